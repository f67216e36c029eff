"""Who is logged in where: session rows and the workers that hold them."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from app.store.db import columns
from app.store.eventlog import EventKind, log_dead_workers_cte, log_sessions_cte


async def register_worker(
    pool: asyncpg.Pool, worker_id: str, pid: int, address: str, lease_s: float
) -> int:
    """Register (or re-register after a restart) a worker; returns sessions it left behind.

    A restarted worker holds none of its old connections, so any session still
    recorded on it is detached: its client will resume or log in again.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO workers (id, pid, address, state, started_at, lease_expires_at,
                                 renewed_at, overloaded_until)
            VALUES ($1, $2, $3, 'active', now(), now() + make_interval(secs => $4), now(), NULL)
            ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, address = excluded.address,
                state = 'active', started_at = now(), lease_expires_at = excluded.lease_expires_at,
                renewed_at = now(), overloaded_until = NULL
            """,
            worker_id,
            pid,
            address,
            lease_s,
        )
        left = await conn.fetchval(
            "WITH detached AS (UPDATE sessions SET state = 'detached', detached_at = now(), "
            "close_reason = 'worker_restarted' WHERE worker_id = $1 AND state = 'active' "
            "RETURNING id, user_id, epoch, worker_id, close_reason), "
            + log_sessions_cte("detached", EventKind.SESSION_DETACHED)
            + " SELECT count(*) FROM detached",
            worker_id,
        )
    return int(left)


# The application_name of a worker's lease connection (liveness.LeaseKeeper). The
# reaper looks for it in pg_stat_activity: a process that died lost its connection
# with it, one that is merely slow (or stopped) still holds it.
LEASE_APP_PREFIX = "switchboard-lease-"


def lease_application_name(worker_id: str) -> str:
    return LEASE_APP_PREFIX + worker_id


async def renew_lease(
    conn: asyncpg.Connection | asyncpg.Pool,
    worker_id: str,
    lease_s: float,
    overloaded_s: float = 0.0,
) -> bool:
    """Extend this worker's lease; False when others have already declared it dead.

    ``overloaded_s`` > 0: the worker sheds load, and says so until that long from
    now (detached sessions do not expire meanwhile, see `reap`).
    """
    renewed = await conn.fetchval(
        "UPDATE workers SET lease_expires_at = now() + make_interval(secs => $2), "
        "renewed_at = now(), overloaded_until = CASE WHEN $3::float8 > 0 "
        "THEN now() + make_interval(secs => $3) ELSE overloaded_until END "
        "WHERE id = $1 AND state <> 'dead' RETURNING true",
        worker_id,
        lease_s,
        overloaded_s,
    )
    return bool(renewed)


@dataclass(frozen=True, slots=True)
class DeadWorker:
    worker_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Reaped:
    dead: list[DeadWorker]
    detached_users: list[int]
    expired_sessions: int
    # Whether expiry was held back because a live worker reports overload.
    expiry_paused: bool = False

    @property
    def dead_workers(self) -> list[str]:
        return [each.worker_id for each in self.dead]


# Why a worker is dead, in SQL over a `workers` row (w) and the set of workers
# holding a lease connection: its lease ran out (hung, stopped or cut off: it still
# had the whole lease), or its lease connection is gone and it has not renewed
# for dead_after ($1) seconds (the process died: the kernel closed its sockets).
_DEATH_REASON = f"""
    CASE WHEN w.lease_expires_at < now() THEN 'lease expired'
         WHEN w.renewed_at < now() - make_interval(secs => $1)
              AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                              WHERE a.application_name = '{LEASE_APP_PREFIX}' || w.id)
         THEN 'lease connection gone'
    END"""


async def reap(
    pool: asyncpg.Pool, resume_grace_s: float, dead_after_s: float, max_grace_s: float
) -> Reaped:
    """Declare dead workers dead, detach their sessions, expire old detached ones.

    A worker is dead when its lease ran out, or when its lease connection is gone
    and it has not renewed for ``dead_after_s`` (see _DEATH_REASON). Detached
    sessions expire ``resume_grace_s`` after detaching, except while a live worker
    reports overload (its clients may be waiting to be served): then only after
    ``max_grace_s``.

    Any live worker may run this; row locks make each dead worker's sessions
    be detached by exactly one reaper.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""
            WITH verdict AS (
                SELECT w.id, {_DEATH_REASON} AS reason
                FROM workers w WHERE w.state IN ('active', 'draining')
            ), dead AS (
                UPDATE workers w SET state = 'dead' FROM verdict v
                WHERE w.id = v.id AND v.reason IS NOT NULL AND w.state IN ('active', 'draining')
                RETURNING w.id, w.lease_expires_at, w.renewed_at, v.reason
            ), detached AS (
                -- Rows locked in id order, as the resume batches lock them: no deadlock.
                UPDATE sessions SET state = 'detached', detached_at = now(),
                                    close_reason = 'worker_died'
                WHERE id IN (SELECT id FROM sessions WHERE state = 'active'
                             AND worker_id IN (SELECT id FROM dead) ORDER BY id FOR UPDATE)
                  AND state = 'active' AND worker_id IN (SELECT id FROM dead)
                RETURNING id, user_id, epoch, worker_id, close_reason
            ), {log_dead_workers_cte("dead")},
            {log_sessions_cte("detached", EventKind.SESSION_DETACHED)}
            SELECT (SELECT coalesce(array_agg(id ORDER BY id), '{{}}') FROM dead) AS dead_workers,
                   (SELECT coalesce(array_agg(reason ORDER BY id), '{{}}') FROM dead) AS reasons,
                   (SELECT coalesce(array_agg(DISTINCT user_id), '{{}}') FROM detached) AS users,
                   EXISTS (SELECT 1 FROM workers WHERE state IN ('active', 'draining')
                           AND overloaded_until > now()) AS overloaded
            """,
            dead_after_s,
        )
        grace = max_grace_s if row["overloaded"] else resume_grace_s
        expired = await conn.fetchval(
            "WITH expired AS (UPDATE sessions SET state = 'closed', closed_at = now(), "
            "close_reason = 'expired' WHERE id IN (SELECT id FROM sessions "
            "WHERE state = 'detached' AND detached_at < now() - make_interval(secs => $1) "
            "ORDER BY id FOR UPDATE) AND state = 'detached' "
            "AND detached_at < now() - make_interval(secs => $1) "
            "RETURNING id, user_id, epoch, worker_id, close_reason), "
            + log_sessions_cte("expired", EventKind.SESSION_CLOSED)
            + " SELECT count(*) FROM expired",
            grace,
        )
    dead = [DeadWorker(w, r) for w, r in zip(row["dead_workers"], row["reasons"], strict=True)]
    return Reaped(dead, list(row["users"]), int(expired), bool(row["overloaded"]))


async def set_worker_state(pool: asyncpg.Pool, worker_id: str, state: str) -> None:
    await pool.execute("UPDATE workers SET state = $2 WHERE id = $1", worker_id, state)


async def close_session(pool: asyncpg.Pool, session_id: int, epoch: int, reason: str) -> bool:
    """Close a session this owner still holds (same epoch); False if someone took it over."""
    result = await pool.execute(
        "UPDATE sessions SET state = 'closed', closed_at = now(), close_reason = $3 "
        "WHERE id = $1 AND epoch = $2 AND state <> 'closed'",
        session_id,
        epoch,
        reason,
    )
    return bool(result != "UPDATE 0")


async def detach_session(pool: asyncpg.Pool, session_id: int, epoch: int, reason: str) -> bool:
    """The connection is gone but the session stays resumable for the grace period."""
    result = await pool.execute(
        "UPDATE sessions SET state = 'detached', detached_at = now(), close_reason = $3 "
        "WHERE id = $1 AND epoch = $2 AND state = 'active'",
        session_id,
        epoch,
        reason,
    )
    return bool(result != "UPDATE 0")


@dataclass(frozen=True, slots=True)
class ResumedSession:
    session_id: int
    user_id: int
    epoch: int
    previous_worker_id: str
    previous_state: str
    last_seq: int
    acked: int | None
    has_contacts: bool


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    username: str
    device: str
    token_hash: bytes
    new_token_hash: bytes
    remote_addr: str


# `NOT u.disabled` needs no lock on users here: the resume takes over an existing
# row, which it locks FOR UPDATE. A disable that closed the row first makes the
# lock wait and re-read it (closed: not taken); one whose `UPDATE sessions` comes
# after waits for this commit and then closes the resumed row (and kicks it).
_RESUME_BATCH = """
WITH input AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::text[])
        WITH ORDINALITY AS t(username, device, token_hash, new_token_hash, remote_addr, ord)
),
old AS MATERIALIZED (
    SELECT s.id, s.worker_id, s.state, i.ord, i.device, i.new_token_hash, i.remote_addr
    FROM input i
    JOIN users u ON u.username = i.username AND NOT u.disabled
    JOIN sessions s ON s.user_id = u.id AND s.device = i.device
                   AND s.resume_token_hash = i.token_hash
    WHERE s.state = 'active'
       OR (s.state = 'detached' AND (s.detached_at > now() - make_interval(secs => $7)
           OR (s.detached_at > now() - make_interval(secs => $8) AND EXISTS (
               SELECT 1 FROM workers w WHERE w.state IN ('active', 'draining')
                                         AND w.overloaded_until > now()))))
    -- One lock order for every batch of every worker: no deadlocks.
    ORDER BY s.id
    FOR UPDATE OF s
)
UPDATE sessions s SET worker_id = $6, remote_addr = old.remote_addr, state = 'active',
    epoch = s.epoch + 1, resume_token_hash = old.new_token_hash, detached_at = NULL,
    close_reason = NULL, last_seen_at = now()
