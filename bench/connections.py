"""N logged-in sessions through HAProxy's client port, then kill -9 of the busiest worker.

    .venv/bin/python -m bench.connections --sessions 100000             # make bench
    .venv/bin/python -m bench.connections --sessions 200000
    .venv/bin/python -m bench.connections --sessions 20000 --state-dir DIR   # a running cluster

Without ``--state-dir`` it starts a cluster of its own (``LocalCluster``, as
``switchboard up`` does, on free ports, stopped and purged at the end), sized by
``switchboard up --capacity N``'s plan (app/cluster/capacity.py), with the test
suite's argon2 cost (1 MiB, 1 pass) and the generator's source addresses
127.0.0.0/8 exempt from the per-address caps and budgets. A running cluster given
by ``--state-dir`` must have been started with those two settings
(``SWITCHBOARD_CONN_CAP_EXEMPT_ADDRS=127.0.0.0/8 SWITCHBOARD_SHARED_CLIENT_ADDRS=127.0.0.0/8``):
HAProxy otherwise closes the generator's connections past 50 per address.

The users are written to the database first (one shared argon2 hash: ``--setup
sql``, the default) or each registers over the wire (``--setup register``). Then
bench/_sessions.py's generator processes (~8,000 sessions each, source addresses
127.0.0.2, ...) log every session in (``--login password``: ``hello``, the default;
``--login token``: ``login_token``) and hold it, with a progress bar on stderr. Then
the worker holding the most sessions is killed with SIGKILL; every dropped session
resumes with its resume token (a password or token login after the kill is a
failure: there must be none).

Reported: logins per second and ``overloaded`` answers per login; RSS per session
of the workers and of the HAProxy processes (from /proc); live session rows per
worker in PostgreSQL; resume latency from the kill to ``welcome`` (p50, p99, max)
and resumes per second; CPU per login and per resume, from /proc/<pid>/stat
(utime + stime) of every process of the cluster (workers, HAProxy, PostgreSQL with
its backends, Patroni, etcd; not the generators, listed apart), and of the whole
machine from /proc/stat for reference (the box is shared: other work counts there).
Also when the clients saw the drop, and the SYNs the kernel dropped at a full listen
queue during the storm (TcpExt ListenDrops: such a client's connect is retried after
1 s, then 2, 4, ... s). Then a per-second timeline of the storm (connects, resumes,
``overloaded``) as a table, and as a PNG plot (``--plot``; needs matplotlib:
``pip install -e .[bench]``); and one of the logins before it (logins, resumes,
``overloaded`` and drops a second, the sessions held as the clients and the workers
count them, the workers' worst event-loop lag from their ``/health``) as a table, a
CSV and a PNG beside the storm's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import secrets
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from app.cluster.health import http_json
from app.settings import Settings
from bench._common import cluster_pids, own_cluster
from bench._sessions import (
    PING_INTERVAL_S,
    Fleet,
    cluster_overrides,
    default_procs,
    password_hash,
    preregister,
    split,
)
from bench._wire import PASSWORD

HOLD_S = 10.0  # the window in which the held sessions' CPU is measured


@dataclass
class Cluster:
    settings: Settings  # enough of them for the database's address and the ports
    state_dir: Path
    # The workers' /health (the login timeline's server columns); unknown for a
    # cluster given by --state-dir, whose worker ports the benchmark does not read.
    health_urls: list[str] = field(default_factory=list)

    def worker_pid(self, worker: str) -> int | None:
        try:
            return int((self.state_dir / "run" / f"{worker}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def _running(state_dir: Path) -> Cluster:
    """The settings of a running cluster, from its rendered haproxy.cfg."""
    text = (state_dir / "haproxy.cfg").read_text()
    # The first bind line of each section, past any comment lines.
    client = re.search(r"frontend clients\s*\n(?:\s*#.*\n)*\s*bind (\S+):(\d+)", text)
    primary = re.search(r"listen pg_primary\s*\n(?:\s*#.*\n)*\s*bind (\S+):(\d+)", text)
    if client is None or primary is None:
        raise SystemExit(f"{state_dir}/haproxy.cfg: no client port or database port found")
    settings = Settings.load(
        env={},
        state_dir=state_dir,
        host=primary.group(1),
        client_port=int(client.group(2)),
        db_primary_port=int(primary.group(2)),
    )
    return Cluster(settings, state_dir.resolve())


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[Cluster]:
    if args.state_dir is not None:
        if args.workers is not None:
            raise SystemExit("--workers sizes a cluster of its own, not one given by --state-dir")
        yield _running(args.state_dir)
        return
    from app.cluster.capacity import Machine, plan, survivor_share
    from tests.cluster_fixture import free_port_block, make_settings

    overrides: dict[str, object] = dict(cluster_overrides())
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value.strip()
    base = make_settings(**overrides)
    chosen = plan(args.sessions, Machine.this(), base)
    print(chosen.explain(), flush=True)
    # A port block has room for 10 workers: more get blocks of their own.
    ports = {}
    if max(chosen.workers, args.workers or 0) > 10:
        ports = {
            "worker_base_port": free_port_block(),
            "worker_health_base_port": free_port_block(),
            "worker_agent_base_port": free_port_block(),
            "worker_ws_base_port": free_port_block(),
        }
    chosen_overrides = chosen.overrides()
    if args.workers is not None:
        # The plan keeps one worker spare; --workers fixes the count (issue #16's kill of
        # 1/8: --workers 8), each then sized to hold its share of a dead worker's.
        if args.workers < 2:
            raise SystemExit("--workers wants at least 2 (one is killed)")
        share = survivor_share(args.sessions, args.workers)
        chosen_overrides |= {"workers": args.workers, "worker_max_sessions": share}
        print(f"--workers {args.workers}: worker_max_sessions {share:,}", flush=True)
    settings = base.replace(**chosen_overrides, **ports)
    with own_cluster(settings) as cluster:
        yield Cluster(settings, cluster.layout.root, cluster.worker_health_urls())


# ---- measurements ------------------------------------------------------------------------


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """utime + stime (s) of each process, from /proc/<pid>/stat."""
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


@dataclass
class CpuMark:
    cluster: dict[int, float]  # every process of the cluster, listed afresh each time
    generators: dict[int, float]
    machine: float  # busy seconds of the whole machine, /proc/stat
    roles: dict[int, str] = field(default_factory=dict)  # pid -> workers, postgres, ...


@dataclass
class CpuUsed:
    cluster: float
    generators: float
    machine: float
    # The cluster's share by role (workers, postgres, haproxy, patroni+etcd).
    by_role: dict[str, float] = field(default_factory=dict)

    def per_second(self, seconds: float) -> str:
        """% of one core, by role."""
        return ", ".join(
            f"{role} {100 * used / seconds:.0f} %" for role, used in self.by_role.items()
        )

    def per(self, count: int) -> str:
        """ms per item, by role: where the CPU went."""
        n = max(count, 1)
        return ", ".join(
            f"{role} {1000 * seconds / n:.2f}" for role, seconds in self.by_role.items()
        )


def _cpu_mark(cluster: Cluster, generator_pids: list[int]) -> CpuMark:
    roles = {pid: role for role, group in cluster_pids(cluster.state_dir).items() for pid in group}
    t = psutil.cpu_times()
    busy = float(sum(t) - t.idle - t.iowait)
    return CpuMark(_cpu_by_pid(list(roles)), _cpu_by_pid(generator_pids), busy, roles)


def _cpu_used(before: CpuMark, after: CpuMark) -> CpuUsed:
    """Seconds used in between. A process that started since counts whole; one that
    ended (the killed worker, closed PostgreSQL backends) took its share with it."""

    def used(a: dict[int, float], b: dict[int, float]) -> float:
        return sum(cpu - a.get(pid, 0.0) for pid, cpu in b.items())

    by_role: dict[str, float] = {}
    for pid, cpu in after.cluster.items():
        role = after.roles.get(pid, "other")
        by_role[role] = by_role.get(role, 0.0) + cpu - before.cluster.get(pid, 0.0)
    return CpuUsed(
        used(before.cluster, after.cluster),
        used(before.generators, after.generators),
        after.machine - before.machine,
        by_role,
    )


def _tcpext(name: str) -> int:
    """A TcpExt counter of the whole machine (/proc/net/netstat), 0 if there is none."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head[0] == "TcpExt:" and name in head:
            return int(values[head.index(name)])
    return 0


