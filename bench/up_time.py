"""Measure `switchboard up` from cold (no state dir) to healthy, several runs.

    .venv/bin/python -m bench.up_time [--runs 5]

Each run starts a fresh cluster in a new temporary state dir on free ports,
times LocalCluster.up() (the code behind `switchboard up`), then stops and
purges it. Prints each run and min / median / max.
"""

from __future__ import annotations

import argparse
import statistics
import time

from app.cluster.launcher import LocalCluster
from tests.cluster_fixture import make_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    times = []
    for run in range(1, args.runs + 1):
        cluster = LocalCluster(make_settings(workers=args.workers))
        t0 = time.monotonic()
        try:
            cluster.up()
            elapsed = time.monotonic() - t0
        finally:
            cluster.down(purge=True)
        times.append(elapsed)
        print(f"run {run}: cold up to healthy in {elapsed:.1f} s", flush=True)
    print(
        f"switchboard up, cold, {args.workers} workers, {args.runs} runs: "
        f"min {min(times):.1f} s / median {statistics.median(times):.1f} s / max {max(times):.1f} s"
    )


if __name__ == "__main__":
    main()
