"""Patroni nodes: their configuration and the cluster view from their REST API."""

from __future__ import annotations

import base64
import json
import shlex
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.cluster import etcd, reporting_gate
from app.cluster.layout import Layout
from app.secrets import PATRONI_REST_USER, read_secrets
from app.settings import Settings

SCOPE = "switchboard"
GATE_SCRIPT = Path(reporting_gate.__file__).resolve()


def gate_file(node_dir: Path) -> Path:
    """The node's list of roles pg_hba refuses (``reporting_gate.py``)."""
    return node_dir / "reporting_gate"


def close_gate(node_dir: Path) -> Path:
    """Before PostgreSQL starts: refuse ``reporting`` until Patroni says "replica"."""
    path = gate_file(node_dir)
    reporting_gate.write_gate(path, "unknown")
    return path


def gate_callbacks(node_dir: Path, pg_port: int) -> dict[str, str]:
    """Patroni callbacks that keep the gate file in step with the node's role
    (reporting_gate.py), reaching PostgreSQL on its socket in ``node_dir``."""
    command = shlex.join(
        [sys.executable, str(GATE_SCRIPT), str(gate_file(node_dir)), str(node_dir), str(pg_port)]
    )
    return {"on_start": command, "on_restart": command, "on_role_change": command}


def node_config(settings: Settings, layout: Layout, node: str, secrets: dict[str, str]) -> str:
    """One node's patroni.yml (JSON is valid YAML, and needs no YAML writer)."""
    host = settings.address_of(node)
    # Who may connect: this host only (HAProxy, the replicas and Patroni all run here);
    # on many hosts, the hosts' network (the balancers proxy the workers' connections,
    # the other database hosts replicate).
    peers = settings.hosts_cidr() if settings.multihost() else f"{host}/32"
    pg_port = settings.pg_port(node)
    rest_port = settings.patroni_rest_port(node)
    node_dir = layout.node_dir(node)
    # Unsafe methods (POST /switchover, PATCH /config, ...) need basic auth; GET
    # /primary, /replica and /health (HAProxy's checks) stay open.
    rest_auth = {"username": PATRONI_REST_USER, "password": secrets["patroni"]}
    config: dict[str, Any] = {
        "scope": SCOPE,
        "name": node,
        "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
        "restapi": {
            "listen": f"{host}:{rest_port}",
            "connect_address": f"{host}:{rest_port}",
            "authentication": rest_auth,
        },
        # patronictl -c patroni.yml (switchover, restart, ...) authenticates with this.
        "ctl": {"authentication": rest_auth},
        "etcd3": {"hosts": ",".join(etcd.client_addresses(settings)), "protocol": "http"},
        "bootstrap": {
            "dcs": {
                "ttl": settings.patroni_ttl,  # Patroni's minimum is 20
                "loop_wait": 1,
                "retry_timeout": 3,  # loop_wait + 2 * retry_timeout <= ttl
                "maximum_lag_on_failover": 1048576,
                "synchronous_mode": True,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "wal_log_hints": "on",
                        "max_connections": 300,
                        "max_wal_senders": 10,
                        "max_replication_slots": 10,
                        "wal_keep_size": "256MB",
                        "password_encryption": "scram-sha-256",
                        # A new 16 MB WAL segment is not written full of zeros first:
                        # with the segments wal_keep_size retains, each node made a
                        # new one every ~6 s at 2,000 msgs/s, all three at once
                        # (they replicate the same WAL): 50 MB written in a burst
                        # that stalled commits for ~100 ms (docs/benchmarks.md).
                        "wal_init_zero": "off",
                        # Every autovacuum/autoanalyze run logged with its timing
                        # (a few lines a minute here), and checkpoints (PostgreSQL's
                        # default): the benchmark's stall timeline reads both.
                        "log_autovacuum_min_duration": "0",
                        "log_checkpoints": "on",
                    },
                },
            },
            "initdb": [
                {"encoding": "UTF8"},
                {"locale": "C.UTF-8"},
                "data-checksums",
                {"auth-host": "scram-sha-256"},
                {"auth-local": "trust"},
            ],
        },
        "postgresql": {
            "listen": f"{host}:{pg_port}",
            "connect_address": f"{host}:{pg_port}",
            "data_dir": str(layout.node_data(node)),
            "bin_dir": str(settings.pg_bin_dir),
            "pgpass": str(node_dir / "pgpass"),
            "authentication": {
                "superuser": {"username": "postgres", "password": secrets["superuser"]},
                "replication": {"username": "replicator", "password": secrets["replication"]},
                "rewind": {"username": "rewind_user", "password": secrets["rewind"]},
            },
            "parameters": {
                "unix_socket_directories": str(node_dir),
                "shared_buffers": "128MB",
            },
            "pg_hba": [
                "local all all trust",
                f"host replication replicator {peers} scram-sha-256",
                # The roles in the gate file are refused: `reporting` except on a replica.
                f"host all @{gate_file(node_dir)} {peers} reject",
                f"host all all {peers} scram-sha-256",
            ],
            "callbacks": gate_callbacks(node_dir, pg_port),
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
    }
    return json.dumps(config, indent=2) + "\n"


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    role: str  # leader, sync_standby, replica
    state: str  # running, streaming, starting, ...
    timeline: int | None
    lag: int | None