FROM old WHERE s.id = old.id
RETURNING old.ord, s.id AS session_id, s.user_id, s.epoch,
          old.worker_id AS previous_worker_id, old.state AS previous_state,
          (SELECT last_seq FROM inbox_counters c WHERE c.user_id = s.user_id) AS last_seq,
          (SELECT acked_seq FROM devices d WHERE d.user_id = s.user_id
              AND d.device = old.device) AS acked,
          EXISTS (SELECT 1 FROM contacts c WHERE c.owner_id = s.user_id
              AND c.status = 'accepted') AS has_contacts
"""


async def resume_sessions(
    conn: asyncpg.Connection | asyncpg.Pool,
    requests: list[ResumeRequest],
    worker_id: str,
    resume_grace_s: float,
    max_grace_s: float,
) -> list[ResumedSession | None]:
    """Take over sessions by their resume tokens: a new epoch fences each previous owner.

    A detached session is resumable for ``resume_grace_s`` after it detached, and
    while a live worker reports overload (its clients may be waiting their turn) for
    up to ``max_grace_s`` (as long as `reap` has not expired it meanwhile).

    Each token is rotated: the one presented stops working. None for a token
    that is unknown, already rotated (also by an earlier request of the same
    batch), of an expired session or of a disabled account. One statement for
    the whole batch, so a reconnect storm costs one round trip and one
    synchronous commit per batch; it also returns the inbox positions the
    welcomes report.
    """
    rows = await conn.fetch(
        _RESUME_BATCH,
        *columns(requests, "username", "device", "token_hash", "new_token_hash", "remote_addr"),
        worker_id,
        resume_grace_s,
        max_grace_s,
    )
    result: list[ResumedSession | None] = [None] * len(requests)
    for row in rows:
        values = dict(row)
        index = values.pop("ord") - 1
        result[index] = ResumedSession(**values)
    return result


async def detach_worker_sessions(pool: asyncpg.Pool, worker_id: str, reason: str) -> list[int]:
    """A stopping worker leaves its sessions resumable; returns the users affected."""
    rows = await pool.fetch(
        "WITH detached AS (UPDATE sessions SET state = 'detached', detached_at = now(), "
        "close_reason = $2 WHERE worker_id = $1 AND state = 'active' "
        "RETURNING id, user_id, epoch, worker_id, close_reason), "
        + log_sessions_cte("detached", EventKind.SESSION_DETACHED)
        + " SELECT user_id FROM detached",
        worker_id,
        reason,
    )
    return sorted({int(r["user_id"]) for r in rows})


@dataclass(frozen=True, slots=True)
class StaleSession:
    """A session a worker holds (at ``held_epoch``; ``index``: its place in the arrays
    asked about) whose row says otherwise. ``state`` is None when the row is gone;
    ``disabled`` when the user's account is disabled."""

    index: int
    session_id: int
    held_epoch: int
    state: str | None
    epoch: int | None
    worker_id: str | None
    close_reason: str | None
    disabled: bool


