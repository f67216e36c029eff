"""A bare line-protocol client for tests that want to see raw frames."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson


class LineClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> LineClient:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, frame: dict[str, Any] | bytes) -> None:
        data = frame if isinstance(frame, bytes) else orjson.dumps(frame) + b"\n"
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise ConnectionError("connection closed")
        frame: dict[str, Any] = orjson.loads(line)
        return frame

    async def request(self, frame: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        await self.send(frame)
        return await self.recv(timeout)

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
