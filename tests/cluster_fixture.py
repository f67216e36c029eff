"""Start real local clusters for tests, through the same code path as `switchboard up`."""

from __future__ import annotations

import os
import random
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.cluster.launcher import LocalCluster
from app.cluster.layout import Layout
from app.settings import Settings

PORT_BLOCK = 70


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block() -> int:
    """A base port with PORT_BLOCK free ports, below the ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 30000 - PORT_BLOCK)
        if all(_free(base + i) for i in range(PORT_BLOCK)):
            return base
    raise RuntimeError("no free block of ports")


def make_settings(workers: int = 3, **overrides: object) -> Settings:
    base = free_port_block()
    # Under /tmp: the unprivileged DB user must be able to enter it.
    state_dir = Path(tempfile.mkdtemp(prefix="switchboard-test-", dir="/tmp"))
    os.chmod(state_dir, 0o755)
    values: dict[str, object] = {
        "state_dir": state_dir,
        "workers": workers,
        "client_port": base,
        "haproxy_stats_port": base + 1,
        "db_primary_port": base + 2,
        "db_replica_port": base + 3,
        "etcd_client_port": base + 4,
        "etcd_peer_port": base + 5,
        "dashboard_port": base + 6,
        # base + 7 is the dashboard app port (dashboard_port + dashboard_app_port_offset).
        "client_tls_port": base + 8,
        "client_ws_port": base + 9,
        "client_wss_port": base + 50,
        "pg_base_port": base + 10,
        "patroni_rest_base_port": base + 15,
        "worker_base_port": base + 20,
        "worker_health_base_port": base + 30,
        "worker_agent_base_port": base + 40,
        "worker_ws_base_port": base + 60,
        # Real argon2id, cheaper parameters: tests log in hundreds of times.
        "argon2_memory_kib": 1024,
        "argon2_time_cost": 1,
        # Short, so the slow-reader test need not wait 30 s.
        "slow_reader_timeout_s": 3.0,
        # test_capacity holds 12,000 connections that never log in until it has opened
        # them all; tests/hostile/test_timeouts.py sets short timeouts of its own.
        "auth_timeout_s": 120.0,
    }
    values.update(overrides)
    return Settings.load(env={}, **values)


def cluster_processes(settings: Settings) -> list[int]:
    """Pids of every process that belongs to this cluster (by cmdline or environment)."""
    layout = Layout.for_settings(settings)
    markers = [str(layout.root).encode(), str(layout.etcd_data).encode()]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(m in blob for m in markers):
            found.append(int(entry.name))
    return found


@contextmanager
def running_cluster(settings: Settings) -> Iterator[LocalCluster]:
    cluster = LocalCluster(settings, say=lambda line: print(line, flush=True))
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down(purge=True)