# A merge join of the held ids with the primary key; the disabled users are read once
# per statement (a hashed subplan over the partial index ix_users_disabled), not
# joined per session: ~10 ms per 10,000 sessions.
_RECHECK = """
SELECT h.ord - 1 AS index, h.id AS session_id, h.epoch AS held_epoch, s.state, s.epoch,
       s.worker_id, s.close_reason,
       coalesce(s.user_id IN (SELECT id FROM users WHERE disabled), false) AS disabled
FROM unnest($1::bigint[], $2::int[]) WITH ORDINALITY AS h(id, epoch, ord)
LEFT JOIN sessions s ON s.id = h.id
WHERE s.id IS NULL OR s.state <> 'active' OR s.epoch <> h.epoch OR s.worker_id <> $3
   OR s.user_id IN (SELECT id FROM users WHERE disabled)
"""


async def stale_sessions(
    pool: asyncpg.Pool, worker_id: str, session_ids: list[int], epochs: list[int]
) -> list[StaleSession]:
    """Of the sessions ``worker_id`` holds (``session_ids[i]`` at ``epochs[i]``), those
    whose row is no longer this worker's active session of that epoch, or whose user is
    disabled. Read-only; only the stale rows come back."""
    rows = await pool.fetch(_RECHECK, session_ids, epochs, worker_id)
    return [StaleSession(**dict(row)) for row in rows]
