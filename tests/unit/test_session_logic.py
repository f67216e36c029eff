"""Session logic through the real Dispatcher: the gate, login, the lifecycle, errors.

No database: the store functions are faked in memory (worker_fakes.FakeStore)
and every other collaborator records what it was asked to do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import typing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
import pytest

from app.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    ContactList,
    ErrorCode,
    Hello,
    History,
    PasswordChange,
    Ping,
    Read,
    Register,
    Request,
    Resume,
    Send,
)
from app.store.errors import StoreRejected
from app.store.messages import Stored
from app.store.sessions import ResumedSession
from app.worker.admission import Work
from app.worker.errors import RequestError, reply_for
from app.worker.login import token_hash
from app.worker.states import SessionEvent, SessionState, WorkerState, set_session_state
from tests.unit.worker_fakes import GOOD_PASSWORD, WORKER_ID, FakePeer, Harness


@pytest.fixture
def h(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch)


def ops(frames: list[dict[str, Any]]) -> list[str]:
    return [f["op"] for f in frames]


def error(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """The one frame of a reply, which must be an error."""
    assert ops(frames) == ["error"], frames
    return frames[0]


def resumed(**changes: Any) -> ResumedSession:
    values: dict[str, Any] = dict(
        session_id=500,
        user_id=1,
        epoch=4,
        previous_worker_id="w2",
        previous_state="detached",
        last_seq=40,
        acked=30,
        has_contacts=True,
    )
    values.update(changes)
    return ResumedSession(**values)


# ---- the gate --------------------------------------------------------------------


@pytest.mark.parametrize(
    "req",
    [Send(cmid="c1", body="hi", to="bob", rid=1), Ack(seq=1, rid=1), ContactList(rid=1)],
    ids=lambda r: r.op,
)
async def test_a_request_before_login_is_refused_and_the_connection_stays(
    h: Harness, req: Request
) -> None:
    peer = h.connect()
    frame = error(await h.request(peer, req))
    assert frame["code"] == "not_authenticated"
    assert frame["rid"] == 1
    assert not peer.closed
    assert peer.state is SessionState.ANONYMOUS
    assert h.store.calls == []
    assert h.commits.sent == []


async def test_ping_is_answered_before_login(h: Harness) -> None:
    peer = h.connect()
    assert await h.request(peer, Ping(rid="p")) == [{"op": "pong", "rid": "p"}]


async def test_every_request_type_has_a_handler(h: Harness) -> None:
    handled = set(h.dispatcher._handlers)
    assert handled == set(typing.get_args(Request))


# ---- hello -----------------------------------------------------------------------


async def test_hello_with_a_wrong_password_fails_and_counts_the_failure(h: Harness) -> None:
    h.store.add_user("alice")
    peer = h.connect("203.0.113.5:5555")
    frame = error(await h.request(peer, Hello(user="alice", password="wrong", device="d", rid=2)))
    assert (frame["code"], frame["rid"]) == ("auth_failed", 2)
    # Counted before the check, per (user, address) and per address; a failure
    # leaves both counted.
    assert {k: r.attempts for k, r in h.store.throttle.items()} == {
        "login|alice|203.0.113.5": 1,
        "login-addr|203.0.113.5": 1,
    }
    assert not peer.closed
    assert peer.state is SessionState.ANONYMOUS
    assert h.registry.by_user == {}
    assert h.store.called("password_batch") == []


async def test_hello_for_an_unknown_user_fails_the_same_way(h: Harness) -> None:
    peer = h.connect()
    frame = error(await h.request(peer, Hello(user="nobody", password=GOOD_PASSWORD, device="d")))
    assert frame["code"] == "auth_failed"
    assert h.store.throttle["login|nobody|198.51.100.7"].attempts == 1


async def test_hello_logs_in_with_a_welcome_as_the_protocol_describes(h: Harness) -> None:
    alice = h.store.add_user("alice")
    h.store.last_seq[alice.id] = 12
    h.store.acked[(alice.id, "phone")] = 9
    peer = h.connect()
    req = Hello(user="alice", password=GOOD_PASSWORD, device="phone", rid="r1")
    (welcome,) = await h.request(peer, req)

    token = welcome.pop("resume_token")
    assert isinstance(token, str) and len(token) >= 32
    device_token = welcome.pop("device_token")
    assert isinstance(device_token, str) and len(device_token) >= 43  # 256 bits
    assert h.store.device_tokens[(alice.id, "phone")] == token_hash(device_token)
    session_id = int(welcome["session"])
    assert welcome == {
        "op": "welcome",
        "v": PROTOCOL_VERSION,
        "user": "alice",
        "device": "phone",
        "session": str(session_id),
        "worker": WORKER_ID,
        "seq": 12,
        "acked": 9,
        "rid": "r1",
    }
    # Only the token's hash is stored.
    assert h.store.sessions[session_id].token_hash == token_hash(token)
    assert peer.state is SessionState.ACTIVE
    assert peer.session is not None
    assert (peer.session.session_id, peer.session.delivered_seq) == (session_id, 9)
    assert h.registry.by_user == {alice.id: {peer}}
    assert h.delivery.dirty == [alice.id]  # the replay after acked starts
    assert h.presence.broadcasts == [alice.id]
    assert h.events.named("session_opened") == [(alice.id, session_id, 1)]
    assert not peer.closed


async def test_hello_replacing_a_session_of_the_same_device_tells_the_others(h: Harness) -> None:
    alice = h.store.add_user("alice")
    first = await h.log_in("alice", "phone")
    assert first.session is not None
    old_id = first.session.session_id
    await h.log_in("alice", "phone")
    assert h.store.sessions[old_id].state == "closed"
    assert h.announcer.replaced == [(alice.id, old_id, None)]
    assert h.events.named("session_replaced") == [(alice.id, old_id, 1, WORKER_ID)]


async def test_a_successful_hello_clears_the_pair_and_gives_the_attempt_back(
    h: Harness,
) -> None:
    h.store.add_user("alice")
    peer = h.connect()
    for _ in range(3):
        await h.request(peer, Hello(user="alice", password="wrong", device="d"))
    await h.log_in("alice", peer=peer)
    assert "login|alice|198.51.100.7" not in h.store.throttle
    # The three failures still count against the address; the right one does not.
    assert h.store.throttle["login-addr|198.51.100.7"].attempts == 3


async def test_hello_is_rate_limited_after_the_free_failures(h: Harness) -> None:
    h.store.add_user("alice")
    peer = h.connect()
    for _ in range(h.settings.login_free_failures):
        frame = error(await h.request(peer, Hello(user="alice", password="wrong", device="d")))
        assert frame["code"] == "auth_failed"
    checked = h.passwords.verified
    frame = error(await h.request(peer, Hello(user="alice", password=GOOD_PASSWORD, device="d")))
    assert frame["code"] == "rate_limited"
    assert frame["retry_after"] == 1  # login_backoff_base_s
    assert h.passwords.verified == checked  # refused before any hash
    assert peer.state is SessionState.ANONYMOUS


async def test_hello_of_another_version_is_refused_but_not_fatal(h: Harness) -> None:
    peer = h.connect()
    frame = error(await h.request(peer, Hello(user="a", password="p", device="d", v=2)))
    assert frame["code"] == "unsupported_version"
    assert not peer.closed
    assert h.store.calls == []


async def test_hello_of_a_disabled_account_is_refused(h: Harness) -> None:
    h.store.add_user("alice", disabled=True)
    peer = h.connect()
    frame = error(await h.request(peer, Hello(user="alice", password=GOOD_PASSWORD, device="d")))
    assert frame["code"] == "account_disabled"
    assert h.store.called("password_batch") == []


async def test_hello_of_an_account_disabled_while_its_password_is_checked_is_refused(
    h: Harness,
) -> None:
    """find_user read the account enabled and the disable committed during argon2:
    the login's batch (which locks the user's row in PostgreSQL) refuses it."""
    h.store.add_user("alice")
    verify = h.passwords.verify

    async def verify_while_disabled(password_hash: str | None, password: str) -> bool:
        account = h.store.users["alice"]
        h.store.users["alice"] = dataclasses.replace(account, disabled=True)
        return await verify(password_hash, password)

    h.passwords.verify = verify_while_disabled  # type: ignore[method-assign]
    peer = h.connect()
    frame = error(await h.request(peer, Hello(user="alice", password=GOOD_PASSWORD, device="d")))
    assert frame["code"] == "account_disabled"
    assert h.store.called("password_batch") == [([(1, "d")],)]
    assert peer.state is SessionState.ANONYMOUS and not peer.closed
    assert h.store.sessions == {} and h.registry.by_user == {}


async def test_a_second_hello_is_refused_without_touching_the_store(h: Harness) -> None:
    peer = await h.log_in("alice")
    session = peer.session
    calls = len(h.store.calls)
    req = Hello(user="alice", password=GOOD_PASSWORD, device="phone", rid=3)
    frame = error(await h.request(peer, req))
    assert (frame["code"], frame["rid"]) == ("already_authenticated", 3)
    assert len(h.store.calls) == calls
    assert peer.session is session
    assert not peer.closed


async def test_logins_past_the_admission_queue_are_told_to_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch, max_concurrent_auth=1, max_auth_queue=0)
    h.store.add_user("alice")
    release = asyncio.Event()

    async def busy() -> None:
        async with h.admission.slot(Work.LOGIN):
            await release.wait()

    holder = asyncio.create_task(busy())
    await asyncio.sleep(0)
    frame = error(
        await h.request(h.connect(), Hello(user="alice", password=GOOD_PASSWORD, device="d"))
    )
    assert frame["code"] == "overloaded"
    s = h.settings
    assert s.admission_retry_min_s <= frame["retry_after"] <= s.admission_retry_max_s
    assert h.admission.overloaded == 1
    release.set()
    await holder


# ---- register and password ---------------------------------------------------------


async def test_register_with_a_short_password_is_weak(h: Harness) -> None:
    peer = h.connect()
    frame = error(await h.request(peer, Register(user="bob", password="short", rid=4)))
    assert (frame["code"], frame["rid"]) == ("weak_password", 4)
    assert "12" in frame["message"]
    assert "bob" not in h.store.users


async def test_register_creates_the_account_without_logging_in(h: Harness) -> None:
    peer = h.connect()
    frames = await h.request(peer, Register(user="bob", password=GOOD_PASSWORD, rid=5))
    assert frames == [{"op": "registered", "user": "bob", "rid": 5}]
    assert h.store.users["bob"].password_hash == "hash:" + GOOD_PASSWORD
    assert peer.state is SessionState.ANONYMOUS


async def test_register_of_a_taken_name_says_so(h: Harness) -> None:
    h.store.add_user("bob")
    frame = error(await h.request(h.connect(), Register(user="bob", password=GOOD_PASSWORD)))
    assert frame["code"] == "user_exists"


async def test_password_change_checks_the_old_one(h: Harness) -> None:
    peer = await h.log_in("alice")
    new = "a much better password"
    frame = error(await h.request(peer, PasswordChange(old="wrong", new=new)))
    assert frame["code"] == "auth_failed"
    assert h.store.called("change_password") == []
    assert await h.request(peer, PasswordChange(old=GOOD_PASSWORD, new=new, rid=1)) == [
        {"op": "ok", "rid": 1}
    ]
    assert h.store.users["alice"].password_hash == "hash:" + new


# ---- resume ----------------------------------------------------------------------


async def test_resume_with_a_bad_token_is_refused(h: Harness) -> None:
    h.store.add_user("alice")
    peer = h.connect()
    req = Resume(user="alice", device="phone", token="stale", last_seq=0, rid=6)
    frame = error(await h.request(peer, req))
    assert (frame["code"], frame["rid"]) == ("bad_token", 6)
    assert peer.state is SessionState.ANONYMOUS
    assert not peer.closed


async def test_resume_of_a_disabled_account_says_only_bad_token(h: Harness) -> None:
    h.store.add_user("alice", disabled=True)
    req = Resume(user="alice", device="phone", token="t" * 16, last_seq=0)
    assert error(await h.request(h.connect(), req))["code"] == "bad_token"
    # Nothing about the account was looked up: the answer cannot depend on it.
    assert h.store.called("find_user") == []


@pytest.mark.parametrize("previous", ["active", "detached"])
async def test_resume_takes_over_with_a_rotated_token(h: Harness, previous: str) -> None:
    h.commits.resumed = resumed(previous_state=previous)
    peer = h.connect()
    req = Resume(user="alice", device="phone", token="old-token", last_seq=35, rid=7)
    (welcome,) = await h.request(peer, req)

    assert welcome["op"] == "welcome"
    assert (welcome["session"], welcome["seq"], welcome["acked"]) == ("500", 40, 30)
    assert welcome["rid"] == 7
    new_token = welcome["resume_token"]
    assert new_token != "old-token"
    (asked,) = h.commits.take_overs
    assert asked.token_hash == token_hash("old-token")
    assert asked.new_token_hash == token_hash(new_token)
    assert peer.state is SessionState.ACTIVE
    assert peer.session is not None
    assert (peer.session.epoch, peer.session.delivered_seq) == (4, 35)  # replay after last_seq
    assert h.registry.by_user == {1: {peer}}
    assert h.login.resumes == 1
    # An active previous owner may still hold a connection: it is fenced by the new epoch.
    assert h.announcer.replaced == ([(1, 500, 4)] if previous == "active" else [])


async def test_resume_without_contacts_skips_the_presence_broadcast(h: Harness) -> None:
    h.commits.resumed = resumed(has_contacts=False, last_seq=10)
    req = Resume(user="alice", device="phone", token="t", last_seq=50)
    await h.request(h.connect(), req)
    assert h.presence.broadcasts == []
    assert h.delivery.dirty == [1]


# ---- the end: bye and a lost connection --------------------------------------------


async def test_bye_closes_the_session_and_the_connection(h: Harness) -> None:
    peer = await h.log_in("alice")
    assert peer.session is not None
    sid, uid = peer.session.session_id, peer.session.user_id
    h.presence.broadcasts.clear()

    assert await h.request(peer, Bye(rid=8)) == [{"op": "ok", "rid": 8}]
    assert peer.closed
    assert peer.state is SessionState.CLOSED
    assert h.store.called("close_session") == [(sid, 1, "bye")]
    assert h.store.called("detach_session") == []
    assert h.store.sessions[sid].state == "closed"
    assert h.registry.by_user == {}
    assert h.events.named("session_ended") == [(uid, sid, 1, "bye", False)]
    assert h.presence.broadcasts == [uid]

    await h.lose(peer)  # connection_lost after the close does nothing more
    assert h.store.called("detach_session") == []
    assert h.store.sessions[sid].state == "closed"


async def test_bye_before_login_just_closes(h: Harness) -> None:
    peer = h.connect()
    assert await h.request(peer, Bye()) == [{"op": "ok"}]
    assert peer.closed
    assert peer.state is SessionState.ANONYMOUS
    assert h.store.calls == []


async def test_a_lost_active_connection_detaches_its_session_once(h: Harness) -> None:
    peer = await h.log_in("alice")
    assert peer.session is not None
    sid, uid = peer.session.session_id, peer.session.user_id
    await h.lose(peer)
    await h.lose(peer)  # a second report of the same loss finds the session ended
    assert h.store.called("detach_session") == [(sid, 1, "disconnected")]
    assert h.store.sessions[sid].state == "detached"  # resumable
    assert peer.state is SessionState.DETACHED
    assert h.registry.connections == set()
    assert h.registry.by_user == {}
    assert h.events.named("session_ended") == [(uid, sid, 1, "disconnected", True)]


@pytest.mark.parametrize("event", [SessionEvent.REPLACED, SessionEvent.KICKED])
async def test_a_lost_connection_after_its_session_ended_elsewhere_does_nothing(
    h: Harness, event: SessionEvent
) -> None:
    peer = await h.log_in("alice")
    h.registry.detach(peer)  # as listener.py does before the state change
    set_session_state(peer, event, "a newer login")
    calls = len(h.store.calls)
    await h.lose(peer)
    assert len(h.store.calls) == calls
    assert peer.state is SessionState.CLOSED


async def test_a_lost_anonymous_connection_leaves_the_registry(h: Harness) -> None:
    peer = h.connect()
    assert h.registry.connections == {peer}
    await h.lose(peer)
    assert h.registry.connections == set()
    assert h.store.calls == []


async def test_a_stopping_worker_leaves_detaching_to_its_bulk_statement(h: Harness) -> None:
    peer = await h.log_in("alice")
    assert h.status.set(WorkerState.STOPPING, "test")
    await h.lose(peer)
    assert h.store.called("detach_session") == []
    assert peer.state is SessionState.ACTIVE


async def test_a_session_taken_over_meanwhile_is_left_alone(h: Harness) -> None:
    peer = await h.log_in("alice")
    assert peer.session is not None
    row = h.store.sessions[peer.session.session_id]
    row.epoch += 1  # another worker resumed it: this connection's epoch is stale
    h.presence.broadcasts.clear()
    await h.lose(peer)
    assert row.state == "active"  # the fenced write changed nothing
    assert h.events.named("session_ended") == []
    assert h.presence.broadcasts == []


# ---- the connection opens ----------------------------------------------------------


async def test_a_serving_worker_keeps_a_new_connection(h: Harness) -> None:
    peer = h.connect()
    assert h.registry.connections == {peer}
    assert peer.frames == []
    assert not peer.closed


async def test_a_draining_worker_sends_a_new_connection_elsewhere(h: Harness) -> None:
    assert h.status.set(WorkerState.DRAINING, "test")
    peer = h.connect()
    (frame,) = peer.frames
    assert frame["op"] == "reconnect"
    assert 0 <= frame["after_ms"] <= 200
    assert peer.closed
    assert h.registry.connections == set()


@pytest.mark.parametrize("state", [WorkerState.STARTING, WorkerState.STOPPING])
async def test_a_worker_not_serving_refuses_a_new_connection(
    monkeypatch: pytest.MonkeyPatch, state: WorkerState
) -> None:
    h = Harness(monkeypatch, state)
    peer = h.connect()
    frame = error(peer.frames)
    assert frame["code"] == "shutting_down"
    assert peer.closed
    assert h.registry.connections == set()


# ---- every request gets exactly one reply -------------------------------------------


@dataclass(frozen=True, slots=True)
class Frobnicate:
    """A request type the dispatcher has no handler for."""

    op: ClassVar[str] = "frobnicate"
    rid: int | None = None


async def test_an_unknown_request_type_gets_unknown_op(h: Harness) -> None:
    peer = await h.log_in("alice")
    frame = error(await h.request(peer, Frobnicate(rid=9)))
    assert (frame["code"], frame["rid"]) == ("unknown_op", 9)
    assert not peer.closed


async def test_a_crashing_handler_costs_one_request_not_the_connection(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    peer = await h.log_in("alice")
    h.commits.error = RuntimeError("a bug")
    frame = error(await h.request(peer, Ack(seq=1, rid=10)))
    assert frame == {
        "op": "error",
        "code": "internal",
        "message": "internal server error",
        "rid": 10,
    }
    assert not peer.closed
    (crash,) = [r for r in caplog.records if r.getMessage() == "request_crashed"]
    assert crash.levelno == logging.ERROR and crash.exc_info is not None
    # The next request is served as usual.
    h.commits.error = None
    assert await h.request(peer, Ack(seq=1, rid=11)) == [{"op": "ok", "rid": 11}]


async def test_a_transient_db_error_asks_for_a_retry(h: Harness) -> None:
    h.store.add_user("alice")
    h.store.error = OSError("connection reset")
    peer = h.connect()
    frame = error(await h.request(peer, Hello(user="alice", password=GOOD_PASSWORD, device="d")))
    assert (frame["code"], frame["message"]) == ("internal", "temporary server error, retry")
    assert not peer.closed
    assert peer.state is SessionState.ANONYMOUS


async def test_a_store_not_found_is_not_found(h: Harness) -> None:
    peer = await h.log_in("alice")
    h.commits.receipt_ok = False
    frame = error(await h.request(peer, Read(msg_id=77, rid=12)))
    assert (frame["code"], frame["rid"]) == ("not_found", 12)


async def test_a_fatal_code_closes_the_connection(h: Harness) -> None:
    peer = await h.log_in("alice")
    h.commits.error = RequestError(ErrorCode.SHUTTING_DOWN, "worker stopping")
    frame = error(await h.request(peer, Ack(seq=1)))
    assert frame["code"] == "shutting_down"
    assert peer.closed


async def test_a_history_for_an_unknown_user_is_not_found(h: Harness) -> None:
    peer = await h.log_in("alice")
    frame = error(await h.request(peer, History(with_user="nobody", rid=13)))
    assert (frame["code"], frame["rid"]) == ("not_found", 13)


# ---- messaging: send, ack -------------------------------------------------------------


async def test_a_send_is_answered_when_its_batch_commits(h: Harness) -> None:
    bob = h.store.add_user("bob")
    peer = await h.log_in("alice")
    assert await h.request(peer, Send(cmid="c1", body="hi", to="bob", rid=14)) == []
    (message, done), *_ = h.commits.sent
    assert (message.recipient_id, message.body, message.cmid) == (bob.id, "hi", "c1")
    assert peer.inflight_sends == 1

    done(Stored(321, datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC), 5))
    assert peer.frames[-1] == {
        "op": "sent",
        "cmid": "c1",
        "id": 321,
        "ts": "2024-05-01T12:00:00.123Z",
        "seq": 5,
        "rid": 14,
    }
    assert peer.inflight_sends == 0


@pytest.mark.parametrize(
    ("failure", "code", "message"),
    [
        # The batch ran out of retry budget: retry (the cmid makes it safe).
        (OSError("gone"), "internal", "the database is unavailable; retry"),
        # The database refused this message alone: the same send would fail again.
        (
            StoreRejected("CharacterNotInRepertoireError"),
            "bad_field",
            "the server cannot store this message; do not resend it unchanged",
        ),
    ],
)
async def test_a_send_that_did_not_commit_gets_its_documented_error(
    h: Harness, failure: Exception, code: str, message: str
) -> None:
    h.store.add_user("bob")
    peer = await h.log_in("alice")
    await h.request(peer, Send(cmid="c1", body="hi", to="bob", rid=15))
    (_, done), *_ = h.commits.sent
    done(failure)
    assert peer.frames[-1] == {"op": "error", "code": code, "message": message, "rid": 15}
    assert peer.inflight_sends == 0


def test_any_request_the_database_refused_is_bad_field_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        frame, fatal = reply_for(StoreRejected("DataError"), "read", 7)
    assert orjson.loads(frame) == {
        "op": "error",
        "code": "bad_field",
        "message": "the server cannot store this request; do not resend it unchanged",
        "rid": 7,
    }
    assert not fatal
    assert not [r for r in caplog.records if r.exc_info]


async def test_send_now_needs_a_session_and_a_cached_recipient(h: Harness) -> None:
    bob = h.store.add_user("bob")
    req = Send(cmid="c1", body="hi", to="bob")
    anonymous = h.connect()
    assert not h.messaging.send_now(anonymous, req)
    peer = await h.log_in("alice")
    assert not h.messaging.send_now(peer, req)  # bob's id is not cached yet
    await h.registry.user_id("bob")
    assert h.messaging.send_now(peer, req)
    assert [m.recipient_id for m, _ in h.commits.sent] == [bob.id]
    peer.inflight_sends = h.settings.max_inflight_sends
    assert not h.messaging.send_now(peer, req)  # no free slot: the slow path waits


async def test_an_ack_is_ok_once_committed(h: Harness) -> None:
    peer = await h.log_in("alice", "phone")
    assert peer.session is not None
    assert await h.request(peer, Ack(seq=3, rid=16)) == [{"op": "ok", "rid": 16}]
    (ack,) = h.commits.acks
    assert (ack.user_id, ack.device, ack.seq) == (peer.session.user_id, "phone", 3)
    assert h.events.named("acked") == [
        (peer.session.user_id, peer.session.session_id, peer.session.epoch, 3)
    ]


async def test_the_fake_peer_drops_writes_after_close() -> None:
    peer = FakePeer()
    peer.fail(ErrorCode.KICKED, "bye now")
    peer.write(b'{"op":"pong"}\n')
    assert [f["code"] for f in peer.frames] == ["kicked"]
    assert peer.written_after_close == [{"op": "pong"}]


# ---- known gaps (see the report; strict: they fail once fixed, drop the marker then) -----


async def test_a_welcome_is_the_only_reply_even_if_the_presence_push_fails(h: Harness) -> None:
    alice = h.store.add_user("alice")
    h.presence.failing[alice.id] = OSError("connection reset")
    peer = h.connect()
    req = Hello(user="alice", password=GOOD_PASSWORD, device="d", rid=1)
    assert ops(await h.request(peer, req)) == ["welcome"]


async def test_bye_is_one_reply_and_a_close_even_if_the_store_fails(h: Harness) -> None:
    peer = await h.log_in("alice")
    assert peer.session is not None
    sid = peer.session.session_id
    h.store.error = OSError("connection reset")
    before = len(peer.frames)
    await h.dispatcher.handle(peer, Bye(rid=2))
    assert ops(peer.frames[before:]) == ["ok"]
    assert peer.closed
    assert h.store.sessions[sid].state == "active"
    # The database is back: the session's end is written by the retry, not lost.
    h.store.error = None
    await h.settle()
    assert h.store.sessions[sid].state == "closed"
    assert h.events.named("session_ended") == [(peer.session.user_id, sid, 1, "bye", False)]
