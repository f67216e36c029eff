"""Overload degrades, it does not cascade (issue #21): password logins at 3x the
capacity measured a moment before, while established sessions keep messaging.

Nothing is declared dead or fenced, no established session is dropped, no
acknowledged message is lost, login goodput does not collapse, every login gets in,
and the cluster is back to normal within the settle time.

The goodput floor here is 40 %, not issue #21's 80 %: on this 2-core box the storm's
clients arrive on the cluster's own cores, and 3x capacity in new connections raises
the CPU a login costs by up to a third (the verdict prints it by role). Counted by
the workers' commits, `switchboard chaos overload` measured 72-96 % on a quiet box,
80-91 % with the storm gate (docs/benchmarks.md, Queue at the door); the full suite
is noisier (55 % in a clean-clone `make test` on 2026-12-07, counted by the generator
and without the gate then). A collapse, the failure this guards against, shows as
goodput near zero and sessions dropped. `switchboard chaos overload` judges the 80 %
target.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.chaos.overload import OverloadConfig, run_overload
from app.cluster.launcher import LocalCluster
from tests.cluster_fixture import make_settings, running_cluster

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def overload_cluster() -> Iterator[LocalCluster]:
    with running_cluster(make_settings(workers=3)) as cluster:
        yield cluster


async def test_a_login_storm_at_three_times_capacity_degrades_gracefully(
    overload_cluster: LocalCluster,
) -> None:
    verdict = await run_overload(overload_cluster, OverloadConfig(seed=21, min_goodput=0.4), print)
    assert verdict.declared_dead == 0, verdict.format()
    assert verdict.registered_again == 0, verdict.format()
    assert verdict.established_dropped == 0, verdict.format()
    assert verdict.acknowledged > 0, verdict.format()
    assert verdict.lost == 0 and verdict.duplicated == 0, verdict.format()
    assert verdict.logged_in == verdict.offered, verdict.format()
    assert verdict.goodput_share >= verdict.min_goodput, verdict.format()
    assert verdict.recovered_s is not None, verdict.format()
    assert verdict.ok
