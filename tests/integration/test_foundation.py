"""The foundation: clients reach workers through HAProxy; the DB ports reach the right nodes."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from app.cluster import patroni
from app.cluster.launcher import LocalCluster
from app.store.db import dsn
from tests.linechat import LineClient

PASSWORD = "correct horse battery staple"


async def _login(
    cluster: LocalCluster, user: str, device: str = "laptop"
) -> tuple[LineClient, dict]:
    s = cluster.settings
    client = await LineClient.connect(s.host, s.client_port)
    reply = await client.request({"op": "register", "user": user, "password": PASSWORD})
    assert reply["op"] in ("registered", "error"), reply
    welcome = await client.request(
        {"op": "hello", "user": user, "password": PASSWORD, "device": device, "rid": "h1"}
    )
    assert welcome["op"] == "welcome", welcome
    return client, welcome


def _user() -> str:
    return "u" + uuid.uuid4().hex[:12]


async def test_welcome_through_haproxy_and_session_row_names_the_worker(
    cluster: LocalCluster,
) -> None:
    user = _user()
    client, welcome = await _login(cluster, user, "phone")
    assert welcome["rid"] == "h1"
    assert welcome["user"] == user
    assert welcome["worker"] in cluster.settings.worker_ids()
    conn = await asyncpg.connect(dsn(cluster.settings))
    try:
        row = await conn.fetchrow(
            "SELECT u.username, s.device, s.worker_id, s.remote_addr, s.connected_at, s.state "
            "FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = $1",
            int(welcome["session"]),
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["username"] == user
    assert row["device"] == "phone"
    assert row["worker_id"] == welcome["worker"]
    assert row["remote_addr"].startswith("127.0.0.1:")
    assert row["state"] == "active"
    assert row["connected_at"] is not None
    await client.close()


async def test_connections_spread_over_workers(cluster: LocalCluster) -> None:
    logins = await asyncio.gather(*(_login(cluster, _user()) for _ in range(9)))
    workers = {welcome["worker"] for _, welcome in logins}
    # leastconn with 9 held connections over 3 workers uses every worker.
    assert workers == set(cluster.settings.worker_ids())
    for client, _ in logins:
        await client.close()


async def test_primary_port_reaches_the_patroni_leader(cluster: LocalCluster) -> None:
    s = cluster.settings
    view = patroni.cluster_view(s)
    assert view is not None and view.leader is not None
    conn = await asyncpg.connect(dsn(s))
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is False
        assert await conn.fetchval("SELECT inet_server_port()") == s.pg_port(view.leader.name)
        await conn.execute("CREATE TEMP TABLE probe (v int)")
        await conn.execute("INSERT INTO probe VALUES (1)")
        assert await conn.fetchval("SELECT count(*) FROM probe") == 1
    finally:
        await conn.close()


async def test_replica_port_reaches_a_replica(cluster: LocalCluster) -> None:
    s = cluster.settings
    view = patroni.cluster_view(s)
    assert view is not None and view.leader is not None
    replica_ports = {s.pg_port(m.name) for m in view.members if m.role != "leader"}
    conn = await asyncpg.connect(dsn(s, replica=True))
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
        assert await conn.fetchval("SELECT inet_server_port()") in replica_ports
    finally:
        await conn.close()


async def test_status_reports_every_component_healthy(cluster: LocalCluster) -> None:
    rows = await asyncio.to_thread(cluster.status)
    assert [r.name for r in rows] == cluster.component_names()
    assert all(r.healthy for r in rows), [r for r in rows if not r.healthy]
    roles = sorted(r.detail.split()[0] for r in rows if r.name.startswith("n"))
    assert roles == ["leader", "replica", "sync_standby"]
