"""The session lifecycle on this worker: a connection arrives, logs in (attach), and
its session ends (bye, disconnect), each step through the one state setter.

The states and the table that allows or refuses each step are in states.py;
the handlers that log in (hello, resume) are in login.py and end here, in
`Sessions.attach`.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg

from app.logs import get_logger
from app.protocol import Bye, ErrorCode, Ping, Rid, frames
from app.store import device_tokens
from app.store import sessions as session_store
from app.store.errors import DB_ERRORS
from app.store.eventlog import EventLog
from app.worker.announce import Announcer
from app.worker.delivery import Delivery
from app.worker.presence import Presence
from app.worker.registry import Registry
from app.worker.revoke import Revoker
from app.worker.states import (
    Peer,
    Session,
    SessionEvent,
    SessionState,
    WorkerState,
    WorkerStatus,
    set_session_state,
)

log = get_logger("session")

OK = frames.Ok()
PONG = frames.Pong()

# Attempts to write a session's end while the database is away: about 40 s in all.
END_RETRIES = 25


class Sessions:
    def __init__(
        self,
        pool: asyncpg.Pool,
        status: WorkerStatus,
        registry: Registry,
        delivery: Delivery,
        announcer: Announcer,
        presence: Presence,
        events: EventLog,
        revoker: Revoker,
    ) -> None:
        self._pool = pool
        self._status = status
        self._registry = registry
        self._delivery = delivery
        self._announcer = announcer
        self._presence = presence
        self._events = events
        self._revoker = revoker

    # ---- the connection ------------------------------------------------------
    def opened(self, peer: Peer) -> None:
        """A client connected: keep it, unless this worker takes no clients now."""
        state = self._status.state
        if state is WorkerState.DRAINING:
            # HAProxy has not heard of the drain yet: send the client elsewhere, soon.
            peer.write(frames.Reconnect(random.randint(0, 200)).encode())
            peer.close()
            return
        if state is not WorkerState.SERVING:
            peer.fail(ErrorCode.SHUTTING_DOWN, "this worker is not accepting clients")
            peer.close()
            return
        self._registry.add(peer)

    def lost(self, peer: Peer) -> None:
        """The connection is gone: its session stays resumable on any worker."""
        self._registry.discard(peer)
        if peer.state is SessionState.ACTIVE and self._status.state is not WorkerState.STOPPING:
            # Stopping: the worker detaches all of its sessions in one statement.
            self._registry.spawn(self.end(peer, "disconnected", resumable=True))

    # ---- login -----------------------------------------------------------------
    async def attach(
        self,
        peer: Peer,
        session: Session,
        token: str,
        last_seq: int,
        acked: int,
        rid: Rid,
        *,
        why: str,
        has_contacts: bool = True,
        device_token: str | None = None,
    ) -> None:
        """Send welcome (with ``device_token``, the device's new one, after hello and
        login_token), then the replay after ``session.delivered_seq``, then live entries."""
        set_session_state(peer, SessionEvent.LOGIN, why, session)
        if peer.closed:
            # The connection went while the login was in flight (its auth_timeout, or
            # the client hung up): nobody holds the session here, so leave it resumable.
            await self.end(peer, "disconnected", resumable=True)
            return
        welcome = frames.Welcome(
            session.username,
            session.device,
            str(session.session_id),
            self._status.worker_id,
            token,
            last_seq,
            acked,
            device_token,
        )
        peer.write(welcome.encode(rid))
        self._registry.attach(peer)
        self._revoker.attached(peer)
        if peer.state is not SessionState.ACTIVE:
            return  # kicked or replaced before it attached: the end frame follows welcome
        self._delivery.mark_dirty([session.user_id])
        if has_contacts:  # nobody to tell otherwise: spare the query in a resume storm
            # In the background: `welcome` is this request's one reply, whatever
            # becomes of the presence push.
            self._registry.spawn(self._presence.broadcast(session.user_id))

    # ---- the end -----------------------------------------------------------------
    async def end(self, peer: Peer, reason: str, resumable: bool) -> None:
        """The session ends: a dropped connection leaves it resumable (detached),
        ``bye`` closes it.

        The state changes at once; the row is written until the database takes
        it (`_write_end`). Both writes are fenced by the epoch: a session another
        worker has taken over is left alone.
        """
        session = peer.session
        event = SessionEvent.DISCONNECT if resumable else SessionEvent.BYE
        if session is None or set_session_state(peer, event, reason) is None:
            return  # no session, or it ended already (replaced, kicked, fenced, bye)
        self._registry.detach(peer)
        try:
            changed = await self._write_end(session, reason, resumable)
        except DB_ERRORS as exc:
            # Still `active` in the table: shown online until the reaper expires it
            # with this worker's lease, or a resume takes it.
            self._registry.spawn(self._retry_end(session, reason, resumable, exc))
            return
        await self._ended(session, reason, resumable, changed)

    async def _write_end(self, session: Session, reason: str, resumable: bool) -> bool:
        write = session_store.detach_session if resumable else session_store.close_session
        return await write(self._pool, session.session_id, session.epoch, reason)

    async def _retry_end(
        self, session: Session, reason: str, resumable: bool, first: BaseException
    ) -> None:
        """Write a session's end until the database takes it (a failover takes ~20 s)."""
        log.warning("session_end_retry", session=session.session_id, error=type(first).__name__)
        delay = 0.2
        for _ in range(END_RETRIES):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            try:
                changed = await self._write_end(session, reason, resumable)
            except DB_ERRORS:
                continue
            await self._ended(session, reason, resumable, changed)
            return
        log.error("session_end_lost", session=session.session_id, reason=reason)

    async def _ended(self, session: Session, reason: str, resumable: bool, changed: bool) -> None:
        if not changed:
            log.info("session_end_fenced", session=session.session_id, reason=reason)
            return
        self._events.session_ended(
            session.user_id, session.session_id, session.epoch, reason, resumable
        )
        self._registry.spawn(self._presence.broadcast(session.user_id))

    # ---- requests every state may send -----------------------------------------
    async def ping(self, peer: Peer, req: Ping) -> None:
        peer.write(PONG.encode(req.rid))

    async def bye(self, peer: Peer, req: Bye) -> None:
        session = peer.session
        if req.forget and session is not None and peer.state is SessionState.ACTIVE:
            # Before the ok: once the client reads it, the token no longer logs in.
            await device_tokens.revoke(self._pool, session.user_id, session.device)
            log.info("device_forgotten", user=session.username, device=session.device)
        try:
            # The session is closed before the ok: a client that reads it may log
            # another device in at once, its device slot already free.
            await self.end(peer, "bye", resumable=False)
            peer.write(OK.encode(req.rid))
        finally:
            peer.close()
