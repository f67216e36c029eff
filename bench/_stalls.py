"""What else happened in each second of a benchmark's run: the suspects of a latency
stall, recorded next to it (issue #19).

`StallProbe` runs on a thread of the benchmark's parent process from the start of
the load and records, per second after ``t0``:

- **disk**: MB written to the machine's disks (``/proc/diskstats``, every 100 ms),
  and the largest 100 ms burst: a burst of tens of MB is a stall on every fsync
  queued behind it (it found the WAL segments zero-filled on all nodes at once);
- **GC**: milliseconds the workers' cyclic garbage collector ran (their
  ``switchboard_gc_pause_seconds``), summed over the workers;
- **lag**: how many of the workers' event-loop probes (one every 50 ms each) ran
  50 ms or more late (``switchboard_event_loop_lag_seconds``);
- **database**: checkpoints and autovacuum/autoanalyze runs, from the PostgreSQL
  nodes' logs (``log_checkpoints`` and ``log_autovacuum_min_duration``, set in
  app/cluster/patroni.py), each in the second it was logged;
- **CPU**: the machine's busy share in that second and in its busiest 100 ms (% of
  one core; 200 % is this box full: a stall with the machine full is a stall of
  waiting for a core), and each group's share of the second (workers, PostgreSQL,
  HAProxy, Patroni + etcd, the load generator).

The workers' /metrics are read every 250 ms (the ports from the cluster's
haproxy.cfg); reading them costs the workers a little CPU, which is why the probe
runs only with ``--timeline``.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

from bench._common import cpu_seconds, metrics_ports

DISK_EVERY_S = 0.1
METRICS_EVERY_S = 0.25
LAG_LATE_S = "0.05"  # a bucket bound of switchboard_event_loop_lag_seconds
SECTOR = 512

_PG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (?:UTC|GMT)?.*?"
    r"(checkpoint starting|checkpoint complete|automatic vacuum of table|"
    r"automatic analyze of table)(?: \"([^\"]+)\")?"
)


@dataclass(slots=True)
class Second:
    disk_mb: float = 0.0
    burst_mb: float = 0.0
    gc_ms: float = 0.0
    late_probes: int = 0
    busy_pct: float = 0.0  # the machine, % of one core, over the second
    busiest_pct: float = 0.0  # ... and in its busiest 100 ms
    cpu: Counter[str] = field(default_factory=Counter)  # group -> % of one core
    db_events: Counter[str] = field(default_factory=Counter)

    def format(self, groups: list[str] | None = None) -> str:
        events = ", ".join(
            f"{what}" + (f" x{n}" if n > 1 else "") for what, n in sorted(self.db_events.items())
        )
        shares = " ".join(f"{self.cpu[g]:3.0f}" for g in groups or [])
        return (
            f"{self.disk_mb:6.1f} {self.burst_mb:6.1f} {self.gc_ms:6.1f} {self.late_probes:5d}"
            f" | {self.busy_pct:4.0f} {self.busiest_pct:4.0f}"
            + (f" {shares}" if shares else "")
            + (f"  {events}" if events else "")
        )


def header(groups: list[str]) -> str:
    """The timeline's column names for `Second.format` with these ``groups``."""
    return (
        "disk MB, largest 100 ms; GC ms; probes >= 50 ms late | CPU % machine, busiest"
        f" 100 ms{''.join(f', {g}' for g in groups)}; database"
    )


def _disks() -> list[str]:
    names = []
    for dev in sorted(Path("/sys/block").iterdir()):
        if not dev.name.startswith(("loop", "ram", "zram")):
            names.append(dev.name)
    return names


def _sectors_written(disks: list[str]) -> int:
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 9 and parts[2] in disks:
                total += int(parts[9])
    return total


