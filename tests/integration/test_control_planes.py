"""Control planes (docs/security.md, "Control planes"; review M5, M6): Patroni's unsafe
REST methods need credentials, etcd listens on loopback only, and the ``reporting``
role is refused by a primary (and admitted by replicas) across a switchover.

The module switches the primary over, so it runs on a cluster of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import quote

import asyncpg
import pytest

from app.cluster import etcd, patroni
from app.cluster.launcher import LocalCluster
from app.secrets import PATRONI_REST_USER, read_secrets
from app.settings import Settings
from app.store.db import dsn
from tests.cluster_fixture import make_settings, running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ccluster() -> Iterator[LocalCluster]:
    with running_cluster(make_settings(workers=1)) as c:
        yield c


def rest(
    settings: Settings,
    node: str,
    method: str,
    path: str,
    body: object = None,
    auth: tuple[str, str] | None = None,
) -> tuple[int, str]:
    """(status, body) of one call to a node's Patroni REST API."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(
        f"http://{settings.host}:{settings.patroni_rest_port(node)}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def leader_and_standby(settings: Settings) -> tuple[str, str]:
    view = patroni.cluster_view(settings)
    assert view is not None and view.leader is not None
    return view.leader.name, next(m.name for m in view.members if m.role == "sync_standby")


def node_dsn(settings: Settings, node: str, role: str = "reporting") -> str:
    """A URL straight to one node's PostgreSQL, past HAProxy."""
    user = {"reporting": "reporting", "app": settings.db_user}[role]
    password = quote(read_secrets(settings)[role], safe="")
    return f"postgresql://{user}:{password}@{settings.host}:{settings.pg_port(node)}/{settings.db_name}"


async def refused(url: str) -> str:
    """The error text of a connection PostgreSQL must refuse."""
    with pytest.raises(asyncpg.PostgresError) as caught:
        conn = await asyncpg.connect(url, timeout=5)
        await conn.close()
    return str(caught.value)


def test_unsafe_patroni_methods_need_credentials(ccluster: LocalCluster) -> None:
    s = ccluster.settings
    leader, standby = leader_and_standby(s)
    password = read_secrets(s)["patroni"]
    switch = {"leader": leader, "candidate": standby}
    for node in s.node_names():
        for auth in (None, (PATRONI_REST_USER, "wrong"), ("someone", password)):
            assert rest(s, node, "POST", "/switchover", switch, auth)[0] == 401
            status, _ = rest(s, node, "PATCH", "/config", {"synchronous_mode": False}, auth)
            assert status == 401
            assert rest(s, node, "POST", "/restart", {}, auth)[0] == 401
            assert rest(s, node, "POST", "/reinitialize", {}, auth)[0] == 401
            assert rest(s, node, "DELETE", "/switchover", None, auth)[0] == 401
    # Nothing changed: synchronous mode is still on, the leader is where it was.
    status, config = rest(s, leader, "GET", "/config")
    assert status == 200 and json.loads(config)["synchronous_mode"] is True
    assert leader_and_standby(s)[0] == leader
    # HAProxy's checks stay open: the status code says the role.
    assert rest(s, leader, "GET", "/primary")[0] == 200
    assert rest(s, standby, "GET", "/replica")[0] == 200
    assert rest(s, leader, "GET", "/replica")[0] == 503
    assert all(rest(s, n, "GET", "/health")[0] == 200 for n in s.node_names())
    # With the credentials an unsafe method is accepted (a no-op PATCH).
    auth = (PATRONI_REST_USER, password)
    status, config = rest(s, leader, "PATCH", "/config", {"synchronous_mode": True}, auth)
    assert status == 200 and json.loads(config)["synchronous_mode"] is True


def non_loopback_ipv4() -> list[str]:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    addresses = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return [a for a in addresses if not a.startswith("127.")]


def test_etcd_listens_on_loopback_only(ccluster: LocalCluster) -> None:
    s = ccluster.settings
    args = etcd.argv(s, ccluster.layout)
    for flag in ("--listen-client-urls", "--listen-peer-urls"):
        (value,) = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
        assert value.startswith("http://127.0.0.1:")
    assert etcd.healthy(s)  # it answers on loopback
    others = non_loopback_ipv4()
    assert others, "this machine has a non-loopback address to probe"
    for address in others:
        for port in (s.etcd_client_port, s.etcd_peer_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=2).close()


async def test_reporting_is_refused_by_the_primary(ccluster: LocalCluster) -> None:
    s = ccluster.settings
    leader, standby = leader_and_standby(s)
    # Through HAProxy's primary port, and straight to the primary's own port.
    for url in (dsn(s, role="reporting"), node_dsn(s, leader)):
        assert "rejects connection" in await refused(url)
    # Replicas admit it, read-only, through the replica port and on their own ports.
    conn = await asyncpg.connect(dsn(s, replica=True, role="reporting"), timeout=5)
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute("LISTEN sb_push")  # and a replica cannot LISTEN
    finally:
        await conn.close()
    for node in s.node_names():
        if node != leader:
            conn = await asyncpg.connect(node_dsn(s, node), timeout=5)
            await conn.close()
    # The application role still connects to the primary and may LISTEN there.
    app = await asyncpg.connect(dsn(s), timeout=5)
    try:
        await app.execute("LISTEN sb_push")
    finally:
        await app.close()
    assert standby != leader


async def test_only_the_two_roles_may_connect_to_the_database(ccluster: LocalCluster) -> None:
    s = ccluster.settings
    admin = await asyncpg.connect(dsn(s, role="superuser"), timeout=5)
    try:
        await admin.execute("DROP ROLE IF EXISTS cp_probe")
        await admin.execute("CREATE ROLE cp_probe LOGIN PASSWORD 'probe-password-1'")
        url = f"postgresql://cp_probe:probe-password-1@{s.host}:{s.db_primary_port}/{s.db_name}"
        assert "permission denied for database" in await refused(url)
    finally:
        await admin.execute("DROP ROLE IF EXISTS cp_probe")
        await admin.close()


async def test_the_gate_follows_a_switchover(ccluster: LocalCluster) -> None:
    """The standby that becomes primary closes its gate and ends the reporting
    sessions it had; the old primary, now a replica, admits the role again."""
    s = ccluster.settings
    leader, standby = leader_and_standby(s)
    held = await asyncpg.connect(node_dsn(s, standby), timeout=5)
    assert await held.fetchval("SELECT pg_is_in_recovery()") is True
    await asyncio.to_thread(patroni.switchover, s, leader, standby)
    await asyncio.to_thread(ccluster.wait_db_healthy, 90)
    assert leader_and_standby(s)[0] == standby
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await held.fetchval("SELECT 1")  # ended when the node was promoted
    held.terminate()
    assert "rejects connection" in await refused(node_dsn(s, standby))
    assert "rejects connection" in await refused(dsn(s, role="reporting"))
    # The callback says what it did in the node's log.
    log = "".join(ccluster.log_tail(standby, 400))
    assert "reporting gate closed: on_role_change as primary" in log

    async def old_leader_admits() -> bool:
        try:
            conn = await asyncpg.connect(node_dsn(s, leader), timeout=5)
        except asyncpg.PostgresError:
            return False
        try:
            return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
        finally:
            await conn.close()

    for _ in range(80):
        if await old_leader_admits():
            break
        await asyncio.sleep(0.25)
    else:
        pytest.fail(f"{leader}, now a replica, still refuses the reporting role")
    conn = await asyncpg.connect(dsn(s, replica=True, role="reporting"), timeout=5)
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
    finally:
        await conn.close()
