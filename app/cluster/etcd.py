"""etcd, Patroni's distributed configuration store.

On one host it is one member listening on loopback only, whatever ``host`` says:
Patroni, its only client, runs on the same machine, and etcd has no authentication
here (docs/security.md, "Control planes"). Compose puts it on a network only the DB
tier joins. On many hosts (``hosts_net``) each database host runs a member
(etcd1, etcd2, ...) on its own address, so a quorum survives the loss of any one.
"""

from __future__ import annotations

import json
import urllib.request

from app.cluster.layout import Layout
from app.settings import Settings

LOOPBACK = "127.0.0.1"


def _address(settings: Settings, name: str) -> str:
    return settings.address_of(name) if settings.multihost() else LOOPBACK


def client_address(settings: Settings, name: str | None = None) -> str:
    """One member's client address (the first member's by default)."""
    return f"{_address(settings, name or settings.etcd_names()[0])}:{settings.etcd_client_port}"


def client_addresses(settings: Settings) -> list[str]:
    """Every member's client address, for Patroni."""
    return [client_address(settings, name) for name in settings.etcd_names()]


def _peer_url(settings: Settings, name: str) -> str:
    return f"http://{_address(settings, name)}:{settings.etcd_peer_port}"


def argv(settings: Settings, layout: Layout, name: str = "etcd") -> list[str]:
    client = f"http://{client_address(settings, name)}"
    cluster = ",".join(f"{n}={_peer_url(settings, n)}" for n in settings.etcd_names())
    return [
        settings.etcd_bin,
        f"--name={name}",
        f"--data-dir={layout.etcd_data_of(name)}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={_peer_url(settings, name)}",
        f"--initial-advertise-peer-urls={_peer_url(settings, name)}",
        f"--initial-cluster={cluster}",
        "--initial-cluster-state=new",
        "--auto-compaction-retention=1",
    ]


def healthy(settings: Settings, timeout: float = 1.0, name: str | None = None) -> bool:
    """Whether a member (the first by default) says the cluster is healthy (has a quorum)."""
    url = f"http://{client_address(settings, name)}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(json.load(response).get("health") == "true")
    except (OSError, ValueError):
        return False
