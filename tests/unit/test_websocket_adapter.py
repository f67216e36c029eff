"""The WebSocket adapter (app/worker/websocket.py) over the harness's real request path.

A real aiohttp server on loopback runs the worker's WebSocket app, whose connections
are real ``ClientConnection``s over `worker_fakes.Harness` (no database); an aiohttp
client plays HAProxy, sending the headers HAProxy sets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.protocol import Limits
from app.worker.connection import ConnectionParts
from app.worker.edge import Edge
from app.worker.timeouts import Deadlines
from app.worker.websocket import LingeringWebSocketResponse, make_app, origin_allowed
from tests.unit.worker_fakes import GOOD_PASSWORD, Harness

HAPROXY_HEADERS = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Source-Port": "40123"}


@asynccontextmanager
async def served(h: Harness) -> AsyncIterator[TestServer]:
    s = h.settings
    parts = ConnectionParts(
        s,
        Limits(max_frame_bytes=s.max_frame_bytes),
        h.dispatcher,
        h.sessions,
        h.delivery,  # type: ignore[arg-type]
        Edge(s),
        Deadlines(s),
    )
    server = TestServer(make_app(parts), host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@asynccontextmanager
async def ws_client(
    server: TestServer, headers: dict[str, str] | None = None
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            server.make_url("/ws"), headers=HAPROXY_HEADERS if headers is None else headers
        ) as ws,
    ):
        yield ws


async def frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    value: dict[str, Any] = orjson.loads(msg.data)
    return value


@pytest.fixture
def h(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(
        monkeypatch, max_frame_bytes=2048, ws_allowed_origins="https://chat.example:5281"
    )


async def test_one_frame_per_text_message_each_way(h: Harness) -> None:
    h.store.add_user("alice")
    async with served(h) as server, ws_client(server) as ws:
        await ws.send_str('{"op":"ping","rid":1}')
        # Pretty-printed JSON: newlines are whitespace inside one message.
        await ws.send_str('{\n  "op": "ping",\n  "rid": 2\n}')
        assert await frame(ws) == {"op": "pong", "rid": 1}
        assert await frame(ws) == {"op": "pong", "rid": 2}
        hello = {"op": "hello", "user": "alice", "password": GOOD_PASSWORD, "device": "web"}
        await ws.send_str(orjson.dumps({**hello, "rid": 3}).decode())
        welcome = await frame(ws)
        assert welcome["op"] == "welcome" and welcome["rid"] == 3
        # The session is the connection's: the client's address is HAProxy's header.
        (conn,) = h.registry.connections
        assert conn.peer == "203.0.113.9:40123"
        assert conn.session is not None


async def test_a_binary_message_is_bad_frame_and_the_connection_stays(h: Harness) -> None:
    async with served(h) as server, ws_client(server) as ws:
        await ws.send_bytes(b'{"op":"ping","rid":1}')
        error = await frame(ws)
        assert error["op"] == "error" and error["code"] == "bad_frame"
        await ws.send_str('{"op":"ping","rid":2}')
        assert await frame(ws) == {"op": "pong", "rid": 2}


async def test_bad_json_and_blank_messages(h: Harness) -> None:
    async with served(h) as server, ws_client(server) as ws:
        await ws.send_str("   ")  # ignored, like a blank line
        await ws.send_str('{"op":"ping","body":"raw\nnewline"}')  # a raw newline in a string
        error = await frame(ws)
        assert error["code"] == "bad_json"
        await ws.send_str('{"op":"ping","rid":2}')
        assert await frame(ws) == {"op": "pong", "rid": 2}


async def test_a_message_over_max_frame_bytes_is_fatal_frame_too_large(h: Harness) -> None:
    async with served(h) as server, ws_client(server) as ws:
        await ws.send_str('{"op":"ping","pad":"' + "x" * 2048 + '"}')
        error = await frame(ws)
        assert error["code"] == "frame_too_large"
        closed = await ws.receive(timeout=5)
        assert closed.type is aiohttp.WSMsgType.CLOSE
    assert not h.registry.connections


async def test_far_over_the_limit_aiohttp_closes_with_1009(h: Harness) -> None:
    async with served(h) as server, ws_client(server) as ws:
        await ws.send_str("x" * 5000)
        closed = await ws.receive(timeout=5)
        assert closed.type is aiohttp.WSMsgType.CLOSE
        assert closed.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


def test_the_lingering_close_overrides_aiohttps_own_hook() -> None:
    # LingeringWebSocketResponse replaces a private aiohttp method; an aiohttp that
    # renamed it would close at once again, and reset clients still sending.
    assert callable(vars(web.WebSocketResponse)["_close_transport"])
    assert "_close_transport" in vars(LingeringWebSocketResponse)


async def test_too_many_errors_closes_as_on_tcp(h: Harness) -> None:
    async with served(h) as server, ws_client(server) as ws:
        for _ in range(h.settings.max_errors_per_connection + 1):
            await ws.send_bytes(b"\x00")
        codes = [(await frame(ws))["code"] for _ in range(h.settings.max_errors_per_connection + 2)]
        assert codes[-1] == "too_many_errors"
        assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.CLOSE


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, False),  # no X-Forwarded-For: not through HAProxy's websockets frontend
        ({"X-Forwarded-For": "not an address"}, False),
        ({**HAPROXY_HEADERS, "Origin": "https://evil.example"}, False),
        ({**HAPROXY_HEADERS, "Origin": "https://chat.example:5281"}, True),  # listed
    ],
)
async def test_edge_refusals(h: Harness, headers: dict[str, str], allowed: bool) -> None:
    async with served(h) as server, aiohttp.ClientSession() as http:
        if allowed:
            async with http.ws_connect(server.make_url("/ws"), headers=headers) as ws:
                await ws.send_str('{"op":"ping","rid":1}')
                assert (await frame(ws))["op"] == "pong"
        else:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(server.make_url("/ws"), headers=headers)
            assert refused.value.status == 403


def test_origin_rules() -> None:
    assert origin_allowed(None, "127.0.0.1:5281", ())  # not a browser
    assert origin_allowed("https://127.0.0.1:5281", "127.0.0.1:5281", ())  # its own page
    assert origin_allowed("HTTPS://Chat.Example/", "x", ("https://chat.example",))
    assert not origin_allowed("https://127.0.0.1:5281", "127.0.0.1:5280", ())
    assert not origin_allowed("null", "127.0.0.1:5281", ())
    assert not origin_allowed("https://evil.example", None, ())


async def test_the_chat_page_is_served_with_a_strict_csp(h: Harness) -> None:
    async with served(h) as server, aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/chat/")) as page:
            assert page.status == 200
            assert "default-src 'none'" in page.headers["Content-Security-Policy"]
            assert '<script type="module" src="app.js">' in await page.text()
        async with http.get(server.make_url("/chat/app.js")) as script:
            assert script.status == 200
            assert script.headers["Content-Type"].startswith("text/javascript")
        async with http.get(server.make_url("/chat/..%2fconnection.py")) as escape:
            assert escape.status == 404


async def test_the_sdk_and_the_bench_client_speak_it(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Client.connect(transport="ws")` (app/client/wire.py) and bench's WsWire, end to
    end through the adapter; they send no X-Forwarded-For, so the edge is stubbed."""
    from app.client import Client
    from app.worker import websocket
    from bench._wire import close_ws_sessions, connect_ws

    monkeypatch.setattr(websocket, "client_peer", lambda request: "203.0.113.9:1")
    h.store.add_user("alice")
    async with served(h) as server:
        assert server.port is not None
        client = await Client.connect("127.0.0.1", server.port, transport="ws", timeout=5)
        async with client:
            welcome = await client.login("alice", GOOD_PASSWORD, "web")
            assert welcome.user == "alice"
            assert client.extra_info("peername") is not None
        assert client.closed
        wire = await connect_ws("127.0.0.1", server.port)
        reply = await wire.request({"op": "ping"})
        assert reply["op"] == "pong"
        wire.close()
        await close_ws_sessions()


async def test_the_csp_names_the_pages_own_websocket_and_nothing_injected(h: Harness) -> None:
    async with served(h) as server, aiohttp.ClientSession() as http:
        url = server.make_url("/chat/")
        async with http.get(url, headers={"Host": "chat.example:5281"}) as page:
            csp = page.headers["Content-Security-Policy"]
            assert "connect-src 'self' wss://chat.example:5281 ws://chat.example:5281;" in csp
        async with http.get(url, headers={"Host": "x; script-src *"}) as page:
            csp = page.headers["Content-Security-Policy"]
            assert "connect-src 'self';" in csp and "script-src *" not in csp