def _listen_drops() -> int:
    """SYNs dropped because a listen queue was full; the client tries again after 1 s,
    then 2, 4, ... s."""
    return _tcpext("ListenDrops")


def _softnet() -> tuple[int, int]:
    """(packets dropped at a full per-CPU input queue, SYNs retransmitted), whole machine.

    Loopback traffic enters the receiving side through the per-CPU backlog queue
    (net.core.netdev_max_backlog long): a burst past it is dropped there, before any
    listen queue (so ListenDrops stays 0), and a dropped SYN is sent again after
    1 s, then 2, 4, ... s."""
    dropped = 0
    for line in Path("/proc/net/softnet_stat").read_text().splitlines():
        fields = line.split()
        if len(fields) > 1:
            dropped += int(fields[1], 16)
    return dropped, _tcpext("TCPSynRetrans")


def _netdev_max_backlog() -> int:
    return int(Path("/proc/sys/net/core/netdev_max_backlog").read_text())


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total


async def _session_rows(settings: Settings) -> dict[str, tuple[int, int]]:
    """Live session rows per worker: (active, detached)."""
    import asyncpg

    from app.store import dashboard
    from app.store.db import dsn

    pool = await asyncpg.create_pool(dsn(settings), min_size=1, max_size=1)
    try:
        totals = await dashboard.live_totals(pool)
    finally:
        await pool.close()
    return {w: (s.active, s.detached) for w, s in sorted(totals.by_worker.items())}


