"""Real faults under load: kill -9 a worker, the Patroni leader, a replica, HAProxy or etcd;
a rolling restart; a drain; a worker stopped (SIGSTOP) for less and for more than its lease.

Each scenario prints its counts; lost and duplicated must be 0, every session
must end up connected (resumed where its worker went away), and the database's
view of who is logged in where must match where the clients really are. A
killed process must come back by itself (the supervisor) or the scenario fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest

from app.chaos.checker import Verdict
from app.chaos.runner import ChaosConfig, run_scenario
from app.cluster.launcher import LocalCluster
from tests.cluster_fixture import make_settings, running_cluster

pytestmark = pytest.mark.chaos

CONFIG = ChaosConfig(clients=1000, second_devices=50, rate=0.5, warmup_s=3, after_s=6, seed=7)


@pytest.fixture(scope="module")
def chaos_cluster() -> Iterator[LocalCluster]:
    """Its own cluster: these tests kill its parts."""
    with running_cluster(make_settings(workers=3)) as cluster:
        yield cluster


def _say(line: str) -> None:
    print(line, flush=True)


async def _run(cluster: LocalCluster, scenario: str, config: ChaosConfig = CONFIG) -> Verdict:
    verdict = await run_scenario(cluster, scenario, config, _say)
    assert verdict.acknowledged > 0
    assert verdict.lost == 0, verdict.format()
    assert verdict.duplicated == 0, verdict.format()
    assert verdict.out_of_order == 0, verdict.format()
    assert verdict.sessions_connected == verdict.sessions, verdict.format()
    assert verdict.presence_mismatches == 0, verdict.format()
    if verdict.expect_dead is not None:
        assert verdict.declared_dead == verdict.expect_dead, verdict.format()
    assert verdict.ok
    return verdict


async def test_kill_worker(chaos_cluster: LocalCluster) -> None:
    await _run(chaos_cluster, "kill-worker")


async def test_kill_patroni_leader(chaos_cluster: LocalCluster) -> None:
    await _run(chaos_cluster, "kill-leader")


async def test_kill_patroni_replica(chaos_cluster: LocalCluster) -> None:
    await _run(chaos_cluster, "kill-replica")


async def test_kill_haproxy(chaos_cluster: LocalCluster) -> None:
    await _run(chaos_cluster, "kill-haproxy")


async def test_kill_etcd(chaos_cluster: LocalCluster) -> None:
    await _run(chaos_cluster, "kill-etcd")


async def test_rolling_restart(chaos_cluster: LocalCluster) -> None:
    await _run(chaos_cluster, "rolling-restart")


async def test_drain(chaos_cluster: LocalCluster) -> None:
    await _run(chaos_cluster, "drain")


# The same checker over WebSocket clients (issue #20): every client registers, logs
# in, sends and resumes through HAProxy's websockets frontend.
WS_CONFIG = dataclasses.replace(CONFIG, transport="ws")


async def test_kill_worker_over_websockets(chaos_cluster: LocalCluster) -> None:
    await _run(chaos_cluster, "kill-worker", WS_CONFIG)


async def test_drain_over_websockets(chaos_cluster: LocalCluster) -> None:
    await _run(chaos_cluster, "drain", WS_CONFIG)


async def test_stall_shorter_than_the_lease_is_not_a_death(chaos_cluster: LocalCluster) -> None:
    """Slow is not dead: nothing is declared dead or fenced, nothing lost."""
    await _run(chaos_cluster, "stall")


async def test_stall_longer_than_the_lease(chaos_cluster: LocalCluster) -> None:
    """Its sessions move, nothing is lost, and the worker rejoins (fenced, registered again)."""
    verdict = await _run(chaos_cluster, "stall-long")
    assert verdict.registered_again >= 1, verdict.format()
    rows = {row.name: row for row in await asyncio.to_thread(chaos_cluster.status)}
    victim = chaos_cluster.settings.worker_ids()[1]
    assert rows[victim].healthy, rows[victim]
