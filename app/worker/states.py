"""The states of a client session and of the worker, their transition tables, and the
one setter of each that logs every change.

A connection's session, h11-style: a table maps (state, event) to the next state,
or to the error code that refuses the event. Requests are events too, so the
table is also the gate that decides which requests a connection may send::

    ANONYMOUS --LOGIN (hello, resume, login_token)--> ACTIVE --DISCONNECT--> DETACHED
                                            |
                                            +--BYE, REPLACED, KICKED, FENCED--> CLOSED

    ANONYMOUS: AUTH requests (hello, register, resume, login_token) and ANY (ping, bye) are
               allowed; every other request is refused with not_authenticated.
    ACTIVE:    AUTH requests are refused with already_authenticated.
    DETACHED, CLOSED: final; the connection holds no session any more.

The values of ACTIVE, DETACHED and CLOSED are the ``sessions.state`` values of
the row the session has in PostgreSQL (ANONYMOUS has no row). They describe
what *this connection* holds: FENCED leaves the connection CLOSED while the row
stays ``detached`` for another worker to resume.

The worker::

    STARTING --started--> SERVING <--drain/undrain--> DRAINING
        \\___________________  |  ______________________/
                             v  v  v
                            STOPPING

Being fenced (declared dead by the others) is not a state: the worker drops
its connections, registers again and goes on serving (see liveness.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from app.logs import get_logger
from app.protocol import PRE_AUTH_OPS, Bye, ErrorCode, Ping, Request

log = get_logger("states")


class SessionState(Enum):
    ANONYMOUS = "anonymous"
    ACTIVE = "active"
    DETACHED = "detached"
    CLOSED = "closed"


class SessionEvent(Enum):
    # Requests, by what the gate needs to know of them.
    AUTH = "auth request"  # hello, register, resume, login_token
    ANY = "any-state request"  # ping, bye
    REQUEST = "request"  # everything else: needs a session
    # Lifecycle.
    LOGIN = "login"  # hello, resume or login_token succeeded: the session is attached here
    BYE = "bye"  # the client ended the session: closed, not resumable
    DISCONNECT = "disconnect"  # the connection dropped: resumable elsewhere
    REPLACED = "replaced"  # the device logged in (or resumed) on another connection
    KICKED = "kicked"  # an administrator closed the session or disabled the account
    FENCED = "fenced"  # this worker was declared dead: its rows belong to others


S, E = SessionState, SessionEvent
_ENDS = {E.BYE: S.CLOSED, E.REPLACED: S.CLOSED, E.KICKED: S.CLOSED, E.FENCED: S.CLOSED}
_FINAL = {
    E.AUTH: ErrorCode.NOT_AUTHENTICATED,
    E.REQUEST: ErrorCode.NOT_AUTHENTICATED,
    E.ANY: None,
    E.LOGIN: ErrorCode.NOT_AUTHENTICATED,
    **dict.fromkeys((E.BYE, E.DISCONNECT, E.REPLACED, E.KICKED, E.FENCED)),
}

# (state, event) -> next state, or the error code that refuses the event. None:
# allowed, the state stays. A pair that is missing is a bug in the caller.
SESSION_TABLE: Mapping[SessionState, Mapping[SessionEvent, SessionState | ErrorCode | None]] = {
    S.ANONYMOUS: {
        E.AUTH: None,
        E.ANY: None,
        E.REQUEST: ErrorCode.NOT_AUTHENTICATED,
        E.LOGIN: S.ACTIVE,
        # No session yet: nothing to end (the connection just goes).
        E.BYE: None,
        E.DISCONNECT: None,
        E.REPLACED: None,
        E.KICKED: None,
        E.FENCED: None,
    },
    S.ACTIVE: {
        E.AUTH: ErrorCode.ALREADY_AUTHENTICATED,
        E.ANY: None,
        E.REQUEST: None,
        E.LOGIN: ErrorCode.ALREADY_AUTHENTICATED,
        E.DISCONNECT: S.DETACHED,
        **_ENDS,
    },
    # A request still queued when the session ended finds no session.
    S.DETACHED: _FINAL,
    S.CLOSED: _FINAL,
}
del S, E


def request_event(req: Request) -> SessionEvent:
    kind = type(req)
    if kind is Ping or kind is Bye:
        return SessionEvent.ANY
    return SessionEvent.AUTH if kind in PRE_AUTH_OPS else SessionEvent.REQUEST


def next_session_state(state: SessionState, event: SessionEvent) -> SessionState | ErrorCode | None:
    """The table's answer: the next state, the refusing code, or None (no change)."""
    return SESSION_TABLE[state][event]


@dataclass(slots=True)
class Session:
    """What an ACTIVE connection knows about its user; all of it is also in the DB."""

    session_id: int
    user_id: int
    username: str
    device: str
    epoch: int
    # Highest inbox seq written to this connection (or known to the client).
    delivered_seq: int = 0


class Peer(Protocol):
    """What the parts below the connection adapter use of a client connection."""

    state: SessionState
    session: Session | None
    peer: str
    closed: bool  # closing or gone: nothing written reaches the client any more

    @property
    def writable(self) -> bool: ...

    @property
    def write_room(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def fail(self, code: ErrorCode, message: str, rid: str | int | None = None) -> None: ...

    def close(self) -> None: ...

    # Sends queued for a group commit and not yet answered (connection.py).
    inflight_sends: int
    # time.monotonic() until which the server told a client that is not logged in yet
    # to wait (``overloaded``'s retry_after): its login deadline counts from then.
    login_wait_until: float

    async def send_slot(self) -> None: ...

    def send_done(self) -> None: ...


def active_session(peer: Peer) -> Session:
    """The session of a peer the gate admitted a REQUEST from (so it is ACTIVE)."""
    assert peer.session is not None, "the gate admits only ACTIVE sessions here"
    return peer.session


def set_session_state(
    peer: Peer, event: SessionEvent, why: str, session: Session | None = None, **fields: Any
) -> SessionState | None:
    """The one place a session's state changes; every change is logged.

    Returns the state left (None: nothing changed, the event found a final state
    or is refused). LOGIN takes the ``session`` being attached.
    """
    old = peer.state
    new = SESSION_TABLE[old].get(event)
    if not isinstance(new, SessionState) or new is old:
        return None
    if event is SessionEvent.LOGIN:
        assert session is not None, "LOGIN attaches a session"
        peer.session = session
    current = peer.session
    peer.state = new
    if current is not None:
        fields.update(user=current.username, device=current.device, session=current.session_id)
    log.info("session_state", old=old.value, new=new.value, on=event.value, why=why, **fields)
    return old


class WorkerState(Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"


W = WorkerState
WORKER_TABLE: Mapping[WorkerState, frozenset[WorkerState]] = {
    W.STARTING: frozenset({W.SERVING, W.STOPPING}),
    W.SERVING: frozenset({W.DRAINING, W.STOPPING}),
    W.DRAINING: frozenset({W.SERVING, W.STOPPING}),
    W.STOPPING: frozenset(),
}
del W


class WorkerStatus:
    """The worker's state, shared by the parts that act on it; one logged setter."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.state = WorkerState.STARTING

    def set(self, new: WorkerState, why: str, **fields: Any) -> bool:
        """Move to ``new`` if the table allows it from here; False (no change) if not."""
        old = self.state
        if new not in WORKER_TABLE[old]:
            return False
        self.state = new
        # worker_serving, worker_draining, ...: the names operators grep for.
        log.info(f"worker_{new.value}", old=old.value, why=why, **fields)
        return True

    @property
    def accepting(self) -> bool:
        return self.state is WorkerState.SERVING
