"""A lean load-generator client: one asyncio Protocol per connection, orjson, no coroutines
per frame. Run it on uvloop. `WsWire` is the same over a WebSocket (``--transport ws``):
aiohttp's client, a reader and a writer task per connection, one frame per text message.

Replies to requests made with ``request()`` (string rids) resolve futures; every other
frame goes to ``on_frame``, a plain callback, so the hot path is a split and a
``orjson.loads`` per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

Frame = dict[str, Any]

PASSWORD = "bench-password-0123456789"

_rids = itertools.count(1)


class _Requests:
    """What both wires share: requests by rid, and failing them when the wire closes."""

    __slots__ = ("_waiters", "closed", "on_close", "on_frame")

    def __init__(self, on_frame: Callable[[Frame], None] | None) -> None:
        self._waiters: dict[str, asyncio.Future[Frame]] = {}
        self.on_frame = on_frame
        self.on_close: Callable[[Exception | None], None] | None = None
        self.closed = False

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def request(self, frame: Frame, timeout: float = 60.0) -> Frame:
        rid = f"r{next(_rids)}"
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        self.write(orjson.dumps({**frame, "rid": rid}, option=orjson.OPT_APPEND_NEWLINE))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.pop(rid, None)

    def _closed(self, exc: Exception | None) -> None:
        self.closed = True
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed by the server"))
        self._waiters.clear()
        if self.on_close is not None:
            self.on_close(exc)


class Wire(_Requests, asyncio.Protocol):
    __slots__ = ("_buf", "transport")

    def __init__(self, on_frame: Callable[[Frame], None] | None = None) -> None:
        super().__init__(on_frame)
        self._buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
        lines = data.split(b"\n")
        self._buf = lines.pop()
        waiters = self._waiters
        on_frame = self.on_frame
        for line in lines:
            if not line:
                continue
            frame = orjson.loads(line)
            if waiters:
                fut = waiters.pop(frame.get("rid"), None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(frame)
                    continue
            if on_frame is not None:
                on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


async def connect(
    host: str,
    port: int,
    on_frame: Callable[[Frame], None] | None = None,
    preamble: bytes = b"",
    tls: ssl.SSLContext | None = None,
) -> Wire:
    """A connection; ``preamble`` is written first (a PROXY header, to a worker's own port).
    With ``tls``, a TLS connection that verifies the server's certificate for ``host``."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Wire(on_frame), host, port, ssl=tls)
    if preamble:
        proto.write(preamble)
    return proto


class WsWire(_Requests):
    """`Wire`'s interface over a WebSocket: ``write`` takes newline-terminated frames
    (one or several) and sends each as a text message."""

    def __init__(
        self, ws: aiohttp.ClientWebSocketResponse, on_frame: Callable[[Frame], None] | None
    ) -> None:
        super().__init__(on_frame)
        self._ws = ws
        self._out: deque[bytes] = deque()
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._writer = loop.create_task(self._write())

    async def _read(self) -> None:
        error: Exception | None = None
        try:
            async for msg in self._ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                frame = orjson.loads(msg.data)
                if self._waiters:
                    fut = self._waiters.pop(frame.get("rid"), None)
                    if fut is not None:
                        if not fut.done():
                            fut.set_result(frame)
                        continue
                if self.on_frame is not None:
                    self.on_frame(frame)
        except Exception as exc:
            error = exc
        finally:
            self._lost(error)

    async def _write(self) -> None:
        ws, out = self._ws, self._out
        with contextlib.suppress(Exception):
            while True:
                await self._wake.wait()
                self._wake.clear()
                while out:
                    await ws.send_frame(out.popleft(), aiohttp.WSMsgType.TEXT)

    def _lost(self, error: Exception | None) -> None:
        if self.closed:
            return
        self._writer.cancel()
        self._closed(error)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        for line in data.split(b"\n"):
            if line:
                self._out.append(line)
        self._wake.set()

    def close(self) -> None:
        if not self.closed:
            task = asyncio.get_running_loop().create_task(self._ws.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[Any]] = set()
_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


def _http() -> aiohttp.ClientSession:
    """One client session per event loop for every WebSocket (no pool: each is its own
    connection), so a bench process does not pay a session per connection."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        session = _sessions[loop] = aiohttp.ClientSession(connector=connector)
    return session


async def connect_ws(
    host: str,
    port: int,
    on_frame: Callable[[Frame], None] | None = None,
    tls: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> WsWire:
    """A WebSocket to ``/ws`` (``wss://`` with ``tls``). ``headers``: e.g. the
    X-Forwarded-For a worker's own WebSocket port expects from HAProxy."""
    scheme = "wss" if tls is not None else "ws"
    ws = await _http().ws_connect(
        f"{scheme}://{host}:{port}/ws",
        ssl=tls if tls is not None else False,
        headers=headers,
        compress=0,
        max_msg_size=1 << 22,
    )
    return WsWire(ws, on_frame)


async def close_ws_sessions() -> None:
    """Close this loop's client session (after the WebSockets)."""
    if _closing:
        await asyncio.gather(*_closing, return_exceptions=True)
    session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()


class SetupError(RuntimeError):
    pass


async def call(
    wire: Wire | WsWire, frame: Frame, want: str, tolerate: tuple[str, ...] = ()
) -> Frame:
    """A request whose reply must be ``want`` (or an error code in ``tolerate``).

    ``overloaded`` and ``rate_limited`` (admission control under a login storm) are
    retried after the server's ``retry_after``.
    """
    for _ in range(20):
        reply = await wire.request(frame)
        if reply["op"] == want or reply.get("code") in tolerate:
            return reply
        if reply.get("code") in ("overloaded", "rate_limited"):
            await asyncio.sleep(float(reply.get("retry_after") or 1.0))
            continue
        raise SetupError(f"{frame['op']} {frame.get('user', '')}: {reply}")
    raise SetupError(f"{frame['op']} {frame.get('user', '')}: still overloaded")


async def register(wire: Wire | WsWire, user: str) -> None:
    """Create the account (an existing one is fine: reruns and retries)."""
    frame = {"op": "register", "user": user, "password": PASSWORD}
    await call(wire, frame, "registered", tolerate=("user_exists",))


async def hello(wire: Wire | WsWire, user: str, device: str = "bench") -> Frame:
    frame = {"op": "hello", "user": user, "password": PASSWORD, "device": device, "v": 1}
    return await call(wire, frame, "welcome")
