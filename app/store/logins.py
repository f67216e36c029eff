"""Password logins after their hash check, a batch at a time (``hello``).

argon2 runs per login, off the event loop (passwords.py); everything after it is
set-based: `open_batch` opens the sessions of a whole batch of verified logins in
one transaction, so N concurrent logins share one synchronously replicated commit
(as resumes and token logins do: sessions.resume_sessions, device_tokens.login_batch).

The transaction, per batch:

1. ``_LOCK_USERS``: the users' rows, FOR NO KEY UPDATE in id order (one lock order
   for every batch of every worker, and the lock a disable or a password change
   waits for: see the comment above it). The
   rows come back as they are once locked: each login is refused if its account is
   disabled (`Refusal.DISABLED`) or its password hash is no longer the one argon2
   verified (`Refusal.PASSWORD_CHANGED`, answered ``auth_failed``).
2. ``_OPEN``, once per *round*: a fresh snapshot with the users locked, the device
   cap (`Refusal.TOO_MANY_DEVICES`), the device's live session replaced, the new
   session, the devices row and the device token (re)issued. A round holds at most
   one login per user, so the cap counts every earlier login of the batch: a
   user's logins within one batch are opened in arrival order, as if one after the
   other. Hence a device named twice in one batch: **the later login wins** (it
   replaces the session the earlier one opened, which gets its welcome and is then
   told it was replaced, exactly as two logins in a row). Nearly every batch is one
   round.

The throttle's settlement of the right passwords (forget the pairs, give the
addresses their attempts back) is a separate statement with an asynchronous
commit (throttle.settle_rights), run by the caller after this commit: the
counters' rows are then locked for a moment, not across the synchronous commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import asyncpg

from app.store.db import columns


@dataclass(frozen=True, slots=True)
class PasswordLogin:
    """One ``hello`` whose password argon2 found right: the user and the hash it was
    verified against, the hashes of the tokens to issue, and the throttle keys of
    its attempt (settled once the batch commits)."""

    user_id: int
    device: str
    password_hash: str
    device_token_hash: bytes
    resume_token_hash: bytes
    remote_addr: str
    pair_key: str
    addr_key: str | None


class Refusal(Enum):
    DISABLED = "disabled"  # disabled (or gone) when its row was locked
    PASSWORD_CHANGED = "password_changed"  # the hash verified is not the account's any more
    TOO_MANY_DEVICES = "too_many_devices"


@dataclass(frozen=True, slots=True)
class LoginRefused:
    why: Refusal


@dataclass(frozen=True, slots=True)
class LoggedIn:
    """A session a login opened (a password's or a device token's)."""

    session_id: int
    user_id: int
    epoch: int
    replaced_session_id: int | None
    replaced_worker_id: str | None
    last_seq: int
    acked: int
    has_contacts: bool


@dataclass(frozen=True, slots=True)
class LockedUser:
    disabled: bool
    password_hash: str


# FOR NO KEY UPDATE conflicts with the disable's `UPDATE users`
# (dashboard.set_user_disabled) and the password change's (accounts.change_password),
# and all of them take the user's row before any session row, so they serialise in
# one order: if the disable locked the row first, this waits for its commit and reads
# disabled = true; if this locked it first, the disable's UPDATE waits for this
# commit, and its `UPDATE sessions` (a later statement, a later snapshot) sees and
# closes the rows opened here. It also serialises one user's logins across workers,
# so the device count cannot be raced past the cap; it does not conflict with the
# FOR KEY SHARE of foreign-key checks (messages to these users commit meanwhile).
# (FOR KEY SHARE would not do: `disabled` is no key.)
_LOCK_USERS = """
SELECT id, disabled, password_hash FROM users WHERE id = ANY($1::bigint[])
ORDER BY id FOR NO KEY UPDATE
"""


def capped(cap: str) -> str:
    """CTEs ``counted`` (each ``input`` row with its user's live sessions on other
    devices) and ``allowed`` (the rows under the device cap, parameter ``cap``).
    Shared with device_tokens._OPEN."""
    return f"""
counted AS MATERIALIZED (
    SELECT i.*, (SELECT count(*) FROM sessions s WHERE s.user_id = i.user_id
                 AND s.device <> i.device AND s.state <> 'closed') AS others
    FROM input i
),
allowed AS MATERIALIZED (SELECT * FROM counted WHERE others < {cap}::int)"""


def opening(worker: str) -> str:
    """CTEs ``opened`` (a session for each ``allowed`` row, on worker parameter
    ``worker``, its epoch one past the ``old`` one it replaced) and ``known`` (the
    devices rows), then the SELECT of one row per ``counted`` row: `logged_in` reads
    it. Shared with device_tokens._OPEN."""
    return f"""
