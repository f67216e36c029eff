"""Messages and inboxes: the durable heart of delivery.

A batch of sends is stored by ONE statement (group commit): arrays in,
``unnest`` out; messages inserted idempotently on (sender, cmid); every
recipient's inbox gets the next gap-free seqs under its counter row, locked in
user-id order so concurrent batches cannot deadlock; one ``pg_notify`` per
chunk of recipients tells the workers whose inboxes moved (ids, not bodies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from app.store.schema import INBOX_KIND_MESSAGE, INBOX_KIND_RECEIPT

INBOX_CHANNEL = "sb_inbox"
# pg_notify payloads are limited to 8000 bytes: 400 ids of up to 19 digits fit.
NOTIFY_CHUNK = 400


@dataclass(frozen=True, slots=True)
class NewMessage:
    sender_id: int
    sender_device: str
    cmid: str
    recipient_id: int | None
    room_id: int | None
    body: str


@dataclass(frozen=True, slots=True)
class Stored:
    """A message as committed: id, server time, and its seq in the sender's inbox."""

    id: int
    created_at: datetime
    sender_seq: int | None


_STORE_BATCH = f"""
WITH input AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                         $6::text[])
        WITH ORDINALITY AS t(sender_id, sender_device, cmid, recipient_id, room_id, body, ord)
),
allowed AS MATERIALIZED (
    SELECT i.* FROM input i
    WHERE i.recipient_id IS NOT NULL
       OR EXISTS (SELECT 1 FROM room_members rm
                  WHERE rm.room_id = i.room_id AND rm.user_id = i.sender_id
                    AND rm.status = 'member')
),
ins AS MATERIALIZED (
    INSERT INTO messages (sender_id, sender_device, cmid, recipient_id, room_id, body)
    SELECT sender_id, sender_device, cmid, recipient_id, room_id, body FROM allowed ORDER BY ord
    ON CONFLICT (sender_id, cmid) DO NOTHING
    RETURNING id, sender_id, cmid, recipient_id, room_id, created_at
),
targets AS MATERIALIZED (
    SELECT id AS message_id, recipient_id AS user_id FROM ins WHERE recipient_id IS NOT NULL
    UNION
    SELECT id, sender_id FROM ins
    UNION
    SELECT ins.id, rm.user_id FROM ins
    JOIN room_members rm ON rm.room_id = ins.room_id AND rm.status = 'member'
),
locked AS MATERIALIZED (
    SELECT user_id, last_seq FROM inbox_counters
    WHERE user_id IN (SELECT user_id FROM targets)
    ORDER BY user_id
    FOR UPDATE
),
numbered AS MATERIALIZED (
    SELECT t.user_id, t.message_id,
           l.last_seq + row_number() OVER (PARTITION BY t.user_id ORDER BY t.message_id) AS seq
    FROM targets t JOIN locked l USING (user_id)
),
bumped AS (
    UPDATE inbox_counters c SET last_seq = n.max_seq
    FROM (SELECT user_id, max(seq) AS max_seq FROM numbered GROUP BY user_id) n
    WHERE c.user_id = n.user_id
),
delivered AS (
    INSERT INTO inbox (user_id, seq, kind, message_id)
    SELECT user_id, seq, {INBOX_KIND_MESSAGE}, message_id FROM numbered
),
notified AS MATERIALIZED (
    SELECT count(pg_notify('{INBOX_CHANNEL}', users)::text) AS n FROM (
        SELECT string_agg(user_id::text, ',') AS users FROM (
            SELECT user_id, (row_number() OVER (ORDER BY user_id) - 1) / {NOTIFY_CHUNK} AS chunk
            FROM (SELECT DISTINCT user_id FROM numbered) d
        ) c GROUP BY chunk
    ) chunks
)
SELECT i.ord, ins.id, ins.created_at, n.seq AS sender_seq, (SELECT n FROM notified) AS notified
FROM ins
JOIN input i ON i.sender_id = ins.sender_id AND i.cmid = ins.cmid
LEFT JOIN numbered n ON n.message_id = ins.id AND n.user_id = ins.sender_id
"""

