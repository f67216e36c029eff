"""The supervisor's decisions, with a fake tier and a fake clock: backoff, holds, the lock."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import pytest

from app.cluster import runstate
from app.cluster.errors import ClusterError
from app.cluster.launcher import ComponentStatus, LocalCluster, format_status
from app.cluster.layout import Layout
from app.cluster.process import PidRecord, write_pidfile
from app.cluster.supervisor import Backoff, Supervisor
from app.dashboard.sampler import EMPTY
from app.dashboard.views import live_fields
from app.settings import Settings


class FakeTier:
    def __init__(self, root: Path, names: list[str]) -> None:
        self.layout = Layout(root=root, etcd_data=root / "etcd")
        self.layout.run.mkdir(parents=True)
        self.names = names
        self.alive = set(names)
        self.started: list[str] = []
        self.fail = False
        self.next_pid = 1000

    def supervised_names(self) -> list[str]:
        return self.names

    def pid_of(self, name: str) -> int | None:
        return 1 if name in self.alive else None

    def start_component(self, name: str) -> PidRecord:
        if self.fail:
            raise ClusterError(f"cannot start {name}")
        self.started.append(name)
        self.alive.add(name)
        self.next_pid += 1
        self.layout.pidfile(name).write_text(f"{self.next_pid} 0\n")
        return PidRecord(self.next_pid, None)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tier(tmp_path: Path) -> FakeTier:
    return FakeTier(tmp_path, ["etcd", "n1", "haproxy", "w1", "w2", "dashboard"])


def make(tier: FakeTier, clock: Clock) -> Supervisor:
    settings = Settings.load(
        env={},
        supervise_backoff_base_s=0.5,
        supervise_backoff_max_s=4.0,
        supervise_healthy_s=60.0,
    )
    return Supervisor(tier, settings, clock=clock, wall=lambda: 1_700_000_000.0)


def test_backoff_doubles_from_the_second_restart_and_is_capped() -> None:
    b = Backoff(base_s=0.5, max_s=4.0, healthy_s=60.0)
    waits = []
    for _ in range(7):
        waits.append(b.wait_s())
        b.started(0.0)
    assert waits == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_dead_component_is_restarted_at_once_and_recorded(tier: FakeTier) -> None:
    clock = Clock()
    sup = make(tier, clock)
    sup.tick()
    tier.layout.pidfile("w2").write_text("999999999 0\n")
    tier.alive.discard("w2")
    decisions = sup.tick()
    assert tier.started == ["w2"]
    assert [d.component for d in decisions] == ["w2"]
    assert "pid 999999999 gone: restarted as pid 1001 (attempt 1" in decisions[0].decision
    restarts = runstate.read_restarts(tier.layout)
    assert restarts["w2"].count == 1
    assert restarts["w2"].last_reason == "pid 999999999 gone"
    assert restarts["w2"].last_at == 1_700_000_000.0
    assert [(d.component, d.decision) for d in sup.tick()] == [("w2", "running")]
    assert sup.tick() == []  # nothing changed: nothing to say


def test_a_crash_loop_waits_longer_each_time_then_backoff_resets(tier: FakeTier) -> None:
    clock = Clock()
    sup = make(tier, clock)
    starts = []
    for _ in range(40):  # w1 dies as soon as it is started, for 10 s
        tier.alive.discard("w1")
        before = len(tier.started)
        sup.tick()
        if len(tier.started) > before:
            starts.append(clock.now)
        clock.now += 0.25
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(starts)]
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0]
    assert all(g == 4.0 for g in gaps[4:])
    assert sup.sleep_s() <= 4.0
    # Up for healthy_s: the next crash is restarted at once again.
    tier.alive.add("w1")
    sup.tick()
    clock.now += 61
    assert [d.decision for d in sup.tick()] == ["up 60 s: backoff reset"]
    tier.alive.discard("w1")
    n = len(tier.started)
    sup.tick()
    assert len(tier.started) == n + 1
    assert runstate.read_restarts(tier.layout)["w1"].count == len(starts) + 1


def test_a_held_component_is_left_alone_while_its_holder_lives(tier: FakeTier) -> None:
    clock = Clock()
    sup = make(tier, clock)
    with runstate.hold(tier.layout, "w1"):
        with runstate.hold(tier.layout, "w1"):  # nested in one process
            pass
        assert runstate.holder(tier.layout, "w1") is not None
        tier.alive.discard("w1")
        said = {d.component: d.decision for d in sup.tick()}
        assert tier.started == []
        assert f"held by pid {os.getpid()}" in said["w1"]
    assert not tier.layout.hold_file("w1").exists()
    sup.tick()
    assert tier.started == ["w1"]


def test_a_hold_whose_holder_is_gone_is_ignored(tier: FakeTier) -> None:
    sup = make(tier, Clock())
    tier.layout.hold_file("w1").write_text("999999999 0\n")
    tier.alive.discard("w1")
    sup.tick()
    assert tier.started == ["w1"]


def test_another_live_holder_is_an_error(tier: FakeTier) -> None:
    write_pidfile(tier.layout.hold_file("w1"), os.getppid())
    with pytest.raises(ClusterError, match="held by pid"), runstate.hold(tier.layout, "w1"):
        pass


def test_nothing_is_restarted_while_a_command_holds_the_lock(tier: FakeTier) -> None:
    sup = make(tier, Clock())
    tier.alive.discard("etcd")
    with runstate.locked(tier.layout) as got:
        assert got
        decisions = sup.tick()
    assert tier.started == []
    assert decisions[0].decision.startswith("paused")
    sup.tick()
    assert tier.started == ["etcd"]


def test_a_failed_start_counts_as_an_attempt(tier: FakeTier) -> None:
    clock = Clock()
    sup = make(tier, clock)
    tier.fail = True
    tier.alive.discard("dashboard")
    assert "restart 1 failed: cannot start dashboard" in sup.tick()[-1].decision
    clock.now += 0.1
    assert "waits for backoff" in sup.tick()[-1].decision
    assert "dashboard" not in runstate.read_restarts(tier.layout)


def test_the_running_clusters_shape_wins_over_the_defaults(tmp_path: Path) -> None:
    up = Settings.load(env={}, state_dir=tmp_path, workers=2, haproxy_processes=3)
    layout = Layout.for_settings(up)
    layout.run.mkdir(parents=True)
    runstate.write_shape(layout, up)
    later = LocalCluster.running(Settings.load(env={}, state_dir=tmp_path))
    assert later.worker_names() == ["w1", "w2"]
    assert later.haproxy_names() == ["haproxy", "haproxy2", "haproxy3"]
    assert later.supervised_names()[-3:] == ["w1", "w2", "dashboard"]
    # Nothing recorded (no cluster): the settings as they are.
    layout.cluster_file.unlink()
    assert LocalCluster.running(Settings.load(env={}, state_dir=tmp_path)).worker_names() == [
        "w1",
        "w2",
        "w3",
    ]


def test_status_has_a_restarts_column() -> None:
    rows = [ComponentStatus("w1", 42, True, "127.0.0.1:7001", "serving", True, 3)]
    header, line = format_status(rows).splitlines()
    assert header.split()[:4] == ["COMPONENT", "PID", "HEALTH", "RESTARTS"]
    assert line.split()[:4] == ["w1", "42", "ok", "3"]


def test_the_dashboard_overview_lists_restarts() -> None:
    restart = runstate.Restart("w2", 2, 0.0, "killed by SIGKILL")
    shown = live_fields(dataclasses.replace(EMPTY, restarts=(restart,)))["restarts"]
    assert shown.startswith("w2 2 (last at ") and shown.endswith(": killed by SIGKILL)")
    assert live_fields(EMPTY)["restarts"] == "none"
