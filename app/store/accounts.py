"""Accounts: create, find, change the password (which ends the other sessions).

The counters that throttle password attempts are in throttle.py."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from app.store import device_tokens
from app.store.errors import UserExists
from app.store.social import push_kicked


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


async def has_password_hash(pool: asyncpg.Pool, username: str, password_hash: str) -> bool:
    """Whether ``username`` exists with exactly this (salted, so unique) hash: whether a
    `create_user` whose commit reported an error took effect after all."""
    return bool(
        await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM users WHERE username = $1 AND password_hash = $2)",
            username,
            password_hash,
        )
    )


async def find_user(pool: asyncpg.Pool, username: str) -> Account | None:
    row = await pool.fetchrow(
        "SELECT id, username, password_hash, disabled FROM users WHERE username = $1", username
    )
    return Account(**dict(row)) if row else None


async def change_password(
    pool: asyncpg.Pool, user_id: int, keep_session_id: int, password_hash: str, push_key: bytes
) -> int:
    """Set a new password and end every other session of the user, in one transaction.

    The other sessions are closed (``password_changed``) and their resume tokens
    cleared, and every device token but the changing device's is revoked, so no
    connection or token obtained with the old password outlives
    the change; the signed ``kicked`` push that tells the workers holding them to
    drop the connections leaves when the transaction commits. The session that
    changed the password (``keep_session_id``) stays. Returns how many ended.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash
        )
        # Before the sessions: a token login waiting on the user's row then finds its
        # token gone; one that committed first has its session closed below.
        keep_device = await conn.fetchval(
            "SELECT device FROM sessions WHERE id = $1", keep_session_id
        )
        await device_tokens.revoke_all(conn, user_id, keep_device)
        ended = await conn.fetch(
            "UPDATE sessions SET state = 'closed', closed_at = now(), "
            "close_reason = 'password_changed', resume_token_hash = NULL "
            "WHERE user_id = $1 AND id <> $2 AND state <> 'closed' RETURNING id",
            user_id,
            keep_session_id,
        )
        await push_kicked(
            conn, [(user_id, int(row["id"])) for row in ended], "password_changed", push_key
        )
    return len(ended)