_FIND_EXISTING = """
SELECT t.ord, m.id, m.created_at,
       (SELECT seq FROM inbox x WHERE x.user_id = m.sender_id AND x.message_id = m.id
        ORDER BY seq DESC LIMIT 1) AS sender_seq
FROM unnest($1::bigint[], $2::text[]) WITH ORDINALITY AS t(sender_id, cmid, ord)
JOIN messages m ON m.sender_id = t.sender_id AND m.cmid = t.cmid
"""


async def store_batch(conn: asyncpg.Connection, batch: Sequence[NewMessage]) -> list[Stored | None]:
    """Store a batch in one statement; per input, what was stored (None: not allowed).

    Safe to retry after an unknown outcome: messages already committed are
    found again by (sender, cmid) and keep their id, timestamp and seq.
    """
    rows = await conn.fetch(
        _STORE_BATCH,
        [m.sender_id for m in batch],
        [m.sender_device for m in batch],
        [m.cmid for m in batch],
        [m.recipient_id for m in batch],
        [m.room_id for m in batch],
        [m.body for m in batch],
    )
    result: list[Stored | None] = [None] * len(batch)
    for row in rows:
        result[row["ord"] - 1] = Stored(row["id"], row["created_at"], row["sender_seq"])
    missing = [i for i, r in enumerate(result) if r is None]
    if missing:
        # Resends (or retries of a batch that did commit): the earlier copy stands.
        found = await conn.fetch(
            _FIND_EXISTING,
            [batch[i].sender_id for i in missing],
            [batch[i].cmid for i in missing],
        )
        for row in found:
            index = missing[row["ord"] - 1]
            result[index] = Stored(row["id"], row["created_at"], row["sender_seq"])
    return result


@dataclass(frozen=True, slots=True)
class InboxEntry:
    user_id: int
    seq: int
    kind: int
    message_id: int
    sender: str
    sender_device: str
    recipient: str | None
    room_id: int | None
    body: str
    cmid: str
    created_at: datetime
    actor: str | None
    read_at: datetime | None


_FETCH_INBOX = """
SELECT i.user_id, i.seq, i.kind, m.id AS message_id, su.username AS sender, m.sender_device,
       ru.username AS recipient, m.room_id, m.body, m.cmid, m.created_at,
       au.username AS actor, r.read_at
FROM unnest($1::bigint[], $2::bigint[]) AS w(user_id, after_seq)
JOIN LATERAL (
    SELECT * FROM inbox x WHERE x.user_id = w.user_id AND x.seq > w.after_seq
    ORDER BY x.seq LIMIT $3
) i ON true
JOIN messages m ON m.id = i.message_id
JOIN users su ON su.id = m.sender_id
LEFT JOIN users ru ON ru.id = m.recipient_id
LEFT JOIN users au ON au.id = i.actor_id
LEFT JOIN receipts r ON i.kind = 2 AND r.message_id = i.message_id AND r.reader_id = i.actor_id
ORDER BY i.user_id, i.seq
"""


async def fetch_inboxes(
    conn: asyncpg.Connection | asyncpg.Pool, after: dict[int, int], per_user: int
) -> list[InboxEntry]:
    """Each user's inbox entries after the given seq, in order, at most ``per_user`` each."""
    users = list(after)
    rows = await conn.fetch(_FETCH_INBOX, users, [after[u] for u in users], per_user)
    return [InboxEntry(**dict(row)) for row in rows]


async def inbox_position(pool: asyncpg.Pool, user_id: int, device: str) -> tuple[int, int]:
    """(the user's last inbox seq, this device's acked seq)."""
    row = await pool.fetchrow(
        "SELECT c.last_seq, coalesce(d.acked_seq, 0) AS acked FROM inbox_counters c "
        "LEFT JOIN devices d ON d.user_id = c.user_id AND d.device = $2 WHERE c.user_id = $1",
        user_id,
        device,
    )
    return (int(row["last_seq"]), int(row["acked"])) if row else (0, 0)


