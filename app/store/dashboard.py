"""The dashboard's queries: admin accounts and sessions, live aggregates, paginated lists.

Every list is paginated and every total is aggregated in PostgreSQL, so a page
costs the same with ten sessions or ten thousand. Queries on live sessions say
``state <> 'closed'``, the predicate of the partial indexes on ``sessions``: the
table keeps every closed session, the live ones are a small part of it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

from app.protocol.push import Kicked
from app.store import device_tokens
from app.store.errors import AdminExists
from app.store.social import push

# ---- admin accounts and their dashboard sessions -----------------------------


@dataclass(frozen=True, slots=True)
class Admin:
    id: int
    username: str
    password_hash: str
    disabled: bool


@dataclass(frozen=True, slots=True)
class AdminSession:
    admin_id: int
    username: str
    disabled: bool
    csrf_token: str
    idle_s: float
    age_s: float


async def create_admin(pool: asyncpg.Pool, username: str, password_hash: str) -> int:
    admin_id = await pool.fetchval(
        "INSERT INTO admins (username, password_hash) VALUES ($1, $2) "
        "ON CONFLICT (username) DO NOTHING RETURNING id",
        username,
        password_hash,
    )
    if admin_id is None:
        raise AdminExists(username)
    return int(admin_id)


async def set_admin_password(pool: asyncpg.Pool, username: str, password_hash: str) -> bool:
    """Set an admin's password (and re-enable it), signing out all its sessions."""
    async with pool.acquire() as conn, conn.transaction():
        admin_id = await conn.fetchval(
            "UPDATE admins SET password_hash = $2, disabled = false WHERE username = $1 "
            "RETURNING id",
            username,
            password_hash,
        )
        if admin_id is None:
            return False
        await conn.execute("DELETE FROM admin_sessions WHERE admin_id = $1", admin_id)
    return True


async def find_admin(pool: asyncpg.Pool, username: str) -> Admin | None:
    row = await pool.fetchrow(
        "SELECT id, username, password_hash, disabled FROM admins WHERE username = $1", username
    )
    return Admin(**dict(row)) if row else None


async def open_admin_session(
    pool: asyncpg.Pool, admin_id: int, token_hash: bytes, csrf_token: str, remote_addr: str
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO admin_sessions (token_hash, admin_id, csrf_token, remote_addr) "
            "VALUES ($1, $2, $3, $4)",
            token_hash,
            admin_id,
            csrf_token,
            remote_addr,
        )
        await conn.execute("UPDATE admins SET last_login_at = now() WHERE id = $1", admin_id)


async def admin_session(pool: asyncpg.Pool, token_hash: bytes) -> AdminSession | None:
    row = await pool.fetchrow(
        """
        SELECT s.admin_id, a.username, a.disabled, s.csrf_token,
               extract(epoch FROM now() - s.last_seen_at)::float8 AS idle_s,
               extract(epoch FROM now() - s.created_at)::float8 AS age_s
        FROM admin_sessions s JOIN admins a ON a.id = s.admin_id
        WHERE s.token_hash = $1
        """,
        token_hash,
    )
    return AdminSession(**dict(row)) if row else None


async def touch_admin_session(pool: asyncpg.Pool, token_hash: bytes) -> None:
    await pool.execute(
        "UPDATE admin_sessions SET last_seen_at = now() WHERE token_hash = $1", token_hash
    )


async def close_admin_session(pool: asyncpg.Pool, token_hash: bytes) -> None:
    await pool.execute("DELETE FROM admin_sessions WHERE token_hash = $1", token_hash)


async def prune_admin_sessions(pool: asyncpg.Pool, idle_s: float, max_age_s: float) -> int:
    result = await pool.execute(
        "DELETE FROM admin_sessions WHERE last_seen_at < now() - make_interval(secs => $1) "
        "OR created_at < now() - make_interval(secs => $2)",
        idle_s,
        max_age_s,
    )
    return int(result.split()[-1])


# ---- live aggregates for the overview and the workers page --------------------


@dataclass(frozen=True, slots=True)
class WorkerSessions:
    active: int
    detached: int


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    id: str
    pid: int
    address: str
    state: str
    started_at: dt.datetime
    lease_left_s: float


@dataclass(frozen=True, slots=True)
class LiveTotals:
    active: int
    detached: int
    users_online: int
    last_message_id: int
    by_worker: dict[str, WorkerSessions]
    workers: tuple[WorkerRecord, ...]


