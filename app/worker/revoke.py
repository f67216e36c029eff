"""Revocation: a session ended elsewhere (kicked, disabled, taken over) ends here too.

A worker learns that a session it holds was revoked in three ways, and each
ends the connection through `Revoker.end` (the one state setter underneath):

- **a push** (listener.py): the dashboard's ``kicked``, another login's or
  resume's ``replaced``; the connection holding the session is closed at once;
- **at attach**: a push can arrive between the commit that opened (or resumed)
  a row and the attach of its connection, when no connection holds it yet. Every
  push is remembered for `MISSED_PUSH_TTL_S`, and `attached` applies it, right
  after ``welcome``;
- **the rows** (`recheck_tick`): a NOTIFY sent while the listener was away (a
  failover) is lost. So on a timer (``session_recheck_interval_s``) and at once
  after the listener (re)connects, one set-based query reads the rows of every
  ACTIVE session here; a row that is closed, taken over (its epoch or worker
  moved), detached by the reaper, or whose user is disabled, ends its
  connection. Each tick returns a `Decision`::

      "every session current"
      "dropped 2 of 1200 sessions (after the listener reconnected): 1 disabled, 1 replaced"
      "dropped 1 of 1200 sessions (on the timer): 1 kicked"
      "recheck of 1200 sessions failed (OSError); next in 5.0 s"

The decisions depend on a `SessionRows` store alone, so they are tested with
fakes (tests/unit/test_revoke.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from app.logs import get_logger
from app.protocol import ErrorCode, frames
from app.settings import Settings
from app.store import sessions as session_store
from app.store.errors import DB_ERRORS
from app.store.eventlog import EventLog
from app.store.sessions import StaleSession
from app.worker import metrics
from app.worker.decisions import Decision, DecisionLog
from app.worker.presence import Presence
from app.worker.registry import Registry
from app.worker.states import (
    Peer,
    Session,
    SessionEvent,
    SessionState,
    active_session,
    set_session_state,
)

log = get_logger("revoke")

# How long a push for a session no connection here holds is kept for `attached`
# (the rows' recheck catches anything later), and at most how many are kept.
MISSED_PUSH_TTL_S = 10.0
MISSED_PUSH_MAX = 50_000
# Sessions per recheck statement: a worker with 100k sessions sends ten, and serves
# its clients between them (each costs the loop ~3 ms, the database ~10 ms).
RECHECK_CHUNK = 10_000

# The `kicked` error's message, by the reason the session was closed.
KICKED_MESSAGES = {
    "kicked": "an administrator closed this session",
    "disabled": "this account was disabled",
    "password_changed": "the password was changed on another device; log in again",
    "device_revoked": "an administrator signed this device out; log in with the password",
}
CLOSED_MESSAGE = "this session was closed"
# What started a recheck (the metric's label), as its decision says it.
TRIGGERS = {"timer": "on the timer", "listener": "after the listener reconnected"}
REPLACED_MESSAGE = "this device logged in on another connection"


@dataclass(frozen=True, slots=True)
class Ending:
    """How a revoked session ends here: ``event`` is KICKED, REPLACED or FENCED;
    ``reason`` says why (kicked, disabled, replaced, detached, or a row's close
    reason). A REPLACED with ``below_epoch`` ends only holders of an older epoch
    (a resume elsewhere); without one (a new login of the device), any holder."""

    event: SessionEvent
    reason: str
    below_epoch: int | None = None

    def applies_to(self, session: Session) -> bool:
        return self.below_epoch is None or session.epoch < self.below_epoch


def ending_for(row: StaleSession, worker_id: str) -> Ending:
    """What a stale row means for the connection that holds ``row.held_epoch``."""
    if row.disabled:
        return Ending(SessionEvent.KICKED, "disabled")
    if row.state is None:
        return Ending(SessionEvent.KICKED, "closed")
    if row.epoch != row.held_epoch or row.worker_id != worker_id:
        return Ending(SessionEvent.REPLACED, "replaced")
    if row.state == "closed":
        if row.close_reason == "replaced":
            return Ending(SessionEvent.REPLACED, "replaced")
        return Ending(SessionEvent.KICKED, row.close_reason or "closed")
    # Still this worker's epoch, but detached: the reaper took this worker for dead.
    # The row stays resumable, so the client is sent to resume it (as fencing does).
    return Ending(SessionEvent.FENCED, "detached")


class SessionRows(Protocol):
    async def stale(
        self, worker_id: str, session_ids: list[int], epochs: list[int]
    ) -> list[StaleSession]: ...

    async def close(self, session_id: int, epoch: int, reason: str) -> bool: ...


class PgSessionRows:
    """The `SessionRows` in PostgreSQL (the primary: a replica may lag behind a kick)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def stale(
        self, worker_id: str, session_ids: list[int], epochs: list[int]
    ) -> list[StaleSession]:
        return await session_store.stale_sessions(self._pool, worker_id, session_ids, epochs)

    async def close(self, session_id: int, epoch: int, reason: str) -> bool:
        return await session_store.close_session(self._pool, session_id, epoch, reason)


