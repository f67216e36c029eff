"""Revocation without a database: pushes, pushes that beat the attach, the rows' recheck.

The real Login, Sessions and Revoker run over worker_fakes (FakeStore's rows,
FakeSessionRows answering as the recheck query does); each recheck tick is
driven by hand, except in the two tests of the loop itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import pytest

from app.protocol import Hello, Ping
from app.worker import metrics, revoke
from app.worker.decisions import Decision
from app.worker.revoke import (
    CLOSED_MESSAGE,
    MISSED_PUSH_TTL_S,
    REPLACED_MESSAGE,
    Ending,
)
from app.worker.states import Session, SessionEvent, SessionState
from tests.unit.worker_fakes import GOOD_PASSWORD, FakePeer, FakeStore, Harness

ADMIN_CLOSED = "an administrator closed this session"
DISABLED = "this account was disabled"
KICKED = Ending(SessionEvent.KICKED, "kicked")


@pytest.fixture
def h(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch)


def ops(frames: list[dict[str, Any]]) -> list[str]:
    return [f["op"] for f in frames]


def session_of(peer: FakePeer) -> Session:
    assert peer.session is not None
    return peer.session


def assert_kicked(peer: FakePeer, message: str) -> None:
    last = peer.frames[-1]
    assert (last["op"], last["code"], last["message"]) == ("error", "kicked", message)
    assert peer.closed and peer.state is SessionState.CLOSED


async def assert_untouched(h: Harness, peer: FakePeer) -> None:
    """The bystander: still attached, still served."""
    assert not peer.closed and peer.state is SessionState.ACTIVE
    assert peer in h.registry.by_user[session_of(peer).user_id]
    assert ops(await h.request(peer, Ping())) == ["pong"]


def disable(store: FakeStore, user: str) -> None:
    store.users[user] = dataclasses.replace(store.users[user], disabled=True)


# ---- pushes ------------------------------------------------------------------------------


async def test_a_kick_push_ends_its_holder_and_no_one_else(h: Harness) -> None:
    alice, bob = await h.log_in("alice"), await h.log_in("bob")
    s = session_of(alice)
    broadcasts = len(h.presence.broadcasts)
    h.revoker.pushed(s.user_id, s.session_id, KICKED, "kicked")
    await h.settle()
    assert_kicked(alice, ADMIN_CLOSED)
    assert s.user_id not in h.registry.by_user
    assert h.events.named("session_ended") == [(s.user_id, s.session_id, 1, "kicked", False)]
    assert h.presence.broadcasts[broadcasts:] == [s.user_id]  # her contacts see her leave
    await assert_untouched(h, bob)


async def test_a_replacement_push_ends_only_holders_of_an_older_epoch(h: Harness) -> None:
    alice = await h.log_in("alice")
    s = session_of(alice)
    # A resume elsewhere at this very epoch is this connection's own (it resumed): stays.
    h.revoker.pushed(s.user_id, s.session_id, Ending(SessionEvent.REPLACED, "replaced", 1), "r")
    await assert_untouched(h, alice)
    h.revoker.pushed(s.user_id, s.session_id, Ending(SessionEvent.REPLACED, "replaced", 2), "r")
    last = alice.frames[-1]
    assert (last["code"], last["message"]) == ("session_replaced", REPLACED_MESSAGE)
    assert alice.closed and alice.state is SessionState.CLOSED
    assert h.events.named("session_ended") == []  # the one who replaced it logs that


async def test_a_kick_that_came_before_the_attach_follows_the_welcome(h: Harness) -> None:
    """The disable closed the row between open_session's commit and the attach: the
    push found no holder, so it waits for the connection that attaches the session."""
    account = h.store.add_user("alice")
    next_session_id = 1000 + len(h.store.sessions)  # the id FakeStore opens next
    h.revoker.pushed(account.id, next_session_id, Ending(SessionEvent.KICKED, "disabled"), "d")
    peer = h.connect()
    frames = await h.request(peer, Hello(user="alice", password=GOOD_PASSWORD, device="phone"))
    assert ops(frames) == ["welcome", "error"]
    assert_kicked(peer, DISABLED)
    assert account.id not in h.registry.by_user
    assert h.delivery.dirty == []  # no replay for a session that is over
    bob = await h.log_in("bob")
    await assert_untouched(h, bob)


async def test_a_remembered_push_expires(h: Harness) -> None:
    account = h.store.add_user("alice")
    h.revoker.pushed(account.id, 1000, KICKED, "kicked")
    h.clock.advance(MISSED_PUSH_TTL_S + 1)
    alice = await h.log_in("alice")
    assert session_of(alice).session_id == 1000
    await assert_untouched(h, alice)


async def test_remembered_pushes_are_bounded(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(revoke, "MISSED_PUSH_MAX", 3)
    for session_id in range(10):
        h.revoker.pushed(1, session_id, KICKED, "kicked")
    assert list(h.revoker._missed) == [7, 8, 9]  # the newest, in time order
    h.clock.advance(MISSED_PUSH_TTL_S + 1)
    h.revoker.pushed(1, 10, KICKED, "kicked")
    assert list(h.revoker._missed) == [10]  # expired ones go as new ones come


# ---- the rows' recheck ----------------------------------------------------------------------


def row_kicked(h: Harness, s: Session) -> None:
    h.store.sessions[s.session_id].state = "closed"
    h.store.sessions[s.session_id].reason = "kicked"


def row_disabled(h: Harness, s: Session) -> None:
    row_kicked(h, s)
    h.store.sessions[s.session_id].reason = "disabled"
    disable(h.store, s.username)


def user_disabled_row_missed(h: Harness, s: Session) -> None:
    disable(h.store, s.username)  # and the row is still this worker's, active


def row_replaced(h: Harness, s: Session) -> None:
    row_kicked(h, s)
    h.store.sessions[s.session_id].reason = "replaced"


def resumed_elsewhere(h: Harness, s: Session) -> None:
    h.store.sessions[s.session_id].epoch += 1
    h.store.sessions[s.session_id].worker_id = "w2"


def row_gone(h: Harness, s: Session) -> None:
    del h.store.sessions[s.session_id]


def row_detached(h: Harness, s: Session) -> None:
    h.store.sessions[s.session_id].state = "detached"


CHANGES: dict[str, tuple[Callable[[Harness, Session], None], str, str | None, str]] = {
    # what happened to the row: (the change, error code, message, the decision's reason)
    "kicked": (row_kicked, "kicked", ADMIN_CLOSED, "kicked"),
    "disabled": (row_disabled, "kicked", DISABLED, "disabled"),
    "disabled, row missed": (user_disabled_row_missed, "kicked", DISABLED, "disabled"),
    "replaced by a login": (row_replaced, "session_replaced", REPLACED_MESSAGE, "replaced"),
    "resumed elsewhere": (resumed_elsewhere, "session_replaced", REPLACED_MESSAGE, "replaced"),
    "row gone": (row_gone, "kicked", CLOSED_MESSAGE, "closed"),
    "detached by the reaper": (row_detached, "reconnect", None, "detached"),
}


@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_recheck_ends_a_session_whose_row_moved_on(h: Harness, change: str) -> None:
    mutate, code, message, reason = CHANGES[change]
    alice, bob = await h.log_in("alice"), await h.log_in("bob")
    s = session_of(alice)
    mutate(h, s)
    decision = await h.revoker.recheck_tick("on the timer")
    await h.settle()
    assert decision == Decision(f"dropped 1 of 2 sessions (on the timer): 1 {reason}", "warning")
    [(worker, held)] = h.rows.asked
    assert (worker, sorted(held)) == ("w1", [(s.session_id, 1), (session_of(bob).session_id, 1)])
    last = alice.frames[-1]
    if code == "reconnect":  # resumable: the client is sent to resume it
        assert last["op"] == "reconnect" and 0 <= last["after_ms"] <= 1000
        assert h.store.sessions[s.session_id].state == "detached"
    else:
        assert (last["code"], last["message"]) == (code, message)
    assert alice.closed and alice.state is SessionState.CLOSED
    assert s.user_id not in h.registry.by_user
    if change == "disabled, row missed":
        assert h.rows.closed == [(s.session_id, 1, "disabled")]
        assert h.store.sessions[s.session_id].state == "closed"
    else:
        assert h.rows.closed == []
    await assert_untouched(h, bob)
    assert await h.revoker.recheck_tick("on the timer") == Decision("every session current")


async def test_a_recheck_with_every_row_current_drops_nothing(h: Harness) -> None:
    alice = await h.log_in("alice")
    assert await h.revoker.recheck_tick("on the timer") == Decision("every session current")
    await assert_untouched(h, alice)


async def test_a_recheck_without_sessions_asks_nothing(h: Harness) -> None:
    h.connect()  # connected, not logged in: no session to check
    assert await h.revoker.recheck_tick("on the timer") == Decision("every session current")
    assert h.rows.asked == []


async def test_a_recheck_asks_in_chunks_and_ends_what_each_finds(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(revoke, "RECHECK_CHUNK", 2)
    peers = [await h.log_in(f"user{i}") for i in range(5)]
    row_kicked(h, session_of(peers[3]))
    decision = await h.revoker.recheck_tick("on the timer")
    assert decision == Decision("dropped 1 of 5 sessions (on the timer): 1 kicked", "warning")
    assert [len(held) for _, held in h.rows.asked] == [2, 2, 1]
    assert sorted(sid for _, held in h.rows.asked for sid, _ in held) == sorted(
        session_of(p).session_id for p in peers
    )
    assert_kicked(peers[3], ADMIN_CLOSED)
    for peer in (*peers[:3], peers[4]):
        await assert_untouched(h, peer)


async def test_a_recheck_failing_midway_keeps_what_it_did(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(revoke, "RECHECK_CHUNK", 1)
    first, second = await h.log_in("alice"), await h.log_in("bob")
    row_kicked(h, session_of(first))
    row_kicked(h, session_of(second))
    fail_second = iter([None, OSError("connection reset")])

    def during() -> None:
        h.rows.error = next(fail_second)

    h.rows.during = during
    decision = await h.revoker.recheck_tick("on the timer")
    assert decision == Decision(
        "recheck of 2 sessions failed (OSError) after dropping 1 kicked; next in 5.0 s",
        "warning",
    )
    assert [p.closed for p in (first, second)].count(True) == 1


async def test_a_failed_recheck_drops_nothing_and_says_so(h: Harness) -> None:
    alice = await h.log_in("alice")
    row_kicked(h, session_of(alice))
    h.rows.error = OSError("connection refused")
    decision = await h.revoker.recheck_tick("on the timer")
    assert decision == Decision("recheck of 1 sessions failed (OSError); next in 5.0 s", "warning")
    assert not alice.closed and alice.state is SessionState.ACTIVE


async def test_a_session_ended_during_the_query_is_not_ended_twice(h: Harness) -> None:
    alice = await h.log_in("alice")
    s = session_of(alice)
    row_kicked(h, s)
    # The kick's push arrives while the recheck's query is on its way.
    h.rows.during = lambda: h.revoker.pushed(s.user_id, s.session_id, KICKED, "kicked")
    assert await h.revoker.recheck_tick("on the timer") == Decision("every session current")
    assert [f["code"] for f in alice.frames if f["op"] == "error"] == ["kicked"]
    assert len(h.events.named("session_ended")) == 1


async def test_a_recheck_tells_two_epochs_of_one_session_apart(h: Harness) -> None:
    """The device resumed its session on this same worker: the old connection holds
    epoch 1, the new one epoch 2, and only the old one is stale."""
    old = await h.log_in("alice")
    s = session_of(old)
    new = FakePeer("198.51.100.8:40001")
    new.state = SessionState.ACTIVE
    new.session = dataclasses.replace(s, epoch=2)
    h.registry.add(new)
    h.registry.attach(new)
    h.store.sessions[s.session_id].epoch = 2
    decision = await h.revoker.recheck_tick("after the listener reconnected")
    assert decision == Decision(
        "dropped 1 of 2 sessions (after the listener reconnected): 1 replaced", "warning"
    )
    assert sorted(h.rows.asked[0][1]) == [(s.session_id, 1), (s.session_id, 2)]
    assert old.closed and old.frames[-1]["code"] == "session_replaced"
    await assert_untouched(h, new)


# ---- the loop ---------------------------------------------------------------------------------


def sample(name: str, labels: dict[str, str]) -> float:
    """A sample of the worker's metrics (0 before its first count)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