async def live_totals(pool: asyncpg.Pool, counted: LiveTotals | None = None) -> LiveTotals:
    """The live view's figures from the database. The session counts scan every live
    session (75-80 ms at 200,000, docs/benchmarks.md); with ``counted`` they are taken
    from it, and only the cheap parts (the newest message id, the workers' leases) are
    read again."""
    async with pool.acquire() as conn:
        if counted is None:
            rows = await conn.fetch(
                """
                SELECT worker_id,
                       count(*) FILTER (WHERE state = 'active') AS active,
                       count(*) FILTER (WHERE state = 'detached') AS detached
                FROM sessions WHERE state <> 'closed' GROUP BY worker_id
                """
            )
            users_online = await conn.fetchval(
                "SELECT count(DISTINCT user_id) FROM sessions "
                "WHERE state <> 'closed' AND state = 'active'"
            )
            by_worker = {
                str(r["worker_id"]): WorkerSessions(int(r["active"]), int(r["detached"]))
                for r in rows
            }
        else:
            by_worker, users_online = counted.by_worker, counted.users_online
        last_message_id = await conn.fetchval("SELECT coalesce(max(id), 0) FROM messages")
        workers = await conn.fetch(
            "SELECT id, pid, address, state, started_at, "
            "extract(epoch FROM lease_expires_at - now())::float8 AS lease_left_s "
            "FROM workers ORDER BY id"
        )
    return LiveTotals(
        active=sum(w.active for w in by_worker.values()),
        detached=sum(w.detached for w in by_worker.values()),
        users_online=int(users_online),
        last_message_id=int(last_message_id),
        by_worker=by_worker,
        workers=tuple(WorkerRecord(**dict(r)) for r in workers),
    )


# ---- sessions: search, pages, kick ---------------------------------------------

LIVE_STATES = ("live", "active", "detached")


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: int
    user_id: int
    username: str
    device: str
    worker_id: str
    remote_addr: str
    state: str
    epoch: int
    connected_at: dt.datetime
    last_seen_at: dt.datetime
    detached_at: dt.datetime | None
    close_reason: str | None


@dataclass(frozen=True, slots=True)
class SessionPage:
    rows: tuple[SessionRow, ...]
    total: int
    next_before: int | None  # the keyset of the next (older) page, if there is one


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def session_page(
    pool: asyncpg.Pool,
    *,
    user: str = "",
    worker: str = "",
    state: str = "live",
    before: int | None = None,
    limit: int = 50,
) -> SessionPage:
    """Live sessions, newest first, filtered by user name prefix, worker and state."""
    where = ["s.state <> 'closed'"]
    args: list[object] = []
    if state in ("active", "detached"):
        args.append(state)
        where.append(f"s.state = ${len(args)}")
    if worker:
        args.append(worker)
        where.append(f"s.worker_id = ${len(args)}")
    if user:
        args.append(_like_prefix(user))
        where.append(f"u.username LIKE ${len(args)}")
    filters = " AND ".join(where)
    count_args = list(args)
    if before is not None:
        args.append(before)
        where.append(f"s.id < ${len(args)}")
    args.append(limit + 1)
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"""
            SELECT s.id, s.user_id, u.username, s.device, s.worker_id, s.remote_addr, s.state,
                   s.epoch, s.connected_at, s.last_seen_at, s.detached_at, s.close_reason
            FROM sessions s JOIN users u ON u.id = s.user_id
            WHERE {" AND ".join(where)}
            ORDER BY s.id DESC LIMIT ${len(args)}
            """,
            *args,
        )
        total = await conn.fetchval(
            f"SELECT count(*) FROM sessions s JOIN users u ON u.id = s.user_id WHERE {filters}",
            *count_args,
        )
    page = tuple(SessionRow(**dict(r)) for r in rows[:limit])
    return SessionPage(page, int(total), page[-1].id if len(rows) > limit else None)


# (user, session) pairs per signed push: well under NOTIFY's 8000 bytes.
KICKED_CHUNK = 150