opened AS (
    INSERT INTO sessions (user_id, device, worker_id, remote_addr, epoch, resume_token_hash)
    SELECT a.user_id, a.device, {worker}, a.remote_addr,
           coalesce((SELECT max(o.epoch) FROM old o WHERE o.ord = a.ord), 0) + 1,
           a.resume_token_hash
    FROM allowed a
    RETURNING id, user_id, device, epoch
),
known AS (
    INSERT INTO devices (user_id, device) SELECT user_id, device FROM allowed
    ON CONFLICT DO NOTHING
)
SELECT c.ord, c.user_id, n.id AS session_id, n.epoch,
       (SELECT o.id FROM old o WHERE o.ord = c.ord ORDER BY o.epoch DESC LIMIT 1)
           AS replaced_session_id,
       (SELECT o.worker_id FROM old o WHERE o.ord = c.ord ORDER BY o.epoch DESC LIMIT 1)
           AS replaced_worker_id,
       (SELECT last_seq FROM inbox_counters ic WHERE ic.user_id = c.user_id) AS last_seq,
       (SELECT acked_seq FROM devices d WHERE d.user_id = c.user_id
           AND d.device = c.device) AS acked,
       EXISTS (SELECT 1 FROM contacts k WHERE k.owner_id = c.user_id
           AND k.status = 'accepted') AS has_contacts
FROM counted c LEFT JOIN opened n ON n.user_id = c.user_id AND n.device = c.device"""


def logged_in(row: asyncpg.Record) -> LoggedIn | None:
    """The session a row of `opening`'s SELECT reports; None: over the device cap."""
    if row["session_id"] is None:
        return None
    return LoggedIn(
        session_id=int(row["session_id"]),
        user_id=int(row["user_id"]),
        epoch=int(row["epoch"]),
        replaced_session_id=row["replaced_session_id"],
        replaced_worker_id=row["replaced_worker_id"],
        last_seq=int(row["last_seq"] or 0),
        acked=int(row["acked"] or 0),
        has_contacts=bool(row["has_contacts"]),
    )


# One login per user (a round). The live sessions to replace are locked first, in id
# order, as the resume batches and the reaper lock them: no deadlock between them.
_OPEN = f"""
WITH input AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::bytea[], $5::text[],
                         $6::int[])
        AS t(user_id, device, device_token_hash, resume_token_hash, remote_addr, ord)
),
{capped("$8")},
live AS MATERIALIZED (
    SELECT s.id, a.ord FROM allowed a
    JOIN sessions s ON s.user_id = a.user_id AND s.device = a.device AND s.state <> 'closed'
    ORDER BY s.id
    FOR UPDATE OF s
),
old AS (
    UPDATE sessions s SET state = 'closed', closed_at = now(), close_reason = 'replaced'
    FROM live l WHERE s.id = l.id AND s.state <> 'closed'
    RETURNING l.ord, s.id, s.worker_id, s.epoch
),
issued AS (
    INSERT INTO device_credentials (user_id, device, token_hash, last_addr)
    SELECT user_id, device, device_token_hash, remote_addr FROM allowed
    ON CONFLICT (user_id, device) DO UPDATE SET token_hash = excluded.token_hash,
        previous_token_hash = NULL, previous_valid_until = NULL, created_at = now(),
        last_used_at = now(), last_addr = excluded.last_addr
),
{opening("$7")}
"""


def plan(
    requests: list[PasswordLogin], users: dict[int, LockedUser]
) -> tuple[list[LoginRefused | None], list[list[int]]]:
    """Refuse what the locked rows refuse, and put the rest in rounds: the k-th login
    of a user within the batch goes in round k (a list of request indexes)."""
    refused: list[LoginRefused | None] = [None] * len(requests)
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for index, request in enumerate(requests):
        user = users.get(request.user_id)
        if user is None or user.disabled:
            refused[index] = LoginRefused(Refusal.DISABLED)
        elif user.password_hash != request.password_hash:
            refused[index] = LoginRefused(Refusal.PASSWORD_CHANGED)
        else:
            k = seen.get(request.user_id, 0)
            seen[request.user_id] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(index)
    return refused, rounds


async def open_batch(
    conn: asyncpg.Connection,
    requests: list[PasswordLogin],
    *,
    worker_id: str,
    max_devices: int,
) -> list[LoggedIn | LoginRefused]:
    """Open the sessions of a batch of verified password logins: one transaction
    (see the module docstring). A retried batch (its commit's outcome unknown) opens
    them again, replacing the sessions the first attempt may have opened: the
    client gets the later one."""
    async with conn.transaction():
        rows = await conn.fetch(_LOCK_USERS, sorted({r.user_id for r in requests}))
        users = {int(r["id"]): LockedUser(bool(r["disabled"]), r["password_hash"]) for r in rows}
        refused, rounds = plan(requests, users)
        result: list[LoggedIn | LoginRefused | None] = list(refused)
        for indexes in rounds:
            chosen = [requests[i] for i in indexes]
            opened = await conn.fetch(
                _OPEN,
                *columns(
                    chosen,
                    "user_id",
                    "device",
                    "device_token_hash",
                    "resume_token_hash",
                    "remote_addr",
                ),
                indexes,
                worker_id,
                max_devices,
            )
            for row in opened:
                result[row["ord"]] = logged_in(row) or LoginRefused(Refusal.TOO_MANY_DEVICES)
    assert all(r is not None for r in result)
    return result  # type: ignore[return-value]