class Revoker:
    def __init__(
        self,
        settings: Settings,
        rows: SessionRows,
        registry: Registry,
        presence: Presence,
        events: EventLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._rows = rows
        self._registry = registry
        self._presence = presence
        self._events = events
        self._clock = clock
        # Session id -> (until when, the push's ending), oldest first.
        self._missed: dict[int, tuple[float, Ending]] = {}
        self._wake = asyncio.Event()
        self._decisions = DecisionLog(log)

    # ---- ending a connection ---------------------------------------------------
    def end(self, peer: Peer, ending: Ending, why: str, found: str) -> bool:
        """End the connection of a revoked session; False if the ending does not apply
        (an older epoch's) or the session ended already. ``found``: push, attach or
        recheck (the metric's label)."""
        session = peer.session
        if session is None or not ending.applies_to(session):
            return False
        if set_session_state(peer, ending.event, why, reason=ending.reason) is None:
            return False
        self._registry.detach(peer)
        metrics.REVOKED.labels(found, ending.event.value).inc()
        if ending.event is SessionEvent.FENCED:
            peer.write(frames.Reconnect(random.randint(0, 1000)).encode())
            peer.close()
        elif ending.event is SessionEvent.REPLACED:
            peer.fail(ErrorCode.SESSION_REPLACED, REPLACED_MESSAGE)
        else:
            peer.fail(ErrorCode.KICKED, KICKED_MESSAGES.get(ending.reason, CLOSED_MESSAGE))
            self._events.session_ended(
                session.user_id, session.session_id, session.epoch, ending.reason, resumable=False
            )
            # The contacts learn the presence that leaves.
            self._registry.spawn(self._presence.broadcast(session.user_id))
        return True

    # ---- pushes ------------------------------------------------------------------
    def pushed(self, user_id: int, session_id: int, ending: Ending, why: str) -> None:
        """A kick or replacement from another worker or the dashboard: end the local
        holder, and remember it for a connection that attaches the session later."""
        for peer in self._registry.holding(user_id, session_id):
            self.end(peer, ending, why, "push")
        self._remember(session_id, ending)

    def _remember(self, session_id: int, ending: Ending) -> None:
        now = self._clock()
        missed = self._missed
        missed.pop(session_id, None)  # re-inserted last: the dict stays in time order
        missed[session_id] = (now + MISSED_PUSH_TTL_S, ending)
        while missed:
            oldest = next(iter(missed))
            if missed[oldest][0] > now and len(missed) <= MISSED_PUSH_MAX:
                break
            del missed[oldest]

    def attached(self, peer: Peer) -> None:
        """``peer`` just attached its session: apply a push that came before it."""
        session = peer.session
        assert session is not None
        remembered = self._missed.get(session.session_id)
        if remembered is not None and remembered[0] > self._clock():
            self.end(peer, remembered[1], "revoked before its connection attached", "attach")

    # ---- the rows ------------------------------------------------------------------
    def recheck_soon(self) -> None:
        """The listener (re)connected: what it missed meanwhile is in the rows."""
        self._wake.set()

    async def recheck_tick(self, why: str) -> Decision:
        """Read the rows of every ACTIVE session here, RECHECK_CHUNK to a statement (the
        event loop serves the clients between them); end the stale ones."""
        held = [peer for peer in self._registry.connections if peer.state is SessionState.ACTIVE]
        wid = self._settings.worker_id
        ended: Counter[str] = Counter()
        for start in range(0, len(held), RECHECK_CHUNK):
            peers = held[start : start + RECHECK_CHUNK]
            sessions = [active_session(peer) for peer in peers]
            try:
                stale = await self._rows.stale(
                    wid, [s.session_id for s in sessions], [s.epoch for s in sessions]
                )
            except DB_ERRORS as exc:
                return Decision(
                    f"recheck of {len(held)} sessions failed ({type(exc).__name__})"
                    + (f" after dropping {_counts(ended)}" if ended else "")
                    + f"; next in {self._settings.session_recheck_interval_s} s",
                    "warning",
                )
            for row in stale:
                peer, session = peers[row.index], sessions[row.index]
                if peer.session is not session:
                    continue  # it ended (and maybe logged in again) since the snapshot
                ending = ending_for(row, wid)
                seen = f"its row is {row.state or 'gone'}, epoch {row.epoch}, on {row.worker_id}"
                if row.disabled:
                    seen += ", the user disabled"
                if self.end(peer, ending, seen, "recheck"):
                    ended[ending.reason] += 1
                    if row.disabled and row.state != "closed" and still_mine(row, wid):
                        # The disable missed this row (it is still ours): close it.
                        self._registry.spawn(self._close(session, "disabled"))
        if not ended:
            return Decision("every session current")
        return Decision(
            f"dropped {ended.total()} of {len(held)} sessions ({why}): {_counts(ended)}",
            "warning",
        )

    async def _close(self, session: Session, reason: str) -> None:
        await self._rows.close(session.session_id, session.epoch, reason)

    async def run(self) -> None:
        """Recheck every interval, and at once when `recheck_soon` is called."""
        interval = self._settings.session_recheck_interval_s
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
                trigger = "listener"
            except TimeoutError:
                trigger = "timer"
            self._wake.clear()
            metrics.RECHECKS.labels(trigger).inc()
            self._decisions.say("recheck", await self.recheck_tick(TRIGGERS[trigger]))


def _counts(ended: Counter[str]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(ended.items()))


def still_mine(row: StaleSession, worker_id: str) -> bool:
    """The row is still this worker's, of the epoch its connection held."""
    return row.epoch == row.held_epoch and row.worker_id == worker_id
