"""Who is logged in where: session rows and the workers that hold them."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True, slots=True)
class OpenedSession:
    session_id: int
    epoch: int
    replaced_session_id: int | None
    replaced_worker_id: str | None


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
            INSERT INTO workers (id, pid, address, state, started_at, lease_expires_at)
            VALUES ($1, $2, $3, 'active', now(), now() + make_interval(secs => $4))
            ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, address = excluded.address,
                state = 'active', started_at = now(), lease_expires_at = excluded.lease_expires_at
            """,
            worker_id,
            pid,
            address,
            lease_s,
        )
        result: str = await conn.execute(
            "UPDATE sessions SET state = 'detached', detached_at = now(), "
            "close_reason = 'worker_restarted' WHERE worker_id = $1 AND state = 'active'",
            worker_id,
        )
    return int(result.split()[-1])


async def renew_lease(pool: asyncpg.Pool, worker_id: str, lease_s: float) -> None:
    await pool.execute(
        "UPDATE workers SET lease_expires_at = now() + make_interval(secs => $2) WHERE id = $1",
        worker_id,
        lease_s,
    )


async def set_worker_state(pool: asyncpg.Pool, worker_id: str, state: str) -> None:
    await pool.execute("UPDATE workers SET state = $2 WHERE id = $1", worker_id, state)


async def open_session(
    pool: asyncpg.Pool,
    user_id: int,
    device: str,
    worker_id: str,
    remote_addr: str,
    resume_token_hash: bytes | None = None,
) -> OpenedSession:
    """Record a new session; a live session of the same device is replaced (one per device)."""
    async with pool.acquire() as conn, conn.transaction():
        old = await conn.fetchrow(
            "UPDATE sessions SET state = 'closed', closed_at = now(), close_reason = 'replaced' "
            "WHERE user_id = $1 AND device = $2 AND state <> 'closed' "
            "RETURNING id, worker_id, epoch",
            user_id,
            device,
        )
        epoch = (old["epoch"] + 1) if old else 1
        session_id = await conn.fetchval(
            "INSERT INTO sessions (user_id, device, worker_id, remote_addr, epoch, "
            "resume_token_hash) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            user_id,
            device,
            worker_id,
            remote_addr,
            epoch,
            resume_token_hash,
        )
        await conn.execute(
            "INSERT INTO devices (user_id, device) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            user_id,
            device,
        )
    return OpenedSession(
        int(session_id),
        epoch,
        int(old["id"]) if old else None,
        str(old["worker_id"]) if old else None,
    )


async def close_session(pool: asyncpg.Pool, session_id: int, reason: str) -> None:
    await pool.execute(
        "UPDATE sessions SET state = 'closed', closed_at = now(), close_reason = $2 "
        "WHERE id = $1 AND state <> 'closed'",
        session_id,
        reason,
    )


async def close_worker_sessions(pool: asyncpg.Pool, worker_id: str, reason: str) -> None:
    await pool.execute(
        "UPDATE sessions SET state = 'closed', closed_at = now(), close_reason = $2 "
        "WHERE worker_id = $1 AND state <> 'closed'",
        worker_id,
        reason,
    )