async def kick_session(
    pool: asyncpg.Pool, session_id: int, key: bytes, reason: str = "kicked"
) -> int | None:
    """Close a live session and tell whichever worker holds it to drop the connection.

    The same two steps as a new login of the device on a worker (``logins.open_batch``
    then ``Delivery.replace_session``): the row is closed first, so a resume
    cannot take it back, then ``sb_push`` reaches every worker, and the one
    holding the connection closes it with ``kicked``. The notification
    leaves on commit, after the row is closed. Returns the user id, or None
    when the session was not live.
    """
    async with pool.acquire() as conn, conn.transaction():
        user_id = await conn.fetchval(
            "UPDATE sessions SET state = 'closed', closed_at = now(), close_reason = $2 "
            "WHERE id = $1 AND state <> 'closed' RETURNING user_id",
            session_id,
            reason,
        )
        if user_id is None:
            return None
        await push(conn, Kicked([(int(user_id), session_id)], reason), key)
    return int(user_id)


# ---- users ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserRow:
    id: int
    username: str
    disabled: bool
    created_at: dt.datetime
    live_sessions: int


@dataclass(frozen=True, slots=True)
class UserPage:
    rows: tuple[UserRow, ...]
    next_after: str | None


async def user_page(
    pool: asyncpg.Pool, *, prefix: str = "", after: str = "", limit: int = 50
) -> UserPage:
    """Users in name order from ``after`` on, with their live session counts."""
    rows = await pool.fetch(
        """
        SELECT u.id, u.username, u.disabled, u.created_at,
               (SELECT count(*) FROM sessions s
                WHERE s.user_id = u.id AND s.state <> 'closed') AS live_sessions
        FROM users u
        WHERE u.username LIKE $1 AND u.username > $2
        ORDER BY u.username LIMIT $3
        """,
        _like_prefix(prefix),
        after,
        limit + 1,
    )
    page = tuple(UserRow(**dict(r)) for r in rows[:limit])
    return UserPage(page, page[-1].username if len(rows) > limit else None)


async def set_user_disabled(
    pool: asyncpg.Pool, username: str, disabled: bool, key: bytes
) -> int | None:
    """Disable or enable an account; disabling also kicks its live sessions.

    Returns how many sessions were kicked, or None when there is no such user.
    """
    async with pool.acquire() as conn, conn.transaction():
        user_id = await conn.fetchval(
            "UPDATE users SET disabled = $2 WHERE username = $1 RETURNING id", username, disabled
        )
        if user_id is None:
            return None
        if not disabled:
            return 0
        # Before the sessions (see device_tokens): no token logs in again.
        await device_tokens.revoke_all(conn, int(user_id))
        kicked = await conn.fetch(
            "UPDATE sessions SET state = 'closed', closed_at = now(), close_reason = 'disabled' "
            "WHERE user_id = $1 AND state <> 'closed' RETURNING id",
            user_id,
        )
        sessions = [(int(user_id), int(row["id"])) for row in kicked]
        for i in range(0, len(sessions), KICKED_CHUNK):
            await push(conn, Kicked(sessions[i : i + KICKED_CHUNK], "disabled"), key)
    return len(kicked)


# ---- a user's devices -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserDevices:
    user: UserRow
    devices: tuple[device_tokens.DeviceToken, ...]


async def user_devices(pool: asyncpg.Pool, username: str, ttl_days: float) -> UserDevices | None:
    """A user and the devices that hold a token (last use, address, expiry)."""
    row = await pool.fetchrow(
        "SELECT u.id, u.username, u.disabled, u.created_at, "
        "(SELECT count(*) FROM sessions s WHERE s.user_id = u.id AND s.state <> 'closed') "
        "AS live_sessions FROM users u WHERE u.username = $1",
        username,
    )
    if row is None:
        return None
    user = UserRow(**dict(row))
    devices = await device_tokens.devices_of(pool, user.id, ttl_days)
    return UserDevices(user, tuple(devices))


async def revoke_device(
    pool: asyncpg.Pool, username: str, device: str, key: bytes
) -> tuple[bool, int] | None:
    """Revoke a device's token and kick its live session (as `kick_session` does):
    (whether it had a token, sessions kicked); None when there is no such user."""
    async with pool.acquire() as conn, conn.transaction():
        # The user's row first, like every other writer of device_credentials.
        user_id = await conn.fetchval(
            "SELECT id FROM users WHERE username = $1 FOR NO KEY UPDATE", username
        )
        if user_id is None:
            return None
        had = await device_tokens.revoke(conn, int(user_id), device)
        kicked = await conn.fetch(
            "UPDATE sessions SET state = 'closed', closed_at = now(), "
            "close_reason = 'device_revoked' "
            "WHERE user_id = $1 AND device = $2 AND state <> 'closed' RETURNING id",
            user_id,
            device,
        )
        if kicked:
            sessions = [(int(user_id), int(row["id"])) for row in kicked]
            await push(conn, Kicked(sessions, "device_revoked"), key)
    return had, len(kicked)


