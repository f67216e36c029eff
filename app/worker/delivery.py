"""Cross-worker delivery: LISTEN for inbox pointers, then pump inbox rows to sockets.

Writers NOTIFY ``sb_inbox`` with the ids of users whose inboxes moved; every
worker listens (through HAProxy's primary port) and marks those of its users
dirty. One pump task per worker fetches each dirty user's entries after the
lowest seq its local sessions have seen and writes them in seq order. Because
the pump reads the tables, a lost notification (listener reconnecting after a
failover) costs latency, never a message: on every (re)connect of the listener
all local users are marked dirty and caught up.

``sb_push`` carries ephemeral frames (presence, typing, contact requests) for
named users; they are written to local sessions and never stored. It also
carries session replacements (a new login of the device) and kicks (the
dashboard), which close the connection holding the session.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from app.logs import get_logger
from app.protocol import ErrorCode, encode
from app.store import messages as message_store
from app.store.errors import DB_ERRORS
from app.store.eventlog import primary_identity
from app.store.messages import INBOX_CHANNEL, InboxEntry, NewMessage, Stored
from app.store.schema import INBOX_KIND_MESSAGE
from app.store.social import PUSH_CHANNEL, push, verify_push
from app.worker import metrics

if TYPE_CHECKING:
    from app.worker.connection import ClientConnection
    from app.worker.server import Worker

log = get_logger("delivery")

# Entries fetched per user per round; a long offline backlog arrives in pages.
PAGE = 500
# Users handled per pump round (one query).
USERS_PER_ROUND = 500
PUSH_CHUNK = 300
# (user, session, epoch) triples per signed push: well under NOTIFY's 8000 bytes.
REPLACED_CHUNK = 150
# The `kicked` error's message, by the reason the dashboard gave.
KICKED_MESSAGES = {
    "kicked": "an administrator closed this session",
    "disabled": "this account was disabled",
}


_last_ts: list[Any] = [None, ""]


def rfc3339(ts: Any) -> str:
    """UTC with milliseconds, 2026-11-26T14:46:12.185Z (PostgreSQL hands us UTC).

    Every message of a batch has the same timestamp (its transaction's start),
    so the last conversion is kept: most calls are answered from it.
    """
    if ts == _last_ts[0]:
        return str(_last_ts[1])
    text = str(ts.isoformat(timespec="milliseconds")).replace("+00:00", "Z")
    _last_ts[0], _last_ts[1] = ts, text
    return text


def entry_frame(entry: InboxEntry, names: dict[int, str]) -> bytes:
    if entry.kind == INBOX_KIND_MESSAGE:
        frame: dict[str, Any] = {
            "op": "msg",
            "seq": entry.seq,
            "id": entry.message_id,
            "from": names.get(entry.sender_id, "?"),
        }
        if entry.room_id is not None:
            frame["room"] = entry.room_id
        else:
            frame["to"] = names.get(entry.recipient_id or 0, "?")
        frame.update(body=entry.body, ts=rfc3339(entry.created_at), cmid=entry.cmid)
        return encode(frame)
    return encode(
        {
            "op": "receipt",
            "seq": entry.seq,
            "by": names.get(entry.actor_id or 0, "?"),
            "msg_id": entry.message_id,
            "ts": rfc3339(entry.read_at or entry.created_at),
        }
    )


class Delivery:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._dirty: set[int] = set()
        self._wake = asyncio.Event()
        # Inboxes moved by this worker's commits, not yet announced to the others.
        self._to_notify: dict[int, int] = {}
        # Sessions taken over here whose previous connection must be closed.
        self._to_replace: list[tuple[int, int, int | None]] = []
        # A batch of ours may have committed unannounced: every worker must catch up.
        self._catch_up = False
        self._notify_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = False
        self.delivered = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen()),
            loop.create_task(self._pump()),
            loop.create_task(self._notifier()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def mark_dirty(self, user_ids: Any) -> None:
        local = self.worker.by_user
        self._dirty.update(u for u in user_ids if u in local)
        if self._dirty:
            self._wake.set()

    def mark_moved(self, moved: dict[int, int]) -> None:
        """Inboxes reached these seqs: fetch for local sessions that are behind."""
        local = self.worker.by_user
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
        if self.worker.by_user:
            self._deliver_direct(batch, results)
        self.inbox_moved(moved)

    def inbox_moved(self, moved: dict[int, int]) -> None:
        """Entries up to these seqs exist (stored here): catch up locally, tell the others."""
        self.mark_moved(moved)
        pending = self._to_notify
        for user_id, seq in moved.items():
            if pending.get(user_id, 0) < seq:
                pending[user_id] = seq
        self._notify_wake.set()

    def _deliver_direct(
        self, batch: Sequence[NewMessage], results: Sequence[Stored | None]
    ) -> None:
        local = self.worker.by_user
        now = time.time()
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
                    metrics.observe_delivery(stored.created_at.timestamp(), now)
                    self.worker.events.delivered(
                        session.user_id, session.session_id, session.epoch, seq
                    )

    def _direct_frame(self, message: NewMessage, stored: Stored, seq: int) -> bytes:
        names = self.worker.cached_names
        sender = names.get(message.sender_id)
        recipient = names.get(message.recipient_id or 0)
        if sender is None or recipient is None:
            return b""
        return encode(
            {
                "op": "msg",
                "seq": seq,
                "id": stored.id,
                "from": sender,
                "to": recipient,
                "body": message.body,
                "ts": rfc3339(stored.created_at),
                "cmid": message.cmid,
            }
        )

    async def _notifier(self) -> None:
        """Announce moved inboxes to the other workers, coalescing while a NOTIFY is in flight.

        NOTIFY runs in its own transaction with synchronous_commit off: it writes no
        data worth waiting for, and PostgreSQL's notify lock is then held for
        microseconds instead of through a synchronously replicated commit. A lost
        notification costs latency only: listeners catch up from the tables.
        """
        while True:
            await self._notify_wake.wait()
            self._notify_wake.clear()
            pending, self._to_notify = self._to_notify, {}
            replaced, self._to_replace = self._to_replace, []
            catch_up, self._catch_up = self._catch_up, False
            try:
                if pending:
                    payloads = _chunks([f"{u}:{q}" for u, q in pending.items()])
                    await message_store.notify_inboxes(self.worker.pool, payloads)
                if catch_up:
                    await self.announce_catch_up(f"uncertain commit: {self.worker.worker_id}")
                for i in range(0, len(replaced), REPLACED_CHUNK):
                    event = {"replaced": replaced[i : i + REPLACED_CHUNK]}
                    await push(self.worker.pool, event, self.worker.push_key)
            except DB_ERRORS as exc:
                # Listeners only catch up from the tables when they reconnect, so a
                # pointer whose NOTIFY failed while they stayed connected must go out
                # again: keep it (and the replacements) for the next round.
                log.warning("notify_failed", users=len(pending), error=type(exc).__name__)
                for user_id, seq in pending.items():
                    if self._to_notify.get(user_id, 0) < seq:
                        self._to_notify[user_id] = seq
                self._to_replace[:0] = replaced
                self._catch_up = self._catch_up or catch_up
                self._notify_wake.set()
                await asyncio.sleep(0.2)

    # ---- the listener ------------------------------------------------------
    async def _listen(self) -> None:
        from app.store.db import dsn

        delay = 0.2
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    dsn(self.worker.settings), timeout=self.worker.settings.db_connect_timeout_s
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, ev=lost: ev.set())
                await conn.add_listener(INBOX_CHANNEL, self._on_inbox)
                await conn.add_listener(PUSH_CHANNEL, self._on_push)
                self.worker.events.primary_connected(*await primary_identity(conn))
                self.listening = True
                delay = 0.2
                # Anything notified while we were not listening: catch up from the tables.
                self.mark_dirty(list(self.worker.by_user))
                log.info("listening", channels=[INBOX_CHANNEL, PUSH_CHANNEL])
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), 2.0)
                    except TimeoutError:
                        # HAProxy cuts a session to a demoted node; a probe notices a dead peer.
                        await conn.fetchval("SELECT 1", timeout=2.0)
            except asyncio.CancelledError:
                raise
            except DB_ERRORS as exc:
                log.warning("listener_lost", error=type(exc).__name__)
            finally:
                self.listening = False
                self.worker.events.primary_lost()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _on_inbox(self, conn: object, pid: int, channel: str, payload: str) -> None:
        moved: dict[int, int] = {}
        for item in payload.split(","):
            user, _, seq = item.partition(":")
            if user.isdigit() and seq.isdigit():
                moved[int(user)] = int(seq)
        self.mark_moved(moved)

    def _on_push(self, conn: object, pid: int, channel: str, payload: str) -> None:
        event = verify_push(payload, self.worker.push_key)
        if event is None:
            log.warning("unsigned_push_dropped", sender_pid=pid)
            return
        try:
            if "replaced" in event:
                for user_id, session_id, epoch in event["replaced"]:
                    self._close_replaced(
                        int(user_id), int(session_id), None if epoch is None else int(epoch)
                    )
                return
            if "catch_up" in event:
                # A worker died (or restarted) and may have committed messages it
                # never announced: read every local user's inbox from the tables.
                log.info("catch_up", reason=str(event["catch_up"]), users=len(self.worker.by_user))
                self.mark_dirty(list(self.worker.by_user))
                return
            if "kicked" in event:
                reason = str(event.get("reason", "kicked"))
                for user_id, session_id in event["kicked"]:
                    self._close_kicked(int(user_id), int(session_id), reason)
                return
            data = encode(event["f"])
            targets = event["to"]
        except (KeyError, TypeError, ValueError):
            log.warning("bad_push_payload")
            return
        for user_id in targets:
            for target in self.worker.by_user.get(user_id, ()):
                target.write(data)

    def _holding(self, user_id: int, session_id: int) -> list[ClientConnection]:
        """The local connections holding this session (at most one, normally)."""
        return [
            conn
            for conn in self.worker.by_user.get(user_id, ())
            if conn.session is not None and conn.session.session_id == session_id
        ]

    def _drop(self, conn: ClientConnection, code: ErrorCode, message: str) -> None:
        """Close a connection whose session row someone else already closed or took."""
        self.worker.session_detached(conn)
        conn.session = None
        conn.fail(code, message)

    def _close_replaced(self, user_id: int, session_id: int, epoch: int | None) -> None:
        for conn in self._holding(user_id, session_id):
            session = conn.session
            assert session is not None
            if epoch is None or session.epoch < epoch:
                log.info("session_replaced", user=session.username, session=session_id)
                self._drop(
                    conn, ErrorCode.SESSION_REPLACED, "this device logged in on another connection"
                )

    def _close_kicked(self, user_id: int, session_id: int, reason: str) -> None:
        """An administrator closed this session (``reason``: kicked, or disabled for
        a disabled account). Its row is closed already, so it cannot be resumed;
        the contacts learn the presence that leaves."""
        for conn in self._holding(user_id, session_id):
            session = conn.session
            assert session is not None
            log.info("session_kicked", user=session.username, session=session_id, reason=reason)
            message = KICKED_MESSAGES.get(reason, KICKED_MESSAGES["kicked"])
            self._drop(conn, ErrorCode.KICKED, message)
            self.worker.events.session_ended(
                user_id, session_id, session.epoch, reason, resumable=False
            )
            self.worker.keep(
                asyncio.get_running_loop().create_task(
                    self.worker.logic.broadcast_presence(user_id)
                )
            )

    def replace_session(self, user_id: int, session_id: int, epoch: int | None) -> None:
        """Close, wherever it is, a connection holding this session below ``epoch``.

        ``epoch`` None: the whole session was replaced by a new login of the device.
        The notifier announces replacements in signed batches: a resume storm
        after a worker died costs a few NOTIFYs, not one per session.
        """
        self._to_replace.append((user_id, session_id, epoch))
        self._notify_wake.set()

    def request_catch_up(self) -> None:
        """A batch of ours lost its connection mid-statement and may have committed
        in an attempt whose inbox moves were never announced (its retry finds the
        rows already there and moves nothing). Have every worker catch up from the
        tables; the notifier sends it, and keeps trying while the database is away.
        """
        self._catch_up = True
        self._notify_wake.set()

    async def announce_catch_up(self, reason: str) -> None:
        """Ask every worker (this one too) to catch its users up from the tables.

        A worker killed between a commit and its NOTIFY leaves inboxes that moved
        unannounced; their users' workers stay connected to the database, so
        nothing else would make them look. Called when a dead worker is reaped
        and when a worker (re)registers (a restart after a crash).
        """
        await push(self.worker.pool, {"catch_up": reason}, self.worker.push_key)

    async def push(self, user_ids: list[int], frame: dict[str, Any]) -> None:
        """Send an ephemeral frame to every session of these users, on any worker."""
        for i in range(0, len(user_ids), PUSH_CHUNK):
            event = {"to": user_ids[i : i + PUSH_CHUNK], "f": frame}
            await push(self.worker.pool, event, self.worker.push_key)

    # ---- the pump ----------------------------------------------------------
    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.worker.settings.delivery_interval_s
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
            conns = [c for c in self.worker.by_user.get(user_id, ()) if c.writable]
            if conns:
                after[user_id] = min(c.session.delivered_seq for c in conns if c.session)
        if not after:
            return
        entries = await message_store.fetch_inboxes(self.worker.pool, after, PAGE)
        by_user: dict[int, list[InboxEntry]] = defaultdict(list)
        ids: set[int] = set()
        for entry in entries:
            by_user[entry.user_id].append(entry)
            ids.add(entry.sender_id)
            if entry.recipient_id is not None:
                ids.add(entry.recipient_id)
            if entry.actor_id is not None:
                ids.add(entry.actor_id)
        names = await self.worker.usernames(ids)
        for user_id, items in by_user.items():
            for conn in list(self.worker.by_user.get(user_id, ())):
                self._write_entries(conn, items, names)
            if len(items) >= PAGE:
                self._dirty.add(user_id)  # more pages to come

    def _write_entries(
        self, conn: ClientConnection, items: list[InboxEntry], names: dict[int, str]
    ) -> None:
        session = conn.session
        if session is None or not conn.writable:
            return
        now = time.time()
        first_seq = session.delivered_seq
        out: list[bytes] = []  # one write (one syscall) per round, not one per frame
        for entry in items:
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
                out.append(entry_frame(entry, names))
                self.delivered += 1
                metrics.observe_delivery(entry.created_at.timestamp(), now)
            session.delivered_seq = entry.seq
        if out:
            conn.write(b"".join(out))
        if session.delivered_seq > first_seq:
            self.worker.events.delivered(
                session.user_id, session.session_id, session.epoch, session.delivered_seq
            )


# NOTIFY payloads are limited to 8000 bytes.
_PAYLOAD_MAX = 7900


def _chunks(items: list[str]) -> list[str]:
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for item in items:
        if current and size + len(item) + 1 > _PAYLOAD_MAX:
            chunks.append(",".join(current))
            current, size = [], 0
        current.append(item)
        size += len(item) + 1
    if current:
        chunks.append(",".join(current))
    return chunks
