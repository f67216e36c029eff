"""``switchboard up --capacity N``: how many HAProxy processes and workers, and what
session limit per worker, hold N logged-in sessions on this machine, and why.

A pure function of N, the machine (cores, available memory, open-files limit) and
the settings: ``plan()`` returns a `Plan` whose ``reasons`` say, one line per
choice, what each number is made of; the CLI prints them and starts the cluster
with ``Plan.overrides()``. It refuses (`CapacityError`) a plan the machine cannot
hold. The figures per session were measured on this project's 2-core box at
100,000 sessions (issue #16, docs/benchmarks.md "Connections").
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path

from app.cluster import haproxy
from app.cluster.errors import ClusterError
from app.settings import Settings

# One HAProxy process holds haproxy.MAXCONN (9,000) clients under a 20,000
# open-files limit, two descriptors each. The kernel spreads new connections over
# the processes by a hash (SO_REUSEPORT), not evenly: plan each for fewer.
CLIENTS_PER_HAPROXY = 8_000
# Sessions a worker is planned to hold once one worker has died and its sessions
# have moved to the others (one event loop; ~12,500 each measured fine at 100k).
SESSIONS_PER_WORKER = 12_500
# Descriptors a worker keeps for other things than clients (pools, listeners, logs).
WORKER_SPARE_FDS = 500
# Memory, measured (#16: 100,000 sessions, 8 workers at 12,500: 105 MB each; 12
# HAProxy processes at ~8,300: 45 MB each), in bytes.
WORKER_BASE_RSS = 45 * 2**20
WORKER_RSS_PER_SESSION = 5 * 1024
HAPROXY_BASE_RSS = 8 * 2**20
HAPROXY_RSS_PER_CLIENT = 5 * 1024
# The kernel's side of one session: four loopback TCP sockets (client, HAProxy's two,
# the worker's) with their idle buffers.
KERNEL_PER_SESSION = 16 * 1024
# etcd, three Patroni nodes with PostgreSQL, the dashboard: about this much.
DB_TIER_BYTES = 1_500 * 2**20
# Use at most this share of the memory available now.
MEMORY_SHARE = 0.8
# PostgreSQL's max_connections (app/cluster/patroni.py) less what Patroni, replication,
# the dashboard and the CLI use: what the workers' pools may take together.
DB_CONNECTIONS_FOR_WORKERS = 250
# Per worker besides db_pool_max: the lease pool (2), the LISTEN connection (1).
WORKER_EXTRA_DB_CONNECTIONS = 3


class CapacityError(ClusterError):
    """N sessions do not fit on this machine."""


@dataclass(frozen=True, slots=True)
class Machine:
    cores: int
    memory_available: int  # bytes (MemAvailable)
    open_files: int  # the soft RLIMIT_NOFILE the cluster's processes inherit

    @classmethod
    def this(cls) -> Machine:
        available = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return cls(os.cpu_count() or 1, available, soft)


@dataclass(frozen=True, slots=True)
class Plan:
    sessions: int
    workers: int
    haproxy_processes: int
    worker_max_sessions: int
    db_pool_max: int
    memory_needed: int  # bytes, estimated
    reasons: tuple[str, ...]

    def overrides(self) -> dict[str, int]:
        return {
            "workers": self.workers,
            "haproxy_processes": self.haproxy_processes,
            "worker_max_sessions": self.worker_max_sessions,
            "db_pool_max": self.db_pool_max,
        }

    def explain(self) -> str:
        head = (
            f"capacity {self.sessions:,} sessions: {self.workers} workers "
            f"(at most {self.worker_max_sessions:,} sessions each), "
            f"{self.haproxy_processes} HAProxy processes, db_pool_max {self.db_pool_max}"
        )
        return "\n".join([head, *(f"  - {line}" for line in self.reasons)])


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def survivor_share(sessions: int, workers: int) -> int:
    """The sessions each worker must be able to hold when one of ``workers`` dies and the
    others take its sessions (rounded up to a hundred)."""
    return math.ceil(sessions / (workers - 1) / 100) * 100


def plan(sessions: int, machine: Machine, settings: Settings) -> Plan:
    """The cluster for ``sessions`` logged-in sessions on ``machine``; CapacityError when
    it does not fit."""
    if sessions < 1:
        raise CapacityError("--capacity wants a number of sessions, at least 1")
    s = settings
    reasons = []

    haproxy_processes = max(s.haproxy_processes, math.ceil(sessions / CLIENTS_PER_HAPROXY))
    reasons.append(
        f"{haproxy_processes} HAProxy processes: one holds {haproxy.MAXCONN:,} clients"
        f" (two descriptors each under a {machine.open_files:,} open-files limit);"
        f" planned {CLIENTS_PER_HAPROXY:,} each, as the kernel spreads connections by hash"
    )

    per_worker = min(SESSIONS_PER_WORKER, machine.open_files - WORKER_SPARE_FDS)
    if per_worker < 100:
        raise CapacityError(f"open-files limit {machine.open_files} leaves no room for clients")
    workers = max(s.workers, math.ceil(sessions / per_worker) + 1)
    worker_max_sessions = survivor_share(sessions, workers)
    reasons.append(
        f"{workers} workers, worker_max_sessions {worker_max_sessions:,}: when one worker"
        f" dies, the other {workers - 1} take its sessions and hold"
        f" {sessions / (workers - 1):,.0f} each (planned at most {per_worker:,}); normally"
        f" {sessions / workers:,.0f} each. A worker at its limit answers new logins"
        " `overloaded`; resumes are never refused"
    )
    if workers > machine.cores:
        reasons.append(
            f"{workers} workers share {machine.cores} cores: each is one event loop, so"
            " more workers add no CPU here; they bound the sessions a dead worker drops"
        )

    pool_max = s.db_pool_max
    per_worker_db = pool_max + s.batch_writers + WORKER_EXTRA_DB_CONNECTIONS
    if workers * per_worker_db > DB_CONNECTIONS_FOR_WORKERS:
        pool_max = DB_CONNECTIONS_FOR_WORKERS // workers - s.batch_writers
        pool_max -= WORKER_EXTRA_DB_CONNECTIONS
        if pool_max < 2:
            raise CapacityError(
                f"{workers} workers need more PostgreSQL connections than the"
                f" {DB_CONNECTIONS_FOR_WORKERS} there are for them"
            )
        reasons.append(
            f"db_pool_max {pool_max} (not {s.db_pool_max}): {workers} workers share"
            f" {DB_CONNECTIONS_FOR_WORKERS} PostgreSQL connections"
        )

    worker_rss = workers * WORKER_BASE_RSS + sessions * WORKER_RSS_PER_SESSION
    haproxy_rss = haproxy_processes * HAPROXY_BASE_RSS + sessions * HAPROXY_RSS_PER_CLIENT
    kernel = sessions * KERNEL_PER_SESSION
    needed = worker_rss + haproxy_rss + kernel + DB_TIER_BYTES
    reasons.append(
        f"memory, estimated: workers {_mb(worker_rss)}, HAProxy {_mb(haproxy_rss)},"
        f" kernel sockets {_mb(kernel)}, database tier {_mb(DB_TIER_BYTES)}:"
        f" {_mb(needed)} of {_mb(machine.memory_available)} available"
    )
    if needed > machine.memory_available * MEMORY_SHARE:
        raise CapacityError(
            f"{sessions:,} sessions need about {_mb(needed)}; this machine has"
            f" {_mb(machine.memory_available)} available (at most"
            f" {MEMORY_SHARE:.0%} of it is planned)"
        )
    reasons.append(
        f"per-address caps unchanged: {s.max_conns_per_addr} connections and"
        f" {s.max_conn_rate_per_addr} new ones per {s.conn_rate_period_s} s per client address"
        f" and HAProxy process (so up to {s.max_conns_per_addr * haproxy_processes} per address"
        f" over the {haproxy_processes}); exempt: {s.conn_cap_exempt_addrs}. A load generator"
        " on other addresses (127.0.0.2, ...) needs them in conn_cap_exempt_addrs and"
        " shared_client_addrs"
    )
    return Plan(
        sessions=sessions,
        workers=workers,
        haproxy_processes=haproxy_processes,
        worker_max_sessions=worker_max_sessions,
        db_pool_max=pool_max,
        memory_needed=needed,
        reasons=tuple(reasons),
    )
