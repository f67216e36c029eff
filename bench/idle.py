"""What an idle cluster costs: CPU by role while nothing connects.

    .venv/bin/python -m bench.idle --sessions 200000

Starts the cluster ``bench.connections`` would start for N sessions (``switchboard up
--capacity N``'s plan, on free ports, stopped and purged at the end), lets it settle
for 20 s, then prints the CPU its processes used over ``--window`` seconds, in % of
one core, by role (from /proc/<pid>/stat: utime + stime). The health- and agent-check
mesh between the HAProxy processes and the workers is most of it (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.connections import _cluster, _cpu_mark, _cpu_used

SETTLE_S = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200_000, help="size the cluster for N")
    parser.add_argument("--window", type=float, default=20.0, help="measured seconds (20)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--state-dir", type=Path, help="a running cluster instead")
    args = parser.parse_args()
    with _cluster(args) as cluster:
        time.sleep(SETTLE_S)
        before = _cpu_mark(cluster, [])
        t0 = time.monotonic()
        time.sleep(args.window)
        used = _cpu_used(before, _cpu_mark(cluster, []))
        elapsed = time.monotonic() - t0
        print(f"== idle cluster sized for {args.sessions:,} sessions, {elapsed:.0f} s")
        share = 100 * used.cluster / elapsed
        print(f"cluster {share:.0f} % of one core: {used.per_second(elapsed)}")


if __name__ == "__main__":
    main()
