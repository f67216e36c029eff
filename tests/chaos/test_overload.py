"""Overload degrades, it does not cascade (issue #21): password logins at 3x the
capacity measured a moment before, while established sessions keep messaging.

Nothing is declared dead or fenced, no established session is dropped, no
acknowledged message is lost, every login gets in, the cluster is back to normal
within the settle time, and login goodput during the overload is at least 80 % of
the capacity (issue #21's target).

Goodput is the one figure here that this 2-core box moves on its own: the storm's
clients arrive on the cluster's own cores, and the box drifts between one window and
the next (docs/benchmarks.md, "Queue at the door": 75-97 % in runs a minute apart,
most at 84-97 %). So goodput is judged on the median of three runs when the first
falls short, as a benchmark would be (every run is printed, and every run must hold
everything else). A collapse, the failure this guards against, shows in every run
as goodput near zero and sessions dropped.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import pytest

from app.chaos.overload import OverloadConfig, OverloadVerdict, run_overload
from app.cluster.launcher import LocalCluster
from tests.cluster_fixture import make_settings, running_cluster

pytestmark = pytest.mark.chaos

MIN_GOODPUT = 0.8
RUNS_WHEN_SHORT = 3  # runs whose median judges the goodput when the first falls short


@pytest.fixture(scope="module")
def overload_cluster() -> Iterator[LocalCluster]:
    with running_cluster(make_settings(workers=3)) as cluster:
        yield cluster


def _holds_besides_goodput(verdict: OverloadVerdict) -> None:
    assert verdict.declared_dead == 0, verdict.format()
    assert verdict.registered_again == 0, verdict.format()
    assert verdict.established_dropped == 0, verdict.format()
    assert verdict.acknowledged > 0, verdict.format()
    assert verdict.lost == 0 and verdict.duplicated == 0, verdict.format()
    assert verdict.logged_in == verdict.offered, verdict.format()
    assert verdict.recovered_s is not None, verdict.format()


async def test_a_login_storm_at_three_times_capacity_degrades_gracefully(
    overload_cluster: LocalCluster,
) -> None:
    verdicts: list[OverloadVerdict] = []
    for seed in range(21, 21 + RUNS_WHEN_SHORT):
        config = OverloadConfig(seed=seed, min_goodput=MIN_GOODPUT)
        verdict = await run_overload(overload_cluster, config, print)
        _holds_besides_goodput(verdict)
        verdicts.append(verdict)
        if verdicts[0].goodput_share >= MIN_GOODPUT:
            break
    shares = [round(v.goodput_share, 3) for v in verdicts]
    assert statistics.median(shares) >= MIN_GOODPUT, f"goodput of each run: {shares}"
