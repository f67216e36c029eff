"""A lean load-generator client: one asyncio Protocol per connection, orjson, no coroutines
per frame. Run it on uvloop.

Replies to requests made with ``request()`` (string rids) resolve futures; every other
frame goes to ``on_frame``, a plain callback, so the hot path is a split and a
``orjson.loads`` per line.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import Callable
from typing import Any

import orjson

Frame = dict[str, Any]

PASSWORD = "bench-password-0123456789"

_rids = itertools.count(1)


class Wire(asyncio.Protocol):
    __slots__ = ("_buf", "_waiters", "closed", "on_close", "on_frame", "transport")

    def __init__(self, on_frame: Callable[[Frame], None] | None = None) -> None:
        self._buf = b""
        self._waiters: dict[str, asyncio.Future[Frame]] = {}
        self.on_frame = on_frame
        self.on_close: Callable[[Exception | None], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

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
                fut = waiters.pop(frame.get("rid"), None)  # type: ignore[arg-type]
                if fut is not None:
                    if not fut.done():
                        fut.set_result(frame)
                    continue
            if on_frame is not None:
                on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed by the server"))
        self._waiters.clear()
        if self.on_close is not None:
            self.on_close(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def request(self, frame: Frame, timeout: float = 60.0) -> Frame:
        rid = f"r{next(_rids)}"
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        self.write(orjson.dumps({**frame, "rid": rid}, option=orjson.OPT_APPEND_NEWLINE))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.pop(rid, None)

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


class SetupError(RuntimeError):
    pass


async def call(wire: Wire, frame: Frame, want: str, tolerate: tuple[str, ...] = ()) -> Frame:
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


async def register(wire: Wire, user: str) -> None:
    """Create the account (an existing one is fine: reruns and retries)."""
    frame = {"op": "register", "user": user, "password": PASSWORD}
    await call(wire, frame, "registered", tolerate=("user_exists",))


async def hello(wire: Wire, user: str, device: str = "bench") -> Frame:
    frame = {"op": "hello", "user": user, "password": PASSWORD, "device": device, "v": 1}
    return await call(wire, frame, "welcome")