# ---- events, as far as the tables tell ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    at: dt.datetime
    kind: str  # the events log's kind, or login, resume, detach, worker_dead, worker_stopped
    subject: str
    detail: str


async def recent_events(pool: asyncpg.Pool, limit: int = 30) -> list[Event]:
    """Recent logins, resumes, detaches and worker deaths, newest first.

    Each part reads an index: logins the primary key, resumes and detaches the
    partial index of live sessions, workers its own small table.
    """
    async with pool.acquire() as conn:
        logins = await conn.fetch(
            "SELECT s.connected_at AS at, u.username, s.device, s.worker_id, s.remote_addr "
            "FROM sessions s JOIN users u ON u.id = s.user_id ORDER BY s.id DESC LIMIT $1",
            limit,
        )
        resumes = await conn.fetch(
            "SELECT s.last_seen_at AS at, u.username, s.device, s.worker_id, s.remote_addr "
            "FROM sessions s JOIN users u ON u.id = s.user_id "
            "WHERE s.state <> 'closed' AND s.last_seen_at > s.connected_at "
            "ORDER BY s.last_seen_at DESC LIMIT $1",
            limit,
        )
        detaches = await conn.fetch(
            "SELECT s.detached_at AS at, u.username, s.device, s.worker_id, s.close_reason "
            "FROM sessions s JOIN users u ON u.id = s.user_id "
            "WHERE s.state <> 'closed' AND s.state = 'detached' "
            "ORDER BY s.detached_at DESC LIMIT $1",
            limit,
        )
        workers = await conn.fetch(
            "SELECT id, state, lease_expires_at AS at, address FROM workers "
            "WHERE state IN ('dead', 'stopped') ORDER BY lease_expires_at DESC LIMIT $1",
            limit,
        )
    events = [
        Event(
            r["at"],
            "login",
            f"{r['username']}/{r['device']}",
            f"on {r['worker_id']} from {r['remote_addr']}",
        )
        for r in logins
    ]
    events += [
        Event(
            r["at"],
            "resume",
            f"{r['username']}/{r['device']}",
            f"on {r['worker_id']} from {r['remote_addr']}",
        )
        for r in resumes
    ]
    events += [
        Event(
            r["at"],
            "detach",
            f"{r['username']}/{r['device']}",
            f"from {r['worker_id']}: {r['close_reason'] or '?'}",
        )
        for r in detaches
    ]
    events += [
        Event(r["at"], f"worker_{r['state']}", str(r["id"]), f"lease ran out at {r['at']:%H:%M:%S}")
        if r["state"] == "dead"
        else Event(r["at"], f"worker_{r['state']}", str(r["id"]), str(r["address"]))
        for r in workers
    ]
    return events


# Per-message kinds: far too many for a page of recent events.
MESSAGE_EVENT_KINDS = ("message_delivered", "message_acked")


async def logged_events(
    pool: asyncpg.Pool, limit: int = 100, window_s: float = 86400.0
) -> list[Event] | None:
    """The newest session, worker and database events from the events log (issue #6).

    None when the database has no ``events`` table (yet).
    """
    if not await pool.fetchval("SELECT to_regclass('public.events') IS NOT NULL"):
        return None
    rows = await pool.fetch(
        """
        SELECT e.at, e.kind, e.worker_id, u.username, e.session_id, e.epoch, e.reason,
               e.detail::text AS detail
        FROM events e LEFT JOIN users u ON u.id = e.user_id
        WHERE e.at > now() - make_interval(secs => $2) AND e.kind <> ALL($3::text[])
        ORDER BY e.at DESC LIMIT $1
        """,
        limit,
        window_s,
        list(MESSAGE_EVENT_KINDS),
        timeout=3.0,
    )
    events = []
    for r in rows:
        if r["username"] is not None:
            subject = f"{r['username']} (session {r['session_id']}, epoch {r['epoch']})"
        else:
            subject = r["worker_id"] or "cluster"
        parts = [f"on {r['worker_id']}" if r["worker_id"] and r["username"] else ""]
        parts += [r["reason"] or "", (r["detail"] or "")[:160]]
        events.append(Event(r["at"], str(r["kind"]), subject, " · ".join(p for p in parts if p)))
    return events
