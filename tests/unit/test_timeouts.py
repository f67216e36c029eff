"""Auth and idle deadlines (app/worker/timeouts.py) on a fake clock, then through the real
`ClientConnection` and session lifecycle over fakes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from app.protocol import ErrorCode, Hello
from app.protocol.proxy import build_proxy_header
from app.settings import Settings
from app.worker.connection import ClientConnection
from app.worker.states import SessionState
from app.worker.timeouts import NO_SLOT, TICK_S, Deadlines
from tests.unit.test_edge import settle
from tests.unit.worker_fakes import (
    GOOD_PASSWORD,
    FakePeer,
    FakeTransport,
    Harness,
    frames_of,
    real_connection,
)

AUTH_S, IDLE_S = 10.0, 90.0


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Conn:
    """A connection as the wheel sees it; counts how often its clock is read."""

    def __init__(self, clock: Clock, state: SessionState = SessionState.ANONYMOUS) -> None:
        self.state = state
        self.closed = False
        self.connected_at = clock.now
        self.deadline_slot = NO_SLOT
        self.peer = "203.0.113.9:5000"
        self.busy = False
        self.login_wait_until = 0.0
        self.failed: list[ErrorCode] = []
        self.looked_at = 0
        self._last = clock.now

    @property
    def last_frame_at(self) -> float:
        self.looked_at += 1
        return self._last

    def frame(self, at: float) -> None:
        self._last = at

    def fail(self, code: ErrorCode, message: str, rid: Any = None) -> None:
        self.failed.append(code)
        self.closed = True


def wheel(clock: Clock) -> Deadlines:
    return Deadlines(Settings(auth_timeout_s=AUTH_S, idle_timeout_s=IDLE_S), clock=clock)


def run_until(deadlines: Deadlines, clock: Clock, until: float) -> None:
    """Sweep at every tick up to ``until``, as the task does."""
    while clock.now < until:
        clock.now = min(until, clock.now + TICK_S)
        deadlines.sweep()


def test_no_login_in_time_is_auth_timeout_whatever_was_sent() -> None:
    clock = Clock()
    deadlines = wheel(clock)
    conn = Conn(clock)
    deadlines.watch(conn)
    run_until(deadlines, clock, clock.now + AUTH_S - 0.01)
    conn.frame(clock.now)  # a ping just before the deadline changes nothing
    assert conn.failed == []
    run_until(deadlines, clock, clock.now + TICK_S + 0.01)
    assert conn.failed == [ErrorCode.AUTH_TIMEOUT]
    assert len(deadlines) == 0


def test_a_client_told_to_wait_has_its_login_deadline_from_the_end_of_the_wait() -> None:
    """Answered `overloaded` (retry_after 4 s) 8 s after connecting: the server's delay,
    not the client's, so its deadline is 8 + 4 + AUTH_S, not AUTH_S."""
    clock = Clock()
    deadlines = wheel(clock)
    conn = Conn(clock)
    deadlines.watch(conn)
    clock.now += 8.0
    conn.login_wait_until = clock.now + 4.0
    until = conn.login_wait_until + AUTH_S
    run_until(deadlines, clock, until - 0.01)
    assert conn.failed == []
    run_until(deadlines, clock, until + TICK_S + 0.01)
    assert conn.failed == [ErrorCode.AUTH_TIMEOUT]


def test_a_login_in_flight_is_not_cut_by_the_login_deadline() -> None:
    clock = Clock()
    deadlines = wheel(clock)
    conn = Conn(clock)
    deadlines.watch(conn)
    conn.busy = True  # its hello queued for admission, or hashing
    run_until(deadlines, clock, clock.now + 3 * AUTH_S)
    assert conn.failed == []
    conn.busy = False  # answered, and still not logged in
    run_until(deadlines, clock, clock.now + TICK_S + 0.01)
    assert conn.failed == [ErrorCode.AUTH_TIMEOUT]


def test_a_login_in_time_moves_to_the_idle_deadline() -> None:
    clock = Clock()
    deadlines = wheel(clock)
    conn = Conn(clock)
    deadlines.watch(conn)
    clock.now += 2.0
    conn.state = SessionState.ACTIVE  # logged in after 2 s, with the hello frame
    conn.frame(clock.now)
    logged_in_at = clock.now
    run_until(deadlines, clock, logged_in_at + IDLE_S - 0.01)
    assert conn.failed == []
    run_until(deadlines, clock, logged_in_at + IDLE_S + TICK_S + 0.01)
    assert conn.failed == [ErrorCode.IDLE_TIMEOUT]


