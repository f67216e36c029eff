"""Patroni nodes: their configuration and the cluster view from their REST API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from app.cluster.layout import Layout
from app.settings import Settings

SCOPE = "switchboard"


def node_config(settings: Settings, layout: Layout, node: str, secrets: dict[str, str]) -> str:
    """One node's patroni.yml (JSON is valid YAML, and needs no YAML writer)."""
    host = settings.host
    pg_port = settings.pg_port(node)
    rest_port = settings.patroni_rest_port(node)
    node_dir = layout.node_dir(node)
    config: dict[str, Any] = {
        "scope": SCOPE,
        "name": node,
        "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
        "restapi": {"listen": f"{host}:{rest_port}", "connect_address": f"{host}:{rest_port}"},
        "etcd3": {"hosts": f"{host}:{settings.etcd_client_port}", "protocol": "http"},
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
                f"host replication replicator {host}/32 scram-sha-256",
                f"host all all {host}/32 scram-sha-256",
            ],
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
        url = f"http://{settings.host}:{settings.patroni_rest_port(node)}/cluster"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = json.load(response)
        except (OSError, urllib.error.URLError, ValueError):
            continue
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
    return None
