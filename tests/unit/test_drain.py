"""Drain and undrain, and HAProxy's agent check, over a fake pool and store."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.settings import Settings
from app.store import sessions as session_store
from app.worker.drain import Drain
from app.worker.registry import Registry
from app.worker.states import SessionState, WorkerState
from tests.unit.worker_fakes import (
    NO_POOL,
    WORKER_ID,
    FakeEvents,
    FakePeer,
    FakeStore,
    active_peer,
    status_in,
)


class Rig:
    def __init__(self, state: WorkerState = WorkerState.SERVING, **settings: Any) -> None:
        self.settings = Settings(worker_id=WORKER_ID, **settings)
        self.status = status_in(state)
        self.registry = Registry(FakeStore().require_user_id, FakeStore().usernames)
        self.events = FakeEvents()
        self.drain = Drain(self.settings, NO_POOL, self.status, self.registry, self.events)


class FakeAgentWriter:
    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_begin_moves_a_serving_worker_to_draining() -> None:
    rig = Rig()
    assert rig.drain.begin("admin")
    assert rig.status.state is WorkerState.DRAINING
    assert not rig.drain.begin("again")  # already draining: nothing more to do
    assert rig.status.state is WorkerState.DRAINING


@pytest.mark.parametrize("state", [WorkerState.STARTING, WorkerState.STOPPING])
def test_begin_does_nothing_when_not_serving(state: WorkerState) -> None:
    rig = Rig(state)
    assert not rig.drain.begin("admin")
    assert rig.status.state is state


async def test_undrain_serves_again_and_is_a_no_op_otherwise() -> None:
    rig = Rig(WorkerState.DRAINING)
    marked: list[str] = []

    async def mark_active() -> None:
        marked.append("active")

    rig.drain._mark_active = mark_active  # type: ignore[method-assign]
    rig.drain.undrain("admin")
    assert rig.status.state is WorkerState.SERVING
    await asyncio.sleep(0)
    assert marked == ["active"]  # the workers table says active again
    rig.drain.undrain("admin")
    assert rig.status.state is WorkerState.SERVING
    stopping = Rig(WorkerState.STOPPING)
    stopping.drain.undrain("admin")
    assert stopping.status.state is WorkerState.STOPPING


async def test_drain_sends_sessions_elsewhere_and_cuts_off_stragglers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marked: list[tuple[str, str]] = []

    async def set_worker_state(pool: Any, worker_id: str, state: str) -> None:
        marked.append((worker_id, state))

    monkeypatch.setattr(session_store, "set_worker_state", set_worker_state)
    # No spread and no timeout: whoever has not left is cut off at once.
    rig = Rig(drain_spread_s=0.0, drain_timeout_s=0.0, agent_interval_s=0.0)
    active, anonymous = active_peer(), FakePeer()
    rig.registry.add(active)
    rig.registry.add(anonymous)

    await rig.drain.drain("SIGTERM")
    assert rig.status.state is WorkerState.DRAINING
    assert marked == [(WORKER_ID, "draining")]
    assert anonymous.closed
    assert anonymous.frames == []  # nothing to resume: just closed
    reconnect, cut_off = active.frames
    assert reconnect == {"op": "reconnect", "after_ms": 200}  # agent interval + 200 ms
    assert cut_off["code"] == "shutting_down"
    assert active.closed
    assert active.state is SessionState.ACTIVE  # stays resumable: lost() detaches it
    assert rig.events.named("worker_draining") == [(2,)]
    ((forced, _seconds),) = rig.events.named("worker_drained")
    assert forced == 2  # the fakes never leave the registry by themselves


async def test_drain_of_a_worker_not_serving_moves_nobody() -> None:
    rig = Rig(WorkerState.STARTING)
    peer = active_peer()
    rig.registry.add(peer)
    await rig.drain.drain("SIGTERM")  # the NO_POOL would fail if it went on
    assert peer.frames == []
    assert not peer.closed


@pytest.mark.parametrize(
    ("state", "word"),
    [(WorkerState.SERVING, b"ready 100%\n"), (WorkerState.DRAINING, b"drain\n")],
)
async def test_the_agent_check_says_ready_or_drain(state: WorkerState, word: bytes) -> None:
    rig = Rig(state)
    writer = FakeAgentWriter()
    await rig.drain.agent(None, writer)  # type: ignore[arg-type]
    assert writer.data == word


async def test_the_agent_check_gives_a_lagging_worker_a_lower_weight() -> None:
    rig = Rig(WorkerState.SERVING)
    rig.drain.weight = lambda: 25
    writer = FakeAgentWriter()
    await rig.drain.agent(None, writer)  # type: ignore[arg-type]
    assert writer.data == b"ready 25%\n"
    assert writer.closed
