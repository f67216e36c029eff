"""What this worker hears from the others: LISTEN for inbox pointers and signed pushes.

``sb_inbox`` names users whose inboxes moved: those with a session here are
handed to the delivery pump. ``sb_push`` carries ephemeral frames (written to
local sessions, never stored), session replacements (a new login of the
device) and kicks (the dashboard), which close the connection holding the
session (revoke.py), and catch-up requests. A push is acted on only if it is
signed with the cluster key, once, and within ``push_max_age_s`` of its
signature. On every (re)connect of the listener all local users are caught up
from the tables and the rows of their sessions are rechecked: notifications
sent while it was away are lost, the entries and the rows are not.

Its connection's ``application_name`` is ``switchboard-<worker>-listener``.
"""

from __future__ import annotations

import asyncio

import asyncpg

from app.logs import get_logger
from app.protocol.push import CatchUp, Forward, Kicked, Replaced, parse_push
from app.settings import Settings
from app.store.db import Connection, dsn
from app.store.errors import DB_ERRORS
from app.store.eventlog import EventLog, primary_identity
from app.store.messages import INBOX_CHANNEL
from app.store.social import PUSH_CHANNEL, PushWindow, verify_push
from app.worker.delivery import Delivery
from app.worker.registry import Registry
from app.worker.revoke import Ending, Revoker
from app.worker.states import SessionEvent

log = get_logger("delivery")


class Listener:
    def __init__(
        self,
        settings: Settings,
        push_key: bytes,
        registry: Registry,
        delivery: Delivery,
        revoker: Revoker,
        events: EventLog,
    ) -> None:
        self._settings = settings
        self._key = push_key
        self._window = PushWindow(settings.push_max_age_s)
        self._registry = registry
        self._delivery = delivery
        self._revoker = revoker
        self._events = events
        self._task: asyncio.Task[None] | None = None
        self.listening = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _listen(self) -> None:
        delay = 0.2
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    dsn(self._settings),
                    timeout=self._settings.db_connect_timeout_s,
                    connection_class=Connection,
                    server_settings={
                        "application_name": f"switchboard-{self._settings.worker_id}-listener"
                    },
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, ev=lost: ev.set())
                await conn.add_listener(INBOX_CHANNEL, self._on_inbox)
                await conn.add_listener(PUSH_CHANNEL, self._on_push)
                self._events.primary_connected(*await primary_identity(conn))
                self.listening = True
                delay = 0.2
                # Anything notified while we were not listening: catch up from the tables
                # (inboxes), and recheck the session rows (kicks and replacements).
                self._delivery.mark_dirty(list(self._registry.by_user))
                self._revoker.recheck_soon()
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
                self._events.primary_lost()
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
        self._delivery.mark_moved(moved)

    def _on_push(self, conn: object, pid: int, channel: str, payload: str) -> None:
        signed = verify_push(payload, self._key)
        if signed is None:
            log.warning("unsigned_push_dropped", sender_pid=pid)
            return
        refused = self._window.refuses(signed)
        if refused is not None:  # stale_push_dropped, replayed_push_dropped
            log.warning(f"{refused}_push_dropped", sender_pid=pid, signed_at=signed.signed_at_ms)
            return
        pushed = parse_push(signed.event)
        by_user = self._registry.by_user
        if isinstance(pushed, Forward):
            data = pushed.frame.encode()
            for user_id in pushed.to:
                for target in by_user.get(user_id, ()):
                    target.write(data)
        elif isinstance(pushed, Replaced):
            why = "a newer login or resume of this device"
            for user_id, session_id, epoch in pushed.sessions:
                ending = Ending(SessionEvent.REPLACED, "replaced", epoch)
                self._revoker.pushed(user_id, session_id, ending, why)
        elif isinstance(pushed, CatchUp):
            # A worker died (or restarted) and may have committed messages it
            # never announced: read every local user's inbox from the tables.
            log.info("catch_up", reason=pushed.reason, users=len(by_user))
            self._delivery.mark_dirty(list(by_user))
        elif isinstance(pushed, Kicked):
            # The row is closed already, so it cannot be resumed.
            ending = Ending(SessionEvent.KICKED, pushed.reason)
            for user_id, session_id in pushed.sessions:
                self._revoker.pushed(user_id, session_id, ending, pushed.reason)
        else:
            log.warning("bad_push_payload")
