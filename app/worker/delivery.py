"""Local delivery: inbox entries to this worker's connections, in seq order.

Every inbox entry is in PostgreSQL before anyone is told of it. A user whose
inbox moved is marked dirty (by our own commits, or by the listener's
``sb_inbox`` notifications from other workers); one pump task per worker
fetches each dirty user's entries after the lowest seq its local sessions have
seen and writes them in seq order. Because the pump reads the tables, a lost
notification costs latency, never a message. Our own 1:1 commits skip the
read: a session that has seen everything before the new entry gets it straight
from the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime

import asyncpg

from app.logs import get_logger
from app.protocol import encode_msg, frames, rfc3339
from app.store import messages as message_store
from app.store.errors import DB_ERRORS
from app.store.eventlog import EventLog
from app.store.messages import InboxEntry, NewMessage, Stored
from app.store.schema import INBOX_KIND_MESSAGE
from app.worker import metrics
from app.worker.announce import Announcer
from app.worker.registry import Registry
from app.worker.states import Peer, Session

log = get_logger("delivery")

# Entries fetched per user per round; a long offline backlog arrives in pages.
INBOX_PAGE_ENTRIES = 500
# Users handled per pump round (one query).
USERS_PER_ROUND = 500


def entry_frame(entry: InboxEntry, names: dict[int, str]) -> bytes:
    """The frame of an inbox entry: a ``msg``, or a ``receipt`` of one of ours read."""
    if entry.kind == INBOX_KIND_MESSAGE:
        room = entry.room_id
        return encode_msg(
            entry.seq,
            entry.message_id,
            names.get(entry.sender_id, "?"),
            None if room is not None else names.get(entry.recipient_id or 0, "?"),
            room,
            entry.body,
            rfc3339(entry.created_at),
            entry.cmid,
        )
    return frames.Receipt(
        entry.seq,
        names.get(entry.actor_id or 0, "?"),
        entry.message_id,
        rfc3339(entry.read_at or entry.created_at),
    ).encode()


class Delivery:
    def __init__(
        self,
        pool: asyncpg.Pool,
        registry: Registry,
        announcer: Announcer,
        events: EventLog,
        interval_s: float,
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._announcer = announcer
        self._events = events
        self._interval = interval_s
        self._dirty: set[int] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def mark_dirty(self, user_ids: Iterable[int]) -> None:
        """Look at these users' inboxes (those with a session here)."""
        local = self._registry.by_user
        self._dirty.update(u for u in user_ids if u in local)
        if self._dirty:
            self._wake.set()

    def mark_moved(self, moved: dict[int, int]) -> None:
        """Inboxes reached these seqs: fetch for local sessions that are behind."""
        local = self._registry.by_user
        for user_id, seq in moved.items():
            conns = local.get(user_id)
            if conns and any(c.session and c.session.delivered_seq < seq for c in conns):
                self._dirty.add(user_id)
        if self._dirty:
            self._wake.set()

    def committed(
        self,
        batch: Sequence[NewMessage],
        results: Sequence[Stored | None],
        moved: dict[int, int],
    ) -> None:
        """Our own commit moved these inboxes: deliver locally now, tell the others soon.

        A local session that has seen everything before a new entry gets the
        entry straight from the batch, with no read back from the database: the
        sending device only moves its position past its own copy (its `sent`
        reply is already written), every other local session gets the ``msg``
        frame. Sessions that are behind (room messages, gaps) are caught up by
        the pump from the tables, in order.
        """
        if self._registry.by_user:
            self._deliver_direct(batch, results)
        self.inbox_moved(moved)

    def inbox_moved(self, moved: dict[int, int]) -> None:
        """Entries up to these seqs exist (stored here): catch up locally, tell the others."""
        self.mark_moved(moved)
        self._announcer.inbox_moved(moved)

    def _deliver_direct(
        self, batch: Sequence[NewMessage], results: Sequence[Stored | None]
    ) -> None:
        local = self._registry.by_user
        now = time.time()
        # Per batch, not per message: one histogram call per commit time (a batch's
        # messages share one) and one `message_delivered` event per session, its
        # highest seq, written at the same moment as the rest.
        commits: Counter[datetime] = Counter()
        marks: dict[int, tuple[Session, int]] = {}  # by id(): a Session is not hashable
        for message, stored in zip(batch, results, strict=True):
            if stored is None or stored.recipient_seq is None or stored.sender_seq is None:
                continue  # refused, resent, or a room message: the pump's job
            targets = [(message.sender_id, stored.sender_seq)]
            if message.recipient_id != message.sender_id:
                targets.append((message.recipient_id or 0, stored.recipient_seq))
            for user_id, seq in targets:
                conns = local.get(user_id)
                if not conns:
                    continue
                frame = b""
                for conn in conns:
                    session = conn.session
                    if session is None or session.delivered_seq != seq - 1 or not conn.writable:
                        continue  # behind or paused: mark_moved hands it to the pump
                    if user_id == message.sender_id and session.device == message.sender_device:
                        session.delivered_seq = seq  # the sending device has it as `sent`
                        continue
                    if not frame:
                        frame = self._direct_frame(message, stored, seq)
                        if not frame:
                            break  # a name not cached: the pump reads it
                    conn.write(frame)
                    session.delivered_seq = seq
                    self.delivered += 1
                    commits[stored.created_at] += 1
                    marks[id(session)] = (session, seq)
        for created_at, count in commits.items():
            metrics.observe_delivery(created_at.timestamp(), now, count)
        for session, seq in marks.values():
            self._events.delivered(session.user_id, session.session_id, session.epoch, seq)

    def _direct_frame(self, message: NewMessage, stored: Stored, seq: int) -> bytes:
        names = self._registry.cached_names
        sender = names.get(message.sender_id)
        recipient = names.get(message.recipient_id or 0)
        if sender is None or recipient is None:
            return b""
        return encode_msg(
            seq,
            stored.id,
            sender,
            recipient,
            None,
            message.body,
            rfc3339(stored.created_at),
            message.cmid,
        )

    # ---- the pump ----------------------------------------------------------
    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._interval
        started = -1e9
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                # Under load, one read per interval serves every inbox that moved
                # meanwhile (each read has a fixed cost); an idle pump reads at once.
                wait = started + interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                started = loop.time()
                users = [self._dirty.pop() for _ in range(min(USERS_PER_ROUND, len(self._dirty)))]
                try:
                    await self._deliver(users)
                except asyncio.CancelledError:
                    raise
                except DB_ERRORS as exc:
                    log.warning("delivery_retry", users=len(users), error=type(exc).__name__)
                    self._dirty.update(users)
                    await asyncio.sleep(0.5)

    async def _deliver(self, users: list[int]) -> None:
        after: dict[int, int] = {}
        for user_id in users:
            conns = [c for c in self._registry.by_user.get(user_id, ()) if c.writable]
            if conns:
                after[user_id] = min(c.session.delivered_seq for c in conns if c.session)
        if not after:
            return
        entries = await message_store.fetch_inboxes(self._pool, after, INBOX_PAGE_ENTRIES)
        by_user: dict[int, list[InboxEntry]] = defaultdict(list)
        ids: set[int] = set()
        for entry in entries:
            by_user[entry.user_id].append(entry)
            ids.add(entry.sender_id)
            if entry.recipient_id is not None:
                ids.add(entry.recipient_id)
            if entry.actor_id is not None:
                ids.add(entry.actor_id)
        names = await self._registry.usernames(ids)
        for user_id, items in by_user.items():
            for conn in list(self._registry.by_user.get(user_id, ())):
                self._write_entries(conn, items, names)
            if len(items) >= INBOX_PAGE_ENTRIES:
                self._dirty.add(user_id)  # more pages to come

    def _write_entries(self, conn: Peer, items: list[InboxEntry], names: dict[int, str]) -> None:
        session = conn.session
        if session is None or not conn.writable:
            return
        now = time.time()
        first_seq = session.delivered_seq
        commits: Counter[datetime] = Counter()
        out: list[bytes] = []  # one write (one syscall) per round, not one per frame
        # Paced: stop once the transport's high-water mark is crossed. Its
        # pause_writing makes the connection unwritable, and resume_writing marks
        # the user dirty again, so the rest of a long backlog follows as the peer
        # reads, never past the hard cap (connection._flush).
        room = conn.write_room
        for entry in items:
            if room <= 0:
                # The rest once this is read: resume_writing marks the user dirty if
                # the transport pauses; if it does not, the next round goes on.
                self._dirty.add(session.user_id)
                self._wake.set()
                break
            if entry.seq <= session.delivered_seq:
                continue
            if entry.seq != session.delivered_seq + 1:
                # Seqs are gap-free and become visible in order; never skip ahead.
                log.warning(
                    "inbox_gap",
                    user=session.username,
                    expected=session.delivered_seq + 1,
                    got=entry.seq,
                )
                break
            own_copy = (
                entry.kind == INBOX_KIND_MESSAGE
                and entry.sender_id == session.user_id
                and entry.sender_device == session.device
            )
            if not own_copy:  # the sending device already has it, as `sent`
                frame = entry_frame(entry, names)
                out.append(frame)
                room -= len(frame)
                self.delivered += 1
                commits[entry.created_at] += 1
            session.delivered_seq = entry.seq
        if out:
            conn.write(b"".join(out))
        for created_at, count in commits.items():
            metrics.observe_delivery(created_at.timestamp(), now, count)
        if session.delivered_seq > first_seq:
            self._events.delivered(
                session.user_id, session.session_id, session.epoch, session.delivered_seq
            )
