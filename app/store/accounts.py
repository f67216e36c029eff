"""Accounts and the login rate limiter's counters."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from app.store.errors import UserExists


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    username: str
    password_hash: str
    disabled: bool


async def create_user(pool: asyncpg.Pool, username: str, password_hash: str) -> int:
    async with pool.acquire() as conn, conn.transaction():
        user_id = await conn.fetchval(
            "INSERT INTO users (username, password_hash) VALUES ($1, $2) "
            "ON CONFLICT (username) DO NOTHING RETURNING id",
            username,
            password_hash,
        )
        if user_id is None:
            raise UserExists(username)
        await conn.execute("INSERT INTO inbox_counters (user_id) VALUES ($1)", user_id)
        return int(user_id)


async def find_user(pool: asyncpg.Pool, username: str) -> Account | None:
    row = await pool.fetchrow(
        "SELECT id, username, password_hash, disabled FROM users WHERE username = $1", username
    )
    return Account(**dict(row)) if row else None


async def set_password(pool: asyncpg.Pool, user_id: int, password_hash: str) -> None:
    await pool.execute("UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash)


async def failure_counts(pool: asyncpg.Pool, keys: list[str], window_s: float) -> dict[str, int]:
    """Failed logins per key within the current window (absent keys count 0)."""
    rows = await pool.fetch(
        "SELECT key, failures FROM login_failures "
        "WHERE key = ANY($1::text[]) AND window_started_at > now() - make_interval(secs => $2)",
        keys,
        window_s,
    )
    counts = dict.fromkeys(keys, 0)
    counts.update({row["key"]: int(row["failures"]) for row in rows})
    return counts


async def record_failure(pool: asyncpg.Pool, keys: list[str], window_s: float) -> None:
    await pool.execute(
        """
        INSERT INTO login_failures AS f (key, failures, window_started_at)
        SELECT k, 1, now() FROM unnest($1::text[]) AS k
        ON CONFLICT (key) DO UPDATE SET
            failures = CASE WHEN f.window_started_at > now() - make_interval(secs => $2)
                            THEN f.failures + 1 ELSE 1 END,
            window_started_at = CASE WHEN f.window_started_at > now() - make_interval(secs => $2)
                            THEN f.window_started_at ELSE now() END
        """,
        keys,
        window_s,
    )


async def clear_failures(pool: asyncpg.Pool, key: str) -> None:
    await pool.execute("DELETE FROM login_failures WHERE key = $1", key)