def _bar(label: str, done: int, total: int, started: float, extra: str = "") -> None:
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = done / elapsed
    eta = (total - done) / rate if rate > 0 else float("inf")
    width = 30
    filled = int(width * done / total) if total else width
    eta_text = f"{eta:,.0f} s" if eta != float("inf") else "?"
    sys.stderr.write(
        f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}"
        f"  {rate:,.0f}/s  ETA {eta_text}  {extra}   "
    )
    sys.stderr.flush()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * q) - 1))]


# ---- the run -----------------------------------------------------------------------------


class _HealthSampler(threading.Thread):
    """About once a second, every worker's ``/health``: the worst event-loop lag among
    them (each reports the worst of its last 10-20 s) and the sessions they hold."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(name="health-sampler", daemon=True)
        self._urls = urls
        self._done = threading.Event()
        # (wall time, worst loop lag in ms, sessions held; None where a worker did not answer)
        self.samples: list[tuple[float, float | None, int | None]] = []

    def run(self) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            while not self._done.wait(1.0):
                bodies = [b for _, b in pool.map(lambda u: http_json(u, 0.8), self._urls)]
                answered = [b for b in bodies if isinstance(b, dict)]
                lags = [float(b.get("loop_lag_ms") or 0.0) for b in answered]
                held = sum(int(b.get("sessions") or 0) for b in answered)
                self.samples.append(
                    (
                        time.time(),
                        max(lags) if lags else None,
                        held if len(answered) == len(bodies) else None,
                    )
                )

    def __enter__(self) -> _HealthSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join(timeout=10)


@dataclass(frozen=True, slots=True)
class LoginSecond:
    """One second of the logins (second s is (s-1, s] from their start)."""

    second: int
    logins: int
    resumes: int
    overloaded: int
    drops: int
    online: int  # sessions the generators held at the second's end
    server_sessions: int | None  # sessions the workers held (/health, sampled once a second)
    worst_lag_ms: float | None  # the workers' worst event-loop lag (their /health)


def _login_timeline(
    fleet: Fleet,
    origin: float,
    seconds: int,
    online: dict[int, int],
    samples: list[tuple[float, float | None, int | None]],
) -> list[LoginSecond]:
    counts = fleet.per_second(origin)
    server: dict[int, tuple[float | None, int | None]] = {}
    for at, lag, held in samples:  # the second's last sample
        server[int(at - origin) + 1] = (lag, held)
    rows, last_online = [], 0
    for second in range(1, seconds + 1):
        c = counts.get(second, {})
        last_online = online.get(second, last_online)
        lag, held = server.get(second, (None, None))
        rows.append(
            LoginSecond(
                second,
                c.get("logins", 0),
                c.get("resumes", 0),
                c.get("overloaded", 0),
                c.get("drops", 0),
                last_online,
                held,
                lag,
            )
        )
    return rows


@dataclass
class Result:
    sessions: int
    login_s: float
    logins: int
    login_overloaded: int
    cpu_login: CpuUsed
    rss_workers: int
    rss_haproxy: int
    rss_base_workers: int  # before the first login: the processes' own start-up memory
    rss_base_haproxy: int
    workers: int
    haproxy_processes: int
    rows_before: dict[str, tuple[int, int]]
    victim: str
    victim_sessions: int
    latencies: list[float]
    noticed: list[float]  # when each client saw its connection drop, from the kill
    # Each resume's later phases: from the drop seen to the start of the connect that
    # resumed (the SDK's 0-100 ms jitter, failed attempts, the client's loop running
    # late), that connect (the TCP handshake), and from it to the welcome (HAProxy,
    # the worker's admission queue and batch).
    waited: list[float]
    handshake: list[float]
    answered: list[float]
    listen_drops: int  # SYNs dropped at full listen queues during the storm (whole machine)
    softnet_drops: tuple[int, int]  # packets dropped at the per-CPU input queue: logins, storm
    syn_retrans: tuple[int, int]  # SYNs sent again: logins, storm
    netdev_max_backlog: int
    resume_window_s: float
    resumes: int
    fallback_logins: int
    storm_overloaded: int
    cpu_resume: CpuUsed
    cpu_hold: CpuUsed  # HOLD_S seconds of the sessions only held (a ping each per interval)
    hold_s: float
    rows_after: dict[str, tuple[int, int]]
    # (second from the kill, drops seen, connects, failed connects or connections lost
    # before their welcome, resumes, overloaded)
    timeline: list[tuple[int, int, int, int, int, int]]
    unresumed: int
    login_timeline: list[LoginSecond] = field(default_factory=list)


def _await_logins(
    fleet: Fleet,
    n: int,
    started: float,
    origin: float,
    online: dict[int, int],
    timeout: float,
) -> None:
    """Until every generator has logged its sessions in (at most ``timeout`` from
    ``started``), with a progress bar; ``online`` gets the generators' sessions at each
    second's end (from ``origin``, wall clock)."""
    deadline, last_bar = started + timeout, 0.0
    while not fleet.all_ready():
        fleet.poll(0.2)
        online[int(time.time() - origin) + 1] = fleet.sessions_online()
        if time.monotonic() - last_bar > 0.5:
            last_bar = time.monotonic()
            _bar(
                "logins ",
                fleet.totals["logins"],
                n,
                started,
                f"overloaded {fleet.totals['overloaded']:,} drops {fleet.totals['drops']:,}"
                f" idle {fleet.totals['idle_timeouts']:,}"
                f" ({fleet.totals['idle_after_ping']:,} pinged)"
                f" lag {fleet.totals['lag_ms'] / 1000:,.0f} s"
                f" online {fleet.sessions_online():,}",
            )
        if time.monotonic() > deadline:
            raise SystemExit(f"\nlogins not done after {timeout:.0f} s")


