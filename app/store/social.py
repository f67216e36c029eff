"""Presence, contacts and rooms."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from app.protocol.push import Kicked, Push
from app.store.errors import Forbidden, NotFound

PUSH_CHANNEL = "sb_push"


async def user_ids(pool: asyncpg.Pool, usernames: list[str]) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT username, id FROM users WHERE username = ANY($1::text[])", usernames
    )
    return {row["username"]: int(row["id"]) for row in rows}


async def require_user(pool: asyncpg.Pool, username: str) -> int:
    found = await user_ids(pool, [username])
    if username not in found:
        raise NotFound(f"no user {username!r}")
    return found[username]


# ---- presence ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PresenceView:
    username: str
    state: str  # online, away, dnd, or offline when no live session
    text: str | None


_EFFECTIVE_PRESENCE = """
    CASE WHEN EXISTS (SELECT 1 FROM sessions s WHERE s.user_id = u.id AND s.state = 'active')
         THEN u.presence_state ELSE 'offline' END
"""


async def set_presence(pool: asyncpg.Pool, user_id: int, state: str, text: str | None) -> None:
    await pool.execute(
        "UPDATE users SET presence_state = $2, status_text = $3 WHERE id = $1",
        user_id,
        state,
        text,
    )


async def presence_of(pool: asyncpg.Pool, user_id: int) -> PresenceView:
    row = await pool.fetchrow(
        f"SELECT u.username, {_EFFECTIVE_PRESENCE} AS state, u.status_text AS text "
        "FROM users u WHERE u.id = $1",
        user_id,
    )
    assert row is not None
    return PresenceView(row["username"], row["state"], row["text"])


async def accepted_contact_ids(pool: asyncpg.Pool, user_id: int) -> list[int]:
    rows = await pool.fetch(
        "SELECT contact_id FROM contacts WHERE owner_id = $1 AND status = 'accepted'", user_id
    )
    return [int(r["contact_id"]) for r in rows]


async def require_contact(pool: asyncpg.Pool, user_id: int, other_id: int) -> None:
    """Forbidden unless ``other_id`` is an accepted contact of ``user_id``."""
    accepted = await pool.fetchval(
        "SELECT 1 FROM contacts WHERE owner_id = $1 AND contact_id = $2 AND status = 'accepted'",
        user_id,
        other_id,
    )
    if not accepted:
        raise Forbidden("that user is not one of your contacts")


def push_key(admin_secret: str) -> bytes:
    """The key that signs ``sb_push`` payloads (derived from the cluster's admin secret)."""
    return hashlib.sha256(b"switchboard sb_push v1:" + admin_secret.encode()).digest()


def sign_push(
    event: Push, key: bytes, *, signed_at_ms: int | None = None, nonce: str | None = None
) -> str:
    """``<mac>|<signed at, ms since the epoch>|<nonce>|<json>``, the MAC over all after
    the first ``|``. Any role that can connect may NOTIFY, PostgreSQL has no permission
    against it: workers act only on payloads signed with the cluster key, and each
    only once and while fresh (`PushWindow`). ``event`` is one of app/protocol/push.py's
    payloads; ``signed_at_ms`` and ``nonce`` are for tests (default: now, 64 random bits).
    """
    if signed_at_ms is None:
        signed_at_ms = int(time.time() * 1000)
    if nonce is None:
        nonce = secrets.token_hex(NONCE_BYTES)
    signed = f"{signed_at_ms}|{nonce}|".encode() + event.encode()
    mac = hmac.new(key, signed, hashlib.sha256).hexdigest()[:32]
    return f"{mac}|{signed.decode()}"


NONCE_BYTES = 8


@dataclass(frozen=True, slots=True)
class SignedPush:
    """A payload ``verify_push`` found signed: when and with which nonce, and the event."""

    signed_at_ms: int
    nonce: int
    event: dict[str, Any]


def verify_push(payload: str, key: bytes) -> SignedPush | None:
    """The decoded payload if ``key`` signed it, else None; `parse_push` reads its event."""
    mac, sep, signed = payload.partition("|")
    if not sep:
        return None
    expected = hmac.new(key, signed.encode(), hashlib.sha256).hexdigest()[:32]
    if not hmac.compare_digest(mac, expected):
        return None
    signed_at, _, rest = signed.partition("|")
    nonce, _, body = rest.partition("|")
    if not signed_at.isdigit() or len(nonce) != 2 * NONCE_BYTES:
        return None
    try:
        event = orjson.loads(body)
        nonce_bits = int(nonce, 16)
    except (orjson.JSONDecodeError, ValueError):
        return None
    if not isinstance(event, dict):
        return None
    return SignedPush(int(signed_at), nonce_bits, event)


class PushWindow:
    """Admits each signed push once, and only within ``max_age_s`` of its signature
    (either way: the signer's clock may run ahead). A captured push replayed later
    is refused: stale once the window has passed, replayed within it.

    It remembers the nonces of the window: about 100 bytes for each push the
    cluster sends in ``max_age_s`` (forgeries never get this far).
    """

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.time) -> None:
        self._max_age_ms = int(max_age_s * 1000)
        self._clock = clock
        # nonce -> when it may be forgotten (ms): past it the push is stale anyway.
        self._seen: dict[int, int] = {}

    def refuses(self, signed: SignedPush) -> str | None:
        """None to admit it (and remember it); else why not: ``stale`` or ``replayed``."""
        now_ms = int(self._clock() * 1000)
        seen = self._seen
        while seen:  # forget, oldest first, what would be stale by now
            oldest = next(iter(seen))
            if seen[oldest] > now_ms:
                break
            del seen[oldest]
        if abs(now_ms - signed.signed_at_ms) > self._max_age_ms:
            return "stale"
        if signed.nonce in seen:
            return "replayed"
        seen[signed.nonce] = max(signed.signed_at_ms, now_ms) + self._max_age_ms
        return None

    def __len__(self) -> int:
        return len(self._seen)


