"""Device tokens (table ``device_credentials``): long-lived, revocable logins per device.

A password ``hello`` issues (or replaces) the device's token in the transaction that
opens its session (logins.open_batch). ``login_token`` presents it: `login_batch`
checks, rotates and opens the sessions of a whole batch of devices in one
transaction of two set-based statements. Only SHA-256 hashes of tokens are stored;
tokens are never logged.

Every writer takes the user's row before the credential row (a login locks ``users``
FOR NO KEY UPDATE, a disable or password change updates it first), so they
serialise in one order: a revocation that committed first leaves a login nothing to
lock; one that waits for a login's commit then closes the session it opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import asyncpg

from app.store.db import columns
from app.store.logins import LoggedIn, capped, logged_in, opening


async def revoke(conn: asyncpg.Connection | asyncpg.Pool, user_id: int, device: str) -> bool:
    """Forget one device's token; False if it had none."""
    status = await conn.execute(
        "DELETE FROM device_credentials WHERE user_id = $1 AND device = $2", user_id, device
    )
    return bool(status != "DELETE 0")


async def revoke_all(conn: asyncpg.Connection, user_id: int, keep_device: str | None = None) -> int:
    """Forget every token of the user (but ``keep_device``'s); call after locking the
    user's row (the disable's or password change's ``UPDATE users``)."""
    status = await conn.execute(
        "DELETE FROM device_credentials WHERE user_id = $1 AND device IS DISTINCT FROM $2",
        user_id,
        keep_device,
    )
    return int(status.split()[-1])


@dataclass(frozen=True, slots=True)
class DeviceToken:
    """A device's token as the dashboard shows it (never the hash)."""

    device: str
    created_at: object
    last_used_at: object
    last_addr: str | None
    expires_at: object


async def devices_of(pool: asyncpg.Pool, user_id: int, ttl_days: float) -> list[DeviceToken]:
    rows = await pool.fetch(
        "SELECT device, created_at, last_used_at, last_addr, "
        "last_used_at + make_interval(secs => $2::float8 * 86400) AS expires_at "
        "FROM device_credentials WHERE user_id = $1 ORDER BY last_used_at DESC",
        user_id,
        ttl_days,
    )
    return [DeviceToken(**dict(r)) for r in rows]


# ---- login_token, a batch at a time ----------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenLogin:
    """One ``login_token``: the presented token's hash, the hashes of the tokens to
    issue, and the throttle keys of its (user, address) and address (None: shared)."""

    username: str
    device: str
    token_hash: bytes
    new_token_hash: bytes
    resume_token_hash: bytes
    remote_addr: str
    pair_key: str
    addr_key: str | None


class Refusal(Enum):
    FAILED = "failed"  # unknown, expired, revoked or already rotated past the overlap
    DISABLED = "disabled"  # a valid token of a disabled account
    THROTTLED = "throttled"  # the pair or the address is waiting off failures
    TOO_MANY_DEVICES = "too_many_devices"


@dataclass(frozen=True, slots=True)
class TokenRefused:
    why: Refusal
    retry_after_s: float = 0.0


# Statement 1: refuse throttled pairs and addresses, then find and lock the valid
# credentials, users first (FOR NO KEY UPDATE: as a password login, see _LOCK_USERS
# in logins.py). A lock that waited re-checks the row it waited for: a token rotated
# or revoked meanwhile is no longer found, a user disabled meanwhile is.
_FIND = """
WITH input AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[])
        WITH ORDINALITY AS t(username, device, token_hash, pair_key, addr_key, ord)
),
blocked AS MATERIALIZED (
    SELECT i.ord, max(extract(epoch FROM t.next_attempt_at - clock_timestamp()))::float8 AS wait_s
    FROM input i JOIN auth_throttle t ON (t.key = i.pair_key)
        OR (t.key = i.addr_key AND t.attempts >= $7::int)
    WHERE t.next_attempt_at > clock_timestamp()
    GROUP BY i.ord
),
hit AS MATERIALIZED (
    SELECT i.ord, u.id AS user_id, u.disabled, c.token_hash = i.token_hash AS current
    FROM input i
    JOIN users u ON u.username = i.username
    JOIN device_credentials c ON c.user_id = u.id AND c.device = i.device
    WHERE i.ord NOT IN (SELECT ord FROM blocked)
      AND (c.token_hash = i.token_hash
           OR (c.previous_token_hash = i.token_hash AND c.previous_valid_until > now()))
      AND c.last_used_at > now() - make_interval(secs => $6::float8 * 86400)
    ORDER BY u.id, c.device
    FOR NO KEY UPDATE OF u
    FOR UPDATE OF c
)
SELECT i.ord, h.user_id, h.disabled, h.current, b.wait_s
FROM input i LEFT JOIN hit h ON h.ord = i.ord LEFT JOIN blocked b ON b.ord = i.ord
ORDER BY i.ord
"""