@dataclass(frozen=True, slots=True)
class ClusterView:
    """An immutable snapshot of the Patroni cluster, as one node's REST API saw it."""

    members: tuple[Member, ...]

    @property
    def leader(self) -> Member | None:
        return next((m for m in self.members if m.role == "leader"), None)

    def healthy(self, expected: int) -> tuple[bool, str]:
        """Whether the cluster is fully up, and a readable reason when not."""
        if len(self.members) < expected:
            return False, f"{len(self.members)} of {expected} members registered"
        leader = self.leader
        if leader is None or leader.state != "running":
            return False, "no running leader yet"
        if expected > 1 and not any(m.role == "sync_standby" for m in self.members):
            return False, "no synchronous standby yet"
        lagging = [m.name for m in self.members if m is not leader and m.state != "streaming"]
        if lagging:
            return False, f"not streaming yet: {', '.join(lagging)}"
        timelines = {m.timeline for m in self.members}
        if len(timelines) != 1:
            return False, "members on different timelines"
        return True, "healthy"


def cluster_view(settings: Settings, timeout: float = 1.0) -> ClusterView | None:
    """Ask each node in turn for the cluster view; None when none answers."""
    for node in settings.node_names():
        view = cluster_view_of(settings, node, timeout)
        if view is not None:
            return view
    return None


def cluster_view_of(settings: Settings, node: str, timeout: float = 1.0) -> ClusterView | None:
    """The cluster as ``node``'s REST API sees it; None when it does not answer."""
    url = f"http://{settings.address_of(node)}:{settings.patroni_rest_port(node)}/cluster"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.load(response)
    except (OSError, urllib.error.URLError, ValueError):
        return None
    members = tuple(
        Member(
            name=m.get("name", "?"),
            role=m.get("role", "?"),
            state=m.get("state", "?"),
            timeline=m.get("timeline"),
            lag=m.get("lag") if isinstance(m.get("lag"), int) else None,
        )
        for m in data.get("members", [])
    )
    return ClusterView(members)


def rest_auth_header(settings: Settings) -> dict[str, str]:
    """The basic-auth header Patroni's REST API wants for unsafe methods."""
    token = f"{PATRONI_REST_USER}:{read_secrets(settings)['patroni']}".encode()
    return {"Authorization": "Basic " + base64.b64encode(token).decode()}


def switchover(settings: Settings, leader: str, candidate: str, timeout: float = 60.0) -> str:
    """Ask ``leader``'s Patroni (with credentials) to hand the primary role to
    ``candidate``; Patroni's answer. Raises ``urllib.error.HTTPError`` on a refusal."""
    request = urllib.request.Request(
        f"http://{settings.address_of(leader)}:{settings.patroni_rest_port(leader)}/switchover",
        data=json.dumps({"leader": leader, "candidate": candidate}).encode(),
        headers={"Content-Type": "application/json", **rest_auth_header(settings)},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return str(response.read().decode(errors="replace")).strip()
