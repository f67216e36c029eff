"""Per-address connection caps at HAProxy (review item H2): one host cannot hold every
client slot, nor open connections as fast as it likes.

One HAProxy process (each process keeps its own table) and the default caps: 50
connections open per address, 100 new per 10 s. 127.0.0.1 is exempt by default;
other loopback addresses play other hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator

import pytest

from app.cluster.launcher import LocalCluster
from tests.cluster_fixture import make_settings, running_cluster
from tests.hostile.edge import client_from, login_from, still_open
from tests.integration.helpers import new_user
from tests.linechat import LineClient


@pytest.fixture(scope="module")
def ccluster() -> Iterator[LocalCluster]:
    with running_cluster(make_settings(workers=1, haproxy_processes=1)) as cluster:
        assert (cluster.settings.max_conns_per_addr, cluster.settings.max_conn_rate_per_addr) == (
            50,
            100,
        )
        yield cluster


async def admitted(cluster: LocalCluster, source: str) -> LineClient | None:
    """A connection from ``source`` if HAProxy lets it through (it answers a ping)."""
    try:
        client = await client_from(cluster, source)
    except OSError:
        return None
    if await still_open(client):
        return client
    await client.close()
    return None


async def close_all(clients: list[LineClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_the_51st_connection_from_one_address_is_refused(ccluster: LocalCluster) -> None:
    cap = ccluster.settings.max_conns_per_addr
    held: list[LineClient] = []
    refused = 0
    try:
        for _ in range(60):
            client = await admitted(ccluster, "127.0.0.5")
            if client is None:
                refused += 1
            else:
                held.append(client)
        assert (len(held), refused) == (cap, 60 - cap)
        # Another host is not affected: it connects and logs in.
        bystander, _ = await login_from(ccluster, new_user("by"), "127.0.0.6")
        assert await still_open(bystander)
        await bystander.close()
        # Every connection the attacker holds still works; one closed frees a slot.
        assert all([await still_open(c) for c in held])
        await held.pop().close()
        await asyncio.sleep(0.2)
        again = await admitted(ccluster, "127.0.0.5")
        assert again is not None
        held.append(again)
    finally:
        await close_all(held)


async def test_the_cap_counts_the_tls_port_and_the_plaintext_port_together(
    ccluster: LocalCluster,
) -> None:
    """One frontend, two binds, one stick table: a host holding its 50 connections on
    the plaintext port gets no 51st on the TLS port; a slot freed lets it in."""
    s = ccluster.settings
    source = "127.0.0.11"
    context = ssl.create_default_context(cafile=s.tls_ca_file())

    async def over_tls() -> asyncio.StreamWriter:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(s.host, s.client_tls_port, ssl=context, local_addr=(source, 0)),
            10,
        )
        return writer

    held = [await client_from(ccluster, source) for _ in range(s.max_conns_per_addr)]
    try:
        assert await still_open(held[-1])
        with pytest.raises(OSError):  # closed by HAProxy before the handshake
            await over_tls()
        await held.pop().close()
        await asyncio.sleep(0.2)
        writer = await over_tls()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    finally:
        await close_all(held)


async def test_connecting_too_fast_from_one_address_is_refused(ccluster: LocalCluster) -> None:
    rate = ccluster.settings.max_conn_rate_per_addr
    first_refused = None
    for attempt in range(rate + 50):
        client = await admitted(ccluster, "127.0.0.8")
        if client is None:
            first_refused = attempt
            break
        await client.close()
    # HAProxy's rate is an estimate over a sliding period, never above the true count:
    # nothing under the cap is refused; a burst a little over it is.
    assert first_refused is not None and first_refused >= rate, first_refused
    assert await admitted(ccluster, "127.0.0.8") is None  # and it stays refused meanwhile
    bystander, _ = await login_from(ccluster, new_user("by"), "127.0.0.6")
    await bystander.close()


async def test_the_machines_own_address_is_exempt(ccluster: LocalCluster) -> None:
    """The tests, benchmarks and CLI connect from 127.0.0.1: never capped."""
    s = ccluster.settings
    held = []
    try:
        for _ in range(s.max_conns_per_addr + 10):
            client = await LineClient.connect(s.host, s.client_port)
            held.append(client)
        answered = await asyncio.gather(*(still_open(c) for c in held))
        assert all(answered)
    finally:
        with contextlib.suppress(Exception):
            await close_all(held)