async def push(conn: asyncpg.Pool | asyncpg.Connection, event: Push, key: bytes) -> None:
    """An ephemeral event for the workers (presence, typing, contact requests, kicks).

    On a pool it is a transaction of its own, committed without waiting for the
    synchronous standby: PostgreSQL holds its global notify lock until commit, so
    a synchronously replicated NOTIFY would serialise every push behind the
    replication round trip. Inside a caller's transaction it commits with it.
    """
    if isinstance(conn, asyncpg.Pool):
        await conn.execute(
            "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)",
            PUSH_CHANNEL,
            sign_push(event, key),
        )
    else:
        await conn.execute("SELECT pg_notify($1, $2)", PUSH_CHANNEL, sign_push(event, key))


# (user, session) pairs per signed kick: well under NOTIFY's 8000 bytes.
KICKED_PER_PUSH = 150


async def push_kicked(
    conn: asyncpg.Connection, sessions: list[tuple[int, int]], reason: str, key: bytes
) -> None:
    """Tell the workers to drop these (user, session) connections with ``kicked``,
    when ``conn``'s transaction commits; ``reason`` picks the message
    (``KICKED_MESSAGES`` in app/worker/revoke.py)."""
    for i in range(0, len(sessions), KICKED_PER_PUSH):
        await push(conn, Kicked(sessions[i : i + KICKED_PER_PUSH], reason), key)


# ---- contacts ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContactView:
    username: str
    status: str
    state: str | None
    text: str | None


async def contact_add(pool: asyncpg.Pool, owner_id: int, other_id: int) -> str:
    """Ask ``other_id`` to become a contact; returns the owner's new status with them.

    If they had already asked us, both sides become ``accepted``.
    """
    if owner_id == other_id:
        raise Forbidden("you cannot add yourself")
    async with pool.acquire() as conn, conn.transaction():
        theirs = await conn.fetchval(
            "SELECT status FROM contacts WHERE owner_id = $1 AND contact_id = $2 FOR UPDATE",
            other_id,
            owner_id,
        )
        if theirs in ("pending_out", "accepted"):
            mine, other = "accepted", "accepted"
        else:
            mine, other = "pending_out", "pending_in"
        await conn.execute(
            """
            INSERT INTO contacts (owner_id, contact_id, status) VALUES ($1, $2, $3), ($2, $1, $4)
            ON CONFLICT (owner_id, contact_id) DO UPDATE SET status = excluded.status
            WHERE contacts.status <> 'accepted'
            """,
            owner_id,
            other_id,
            mine,
            other,
        )
        return str(
            await conn.fetchval(
                "SELECT status FROM contacts WHERE owner_id = $1 AND contact_id = $2",
                owner_id,
                other_id,
            )
        )


async def contact_accept(pool: asyncpg.Pool, owner_id: int, other_id: int) -> None:
    async with pool.acquire() as conn, conn.transaction():
        mine = await conn.fetchval(
            "SELECT status FROM contacts WHERE owner_id = $1 AND contact_id = $2 FOR UPDATE",
            owner_id,
            other_id,
        )
        if mine == "accepted":
            return
        if mine != "pending_in":
            raise NotFound("no pending request from that user")
        await conn.execute(
            "UPDATE contacts SET status = 'accepted', since = now() "
            "WHERE (owner_id = $1 AND contact_id = $2) OR (owner_id = $2 AND contact_id = $1)",
            owner_id,
            other_id,
        )


async def contact_remove(pool: asyncpg.Pool, owner_id: int, other_id: int) -> bool:
    result = await pool.execute(
        "DELETE FROM contacts "
        "WHERE (owner_id = $1 AND contact_id = $2) OR (owner_id = $2 AND contact_id = $1)",
        owner_id,
        other_id,
    )
    return bool(result != "DELETE 0")


