"""Helpers for the edge's hostile tests: clients from chosen loopback addresses, metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from app.cluster.launcher import LocalCluster
from tests.integration.helpers import PASSWORD, register
from tests.linechat import LineClient


async def client_from(cluster: LocalCluster, source: str) -> LineClient:
    """A connection through HAProxy from the local address ``source`` (another "host")."""
    s = cluster.settings
    return await LineClient.connect(s.host, s.client_port, source=source)


async def login_from(
    cluster: LocalCluster, user: str, source: str, device: str = "laptop"
) -> tuple[LineClient, dict[str, Any]]:
    await register(cluster, user)
    client = await client_from(cluster, source)
    welcome = await client.request(
        {"op": "hello", "user": user, "password": PASSWORD, "device": device}
    )
    assert welcome["op"] == "welcome", welcome
    return client, welcome


async def resume_from(
    cluster: LocalCluster, welcome: dict[str, Any], source: str | None = None
) -> tuple[LineClient, dict[str, Any]]:
    """A new connection (from ``source``) that resumes the session of ``welcome``."""
    s = cluster.settings
    client = await LineClient.connect(s.host, s.client_port, source=source)
    reply = await client.request(
        {
            "op": "resume",
            "user": welcome["user"],
            "device": welcome["device"],
            "token": welcome["resume_token"],
            "last_seq": 0,
        }
    )
    assert reply["op"] == "welcome", reply
    return client, reply


async def still_open(client: LineClient) -> bool:
    """Whether the connection answers a ping (it counts as traffic)."""
    try:
        return bool((await client.request({"op": "ping"}, timeout=5))["op"] == "pong")
    except (ConnectionError, TimeoutError):
        return False


def _metric_total(url: str, family: str, labels: dict[str, str]) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for each in text_string_to_metric_families(text):
        if each.name == family:
            for sample in each.samples:
                if sample.name.endswith("_total") and labels.items() <= sample.labels.items():
                    total += sample.value
    return total


async def worker_counter(cluster: LocalCluster, family: str, **labels: str) -> float:
    """A counter summed over every worker's /metrics."""
    s = cluster.settings
    urls = [f"http://{s.host}:{s.worker_health_port(w)}/metrics" for w in s.worker_ids()]
    values = await asyncio.gather(
        *(asyncio.to_thread(_metric_total, url, family, labels) for url in urls)
    )
    return sum(values)
