"""etcd, Patroni's distributed configuration store.

It listens on loopback only, whatever ``host`` says: Patroni, its only client, runs
on the same machine, and etcd has no authentication here (docs/security.md,
"Control planes"). Compose puts it on a network only the DB tier joins.
"""

from __future__ import annotations

import json
import urllib.request

from app.cluster.layout import Layout
from app.settings import Settings

LOOPBACK = "127.0.0.1"


def client_address(settings: Settings) -> str:
    return f"{LOOPBACK}:{settings.etcd_client_port}"


def argv(settings: Settings, layout: Layout) -> list[str]:
    client = f"http://{client_address(settings)}"
    peer = f"http://{LOOPBACK}:{settings.etcd_peer_port}"
    return [
        settings.etcd_bin,
        "--name=etcd0",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=etcd0={peer}",
        "--initial-cluster-state=new",
        "--auto-compaction-retention=1",
    ]


def healthy(settings: Settings, timeout: float = 1.0) -> bool:
    url = f"http://{client_address(settings)}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(json.load(response).get("health") == "true")
    except (OSError, ValueError):
        return False
