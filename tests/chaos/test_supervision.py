"""Supervision: kill -9 each kind of process and it comes back by itself.

One cluster for the module, started with two workers: it also checks that later
commands (`status`, `restart-workers`) follow the running cluster's shape, not
the default of three workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cluster import patroni, runstate
from app.cluster.health import wait_for
from app.cluster.launcher import LocalCluster
from app.cluster.process import PidRecord, wait_gone
from tests.cluster_fixture import make_settings, running_cluster

pytestmark = pytest.mark.chaos

# A restart comes within a tick (1 s); then the component starts as `up` starts it.
BACK_S = 30.0


@pytest.fixture(scope="module")
def scluster() -> Iterator[LocalCluster]:
    with running_cluster(make_settings(workers=2)) as cluster:
        yield cluster


def later(cluster: LocalCluster) -> LocalCluster:
    """What a later command sees: default settings (three workers), this state dir."""
    return LocalCluster.running(cluster.settings.replace(workers=3))


def restarts(cluster: LocalCluster, name: str) -> int:
    record = runstate.read_restarts(cluster.layout).get(name)
    return record.count if record else 0


def kill9(*pids: int | None) -> None:
    for pid in pids:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    wait_gone([PidRecord(p, None) for p in pids if p is not None], 10)


def back_by_itself(cluster: LocalCluster, name: str, old_pid: int, timeout: float) -> float:
    """Seconds until ``name`` runs again under a new pid and serves."""
    t0 = time.monotonic()
    wait_for(
        f"{name} restarted by the supervisor",
        lambda: (cluster.pid_of(name) not in (None, old_pid), "still down"),
        timeout,
    )
    cluster.wait_ready(name, timeout)
    return time.monotonic() - t0


@pytest.mark.parametrize("name", ["w2", "haproxy", "haproxy2", "dashboard", "etcd"])
def test_a_killed_process_comes_back_by_itself(scluster: LocalCluster, name: str) -> None:
    before = restarts(scluster, name)
    pid = scluster.pid_of(name)
    assert pid is not None
    kill9(pid)
    took = back_by_itself(scluster, name, pid, BACK_S)
    print(f"{name} back after {took:.1f} s", flush=True)
    assert restarts(scluster, name) == before + 1
    row = next(r for r in later(scluster).status() if r.name == name)
    assert row.healthy and row.restarts == before + 1 and row.pid != pid
    if name == "etcd":
        scluster.wait_db_healthy(60)


def test_a_killed_patroni_replica_comes_back_and_streams(scluster: LocalCluster) -> None:
    view = patroni.cluster_view(scluster.settings)
    assert view is not None and view.leader is not None
    node = next(m.name for m in view.members if m.role != "leader")
    patroni_pid = scluster.pid_of(node)
    assert patroni_pid is not None
    kill9(patroni_pid, scluster.postmaster_pid(node))
    took = back_by_itself(scluster, node, patroni_pid, 120)
    print(f"{node} back and streaming after {took:.1f} s", flush=True)
    assert restarts(scluster, node) == 1
    view = patroni.cluster_view(scluster.settings)
    assert view is not None
    assert {m.name: m.state for m in view.members}[node] in ("running", "streaming")


def test_a_killed_patroni_leader_comes_back_and_the_cluster_heals(scluster: LocalCluster) -> None:
    view = patroni.cluster_view(scluster.settings)
    assert view is not None and view.leader is not None
    node = view.leader.name
    patroni_pid = scluster.pid_of(node)
    assert patroni_pid is not None
    before = restarts(scluster, node)
    kill9(patroni_pid, scluster.postmaster_pid(node))
    took = back_by_itself(scluster, node, patroni_pid, 120)
    after = patroni.cluster_view(scluster.settings)
    assert after is not None and after.leader is not None
    # Back within patroni_ttl, its leader key is still valid: it may lead again.
    print(f"{node} back after {took:.1f} s; leader now {after.leader.name}", flush=True)
    assert restarts(scluster, node) == before + 1


def test_a_rolling_restart_is_not_undone_or_counted(scluster: LocalCluster) -> None:
    cluster = later(scluster)
    assert cluster.worker_names() == ["w1", "w2"]  # no w3: `up` started two
    before = {w: (cluster.pid_of(w), restarts(cluster, w)) for w in ("w1", "w2")}
    cluster.restart_workers()
    for w, (pid, count) in before.items():
        assert cluster.pid_of(w) not in (None, pid)
        assert restarts(cluster, w) == count  # held: stopped on purpose
    assert not list(cluster.layout.run.glob("*.hold"))


def test_status_follows_the_running_cluster_and_shows_restarts(scluster: LocalCluster) -> None:
    # The CLI as a user runs it: the cluster's ports, but not its worker count.
    env = {k: v for k, v in scluster.settings.to_env().items() if k != "SWITCHBOARD_WORKERS"}
    result = subprocess.run(
        [sys.executable, "-m", "app", "status"],
        env={**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert "w3" not in lines
    assert lines["w2"][3] == str(restarts(scluster, "w2")) != "0"
    assert lines["supervisor"][2] == "ok"
    events = [json.loads(line) for line in scluster.log_tail("supervisor", 200)]
    restarted = [e for e in events if e["event"] == "component_restarted"]
    assert {e["component"] for e in restarted} >= {"w2", "haproxy", "etcd", "dashboard"}
    assert all({"pid", "attempt", "backoff", "reason"} <= e.keys() for e in restarted)
