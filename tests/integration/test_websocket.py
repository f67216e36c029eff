"""The WebSocket transport through HAProxy (issue #20), against the real cluster.

ws:// on client_ws_port and wss:// on client_wss_port (the cluster CA's certificate)
reach the workers' WebSocket ports; bad input over a WebSocket gets the documented
answer (docs/protocol.md, "WebSocket transport").
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import orjson
import pytest

from app.client import Client, ConnectionLost, ResilientClient
from app.client.sdk import tls_context
from app.cluster.launcher import LocalCluster
from tests.integration.helpers import PASSWORD, db, login, new_user, register
from tests.linechat import WsLineClient


def ws_url(cluster: LocalCluster, tls: bool = False, path: str = "/ws") -> str:
    s = cluster.settings
    if tls:
        return f"wss://{s.host}:{s.client_wss_port}{path}"
    return f"ws://{s.host}:{s.client_ws_port}{path}"


def cluster_tls(cluster: LocalCluster) -> ssl.SSLContext:
    return tls_context(cluster.settings.tls_ca_file())


async def test_a_ws_client_and_a_tcp_client_message_each_other(cluster: LocalCluster) -> None:
    alice, bob = new_user("alice"), new_user("bob")
    a, _ = await login(cluster, alice, worker="w1", transport="ws")
    b, _ = await login(cluster, bob, worker="w2")
    sent = await a.request({"op": "send", "to": bob, "cmid": "w1", "body": "over a websocket"})
    assert sent["op"] == "sent"
    msg = await b.recv()
    assert (msg["id"], msg["body"]) == (sent["id"], "over a websocket")
    reply = await b.request({"op": "send", "to": alice, "cmid": "t1", "body": "over tcp"})
    got = await a.recv()
    assert (got["op"], got["id"], got["from"]) == ("msg", reply["id"], bob)
    for c in (a, b):
        await c.close()


async def test_the_client_address_reaches_the_session_row(cluster: LocalCluster) -> None:
    user = new_user("addr")
    client, welcome = await login(cluster, user, transport="ws")
    assert isinstance(client, WsLineClient)
    local_port = client.ws.get_extra_info("sockname")[1]
    async with db(cluster) as conn:
        addr = await conn.fetchval(
            "SELECT remote_addr FROM sessions WHERE id = $1", int(welcome["session"])
        )
    assert addr == f"127.0.0.1:{local_port}"  # the browser's, not HAProxy's
    await client.close()


async def test_sdk_over_wss_with_the_cluster_ca(cluster: LocalCluster) -> None:
    s = cluster.settings
    user = new_user("wss")
    async with await Client.connect(
        s.host, s.client_wss_port, transport="ws", tls=cluster_tls(cluster)
    ) as client:
        await client.register(user, PASSWORD)
        welcome = await client.login(user, PASSWORD, "browser")
        assert welcome.user == user
        assert client.extra_info("ssl_object") is not None
        sent = await client.send("to myself over wss", to=user)
        assert sent.id > 0


async def test_bad_input_over_a_websocket_gets_the_documented_errors(
    cluster: LocalCluster,
) -> None:
    c = await WsLineClient.connect(cluster.settings.host, cluster.settings.client_ws_port)
    assert isinstance(c, WsLineClient)
    await c.ws.send_bytes(b'{"op":"ping"}')
    assert (await c.recv())["code"] == "bad_frame"
    await c.send(b"{not json")
    assert (await c.recv())["code"] == "bad_json"
    assert (await c.request({"op": "ping"}))["op"] == "pong"  # still usable
    big = orjson.dumps({"op": "ping", "pad": "x" * cluster.settings.max_frame_bytes})
    await c.ws.send_str(big.decode())
    error = await c.recv()
    assert (error["code"], error["message"]) == (
        "frame_too_large",
        f"frame exceeds {cluster.settings.max_frame_bytes} bytes",
    )
    assert await c.closed()
    await c.close()


async def test_far_oversize_message_is_closed_with_1009(cluster: LocalCluster) -> None:
    # Many tries: the client is still sending when the worker closes, and a close
    # that reset the socket lost the 1009 in a few percent of them (the worker's
    # lingering close, app/worker/websocket.py).
    for _ in range(60):
        c = await WsLineClient.connect(cluster.settings.host, cluster.settings.client_ws_port)
        assert isinstance(c, WsLineClient)
        try:
            await c.ws.send_str("x" * (3 * cluster.settings.max_frame_bytes))
            msg = await c.ws.receive(timeout=10)
            assert (msg.type, msg.data) == (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
            )
        finally:
            await c.close()  # a failure here must not leak the session into later tests


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1"])
async def test_a_foreign_origin_is_refused(cluster: LocalCluster, origin: str) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url(cluster), headers={"Origin": origin})
        assert refused.value.status == 403


async def test_the_pages_own_origin_is_allowed(cluster: LocalCluster) -> None:
    s = cluster.settings
    origin = f"https://{s.host}:{s.client_wss_port}"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            ws_url(cluster, tls=True), headers={"Origin": origin}, ssl=cluster_tls(cluster)
        ) as ws,
    ):
        await ws.send_str('{"op":"ping","rid":1}')
        assert orjson.loads((await ws.receive(timeout=10)).data) == {"op": "pong", "rid": 1}


async def test_plain_ws_on_the_tls_port_is_closed_without_an_answer(
    cluster: LocalCluster,
) -> None:
    s = cluster.settings
    # The SDK: the connection fails (HAProxy reads no TLS handshake and closes).
    with pytest.raises(ConnectionLost):
        await Client.connect(s.host, s.client_wss_port, transport="ws", timeout=5)
    # At the byte level: an HTTP upgrade in clear text gets no HTTP answer at all.
    reader, writer = await asyncio.open_connection(s.host, s.client_wss_port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    assert not data.startswith(b"HTTP/")
    writer.close()


async def test_the_chat_page_is_served_over_https(cluster: LocalCluster) -> None:
    async with aiohttp.ClientSession() as http:
        url = ws_url(cluster, tls=True, path="/chat/").replace("wss://", "https://")
        async with http.get(url, ssl=cluster_tls(cluster)) as page:
            assert page.status == 200
            assert "connect-src 'self'" in page.headers["Content-Security-Policy"]
            assert "app.js" in await page.text()


async def test_resilient_client_over_ws_resumes_after_its_connection_drops(
    cluster: LocalCluster,
) -> None:
    s = cluster.settings
    alice, bob = new_user("alice"), new_user("bob")
    await register(cluster, bob)
    client = await ResilientClient.connect(s.host, s.client_ws_port, transport="ws")
    async with client:
        await client.register(alice, PASSWORD)
        await client.login(alice, PASSWORD, "browser")
        first = await client.send("before", to=bob)
        client._link.client.abort("test: the network dropped")
        second = await client.send("after the drop", to=bob)  # waits for the resume
        assert second.id > first.id
        assert client.stats.resumes == 1
