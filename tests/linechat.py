"""A bare line-protocol client for tests that want to see raw frames."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from typing import Any

import aiohttp
import orjson


class LineClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        # Frames that arrived while request() waited for its reply, in order.
        self.backlog: collections.deque[dict[str, Any]] = collections.deque()
        self._rids = itertools.count(1)

    @classmethod
    async def connect(cls, host: str, port: int, source: str | None = None) -> LineClient:
        """Connect, from the local address ``source`` if given (e.g. 127.0.0.2: another "host")."""
        reader, writer = await asyncio.open_connection(
            host, port, limit=1 << 20, local_addr=(source, 0) if source else None
        )
        return cls(reader, writer)

    async def send(self, frame: dict[str, Any] | bytes) -> None:
        data = frame if isinstance(frame, bytes) else orjson.dumps(frame) + b"\n"
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        if self.backlog:
            return self.backlog.popleft()
        return await self._read(timeout)

    async def _read(self, timeout: float) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line.endswith(b"\n"):
            raise ConnectionError("connection closed" + (" mid-frame" if line else ""))
        frame: dict[str, Any] = orjson.loads(line)
        return frame

    async def request(self, frame: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send a request and return its reply (matched by rid); other frames go to the backlog."""
        if "rid" not in frame:
            frame = {**frame, "rid": f"auto-{next(self._rids)}"}
        await self.send(frame)
        while True:
            reply = await self._read(timeout)
            if reply.get("rid") == frame["rid"]:
                return reply
            self.backlog.append(reply)

    async def recv_until(self, op: str, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            frame = await self.recv(timeout)
            if frame["op"] == op:
                return frame

    async def closed(self, timeout: float = 5.0) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(), timeout)
        except (TimeoutError, ConnectionError):
            return False
        return data == b"" or self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class WsLineClient(LineClient):
    """The same raw client over a WebSocket (``ws://host:port/ws``): a frame per text
    message. ``send`` of bytes sends them as one text message (a trailing newline
    removed), so tests written for lines work unchanged."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self.backlog = collections.deque()
        self._rids = itertools.count(1)

    @classmethod
    async def connect(cls, host: str, port: int, source: str | None = None) -> LineClient:
        connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None)
        session = aiohttp.ClientSession(connector=connector)
        try:
            ws = await session.ws_connect(f"ws://{host}:{port}/ws", max_msg_size=1 << 20)
        except BaseException:
            await session.close()
            raise
        return cls(session, ws)

    async def send(self, frame: dict[str, Any] | bytes) -> None:
        data = frame if isinstance(frame, bytes) else orjson.dumps(frame)
        await self.ws.send_str(data.removesuffix(b"\n").decode("utf-8", "surrogateescape"))

    async def _read(self, timeout: float) -> dict[str, Any]:
        msg = await self.ws.receive(timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"connection closed ({msg.type.name})")
        frame: dict[str, Any] = orjson.loads(msg.data)
        return frame

    async def closed(self, timeout: float = 5.0) -> bool:
        try:
            msg = await self.ws.receive(timeout)
        except TimeoutError:
            return False
        return msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2.0)
        await self.session.close()


async def connect(host: str, port: int, transport: str = "tcp") -> LineClient:
    """A raw client over ``transport``: "tcp" (lines) or "ws" (a WebSocket)."""
    if transport == "ws":
        return await WsLineClient.connect(host, port)
    return await LineClient.connect(host, port)