# Statement 2, a fresh snapshot with the rows locked: the device cap, then rotate the
# tokens, replace each device's live session and open the new one (as logins._OPEN).
_OPEN = f"""
WITH input AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::bool[], $4::bytea[], $5::bytea[],
                         $6::text[], $7::int[])
        AS t(user_id, device, current, new_token_hash, resume_token_hash, remote_addr, ord)
),
{capped("$9")},
rotated AS (
    UPDATE device_credentials c SET
        previous_token_hash = CASE WHEN a.current THEN c.token_hash
                                   ELSE c.previous_token_hash END,
        previous_valid_until = CASE WHEN a.current THEN now() + make_interval(secs => $10::float8)
                                    ELSE c.previous_valid_until END,
        token_hash = a.new_token_hash, last_used_at = now(), last_addr = a.remote_addr
    FROM allowed a WHERE c.user_id = a.user_id AND c.device = a.device
),
old AS (
    UPDATE sessions s SET state = 'closed', closed_at = now(), close_reason = 'replaced'
    FROM allowed a
    WHERE s.user_id = a.user_id AND s.device = a.device AND s.state <> 'closed'
    RETURNING a.ord, s.id, s.worker_id, s.epoch
),
{opening("$8")}
"""


async def login_batch(
    conn: asyncpg.Connection,
    requests: list[TokenLogin],
    *,
    worker_id: str,
    ttl_days: float,
    overlap_s: float,
    max_devices: int,
    addr_failure_limit: int,
) -> list[LoggedIn | TokenRefused]:
    """Log in a batch of devices by their tokens: one transaction, two statements.

    Each valid token (current, or the previous one within its overlap, unexpired,
    of an enabled account, its pair and address not throttled) is rotated to
    ``new_token_hash``, and a session is opened with ``resume_token_hash`` (the
    device's live session replaced, as a ``hello`` would). A device named twice
    in one batch logs in once: the later request is FAILED, as its token was
    just rotated.
    """
    failed = TokenRefused(Refusal.FAILED)
    result: list[LoggedIn | TokenRefused] = [failed] * len(requests)
    async with conn.transaction():
        found = await conn.fetch(
            _FIND,
            *columns(requests, "username", "device", "token_hash", "pair_key", "addr_key"),
            ttl_days,
            addr_failure_limit,
        )
        chosen: dict[tuple[int, str], int] = {}
        for row in found:
            index = row["ord"] - 1
            if row["wait_s"] is not None:
                result[index] = TokenRefused(Refusal.THROTTLED, max(float(row["wait_s"]), 0.0))
            elif row["user_id"] is None:
                continue
            elif row["disabled"]:
                result[index] = TokenRefused(Refusal.DISABLED)
            else:
                chosen.setdefault((row["user_id"], requests[index].device), index)
        if not chosen:
            return result
        picked = sorted(chosen.items(), key=lambda kv: kv[1])
        current = {row["ord"] - 1: bool(row["current"]) for row in found}
        rows = await conn.fetch(
            _OPEN,
            [user_id for (user_id, _), _ in picked],
            [device for (_, device), _ in picked],
            [current[i] for _, i in picked],
            [requests[i].new_token_hash for _, i in picked],
            [requests[i].resume_token_hash for _, i in picked],
            [requests[i].remote_addr for _, i in picked],
            [i for _, i in picked],
            worker_id,
            max_devices,
            overlap_s,
        )
    for row in rows:
        result[row["ord"]] = logged_in(row) or TokenRefused(Refusal.TOO_MANY_DEVICES)
    return result