def run(args: argparse.Namespace, cluster: Cluster) -> Result:
    s = cluster.settings
    n = args.sessions
    run_id = secrets.token_hex(3)
    users = [f"cx{run_id}_{i}" for i in range(n)]
    tokens: list[str] | None = None
    if args.setup == "sql":
        from app.store.db import dsn

        t0 = time.monotonic()
        hashed = password_hash(
            PASSWORD,
            s.argon2_memory_kib,
            s.argon2_time_cost,
            s.argon2_parallelism,
        )
        tokens = asyncio.run(preregister(dsn(s), users, hashed))
        print(f"set-up: {n:,} users in the database in {time.monotonic() - t0:.1f} s", flush=True)
    procs = args.procs or default_procs(n)
    configs = split(
        s.host,
        s.client_port,
        users,
        procs,
        device_tokens=tokens if args.login == "token" else None,
        register=args.setup == "register",
        inflight=args.inflight,
        nice=args.generator_nice,
    )
    print(
        f"{n:,} sessions from {len(configs)} generator processes, source addresses "
        f"{configs[0].source_addrs[0]}..{configs[-1].source_addrs[-1]}, login: {args.login}"
        f", generators at nice {args.generator_nice}",
        flush=True,
    )
    base_pids = cluster_pids(cluster.state_dir)
    rss_base_workers, rss_base_haproxy = _rss(base_pids["workers"]), _rss(base_pids["haproxy"])
    net_login = _softnet()
    if args.generator_nice:  # after the cluster started: its processes keep nice 0
        os.setpriority(os.PRIO_PROCESS, 0, args.generator_nice)
    with Fleet(configs) as fleet:
        gen_pids = [p.pid for p in fleet._procs if p.pid is not None]
        mark = _cpu_mark(cluster, gen_pids)
        started, login_origin = time.monotonic(), time.time()
        online: dict[int, int] = {}  # the generators' sessions at each second's end
        with _HealthSampler(cluster.health_urls) as sampler:
            _await_logins(fleet, n, started, login_origin, online, args.login_timeout)
            login_s = time.monotonic() - started
            cpu_login = _cpu_used(mark, _cpu_mark(cluster, gen_pids))
        net_storm = _softnet()
        _bar("logins ", fleet.totals["logins"], n, started, "done")
        sys.stderr.write("\n")
        logins = fleet.totals["logins"]
        login_overloaded = fleet.totals["overloaded"]

        time.sleep(2.0)  # pings flowing, the last rows committed
        # What holding costs: every session pings once per ping interval, nothing else.
        mark = _cpu_mark(cluster, gen_pids)
        hold_from = time.monotonic()
        while time.monotonic() < hold_from + HOLD_S:
            fleet.poll(0.2)
        hold_s = time.monotonic() - hold_from
        cpu_hold = _cpu_used(mark, _cpu_mark(cluster, gen_pids))
        pids = cluster_pids(cluster.state_dir)
        rss_workers, rss_haproxy = _rss(pids["workers"]), _rss(pids["haproxy"])
        rows_before = asyncio.run(_session_rows(s))
        victim = max(rows_before, key=lambda w: rows_before[w][0])
        victim_sessions = rows_before[victim][0]
        pid = cluster.worker_pid(victim)
        if pid is None:
            raise SystemExit(f"no pid file for {victim}")
        fleet.poll(0.0)
        before_kill = dict(fleet.totals)
        mark = _cpu_mark(cluster, gen_pids)
        drops_before = _listen_drops()
        print(f"kill -9 {victim} (pid {pid}) holding {victim_sessions:,} sessions", flush=True)
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        deadline = started + args.resume_timeout
        last_bar = 0.0
        while True:
            fleet.poll(0.1)
            drops = fleet.totals["drops"] - before_kill["drops"]
            back = fleet.totals["resumes"] - before_kill["resumes"]
            back += fleet.totals["fallback_logins"] - before_kill["fallback_logins"]
            if time.monotonic() - last_bar > 0.5:
                last_bar = time.monotonic()
                _bar("resumes", back, max(drops, victim_sessions), started)
            if drops >= victim_sessions and back >= drops and fleet.sessions_online() >= n:
                break
            if time.monotonic() > deadline:
                break
        cpu_resume = _cpu_used(mark, _cpu_mark(cluster, gen_pids))
        listen_drops = _listen_drops() - drops_before
        net_end = _softnet()
        _bar("resumes", back, max(drops, 1), started, "done")
        sys.stderr.write("\n")
        rows_after: dict[str, tuple[int, int]] = {}
        for _ in range(30):  # the dead worker's rows move as their sessions resume
            rows_after = asyncio.run(_session_rows(s))
            if victim not in rows_after:
                break
            time.sleep(1.0)
        tail = time.monotonic() + 2.0  # the timeline's last seconds
        while time.monotonic() < tail:
            fleet.poll(0.2)
        fleet.stop()
    login_timeline = _login_timeline(fleet, login_origin, int(login_s) + 1, online, sampler.samples)
    resumed = [
        (dropped - killed_at, connecting - killed_at, connected - killed_at, welcome - killed_at)
        for report in fleet.reports.values()
        for dropped, connecting, connected, welcome in report["resumed"]
        if welcome >= killed_at
    ]
    latencies = [welcome for *_, welcome in resumed]
    noticed = [dropped for dropped, *_ in resumed]
    storm_s = max(10, int(max(latencies, default=0.0)) + 3)
    timeline = [
        (
            second,
            counts.get("drops", 0),
            counts.get("connects", 0),
            counts.get("connect_errors", 0) + counts.get("login_errors", 0),
            counts.get("resumes", 0),
            counts.get("overloaded", 0),
        )
        for second, counts in sorted(fleet.per_second(killed_at).items())
        if -2 <= second <= storm_s
    ]
    return Result(
        sessions=n,
        login_s=login_s,
        logins=logins,
        login_overloaded=login_overloaded,
        cpu_login=cpu_login,
        rss_workers=rss_workers,
        rss_haproxy=rss_haproxy,
        workers=len(pids["workers"]),
        haproxy_processes=len(pids["haproxy"]),
        rows_before=rows_before,
        victim=victim,
        victim_sessions=victim_sessions,
        latencies=latencies,
        noticed=noticed,
        waited=[connecting - dropped for dropped, connecting, _, _ in resumed],
        handshake=[connected - connecting for _, connecting, connected, _ in resumed],
        answered=[welcome - connected for _, _, connected, welcome in resumed],
        listen_drops=listen_drops,
        softnet_drops=(net_storm[0] - net_login[0], net_end[0] - net_storm[0]),
        syn_retrans=(net_storm[1] - net_login[1], net_end[1] - net_storm[1]),
        netdev_max_backlog=_netdev_max_backlog(),
        rss_base_workers=rss_base_workers,
        rss_base_haproxy=rss_base_haproxy,
        resume_window_s=max(latencies, default=0.0),
        resumes=fleet.totals["resumes"] - before_kill["resumes"],
        fallback_logins=fleet.totals["fallback_logins"] - before_kill["fallback_logins"],
        storm_overloaded=fleet.totals["overloaded"] - before_kill["overloaded"],
        cpu_resume=cpu_resume,
        cpu_hold=cpu_hold,
        hold_s=hold_s,
        rows_after=rows_after,
        timeline=timeline,
        unresumed=n - sum(r["online"] for r in fleet.reports.values()),
        login_timeline=login_timeline,
    )


