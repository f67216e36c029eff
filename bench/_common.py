"""Shared pieces of the benchmarks: the cluster under test and CPU accounting.

A benchmark either starts its own cluster (``make_settings`` + ``LocalCluster``,
always stopped and purged afterwards) or measures a running one named by
``--state-dir`` (ports read from its rendered haproxy.cfg) and/or ``--port``.
A cluster of its own has no auth or idle deadlines to speak of (3600 s); a
running one keeps its own (auth_timeout_s 10 s, idle_timeout_s 90 s by default).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from app.settings import Settings

if TYPE_CHECKING:
    from app.cluster.launcher import LocalCluster


@dataclass
class Target:
    host: str
    client_port: int
    worker_ports: dict[str, int] = field(default_factory=dict)
    state_dir: Path | None = None
    own_cluster: bool = False
    # The TLS client port and the CA that signs its certificate (the cluster's own).
    client_tls_port: int | None = None
    ca_file: Path | None = None
    # WebSockets (--transport ws): HAProxy's ws:// and wss:// ports, each worker's own.
    client_ws_port: int | None = None
    client_wss_port: int | None = None
    worker_ws_ports: dict[str, int] = field(default_factory=dict)
    # The settings of a cluster the benchmark started (None: a running one named).
    settings: Settings | None = None

    def worker_pid(self, worker: str) -> int | None:
        if self.state_dir is None:
            return None
        return _pidfile(self.state_dir / "run" / f"{worker}.pid")


def add_target_args(parser: argparse.ArgumentParser, port_help: str) -> None:
    group = parser.add_argument_group(
        "cluster", "default: start a fresh cluster on free ports, stop and purge it at the end"
    )
    group.add_argument("--host", default="127.0.0.1", help="address of a running cluster")
    group.add_argument("--port", type=int, help=port_help)
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a Settings override for the cluster we start (repeatable), e.g. batch_writers=1",
    )
    group.add_argument(
        "--state-dir",
        type=Path,
        help="state dir of a running cluster (ports from its haproxy.cfg, pids from run/)",
    )


def _pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _ports_from_haproxy_cfg(state_dir: Path) -> tuple[int | None, dict[str, int]]:
    text = (state_dir / "haproxy.cfg").read_text()
    client = None
    # The frontend's first plaintext bind (comment lines may come before it).
    frontend = re.search(r"^frontend clients\n(.*?)(\n\n|\Z)", text, re.S | re.M)
    for bind in re.finditer(
        r"^\s*bind \S+:(\d+)(.*)$", frontend.group(1) if frontend else "", re.M
    ):
        if "ssl" not in bind.group(2):
            client = int(bind.group(1))
            break
    workers = {m.group(1): int(m.group(2)) for m in re.finditer(r"server (w\d+) \S+:(\d+)", text)}
    return client, workers


def _ws_ports_from_haproxy_cfg(state_dir: Path) -> tuple[int | None, int | None, dict[str, int]]:
    """(ws port, wss port, each worker's WebSocket port) from a running cluster's config."""
    text = (state_dir / "haproxy.cfg").read_text()
    front = re.search(r"frontend websockets\n(.*?)\n\n", text, re.S)
    backend = re.search(r"backend ws_workers\n(.*?)(\n\n|$)", text, re.S)
    plain = tls = None
    for bind in re.finditer(r"^\s*bind \S+:(\d+)(.*)$", front.group(1) if front else "", re.M):
        if "ssl crt" in bind.group(2):
            tls = int(bind.group(1))
        else:
            plain = int(bind.group(1))
    workers = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"server (w\d+) \S+:(\d+)", backend.group(1) if backend else "")
    }
    return plain, tls, workers


def metrics_ports(state_dir: Path) -> dict[str, int]:
    """Each worker's health port (/health, /metrics) from a running cluster's haproxy.cfg."""
    text = (state_dir / "haproxy.cfg").read_text()
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"server (w\d+) \S+:\d+ send-proxy-v2 check port (\d+)", text)
    }


def _tls_port_from_haproxy_cfg(state_dir: Path) -> int | None:
    text = (state_dir / "haproxy.cfg").read_text()
    # The client frontend's TLS bind (the dashboard's has no ssl-min-ver of its own).
    found = re.search(r"^\s*bind \S+:(\d+) [^\n]*\bssl crt [^\n]*ssl-min-ver", text, re.M)
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def cluster_target(args: argparse.Namespace, workers: int, **overrides: object) -> Iterator[Target]:
    """The cluster to measure: a running one (--port/--state-dir) or a fresh one of our own."""
    if args.port is not None or args.state_dir is not None:
        if args.set:
            raise SystemExit("--set applies only to a cluster the benchmark starts itself")
        client_port, worker_ports = None, dict[str, int]()
        ws_port = wss_port = None
        worker_ws_ports: dict[str, int] = {}
        if args.state_dir is not None:
            client_port, worker_ports = _ports_from_haproxy_cfg(args.state_dir)
            ws_port, wss_port, worker_ws_ports = _ws_ports_from_haproxy_cfg(args.state_dir)
        state_dir = args.state_dir.resolve() if args.state_dir else None
        yield Target(
            host=args.host,
            client_port=args.port if args.port is not None else (client_port or 5222),
            worker_ports=worker_ports,
            state_dir=state_dir,
            client_tls_port=(
                args.port
                if args.port is not None
                else (_tls_port_from_haproxy_cfg(state_dir) if state_dir else None) or 5223
            ),
            ca_file=state_dir / "tls" / "ca.pem" if state_dir else None,
            client_ws_port=args.port if args.port is not None else ws_port or 5280,
            client_wss_port=args.port if args.port is not None else wss_port or 5281,
            worker_ws_ports=worker_ws_ports,
        )
        return

    from tests.cluster_fixture import make_settings

    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value.strip()
    if args.set:
        print(f"settings overridden for this run: {', '.join(args.set)}", flush=True)
    # Benchmarks register and log in thousands of users over connections that stay
    # anonymous, and then silent, for minutes: no auth or idle deadline in the way.
    overrides = {"auth_timeout_s": 3600.0, "idle_timeout_s": 3600.0, **overrides}
    settings = make_settings(workers=workers, **overrides)
    with own_cluster(settings) as cluster:
        yield Target(
            host=settings.host,
            client_port=settings.client_port,
            worker_ports={w: settings.worker_port(w) for w in settings.worker_ids()},
            state_dir=cluster.layout.root,
            own_cluster=True,
            client_tls_port=settings.client_tls_port,
            ca_file=settings.tls_ca_file(),
            client_ws_port=settings.client_ws_port,
            client_wss_port=settings.client_wss_port,
            worker_ws_ports={w: settings.worker_ws_port(w) for w in settings.worker_ids()},
            settings=settings,
        )


@contextlib.contextmanager
def own_cluster(settings: Settings) -> Iterator[LocalCluster]:
    """A cluster started as `switchboard up` does, always stopped and purged at the end."""
    from app.cluster.launcher import LocalCluster

    cluster = LocalCluster(settings, say=lambda line: print(f"  [cluster] {line}", flush=True))
    print(f"starting a {settings.workers}-worker cluster in {settings.state_dir} ...", flush=True)
    try:
        t0 = time.monotonic()
        cluster.up()
        print(f"cluster up in {time.monotonic() - t0:.1f} s", flush=True)
        yield cluster
    finally:
        print("stopping the cluster ...", flush=True)
        cluster.down(purge=True)
        print("cluster stopped and purged", flush=True)


# ---- CPU accounting ---------------------------------------------------------------


def cluster_pids(state_dir: Path) -> dict[str, list[int]]:
    """Pids of the cluster's processes by role (PostgreSQL: postmasters and all children)."""
    run = state_dir / "run"
    groups: dict[str, list[int]] = {
        "workers": [],
        "postgres": [],
        "haproxy": [],
        "patroni+etcd": [],
    }
    for pidfile in sorted(run.glob("*.pid")):
        pid = _pidfile(pidfile)
        if pid is None:
            continue
        name = pidfile.stem
        if re.fullmatch(r"w\d+", name):
            groups["workers"].append(pid)
        elif re.fullmatch(r"haproxy\d*", name):
            groups["haproxy"].append(pid)
        else:
            groups["patroni+etcd"].append(pid)
    for pm_file in sorted((state_dir / "db").glob("n*/data/postmaster.pid")):
        pid = _pidfile(pm_file)
        if pid is None:
            continue
        groups["postgres"].append(pid)
        with contextlib.suppress(psutil.Error):
            groups["postgres"].extend(c.pid for c in psutil.Process(pid).children(recursive=True))
    return groups


def cpu_seconds(pid: int) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


class CpuSampler:
    """CPU used per group of processes between start() and stop(), in % of one core."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[int, float] = {}
        self._t0 = 0.0
        self._machine0: Any = None

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._machine0 = psutil.cpu_times()
        for pids in self.groups.values():
            for pid in pids:
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    self._start[pid] = cpu

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._t0
        out: dict[str, float] = {}
        for name, pids in self.groups.items():
            used = 0.0
            for pid in pids:
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    used += cpu - self._start.get(pid, 0.0)
            out[name] = 100.0 * used / elapsed
        machine = psutil.cpu_times()
        if self._machine0 is not None:
            busy0 = sum(self._machine0) - self._machine0.idle - self._machine0.iowait
            busy1 = sum(machine) - machine.idle - machine.iowait
            whole = 100.0 * (busy1 - busy0) / elapsed
            softirq = 100.0 * (machine.softirq - self._machine0.softirq) / elapsed
            out["other processes"] = max(0.0, whole - softirq - sum(out.values()))
            out["kernel softirq (network)"] = softirq
            out["whole machine"] = whole
        return out


def format_cpu(usage: dict[str, float]) -> str:
    cores = psutil.cpu_count() or 1
    parts = [f"{name} {pct:.0f}%" for name, pct in usage.items()]
    return "CPU (% of one core, machine = " + f"{cores * 100}%): " + ", ".join(parts)
