"""What this worker tells the other workers: inbox pointers, replacements, catch-ups,
ephemeral frames.

Writers NOTIFY ``sb_inbox`` with the ids of users whose inboxes moved; every
worker listens (listener.py). ``sb_push`` carries signed events: ephemeral frames
(presence, typing, contact requests) for named users, session replacements and
catch-up requests. A lost notification costs latency, never a message:
listeners catch up from the tables when they reconnect.
"""

from __future__ import annotations

import asyncio

import asyncpg

from app.logs import get_logger
from app.protocol.frames import ServerFrame
from app.protocol.push import CatchUp, Forward, Replaced
from app.store import messages as message_store
from app.store.errors import DB_ERRORS
from app.store.social import push

log = get_logger("delivery")

PUSH_CHUNK = 300
# (user, session, epoch) triples per signed push: well under NOTIFY's 8000 bytes.
REPLACED_CHUNK = 150
# NOTIFY payloads are limited to 8000 bytes.
_PAYLOAD_MAX = 7900


class Announcer:
    def __init__(self, pool: asyncpg.Pool, push_key: bytes, worker_id: str) -> None:
        self._pool = pool
        self._key = push_key
        self._worker_id = worker_id
        # Inboxes moved by this worker's commits, not yet announced to the others.
        self._to_notify: dict[int, int] = {}
        # Sessions taken over here whose previous connection must be closed.
        self._to_replace: list[tuple[int, int, int | None]] = []
        # A batch of ours may have committed unannounced: every worker must catch up.
        self._catch_up = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._notifier())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def inbox_moved(self, moved: dict[int, int]) -> None:
        """Entries up to these seqs exist (committed here): tell the others soon."""
        pending = self._to_notify
        for user_id, seq in moved.items():
            if pending.get(user_id, 0) < seq:
                pending[user_id] = seq
        self._wake.set()

    def replace_session(self, user_id: int, session_id: int, epoch: int | None) -> None:
        """Close, wherever it is, a connection holding this session below ``epoch``.

        ``epoch`` None: the whole session was replaced by a new login of the device.
        Replacements go out in signed batches: a resume storm after a worker died
        costs a few NOTIFYs, not one per session.
        """
        self._to_replace.append((user_id, session_id, epoch))
        self._wake.set()

    def request_catch_up(self) -> None:
        """A batch of ours lost its connection mid-statement and may have committed
        in an attempt whose inbox moves were never announced (its retry finds the
        rows already there and moves nothing). Have every worker catch up from the
        tables; the notifier sends it, and keeps trying while the database is away.
        """
        self._catch_up = True
        self._wake.set()

    async def announce_catch_up(self, reason: str) -> None:
        """Ask every worker (this one too) to catch its users up from the tables.

        A worker killed between a commit and its NOTIFY leaves inboxes that moved
        unannounced; their users' workers stay connected to the database, so
        nothing else would make them look. Called when a dead worker is reaped
        and when a worker (re)registers (a restart after a crash).
        """
        await push(self._pool, CatchUp(reason), self._key)

    async def push(self, user_ids: list[int], frame: ServerFrame) -> None:
        """Send an ephemeral frame to every session of these users, on any worker."""
        for i in range(0, len(user_ids), PUSH_CHUNK):
            await push(self._pool, Forward(user_ids[i : i + PUSH_CHUNK], frame), self._key)

    async def _notifier(self) -> None:
        """Announce moved inboxes to the other workers, coalescing while a NOTIFY is in flight.

        NOTIFY runs in its own transaction with synchronous_commit off: it writes no
        data worth waiting for, and PostgreSQL's notify lock is then held for
        microseconds instead of through a synchronously replicated commit. A lost
        notification costs latency only: listeners catch up from the tables.
        """
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._to_notify = self._to_notify, {}
            replaced, self._to_replace = self._to_replace, []
            catch_up, self._catch_up = self._catch_up, False
            try:
                if pending:
                    payloads = _chunks([f"{u}:{q}" for u, q in pending.items()])
                    await message_store.notify_inboxes(self._pool, payloads)
                if catch_up:
                    await self.announce_catch_up(f"uncertain commit: {self._worker_id}")
                for i in range(0, len(replaced), REPLACED_CHUNK):
                    await push(self._pool, Replaced(replaced[i : i + REPLACED_CHUNK]), self._key)
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
                self._wake.set()
                await asyncio.sleep(0.2)


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