def report(r: Result) -> str:
    lines = [f"== connections: {r.sessions:,} sessions"]
    lines.append(
        f"logins: {r.logins:,} in {r.login_s:.1f} s = {r.logins / r.login_s:,.0f}/s;"
        f" overloaded {r.login_overloaded:,} = {r.login_overloaded / max(r.logins, 1):.2f}"
        " per login"
    )
    lines.append(
        f"CPU per login: {1000 * r.cpu_login.cluster / max(r.logins, 1):.2f} ms of the cluster's"
        f" processes (+ {1000 * r.cpu_login.generators / max(r.logins, 1):.2f} ms in the"
        f" generators; whole machine {1000 * r.cpu_login.machine / max(r.logins, 1):.2f} ms)"
    )
    lines.append(f"  by role (ms per login): {r.cpu_login.per(r.logins)}")
    pings = r.sessions / PING_INTERVAL_S * r.hold_s
    lines.append(
        f"holding {r.sessions:,} sessions ({r.sessions / PING_INTERVAL_S:,.0f} pings/s):"
        f" {100 * r.cpu_hold.cluster / r.hold_s:.0f} % of one core for the cluster"
        f" ({1e6 * r.cpu_hold.cluster / max(pings, 1):.0f} µs per ping, idle work included;"
        f" {r.cpu_hold.per_second(r.hold_s)}), generators"
        f" {100 * r.cpu_hold.generators / r.hold_s:.0f} %"
    )
    lines.append(
        f"RSS per session: workers {r.rss_workers / r.sessions / 1024:.1f} KB"
        f" ({r.workers} processes, {r.rss_workers / 2**20:,.0f} MB),"
        f" HAProxy {r.rss_haproxy / r.sessions / 1024:.1f} KB"
        f" ({r.haproxy_processes} processes, {r.rss_haproxy / 2**20:,.0f} MB)"
    )
    lines.append(
        "RSS per session above the processes' start-up memory: workers"
        f" {(r.rss_workers - r.rss_base_workers) / r.sessions / 1024:.2f} KB"
        f" (base {r.rss_base_workers / max(r.workers, 1) / 2**20:,.0f} MB each), HAProxy"
        f" {(r.rss_haproxy - r.rss_base_haproxy) / r.sessions / 1024:.2f} KB"
    )
    lines.append(
        "session rows per worker (active/detached): "
        + ", ".join(f"{w} {a:,}/{d:,}" for w, (a, d) in r.rows_before.items())
    )
    lines.append(f"kill -9 {r.victim} holding {r.victim_sessions:,} sessions")
    if r.latencies:
        lines.append(
            f"resumed {len(r.latencies):,}: from the kill to welcome p50"
            f" {statistics.median(r.latencies):.2f} s, p99 {_percentile(r.latencies, 0.99):.2f} s,"
            f" max {max(r.latencies):.2f} s; {len(r.latencies) / max(r.resume_window_s, 1e-3):,.0f}"
            " resumes/s"
        )
    if r.noticed:
        lines.append(
            f"the clients saw the drop: p50 {statistics.median(r.noticed):.2f} s, p99"
            f" {_percentile(r.noticed, 0.99):.2f} s, max {max(r.noticed):.2f} s after the kill"
        )
    phases = (
        ("drop seen to connect", r.waited),
        ("connect", r.handshake),
        ("connected to welcome", r.answered),
    )
    if r.answered:
        lines.append(
            "then, p50 / p99 / max: "
            + "; ".join(
                f"{name} {statistics.median(xs):.2f} / {_percentile(xs, 0.99):.2f} /"
                f" {max(xs):.2f} s"
                for name, xs in phases
            )
        )
    lines.append(
        f"SYNs dropped at a full listen queue during the storm (TcpExt ListenDrops, whole"
        f" machine): {r.listen_drops:,}"
    )
    lines.append(
        f"packets dropped at the per-CPU input queue (softnet_stat, netdev_max_backlog"
        f" {r.netdev_max_backlog:,}): logins {r.softnet_drops[0]:,}, storm {r.softnet_drops[1]:,};"
        f" SYNs sent again: logins {r.syn_retrans[0]:,}, storm {r.syn_retrans[1]:,}"
    )
    lines.append(
        f"password/token logins after the kill: {r.fallback_logins}; overloaded during the"
        f" storm: {r.storm_overloaded:,}; sessions not back: {r.unresumed}"
    )
    lines.append(
        f"CPU per resume: {1000 * r.cpu_resume.cluster / max(r.resumes, 1):.2f} ms of the"
        f" cluster's processes (+ {1000 * r.cpu_resume.generators / max(r.resumes, 1):.2f} ms in"
        f" the generators; whole machine {1000 * r.cpu_resume.machine / max(r.resumes, 1):.2f}"
        " ms), over the storm"
    )
    lines.append(f"  by role (ms per resume): {r.cpu_resume.per(r.resumes)}")
    left = r.rows_after.get(r.victim)
    lines.append(
        f"rows left on {r.victim}: {left[0] + left[1] if left else 0}; rows per worker now: "
        + ", ".join(f"{w} {a:,}/{d:,}" for w, (a, d) in r.rows_after.items())
    )
    lines += _login_table(r.login_timeline)
    lines.append("storm timeline (per second; second s is (s-1, s] from the kill):")
    lines.append(
        f"{'s':>5} {'drops':>7} {'connects':>9} {'failed':>7} {'resumes':>9} {'overloaded':>11}"
    )
    lines += [
        f"{t:>5} {d:>7,} {c:>9,} {f:>7,} {res:>9,} {o:>11,}" for t, d, c, f, res, o in r.timeline
    ]
    return "\n".join(lines)


