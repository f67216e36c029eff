"""Deadlines of client connections: log in soon after connecting, then never fall silent.

- A connection that has not logged in (``welcome`` to hello or resume)
  ``auth_timeout_s`` after connecting gets the fatal error ``auth_timeout``.
  Nothing the client sends extends it: not pings, not blank lines, not a
  register. The server's own delays do: a login request still being handled,
  and an ``overloaded`` answer, after which it counts from the end of the
  ``retry_after`` the client was given (``login_wait_until``).
- A logged-in connection that has sent no frame (not even a ping) for
  ``idle_timeout_s`` gets the fatal error ``idle_timeout``; its session is
  detached, so the client can resume it. A connection with a request still
  being handled is not idle (it waits for us, not the other way round).

A timer per connection would be 100k heap entries at 100k connections. This is
a coarse timing wheel instead: slots of TICK_S, swept by one task. Each
connection sits in one slot: first the one of its login deadline; when that
slot comes due and the connection is logged in, it moves to the slot of its last
frame + ``idle_timeout_s``. So the hot path only stamps the time of each frame
(the flood bucket's clock does it already), and a busy connection is looked at
about once per ``idle_timeout_s``, not per frame. A deadline fires at most
TICK_S late.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Final, Protocol

from app.logs import get_logger
from app.protocol import ErrorCode
from app.settings import Settings
from app.worker.states import SessionState

log = get_logger("timeouts")

TICK_S: Final = 0.5
NO_SLOT: Final = -1


class Timed(Protocol):
    """What the wheel needs of a connection (connection.py's `ClientConnection`)."""

    state: SessionState
    closed: bool
    connected_at: float  # time.monotonic() at connect
    deadline_slot: int  # the wheel's bookkeeping: the slot it sits in, or NO_SLOT
    login_wait_until: float  # the server told it, not logged in, to wait until then
    peer: str

    @property
    def last_frame_at(self) -> float: ...

    @property
    def busy(self) -> bool: ...

    def fail(self, code: ErrorCode, message: str, rid: str | int | None = None) -> None: ...


class Deadlines:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._auth_s = settings.auth_timeout_s
        self._idle_s = settings.idle_timeout_s
        self._clock = clock
        self._slots: dict[int, set[Timed]] = {}
        # The first slot not swept yet.
        self._next = math.floor(clock() / TICK_S) + 1

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())

    def watch(self, conn: Timed) -> None:
        """A new connection: it must log in by ``connected_at + auth_timeout_s``."""
        self._put(conn, conn.connected_at + self._auth_s)

    def forget(self, conn: Timed) -> None:
        """The connection is gone: drop it from its slot (so it is not kept alive)."""
        slot = self._slots.get(conn.deadline_slot)
        if slot is not None:
            slot.discard(conn)
            if not slot:
                del self._slots[conn.deadline_slot]
        conn.deadline_slot = NO_SLOT

    def sweep(self) -> None:
        """Check every connection whose slot is due; close the late ones."""
        now = self._clock()
        due = math.floor(now / TICK_S)
        while self._next <= due:
            slot = self._slots.pop(self._next, None)
            self._next += 1
            for conn in slot or ():
                conn.deadline_slot = NO_SLOT
                try:
                    self._check(conn, now)
                except Exception:  # a bug: cost this connection its deadline, not the others
                    log.exception("deadline_check_failed", peer=conn.peer)

    async def run(self) -> None:
        """Sweep at every tick, on the tick (so a deadline fires at most TICK_S late)."""
        while True:
            now = self._clock()
            await asyncio.sleep(TICK_S - now % TICK_S + 0.001)
            self.sweep()

    def _put(self, conn: Timed, deadline: float) -> None:
        # The first slot that starts at or after the deadline, never one already swept.
        slot = max(math.ceil(deadline / TICK_S), self._next)
        conn.deadline_slot = slot
        self._slots.setdefault(slot, set()).add(conn)

    def _check(self, conn: Timed, now: float) -> None:
        if conn.closed:
            return
        if conn.state is SessionState.ANONYMOUS:
            # A login in flight (queued for admission, hashing) or one the server told
            # to wait (overloaded) is the server's delay, not the client's: closing it
            # would turn a queued client into a new connection, the bounce overload
            # must not cause. Its deadline counts from the end of the wait.
            deadline = max(conn.connected_at, conn.login_wait_until) + self._auth_s
            if deadline > now or conn.busy:
                self._put(conn, max(deadline, now + TICK_S))
                return
            # Counted in switchboard_errors{code="auth_timeout"}; not logged one by one,
            # since thousands at once are what an attack looks like.
            conn.fail(ErrorCode.AUTH_TIMEOUT, f"not logged in within {self._auth_s:g} s")
            return
        deadline = conn.last_frame_at + self._idle_s
        if deadline > now or conn.busy:
            self._put(conn, max(deadline, now + TICK_S))
            return
        log.info("idle_timeout", peer=conn.peer, silent_s=round(now - conn.last_frame_at, 1))
        conn.fail(ErrorCode.IDLE_TIMEOUT, f"nothing received for {self._idle_s:g} s; resume")