def test_frames_keep_a_session_open_and_cost_a_look_per_idle_period() -> None:
    clock = Clock()
    deadlines = wheel(clock)
    conn = Conn(clock, SessionState.ACTIVE)
    deadlines.watch(conn)
    start = clock.now
    while clock.now < start + 20 * IDLE_S:
        clock.now += TICK_S
        conn.frame(clock.now)  # a frame every tick, e.g. a busy sender
        deadlines.sweep()
    assert conn.failed == []
    # Looked at about once per idle period (plus the login deadline), not per frame.
    assert conn.looked_at <= 20 + 2


def test_a_busy_connection_is_not_idle() -> None:
    clock = Clock()
    deadlines = wheel(clock)
    conn = Conn(clock, SessionState.ACTIVE)
    deadlines.watch(conn)
    conn.busy = True  # e.g. a send waiting through a database failover
    run_until(deadlines, clock, clock.now + 3 * IDLE_S)
    assert conn.failed == []
    conn.busy = False
    run_until(deadlines, clock, clock.now + TICK_S + 0.01)
    assert conn.failed == [ErrorCode.IDLE_TIMEOUT]


def test_forget_drops_a_closed_connection_at_once() -> None:
    clock = Clock()
    deadlines = wheel(clock)
    conns = [Conn(clock) for _ in range(3)]
    for conn in conns:
        deadlines.watch(conn)
    assert len(deadlines) == 3
    deadlines.forget(conns[0])
    deadlines.forget(conns[0])  # twice is fine
    assert len(deadlines) == 2
    conns[1].closed = True  # closed but not forgotten yet: skipped, not failed
    run_until(deadlines, clock, clock.now + AUTH_S + 1)
    assert conns[0].failed == [] and conns[1].failed == []
    assert conns[2].failed == [ErrorCode.AUTH_TIMEOUT]


def test_a_late_sweep_catches_up() -> None:
    """The event loop was blocked for a while: every slot due since is swept."""
    clock = Clock()
    deadlines = wheel(clock)
    early, late = Conn(clock), Conn(clock)
    deadlines.watch(early)
    clock.now += 5
    deadlines.watch(late)
    clock.now += 60
    deadlines.sweep()
    assert early.failed == late.failed == [ErrorCode.AUTH_TIMEOUT]


def test_a_failing_check_costs_only_that_connection() -> None:
    clock = Clock()
    deadlines = wheel(clock)
    broken, fine = Conn(clock), Conn(clock)

    def explode(code: ErrorCode, message: str, rid: Any = None) -> None:
        raise RuntimeError("bug")

    broken.fail = explode  # type: ignore[method-assign]
    deadlines.watch(broken)
    deadlines.watch(fine)
    run_until(deadlines, clock, clock.now + AUTH_S + 1)
    assert fine.failed == [ErrorCode.AUTH_TIMEOUT]


# ---- through the real connection and session lifecycle --------------------------


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch, auth_timeout_s=AUTH_S, idle_timeout_s=IDLE_S)


def connect(h: Harness, clock: Clock) -> tuple[ClientConnection, FakeTransport, Deadlines]:
    deadlines = Deadlines(h.settings, clock=clock)
    conn, transport = real_connection(h, deadlines=deadlines)
    conn.data_received(build_proxy_header(("203.0.113.9", 5000)))
    return conn, transport, deadlines


async def test_an_idle_session_is_closed_and_left_resumable(harness: Harness) -> None:
    clock = Clock(time.monotonic())  # the connection stamps frames with time.monotonic()
    harness.store.add_user("alice")
    conn, transport, deadlines = connect(harness, clock)
    conn.data_received(
        b'{"op":"hello","user":"alice","password":"%s","device":"phone"}\n' % GOOD_PASSWORD.encode()
    )
    await harness.settle()
    await settle()
    assert conn.state.value == "active"
    run_until(deadlines, clock, clock.now + IDLE_S + 1)
    await settle()
    assert frames_of(bytes(transport.out))[-1]["code"] == "idle_timeout"
    assert transport.closed
    conn.connection_lost(None)  # what the transport's close leads to
    await harness.settle()
    assert conn.state is SessionState.DETACHED
    (row,) = harness.store.sessions.values()
    assert row.state == "detached"
    assert len(deadlines) == 0


async def test_a_login_that_ends_after_its_connection_leaves_the_session_resumable(
    harness: Harness,
) -> None:
    """auth_timeout closed the connection while its hello was being handled."""
    harness.store.add_user("alice")
    peer = harness.connect()
    peer.close()
    await harness.request(peer, Hello(user="alice", password=GOOD_PASSWORD, device="phone"))
    assert peer.state is SessionState.DETACHED
    (row,) = harness.store.sessions.values()
    assert row.state == "detached"
    assert not harness.registry.by_user
    assert isinstance(peer, FakePeer)