def _login_table(rows: list[LoginSecond], at_most: int = 40) -> list[str]:
    """The login timeline in at most ``at_most`` rows of equal spans (sums of the
    counts; sessions at the span's end; the worst lag in it)."""
    if not rows:
        return []
    span = max(1, math.ceil(len(rows) / at_most))
    lines = [
        f"login timeline ({span} s a row; per second within it; lag: the workers' worst,"
        " each the worst of its last 10-20 s):",
        f"{'s':>6} {'logins/s':>9} {'resumes/s':>10} {'overl./s':>9} {'drops/s':>8}"
        f" {'online':>9} {'held':>9} {'lag ms':>8}",
    ]
    for i in range(0, len(rows), span):
        part = rows[i : i + span]
        end, n = part[-1], len(part)
        lags = [x.worst_lag_ms for x in part if x.worst_lag_ms is not None]
        held = "-" if end.server_sessions is None else f"{end.server_sessions:,}"
        lines.append(
            f"{end.second:>6} {sum(x.logins for x in part) / n:>9,.0f}"
            f" {sum(x.resumes for x in part) / n:>10,.0f}"
            f" {sum(x.overloaded for x in part) / n:>9,.0f}"
            f" {sum(x.drops for x in part) / n:>8,.0f} {end.online:>9,} {held:>9}"
            f" {(f'{max(lags):,.0f}' if lags else '-'):>8}"
        )
    return lines


