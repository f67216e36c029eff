"""The session table, its one setter, the request gate's classes, and the worker's states."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from app.protocol import (
    Ack,
    Bye,
    ContactAdd,
    ContactList,
    ErrorCode,
    Hello,
    History,
    PasswordChange,
    Ping,
    Read,
    Register,
    Resume,
    RoomCreate,
    RoomList,
    Send,
    Typing,
)
from app.worker.states import (
    SESSION_TABLE,
    WORKER_TABLE,
    Session,
    SessionEvent,
    SessionState,
    WorkerState,
    WorkerStatus,
    next_session_state,
    request_event,
    set_session_state,
)
from tests.unit.worker_fakes import FakePeer, active_peer, status_in

S, E = SessionState, SessionEvent
LIFECYCLE = (E.LOGIN, E.BYE, E.DISCONNECT, E.REPLACED, E.KICKED, E.FENCED)
ENDS = (E.BYE, E.REPLACED, E.KICKED, E.FENCED)


def state_logs(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "switchboard.states" and r.getMessage() == event
    ]


@pytest.fixture(autouse=True)
def _capture_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.states")


# ---- the table -------------------------------------------------------------------


@pytest.mark.parametrize("state", list(SessionState), ids=lambda s: s.name)
def test_every_event_has_an_answer_in_every_state(state: SessionState) -> None:
    assert set(SESSION_TABLE[state]) == set(SessionEvent)


def test_the_table_covers_every_state_and_answers_with_states_codes_or_none() -> None:
    assert set(SESSION_TABLE) == set(SessionState)
    for answers in SESSION_TABLE.values():
        for answer in answers.values():
            assert answer is None or isinstance(answer, SessionState | ErrorCode)


def test_anonymous_may_log_in_ping_and_say_bye_but_not_send_requests() -> None:
    assert next_session_state(S.ANONYMOUS, E.AUTH) is None
    assert next_session_state(S.ANONYMOUS, E.ANY) is None
    assert next_session_state(S.ANONYMOUS, E.REQUEST) is ErrorCode.NOT_AUTHENTICATED
    assert next_session_state(S.ANONYMOUS, E.LOGIN) is S.ACTIVE


def test_active_refuses_a_second_login() -> None:
    assert next_session_state(S.ACTIVE, E.AUTH) is ErrorCode.ALREADY_AUTHENTICATED
    assert next_session_state(S.ACTIVE, E.LOGIN) is ErrorCode.ALREADY_AUTHENTICATED
    assert next_session_state(S.ACTIVE, E.REQUEST) is None
    assert next_session_state(S.ACTIVE, E.ANY) is None


@pytest.mark.parametrize("state", [S.DETACHED, S.CLOSED])
def test_final_states_refuse_every_request_but_ping_and_bye(state: SessionState) -> None:
    assert next_session_state(state, E.REQUEST) is ErrorCode.NOT_AUTHENTICATED
    assert next_session_state(state, E.AUTH) is ErrorCode.NOT_AUTHENTICATED
    assert next_session_state(state, E.ANY) is None


# ---- the gate's classes of requests ------------------------------------------------


@pytest.mark.parametrize(
    ("req", "event"),
    [
        (Hello(user="alice", password="pw", device="phone"), E.AUTH),
        (Register(user="alice", password="pw"), E.AUTH),
        (Resume(user="alice", device="phone", token="t", last_seq=0), E.AUTH),
        (Ping(), E.ANY),
        (Bye(rid=1), E.ANY),
        (Send(cmid="c1", body="hi", to="bob"), E.REQUEST),
        (Ack(seq=3), E.REQUEST),
        (Read(msg_id=9), E.REQUEST),
        (History(with_user="bob"), E.REQUEST),
        (Typing(to="bob"), E.REQUEST),
        (PasswordChange(old="a", new="b"), E.REQUEST),
        (ContactAdd(user="bob"), E.REQUEST),
        (ContactList(), E.REQUEST),
        (RoomCreate(name="r"), E.REQUEST),
        (RoomList(), E.REQUEST),
    ],
    ids=lambda v: getattr(v, "op", None) or str(v),
)
def test_request_event_classifies_requests(req: Any, event: SessionEvent) -> None:
    assert request_event(req) is event


# ---- the setter ----------------------------------------------------------------------


def test_login_attaches_the_session_and_logs_the_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    peer = FakePeer()
    session = Session(7, 1, "alice", "phone", 2)
    left = set_session_state(peer, E.LOGIN, "hello", session, rid=5)
    assert left is S.ANONYMOUS
    assert peer.state is S.ACTIVE
    assert peer.session is session
    assert state_logs(caplog, "session_state") == [
        {
            "old": "anonymous",
            "new": "active",
            "on": "login",
            "why": "hello",
            "rid": 5,
            "user": "alice",
            "device": "phone",
            "session": 7,
        }
    ]


def test_disconnect_detaches_an_active_session(caplog: pytest.LogCaptureFixture) -> None:
    peer = active_peer()
    session = peer.session
    assert set_session_state(peer, E.DISCONNECT, "disconnected") is S.ACTIVE
    assert peer.state is S.DETACHED
    assert peer.session is session  # what ended is still known, for the log and the DB
    (fields,) = state_logs(caplog, "session_state")
    assert (fields["old"], fields["new"], fields["on"]) == ("active", "detached", "disconnect")
    assert fields["user"] == "alice"


@pytest.mark.parametrize("event", ENDS, ids=lambda e: e.name)
def test_ends_close_an_active_session(
    event: SessionEvent, caplog: pytest.LogCaptureFixture
) -> None:
    peer = active_peer()
    assert set_session_state(peer, event, "why not") is S.ACTIVE
    assert peer.state is S.CLOSED
    (fields,) = state_logs(caplog, "session_state")
    assert (fields["old"], fields["new"], fields["on"]) == ("active", "closed", event.value)


@pytest.mark.parametrize("state", [S.DETACHED, S.CLOSED])
@pytest.mark.parametrize("event", LIFECYCLE, ids=lambda e: e.name)
def test_final_states_ignore_lifecycle_events(
    state: SessionState, event: SessionEvent, caplog: pytest.LogCaptureFixture
) -> None:
    peer = active_peer()
    peer.state = state
    session = peer.session
    other = Session(99, 1, "alice", "phone", 5)
    assert set_session_state(peer, event, "late", other) is None
    assert peer.state is state
    assert peer.session is session
    assert state_logs(caplog, "session_state") == []


def test_a_refused_login_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    peer = active_peer()
    first = peer.session
    assert set_session_state(peer, E.LOGIN, "hello again", Session(9, 1, "alice", "tab", 1)) is None
    assert peer.state is S.ACTIVE
    assert peer.session is first
    assert state_logs(caplog, "session_state") == []


@pytest.mark.parametrize("event", [E.BYE, E.DISCONNECT, E.FENCED], ids=lambda e: e.name)
def test_ending_an_anonymous_connection_changes_nothing(
    event: SessionEvent, caplog: pytest.LogCaptureFixture
) -> None:
    peer = FakePeer()
    assert set_session_state(peer, event, "gone") is None
    assert peer.state is S.ANONYMOUS
    assert peer.session is None
    assert state_logs(caplog, "session_state") == []


# ---- the worker --------------------------------------------------------------------


def test_a_worker_starts_in_starting_and_accepts_only_when_serving() -> None:
    status = WorkerStatus("w1")
    assert status.state is WorkerState.STARTING
    assert not status.accepting
    for state in WorkerState:
        assert status_in(state).accepting is (state is WorkerState.SERVING)


@pytest.mark.parametrize("old", list(WorkerState), ids=lambda s: s.name)
@pytest.mark.parametrize("new", list(WorkerState), ids=lambda s: s.name)
def test_worker_status_follows_the_worker_table(
    old: WorkerState, new: WorkerState, caplog: pytest.LogCaptureFixture
) -> None:
    status = status_in(old)
    caplog.clear()
    allowed = new in WORKER_TABLE[old]
    assert status.set(new, "test", connections=3) is allowed
    assert status.state is (new if allowed else old)
    logged = state_logs(caplog, f"worker_{new.value}")
    if allowed:
        assert logged == [{"old": old.value, "why": "test", "connections": 3}]
    else:
        assert logged == []


def test_stopping_is_final() -> None:
    assert WORKER_TABLE[WorkerState.STOPPING] == frozenset()
    status = status_in(WorkerState.STOPPING)
    for state in WorkerState:
        assert not status.set(state, "too late")
    assert status.state is WorkerState.STOPPING


def test_the_worker_table_allows_what_the_docstring_draws() -> None:
    W = WorkerState
    assert {(old, new) for old, news in WORKER_TABLE.items() for new in news} == {
        (W.STARTING, W.SERVING),
        (W.STARTING, W.STOPPING),
        (W.SERVING, W.DRAINING),
        (W.SERVING, W.STOPPING),
        (W.DRAINING, W.SERVING),
        (W.DRAINING, W.STOPPING),
    }