RECHECKS_BY_LISTENER = ("switchboard_session_rechecks_total", {"trigger": "listener"})
KICKED_BY_RECHECK = ("switchboard_sessions_revoked_total", {"found": "recheck", "end": "kicked"})


async def run_until(h: Harness, done: Callable[[], bool]) -> None:
    task = asyncio.get_running_loop().create_task(h.revoker.run())
    try:
        for _ in range(200):
            if done():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the recheck loop did not get there in 2 s")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_loop_rechecks_at_once_when_the_listener_reconnects(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.revoke")
    h = Harness(monkeypatch, session_recheck_interval_s=60.0)
    alice = await h.log_in("alice")
    row_kicked(h, session_of(alice))
    rechecks, revoked = sample(*RECHECKS_BY_LISTENER), sample(*KICKED_BY_RECHECK)
    h.revoker.recheck_soon()
    await run_until(h, lambda: alice.closed)
    assert_kicked(alice, ADMIN_CLOSED)
    assert sample(*RECHECKS_BY_LISTENER) == rechecks + 1
    assert sample(*KICKED_BY_RECHECK) == revoked + 1
    said = [r.fields["decision"] for r in caplog.records if r.getMessage() == "recheck_decision"]  # type: ignore[attr-defined]
    assert said == ["dropped 1 of 1 sessions (after the listener reconnected): 1 kicked"]


async def test_the_loop_rechecks_on_its_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, session_recheck_interval_s=0.05)
    alice = await h.log_in("alice")
    await run_until(h, lambda: len(h.rows.asked) >= 2)
    await assert_untouched(h, alice)
    row_disabled(h, session_of(alice))
    await run_until(h, lambda: alice.closed)
    assert_kicked(alice, DISABLED)
