"""`bench.throughput --timeline` against the shared cluster: the benchmark's stall
timeline (bench/_stalls.py) finds the workers' metrics, the cluster's processes and
the PostgreSQL nodes' logs, and lays a checkpoint forced during the run next to the
second it happened in.

The benchmark is the instrument issue #19's stall attribution rests on; this keeps
it reading the real cluster's files and log format, not only the samples of
tests/unit/test_bench_stalls.py.
"""

from __future__ import annotations

import asyncio
import re
import sys

import asyncpg
import pytest

from app.cluster.launcher import LocalCluster
from app.store.db import dsn

pytestmark = pytest.mark.integration

ROW = re.compile(
    r"^\s+(\d+):\s+[\d,]+\s+[\d.]+ /\s+[\d.]+ /\s+[\d.]+ \|"
    r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+) \|\s+(\d+)\s+(\d+)((?:\s+\d+){5})(.*)$"
)


@pytest.mark.timeout(120)
async def test_the_timeline_shows_each_seconds_suspects_and_a_forced_checkpoint(
    cluster: LocalCluster,
) -> None:
    bench = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.throughput",
        "--mode=rate",
        "--rate=200",
        "--pairs=20",
        "--warmup=1",
        "--duration=5",
        "--drain=5",
        "--timeline",
        f"--state-dir={cluster.layout.root}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert bench.stdout is not None
    lines: list[str] = []
    try:
        while True:  # the checkpoint goes in once the load runs
            line = (await asyncio.wait_for(bench.stdout.readline(), 60)).decode()
            assert line, "\n".join(lines)
            lines.append(line.rstrip())
            if "(measuring)" in line:
                break
        admin = await asyncpg.connect(dsn(cluster.settings, role="superuser"), timeout=5)
        try:
            await admin.execute("CHECKPOINT")
        finally:
            await admin.close()
        out, _ = await asyncio.wait_for(bench.communicate(), 60)
    finally:
        if bench.returncode is None:
            bench.kill()
            await bench.wait()
    lines += out.decode().splitlines()
    text = "\n".join(lines)
    assert bench.returncode == 0, text

    header = next(line for line in lines if line.startswith("latency by second"))
    for column in ("disk MB", "GC ms", "busiest 100 ms", "workers", "postgres", "generator"):
        assert column in header, header
    rows = [m for m in map(ROW.match, lines) if m]
    assert len(rows) >= 5, text
    # Every second: the machine was busy (the probe read /proc/stat), and the
    # workers' and PostgreSQL's shares were counted (it found their processes).
    for row in rows:
        busy, workers, postgres = float(row.group(6)), *map(int, row.group(8).split()[:2])
        assert busy > 0 and workers > 0 and postgres > 0, row.group(0)
    # The forced checkpoint, read back from the node's log, in one of the seconds.
    events = " ".join(row.group(9) for row in rows)
    assert re.search(r"n\d checkpoint (starting|complete)", events), text
    assert re.search(r"^per-second p99: median [\d.]+ ms, worst", text, re.M), text
    assert "errors: none" in text, text