async def contact_list(pool: asyncpg.Pool, owner_id: int) -> list[ContactView]:
    rows = await pool.fetch(
        f"""
        SELECT u.username, c.status,
               CASE WHEN c.status = 'accepted' THEN {_EFFECTIVE_PRESENCE} END AS state,
               CASE WHEN c.status = 'accepted' THEN u.status_text END AS text
        FROM contacts c JOIN users u ON u.id = c.contact_id
        WHERE c.owner_id = $1 ORDER BY u.username
        """,
        owner_id,
    )
    return [ContactView(r["username"], r["status"], r["state"], r["text"]) for r in rows]


# ---- rooms -------------------------------------------------------------------


async def room_create(pool: asyncpg.Pool, creator_id: int, name: str) -> int:
    async with pool.acquire() as conn, conn.transaction():
        room_id = await conn.fetchval(
            "INSERT INTO rooms (name, created_by) VALUES ($1, $2) RETURNING id", name, creator_id
        )
        await conn.execute(
            "INSERT INTO room_members (room_id, user_id, status) VALUES ($1, $2, 'member')",
            room_id,
            creator_id,
        )
    return int(room_id)


async def _membership(
    conn: asyncpg.Connection | asyncpg.Pool, room_id: int, user_id: int
) -> str | None:
    status = await conn.fetchval(
        "SELECT status FROM room_members WHERE room_id = $1 AND user_id = $2", room_id, user_id
    )
    return None if status is None else str(status)


async def require_member(pool: asyncpg.Pool, room_id: int, user_id: int) -> None:
    if await _membership(pool, room_id, user_id) != "member":
        exists = await pool.fetchval("SELECT 1 FROM rooms WHERE id = $1", room_id)
        if not exists:
            raise NotFound("no such room")
        raise Forbidden("you are not a member of that room")


async def room_invite(pool: asyncpg.Pool, room_id: int, inviter_id: int, user_id: int) -> str:
    await require_member(pool, room_id, inviter_id)
    await pool.execute(
        "INSERT INTO room_members (room_id, user_id, status, invited_by) "
        "VALUES ($1, $2, 'invited', $3) ON CONFLICT DO NOTHING",
        room_id,
        user_id,
        inviter_id,
    )
    return str(await pool.fetchval("SELECT name FROM rooms WHERE id = $1", room_id))


async def room_join(pool: asyncpg.Pool, room_id: int, user_id: int) -> str:
    async with pool.acquire() as conn, conn.transaction():
        name = await conn.fetchval("SELECT name FROM rooms WHERE id = $1", room_id)
        if name is None:
            raise NotFound("no such room")
        status = await _membership(conn, room_id, user_id)
        if status is None:
            raise Forbidden("you were not invited to that room")
        if status == "invited":
            await conn.execute(
                "UPDATE room_members SET status = 'member', since = now() "
                "WHERE room_id = $1 AND user_id = $2",
                room_id,
                user_id,
            )
    return str(name)


async def room_leave(pool: asyncpg.Pool, room_id: int, user_id: int) -> None:
    result = await pool.execute(
        "DELETE FROM room_members WHERE room_id = $1 AND user_id = $2", room_id, user_id
    )
    if result == "DELETE 0":
        raise NotFound("you are not in that room")


async def room_members(pool: asyncpg.Pool, room_id: int, user_id: int) -> list[str]:
    await require_member(pool, room_id, user_id)
    rows = await pool.fetch(
        "SELECT u.username FROM room_members rm JOIN users u ON u.id = rm.user_id "
        "WHERE rm.room_id = $1 AND rm.status = 'member' ORDER BY u.username",
        room_id,
    )
    return [r["username"] for r in rows]


async def room_member_ids(pool: asyncpg.Pool, room_id: int) -> list[int]:
    rows = await pool.fetch(
        "SELECT user_id FROM room_members WHERE room_id = $1 AND status = 'member'", room_id
    )
    return [int(r["user_id"]) for r in rows]


@dataclass(frozen=True, slots=True)
class RoomView:
    room: int
    name: str
    invited_by: str | None  # None: a member; else invited (by this user) and not joined


async def rooms_of(pool: asyncpg.Pool, user_id: int) -> list[RoomView]:
    """The rooms this user belongs to, and those it is invited to and has not joined."""
    rows = await pool.fetch(
        "SELECT r.id, r.name, rm.status, coalesce(u.username, '') AS inviter "
        "FROM room_members rm JOIN rooms r ON r.id = rm.room_id "
        "LEFT JOIN users u ON u.id = rm.invited_by WHERE rm.user_id = $1 ORDER BY r.id",
        user_id,
    )
    return [
        RoomView(
            int(r["id"]),
            str(r["name"]),
            None if r["status"] == "member" else str(r["inviter"]),
        )
        for r in rows
    ]