def _read_metrics(port: int) -> tuple[float, float, float] | None:
    """(GC seconds so far, loop probes so far, probes within LAG_LATE_S) of one worker."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=0.5) as r:
            body = r.read().decode()
    except OSError:
        return None
    gc = probes = on_time = 0.0
    for line in body.splitlines():
        if line.startswith("switchboard_gc_pause_seconds_sum"):
            gc = float(line.rsplit(" ", 1)[1])
        elif line.startswith("switchboard_event_loop_lag_seconds_count"):
            probes = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f'switchboard_event_loop_lag_seconds_bucket{{le="{LAG_LATE_S}"}}'):
            on_time = float(line.rsplit(" ", 1)[1])
    return gc, probes, on_time


def db_events(state_dir: Path, since_wall: float, until_wall: float) -> list[tuple[float, str]]:
    """(wall time, what) of the checkpoints and autovacuum runs the nodes logged."""
    found: list[tuple[float, str]] = []
    for log in sorted((state_dir / "logs").glob("n*.log")):
        node = log.stem
        with contextlib.suppress(OSError), open(log, errors="replace") as f:
            for line in f:
                m = _PG_LINE.match(line)
                if not m:
                    continue
                stamp = m.group(1)
                with contextlib.suppress(ValueError):
                    at = datetime.fromisoformat(stamp + "+00:00").timestamp()
                    if since_wall <= at <= until_wall:
                        what = m.group(2).replace("automatic ", "auto")
                        table = (m.group(3) or "").rsplit(".", 1)[-1]
                        found.append((at, f"{node} {what}" + (f" {table}" if table else "")))
    return found


class StallProbe:
    """Samples disk writes and the workers' GC and lag from ``t0`` (monotonic) until
    `stop`; `seconds` then holds a `Second` per whole second after ``t0``."""

    def __init__(
        self, state_dir: Path | None, t0: float, groups: dict[str, list[int]] | None = None
    ) -> None:
        self._state_dir = state_dir
        self.groups = groups or {}
        self._t0 = t0
        self._wall0 = time.time() - (time.monotonic() - t0)
        self._disks = _disks()
        self._ports = metrics_ports(state_dir) if state_dir is not None else {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)
        self.seconds: dict[int, Second] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[int, Second]:
        self._stop.set()
        self._thread.join(5)
        if self._state_dir is not None:
            end = time.time()
            for at, what in db_events(self._state_dir, self._wall0, end):
                self._second(at - self._wall0).db_events[what] += 1
        return self.seconds

    def _second(self, after_t0: float) -> Second:
        return self.seconds.setdefault(int(after_t0), Second())

    def _cpu_by_group(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, pids in self.groups.items():
            totals[name] = sum(c for c in map(cpu_seconds, pids) if c is not None)
        return totals

    def _run(self) -> None:
        sectors = _sectors_written(self._disks)
        machine, cores = psutil.cpu_times(), psutil.cpu_count() or 1
        cpu_at, cpu = time.monotonic(), self._cpu_by_group()
        last_metrics = {
            wid: _read_metrics(port) or (0.0, 0.0, 0.0) for wid, port in self._ports.items()
        }
        next_metrics = time.monotonic() + METRICS_EVERY_S
        while not self._stop.wait(DISK_EVERY_S):
            now = time.monotonic()
            second = self._second(now - self._t0)
            written = _sectors_written(self._disks)
            mb = (written - sectors) * SECTOR / 1e6
            sectors = written
            second.disk_mb += mb
            second.burst_mb = max(second.burst_mb, mb)
            was, machine = machine, psutil.cpu_times()
            idle = (machine.idle + machine.iowait) - (was.idle + was.iowait)
            total = sum(machine) - sum(was)
            if total > 0:
                busy = 100.0 * cores * (1 - idle / total)
                second.busy_pct += busy * DISK_EVERY_S
                second.busiest_pct = max(second.busiest_pct, busy)
            if now < next_metrics:
                continue
            next_metrics = now + METRICS_EVERY_S
            was_at, was_cpu = cpu_at, cpu
            cpu_at, cpu = now, self._cpu_by_group()
            for name, used in cpu.items():
                second.cpu[name] += (
                    100.0
                    * (used - was_cpu.get(name, used))
                    * (METRICS_EVERY_S / max(now - was_at, 1e-3))
                )
            for wid, port in self._ports.items():
                read = _read_metrics(port)
                if read is None:
                    continue
                gc, probes, on_time = read
                gc0, probes0, on_time0 = last_metrics[wid]
                second.gc_ms += max(0.0, gc - gc0) * 1e3
                second.late_probes += max(0, int((probes - probes0) - (on_time - on_time0)))
                last_metrics[wid] = read
