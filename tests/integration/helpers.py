"""Helpers for integration tests: logins through HAProxy, pinned to chosen workers."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from app.cluster import haproxy
from app.cluster.health import http_json
from app.cluster.launcher import LocalCluster
from app.store.db import dsn
from tests.linechat import LineClient
from tests.linechat import connect as connect_line

PASSWORD = "correct horse battery staple"


def new_user(prefix: str = "u") -> str:
    return prefix + uuid.uuid4().hex[:12]


@contextlib.contextmanager
def only_worker(cluster: LocalCluster, worker: str) -> Any:
    """Route new client connections to one worker by putting the others in maintenance.

    Uses HAProxy's runtime API, in every HAProxy process (the kernel hands a new
    connection to any of them): the real balancer decides, existing connections stay.
    The others' agent checks are paused meanwhile: a worker's agent answers "ready"
    every agent_interval_s, which would end the maintenance.
    """
    others = [w for w in cluster.settings.worker_ids() if w != worker]
    servers = [f"{backend}/{w}" for w in others for backend in ("workers", "ws_workers")]
    for server in servers:
        haproxy.runtime_command_all(cluster.layout, f"disable agent {server}")
        haproxy.runtime_command_all(cluster.layout, f"set server {server} state maint")
    try:
        yield
    finally:
        for server in servers:
            haproxy.runtime_command_all(cluster.layout, f"set server {server} state ready")
            haproxy.runtime_command_all(cluster.layout, f"enable agent {server}")


def client_port(cluster: LocalCluster, transport: str = "tcp") -> int:
    """The plaintext port of ``transport``: client_port, or client_ws_port for "ws"."""
    s = cluster.settings
    return s.client_ws_port if transport == "ws" else s.client_port


async def register(cluster: LocalCluster, user: str, transport: str = "tcp") -> None:
    s = cluster.settings
    client = await connect_line(s.host, client_port(cluster, transport), transport)
    reply = await client.request({"op": "register", "user": user, "password": PASSWORD})
    assert reply["op"] == "registered", reply
    await client.close()


async def login(
    cluster: LocalCluster,
    user: str,
    device: str = "laptop",
    worker: str | None = None,
    register_first: bool = True,
    transport: str = "tcp",
) -> tuple[LineClient, dict[str, Any]]:
    """Log in over ``transport`` ("tcp", or "ws": a WebSocket through HAProxy)."""
    s = cluster.settings
    if register_first:
        await register(cluster, user, transport)
    # HAProxy picks the server once the connection is established: keep the other
    # workers in maintenance until the reply shows where the client landed.
    with only_worker(cluster, worker) if worker else contextlib.nullcontext():
        client = await connect_line(s.host, client_port(cluster, transport), transport)
        welcome = await client.request(
            {"op": "hello", "user": user, "password": PASSWORD, "device": device}
        )
    assert welcome["op"] == "welcome", welcome
    if worker:
        assert welcome["worker"] == worker
    return client, welcome


async def contacts_on_two_workers(
    cluster: LocalCluster,
) -> tuple[str, str, LineClient, LineClient, dict[str, Any]]:
    """alice on w1 and bob on w2, accepted contacts, with alice seeing bob online:
    (alice, bob, her client, his client, his welcome)."""
    alice, bob = new_user("alice"), new_user("bob")
    a, _ = await login(cluster, alice, worker="w1")
    b, welcome = await login(cluster, bob, worker="w2")
    assert (await a.request({"op": "contact_add", "user": bob}))["op"] == "ok"
    await b.recv_until("contact_request")
    assert (await b.request({"op": "contact_accept", "user": alice}))["op"] == "ok"
    assert (await a.recv_until("presence"))["state"] == "online"
    return alice, bob, a, b, welcome


@contextlib.asynccontextmanager
async def db(cluster: LocalCluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn(cluster.settings))
    try:
        yield conn
    finally:
        await conn.close()


def health_sums(cluster: LocalCluster, *fields: str) -> list[int]:
    """Each of ``fields`` of the workers' /health, summed over the workers."""
    s = cluster.settings
    sums = [0] * len(fields)
    for worker in s.worker_ids():
        _, health = http_json(f"http://{s.host}:{s.worker_health_port(worker)}/health")
        for i, name in enumerate(fields):
            sums[i] += int(health[name])
    return sums