def write_login_csv(r: Result, path: Path) -> str:
    fields = ("second", "logins", "resumes", "overloaded", "drops", "online")
    lines = [",".join((*fields, "server_sessions", "worst_lag_ms"))]
    for x in r.login_timeline:
        held = "" if x.server_sessions is None else str(x.server_sessions)
        lag = "" if x.worst_lag_ms is None else f"{x.worst_lag_ms:.1f}"
        lines.append(",".join([*(str(getattr(x, f)) for f in fields), held, lag]))
    path.write_text("\n".join(lines) + "\n")
    return f"login timeline, per second: {path}"


NO_MATPLOTLIB = "no plot: matplotlib is not installed (pip install -e '.[bench]')"


def _pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only; None when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_logins(r: Result, path: Path) -> str:
    """Logins, resumes, refusals and drops a second; the sessions held and the workers'
    worst event-loop lag beneath."""
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    rows = r.login_timeline
    seconds = [x.second for x in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, label in (
        ("logins", "logins/s"),
        ("resumes", "resumes/s"),
        ("overloaded", "overloaded/s"),
        ("drops", "drops seen/s"),
    ):
        top.step(seconds, [getattr(x, name) for x in rows], where="pre", label=label, lw=0.8)
    top.set_ylabel("per second")
    top.set_title(f"Logins: {r.logins:,} sessions in {r.login_s:,.0f} s")
    top.legend(loc="upper right")
    top.grid(alpha=0.3)
    bottom.plot(seconds, [x.online for x in rows], label="sessions held (clients)")
    held = [(x.second, x.server_sessions) for x in rows if x.server_sessions is not None]
    if held:
        bottom.plot(*zip(*held, strict=True), label="sessions held (workers)", ls="--")
    bottom.set_ylabel("sessions")
    bottom.set_xlabel("seconds from the first login")
    bottom.grid(alpha=0.3)
    lag = bottom.twinx()
    lags = [(x.second, x.worst_lag_ms) for x in rows if x.worst_lag_ms is not None]
    if lags:
        lag.plot(*zip(*lags, strict=True), color="tab:red", lw=0.8, label="worst loop lag")
    lag.set_ylabel("workers' worst event-loop lag (ms)")
    lag.set_ylim(bottom=0)
    handles = bottom.get_legend_handles_labels()
    extra = lag.get_legend_handles_labels()
    bottom.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"login timeline plot: {path}"


def plot(r: Result, path: Path) -> str:
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    seconds = [t for t, *_ in r.timeline]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    # Each count is of the second that ends at its mark.
    ax.step(seconds, [row[1] for row in r.timeline], where="pre", label="drops seen/s")
    ax.step(seconds, [row[2] for row in r.timeline], where="pre", label="connects/s")
    ax.step(seconds, [row[4] for row in r.timeline], where="pre", label="resumes/s")
    ax.step(seconds, [o for *_, o in r.timeline], where="pre", label="overloaded/s")
    ax.axvline(0, color="grey", linestyle=":", label=f"kill -9 {r.victim}")
    ax.set_xlabel("seconds from the kill")
    ax.set_ylabel("per second")
    ax.set_title(
        f"Resume storm: {r.victim_sessions:,} of {r.sessions:,} sessions, kill -9 {r.victim}"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"timeline plot: {path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000, help="(default 100000)")
    parser.add_argument("--procs", type=int, help="generator processes (default N / 8000)")
    parser.add_argument("--setup", choices=("sql", "register"), default="sql")
    parser.add_argument("--login", choices=("password", "token"), default="password")
    parser.add_argument(
        "--inflight", type=int, default=100, help="first logins at once per process (100)"
    )
    parser.add_argument(
        "--generator-nice",
        type=int,
        default=0,
        metavar="N",
        help="nice value of the generator processes and of this one (default 0). Clients"
        " stand in for devices on other machines: a negative value (root only) keeps the"
        " cluster's load from starving them, so their pings and resumes are on time",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="worker count instead of the capacity plan's (which keeps one spare); the"
        " killed worker then holds 1/N of the sessions",
    )
    parser.add_argument("--login-timeout", type=float, default=1800.0)
    parser.add_argument("--resume-timeout", type=float, default=120.0)
    parser.add_argument(
        "--plot",
        type=Path,
        help="the storm's PNG (default connections-N.png here); the login timeline goes"
        " beside it as NAME-logins.png and NAME-logins.csv",
    )
    parser.add_argument(
        "--state-dir", type=Path, help="a running cluster (see above for its settings)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a Settings override for the cluster it starts (repeatable)",
    )
    args = parser.parse_args()
    if args.login == "token" and args.setup != "sql":
        raise SystemExit("--login token needs --setup sql (the device tokens are made there)")
    with _cluster(args) as cluster:
        result = run(args, cluster)
    print(report(result), flush=True)
    path = args.plot or Path(f"connections-{args.sessions}.png")
    print(plot(result, path), flush=True)
    if result.login_timeline:
        logins = path.with_name(f"{path.stem}-logins")
        print(write_login_csv(result, logins.with_suffix(".csv")), flush=True)
        print(plot_logins(result, logins.with_suffix(".png")), flush=True)


if __name__ == "__main__":
    main()
