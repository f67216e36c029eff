"""CPU used by a local cluster's processes, by role, between two marks (from /proc).

A scenario that loads the cluster reports where its CPU went: on this 2-core box a
change in the cost per unit of work (per login, per message) explains a change in
throughput better than the throughput alone. Roles: the workers, PostgreSQL (each
postmaster and all its children), HAProxy, Patroni + etcd + the rest of the tier,
any extra processes the caller names (a load generator), and the whole machine.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from app.cluster.launcher import LocalCluster
from app.cluster.process import proc_stat

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads), in seconds; None once it is gone."""
    fields = proc_stat(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _TICKS


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in task.read_text().split()]
            except (OSError, ValueError):
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _machine_busy_s() -> float:
    """CPU seconds the machine spent busy (not idle, not waiting for I/O) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICKS


def _roles(cluster: LocalCluster, extra: dict[str, list[int]]) -> dict[int, str]:
    roles: dict[int, str] = {}
    run = cluster.layout.run
    for pidfile in sorted(run.glob("*.pid")) if run.is_dir() else []:
        pid = cluster.pid_of(pidfile.stem)
        if pid is None:
            continue
        if re.fullmatch(r"w\d+", pidfile.stem):
            roles[pid] = "workers"
        elif re.fullmatch(r"haproxy\d*", pidfile.stem):
            roles[pid] = "haproxy"
        else:
            roles[pid] = "patroni+etcd+rest"
    for node in cluster.settings.node_names():
        postmaster = cluster.postmaster_pid(node)
        if postmaster is not None:
            for pid in [postmaster, *_descendants(postmaster)]:
                roles[pid] = "postgres"
    for role, pids in extra.items():
        for pid in pids:
            roles[pid] = role
    return roles


@dataclass(frozen=True, slots=True)
class CpuMark:
    at: float  # the machine's busy seconds
    by_pid: dict[int, tuple[str, float]]


def mark(cluster: LocalCluster, extra: dict[str, list[int]] | None = None) -> CpuMark:
    by_pid: dict[int, tuple[str, float]] = {}
    for pid, role in _roles(cluster, extra or {}).items():
        used = cpu_s(pid)
        if used is not None:
            by_pid[pid] = (role, used)
    return CpuMark(_machine_busy_s(), by_pid)


def used(before: CpuMark, after: CpuMark) -> dict[str, float]:
    """CPU seconds by role between two marks, and ``machine`` (every process, and the
    kernel's interrupts). A process started between them counts whole; one that ended
    between them is lost (PostgreSQL's pools keep their backends, so few are)."""
    out: dict[str, float] = defaultdict(float)
    for pid, (role, cpu) in after.by_pid.items():
        out[role] += max(0.0, cpu - before.by_pid.get(pid, (role, 0.0))[1])
    out["machine"] = after.at - before.at
    return dict(out)


def per_unit_ms(seconds: dict[str, float], units: float) -> str:
    """``seconds`` by role as milliseconds per unit of work: "machine 3.1 ms (workers
    1.2, postgres 0.9, ...)"."""
    if units <= 0:
        return "no work done"
    parts = [
        f"{role} {1000 * s / units:.2f}"
        for role, s in sorted(seconds.items(), key=lambda kv: -kv[1])
        if role != "machine"
    ]
    return f"machine {1000 * seconds.get('machine', 0.0) / units:.2f} ms ({', '.join(parts)})"
