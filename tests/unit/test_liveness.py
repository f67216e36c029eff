"""Liveness decisions: the lease, the reaper, fencing, health, and the decision log.

Each tick is driven by hand against FakeLeases and a FakeClock; no loop runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest

from app.settings import Settings
from app.store.sessions import DeadWorker, Reaped
from app.worker.liveness import OVERLOAD_REPORT_S, Decision, Liveness
from app.worker.registry import Registry
from app.worker.states import SessionState, WorkerState, WorkerStatus
from tests.unit.worker_fakes import (
    WORKER_ID,
    FakeAnnouncer,
    FakeClock,
    FakeEvents,
    FakeLeases,
    FakePeer,
    FakePresence,
    FakeStore,
    active_peer,
    status_in,
)

LEASE_S = Settings().worker_lease_s


class Rig:
    """A Liveness over fakes, registered (the state after start-up) and serving."""

    def __init__(self, state: WorkerState = WorkerState.SERVING) -> None:
        self.settings = Settings(worker_id=WORKER_ID)
        self.refused = 0
        self.status: WorkerStatus = status_in(state)
        self.leases = FakeLeases()
        self.clock = FakeClock()
        store = FakeStore()
        self.registry = Registry(store.require_user_id, store.usernames)
        self.announcer = FakeAnnouncer()
        self.presence = FakePresence()
        self.events = FakeEvents()
        self.liveness = Liveness(
            self.settings,
            self.status,
            self.leases,
            self.registry,
            self.announcer,
            self.presence,
            self.events,
            clock=self.clock,
            refusals=lambda: self.refused,
        )
        # What the lease thread hands to the event loop (fencing), run by run_handed.
        self.handed: list[Callable[[], Awaitable[None]]] = []
        self.liveness.hand_over = self.handed.append

    def advance(self, seconds: float) -> None:
        """Time passes with the event loop running (its lag probe shows it alive)."""
        self.clock.advance(seconds)
        self.liveness.loop_alive_at = self.clock()

    async def run_handed(self) -> None:
        while self.handed:
            await self.handed.pop(0)()

    def connect(self, peer: FakePeer) -> FakePeer:
        self.registry.add(peer)
        if peer.state is SessionState.ACTIVE:
            self.registry.attach(peer)
        return peer


@pytest.fixture
async def rig() -> Rig:
    rig = Rig()
    await rig.liveness.register()
    return rig


# ---- the lease -----------------------------------------------------------------------


async def test_register_reports_the_sessions_left_from_an_earlier_run() -> None:
    rig = Rig()
    rig.leases.left = 7
    decision = await rig.liveness.register()
    assert decision == Decision("registered; 7 sessions left from an earlier run detached")
    assert rig.leases.calls == [("register", WORKER_ID, "127.0.0.1:7001", LEASE_S)]
    assert rig.events.named("worker_started") == [(7,)]
    assert rig.liveness.lease_age_s == 0


async def test_a_renewed_lease_is_a_quiet_decision(rig: Rig) -> None:
    rig.advance(2.5)
    assert await rig.liveness.lease_tick() == Decision("renewed the lease")
    assert rig.liveness.lease_age_s == 0
    assert rig.leases.calls[-1] == ("renew", WORKER_ID, LEASE_S, 0.0)


async def test_a_lagging_event_loop_is_not_a_missed_renewal_but_shedding(rig: Rig) -> None:
    rig.advance(1)
    rig.clock.advance(5)  # the event loop stalls for 5 s: the lease thread renews anyway
    decision = await rig.liveness.lease_tick()
    assert decision == Decision("renewed the lease; shedding load (event loop silent for 5.0 s)")
    assert rig.leases.calls[-1] == ("renew", WORKER_ID, LEASE_S, OVERLOAD_REPORT_S)
    assert rig.liveness.healthy()
    assert rig.liveness.agent_weight() == 10  # 0.5 s of lag is the limit: 5 s gets 10 %


async def test_refusals_are_shedding_and_are_reported_for_a_while(rig: Rig) -> None:
    rig.refused = 3
    decision = await rig.liveness.lease_tick()
    assert decision.text == "renewed the lease; shedding load (3 requests refused overloaded)"
    rig.advance(OVERLOAD_REPORT_S - 1)
    assert "shedding load" in (await rig.liveness.lease_tick()).text
    rig.advance(1)
    assert await rig.liveness.lease_tick() == Decision("renewed the lease")
    assert rig.liveness.agent_weight() == 100


async def test_a_loop_hung_for_a_whole_lease_stops_the_renewals(rig: Rig) -> None:
    rig.clock.advance(LEASE_S + 1)
    decision = await rig.liveness.lease_tick()
    assert decision == Decision(
        f"not renewing: the event loop has not run for {LEASE_S + 1:.1f} s", "warning"
    )
    assert rig.leases.called("renew") == 0
    rig.advance(0.1)  # it runs again
    assert (await rig.liveness.lease_tick()).text.startswith("renewed the lease")


async def test_a_failed_renewal_warns_and_pauses_the_reaper(rig: Rig) -> None:
    rig.leases.renewed = OSError("connection refused")
    decision = await rig.liveness.lease_tick()
    assert decision == Decision("lease renewal failed (OSError); reaping paused", "warning")
    rig.clock.advance(10)
    assert await rig.liveness.reap_tick() == Decision("waiting: the database is not answering")
    assert rig.leases.called("reap") == 0


async def test_the_reaper_waits_a_full_lease_after_the_database_is_back(rig: Rig) -> None:
    rig.leases.renewed = OSError("connection refused")
    await rig.liveness.lease_tick()
    rig.leases.renewed = True
    rig.advance(5)
    await rig.liveness.lease_tick()  # the database answers again from now on

    rig.advance(LEASE_S - 0.5)
    decision = await rig.liveness.reap_tick()
    assert decision.text.startswith("waiting: the database has answered for less than a lease")
    assert "15.0 s" in decision.text
    assert rig.leases.called("reap") == 0

    rig.advance(0.5)
    assert await rig.liveness.reap_tick() == Decision("no worker is dead")
    s = rig.settings
    assert rig.leases.calls[-1] == (
        "reap",
        s.resume_grace_s,
        s.worker_dead_after_s,
        s.resume_grace_max_s,
    )


async def test_a_fresh_registration_also_waits_a_full_lease_before_reaping(rig: Rig) -> None:
    rig.advance(1)
    assert (await rig.liveness.reap_tick()).text.startswith("waiting:")
    rig.advance(LEASE_S)
    assert (await rig.liveness.reap_tick()).text == "no worker is dead"


# ---- fencing ---------------------------------------------------------------------------


async def test_a_refused_renewal_fences_every_connection_and_registers_again(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.liveness")
    alice = rig.connect(active_peer(1, "alice"))
    bob = rig.connect(active_peer(2, "bob"))
    anonymous = rig.connect(FakePeer())
    rig.leases.renewed = False

    decision = await rig.liveness.lease_tick()
    assert decision == Decision("the others declared this worker dead: fencing", "warning")
    # Until the event loop has fenced and registered again, the thread renews nothing.
    assert await rig.liveness.lease_tick() == Decision(
        "fenced: waiting to register again", "warning"
    )
    assert rig.leases.called("renew") == 1
    await rig.run_handed()
    for peer in (alice, bob, anonymous):
        (frame,) = peer.frames
        assert frame["op"] == "reconnect"
        assert 0 <= frame["after_ms"] <= 1000
        assert peer.closed
    assert alice.state is SessionState.CLOSED
    assert bob.state is SessionState.CLOSED
    assert anonymous.state is SessionState.ANONYMOUS  # it held no session to end
    assert rig.registry.by_user == {}
    assert rig.leases.called("register") == 2
    assert len(rig.events.named("worker_started")) == 2
    assert decisions_logged(caplog)[-1] == (
        "fence_decision",
        logging.WARNING,
        "fenced: the others declared this worker dead; dropped 3 connections, registered again",
    )


async def test_fenced_and_registering_again_failed(rig: Rig) -> None:
    peer = rig.connect(active_peer())
    rig.leases.renewed = False
    rig.leases.left = OSError("connection reset")
    await rig.liveness.lease_tick()
    job = rig.handed.pop()
    rig.settings = rig.liveness._settings = Settings(worker_id=WORKER_ID, lease_renew_interval_s=0)
    await job()
    assert peer.closed
    assert peer.state is SessionState.CLOSED
    # It tries again (handed over once more), and renews once registered.
    assert len(rig.handed) == 1
    rig.leases.left = 0
    rig.leases.renewed = True
    await rig.run_handed()
    assert (await rig.liveness.lease_tick()).text == "renewed the lease"


# ---- reaping ---------------------------------------------------------------------------


async def reap(rig: Rig, reaped: Reaped | BaseException) -> Decision:
    rig.leases.reaped = reaped
    rig.advance(LEASE_S)
    return await rig.liveness.reap_tick()


GONE = "lease connection gone"


async def test_reaping_dead_workers_catches_up_and_tells_the_contacts(rig: Rig) -> None:
    dead = [DeadWorker("w2", GONE), DeadWorker("w3", "lease expired")]
    decision = await reap(rig, Reaped(dead, [10, 11, 12], 0))
    assert decision == Decision(
        "declared w2 (lease connection gone), w3 (lease expired) dead; detached 3 users' sessions",
        "warning",
    )
    assert rig.announcer.catch_ups == ["dead: w2,w3"]
    assert rig.presence.broadcasts == [10, 11, 12]


async def test_reaping_names_expired_sessions(rig: Rig) -> None:
    decision = await reap(rig, Reaped([DeadWorker("w2", GONE)], [10], 4))
    assert decision.text == (
        "declared w2 (lease connection gone) dead; detached 1 users' sessions;"
        " 4 detached sessions expired"
    )


async def test_expired_sessions_alone_are_logged_at_info(rig: Rig) -> None:
    decision = await reap(rig, Reaped([], [], 4))
    assert decision == Decision("no worker is dead; 4 detached sessions expired")
    assert rig.announcer.catch_ups == []


async def test_reaping_says_when_overload_holds_back_expiry(rig: Rig) -> None:
    decision = await reap(rig, Reaped([], [], 1, expiry_paused=True))
    assert decision.text == (
        "no worker is dead; 1 detached sessions expired"
        " (a worker reports overload: expiry after resume_grace_max_s)"
    )


async def test_failed_pushes_after_reaping_are_named(rig: Rig) -> None:
    rig.announcer.error = OSError("gone")
    rig.presence.failing[11] = OSError("gone")
    decision = await reap(rig, Reaped([DeadWorker("w2", GONE)], [10, 11], 0))
    assert decision == Decision(
        "declared w2 (lease connection gone) dead; detached 2 users' sessions;"
        " failed: the catch-up push (OSError), 1 presence pushes",
        "warning",
    )
    assert rig.presence.broadcasts == [10]  # the others were still told


async def test_a_failed_reap_warns(rig: Rig) -> None:
    decision = await reap(rig, OSError("connection reset"))
    assert decision == Decision("reaping failed (OSError)", "warning")


async def test_a_failed_reap_also_makes_the_reaper_wait_a_full_lease(rig: Rig) -> None:
    await reap(rig, OSError("connection reset"))
    rig.leases.reaped = Reaped([], [], 0)
    rig.advance(1)
    assert (await rig.liveness.reap_tick()).text.startswith("waiting:")


# ---- health ------------------------------------------------------------------------------


async def test_healthy_while_serving_with_a_fresh_lease(rig: Rig) -> None:
    assert rig.liveness.healthy()
    rig.advance(LEASE_S - 0.1)
    assert rig.liveness.healthy()


async def test_unhealthy_once_the_lease_is_as_old_as_a_lease(rig: Rig) -> None:
    rig.leases.renewed = OSError("gone")
    rig.advance(LEASE_S)
    await rig.liveness.lease_tick()
    assert rig.liveness.lease_age_s == LEASE_S
    assert not rig.liveness.healthy()
    rig.leases.renewed = True
    await rig.liveness.lease_tick()
    assert rig.liveness.healthy()


@pytest.mark.parametrize(
    ("state", "healthy"),
    [
        (WorkerState.STARTING, False),
        (WorkerState.SERVING, True),
        (WorkerState.DRAINING, True),
        (WorkerState.STOPPING, False),
    ],
)
async def test_health_depends_on_the_worker_state(state: WorkerState, healthy: bool) -> None:
    rig = Rig(state)
    await rig.liveness.register()
    assert rig.liveness.healthy() is healthy


# ---- the decision log --------------------------------------------------------------------


def decisions_logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, str]]:
    return [
        (r.getMessage(), r.levelno, r.fields["decision"])  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "switchboard.liveness"
    ]


def test_say_logs_a_decision_only_when_it_changes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="switchboard.liveness")
    liveness = Rig().liveness
    renewed = Decision("renewed the lease")
    failed = Decision("lease renewal failed (OSError); reaping paused", "warning")
    for decision in (renewed, renewed, failed, failed, renewed):
        liveness.say("lease", decision)
    liveness.say("reaper", Decision("renewed the lease"))  # another loop: its own history
    assert decisions_logged(caplog) == [
        ("lease_decision", logging.INFO, "renewed the lease"),
        ("lease_decision", logging.WARNING, failed.text),
        ("lease_decision", logging.INFO, "renewed the lease"),
        ("reaper_decision", logging.INFO, "renewed the lease"),
    ]


# ---- cut off from the database ----------------------------------------------------------


async def test_a_failed_renewal_within_a_lease_does_not_ask_for_the_database(rig: Rig) -> None:
    rig.leases.renewed = OSError("timed out")
    rig.advance(LEASE_S - 1)
    decision = await rig.liveness.lease_tick()
    assert decision.text == "lease renewal failed (OSError); reaping paused"
    assert rig.leases.called("database_reachable") == 0 and not rig.handed


async def test_through_a_primary_failover_the_worker_keeps_its_clients(rig: Rig) -> None:
    """Renewals fail for longer than a lease (Patroni's ttl is 20 s), but the standbys
    answer on the replica port: every worker sees the same outage, nobody fences."""
    peer = rig.connect(active_peer())
    rig.leases.renewed = OSError("no primary")
    rig.advance(LEASE_S + 1)
    decision = await rig.liveness.lease_tick()
    assert decision.text == "lease renewal failed (OSError); reaping paused"
    assert rig.leases.called("database_reachable") == 1
    assert not rig.handed and not peer.closed


async def test_cut_off_for_a_whole_lease_fences_until_the_database_is_back(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """No node answers from here: the others declare this worker dead and its clients
    resume with them, so it drops them (reconnect) rather than hold sends it cannot
    commit, and registers again once the database answers."""
    caplog.set_level(logging.INFO, logger="switchboard.liveness")
    peer = rig.connect(active_peer())
    rig.leases.renewed = OSError("timed out")
    rig.leases.reachable = False
    rig.advance(LEASE_S + 1)
    decision = await rig.liveness.lease_tick()
    assert decision == Decision(
        "cut off from the database for a whole lease (OSError): fencing", "warning"
    )
    assert (await rig.liveness.lease_tick()).text == "fenced: waiting to register again"
    rig.leases.left = OSError("timed out")
    rig.settings = rig.liveness._settings = Settings(worker_id=WORKER_ID, lease_renew_interval_s=0)
    await rig.handed.pop()()
    (frame,) = peer.frames
    assert frame["op"] == "reconnect" and peer.closed
    assert peer.state is SessionState.CLOSED
    assert not rig.liveness.healthy()  # HAProxy sends no new clients meanwhile
    assert decisions_logged(caplog)[-1][2] == (
        "fenced: cut off from the database for a whole lease; dropped 1 connections; "
        "registering again failed (OSError)"
    )
    # The partition heals: it registers, and serves and renews again.
    rig.leases.left = 0
    rig.leases.renewed = True
    await rig.run_handed()
    assert rig.liveness.healthy()
    assert (await rig.liveness.lease_tick()).text == "renewed the lease"