async def ack(pool: asyncpg.Pool, user_id: int, device: str, seq: int) -> int:
    """Move the device's acked position forward (never back, never past the inbox)."""
    value = await pool.fetchval(
        """
        UPDATE devices d SET acked_seq = greatest(d.acked_seq, least($3, c.last_seq)),
                             updated_at = now()
        FROM inbox_counters c
        WHERE d.user_id = $1 AND d.device = $2 AND c.user_id = d.user_id
        RETURNING d.acked_seq
        """,
        user_id,
        device,
        seq,
    )
    return int(value or 0)


async def add_receipt(pool: asyncpg.Pool, reader_id: int, message_id: int) -> bool | None:
    """Record that ``reader_id`` read a message; the author gets an inbox entry.

    None: no such message visible to the reader. False: already recorded (or
    the reader's own message), nothing new.
    """
    async with pool.acquire() as conn, conn.transaction():
        msg = await conn.fetchrow(
            """
            SELECT m.sender_id FROM messages m WHERE m.id = $2 AND (
                m.recipient_id = $1 OR m.sender_id = $1 OR EXISTS (
                    SELECT 1 FROM room_members rm WHERE rm.room_id = m.room_id
                    AND rm.user_id = $1 AND rm.status = 'member'))
            """,
            reader_id,
            message_id,
        )
        if msg is None:
            return None
        author = int(msg["sender_id"])
        if author == reader_id:
            return False
        inserted = await conn.fetchval(
            "INSERT INTO receipts (message_id, reader_id) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING RETURNING 1",
            message_id,
            reader_id,
        )
        if not inserted:
            return False
        seq = await conn.fetchval(
            "UPDATE inbox_counters SET last_seq = last_seq + 1 WHERE user_id = $1 "
            "RETURNING last_seq",
            author,
        )
        await conn.execute(
            "INSERT INTO inbox (user_id, seq, kind, message_id, actor_id) "
            "VALUES ($1, $2, $3, $4, $5)",
            author,
            seq,
            INBOX_KIND_RECEIPT,
            message_id,
            reader_id,
        )
        await conn.execute("SELECT pg_notify($1, $2)", INBOX_CHANNEL, str(author))
    return True


@dataclass(frozen=True, slots=True)
class HistoryRow:
    id: int
    sender: str
    recipient: str | None
    room_id: int | None
    body: str
    cmid: str
    created_at: datetime


async def conversation(
    pool: asyncpg.Pool,
    user_id: int,
    *,
    other_id: int | None,
    room_id: int | None,
    before: int | None,
    limit: int,
) -> list[HistoryRow]:
    """Newest first; ``limit + 1`` rows are asked for so the caller knows if there is more."""
    before_id = before if before is not None else 2**62
    if other_id is not None:
        sql = """
            SELECT m.id, su.username AS sender, ru.username AS recipient, m.room_id, m.body,
                   m.cmid, m.created_at
            FROM messages m JOIN users su ON su.id = m.sender_id
            LEFT JOIN users ru ON ru.id = m.recipient_id
            WHERE least(m.sender_id, m.recipient_id) = least($1::bigint, $2::bigint)
              AND greatest(m.sender_id, m.recipient_id) = greatest($1::bigint, $2::bigint)
              AND m.recipient_id IS NOT NULL AND m.id < $3
            ORDER BY m.id DESC LIMIT $4
        """
        rows = await pool.fetch(sql, user_id, other_id, before_id, limit + 1)
    else:
        sql = """
            SELECT m.id, su.username AS sender, NULL::text AS recipient, m.room_id, m.body,
                   m.cmid, m.created_at
            FROM messages m JOIN users su ON su.id = m.sender_id
            WHERE m.room_id = $1 AND m.room_id IS NOT NULL AND m.id < $2
            ORDER BY m.id DESC LIMIT $3
        """
        rows = await pool.fetch(sql, room_id, before_id, limit + 1)
    return [HistoryRow(**dict(row)) for row in rows]
