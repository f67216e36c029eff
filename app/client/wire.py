"""How a `Client` carries frames: newline-delimited on TCP, or one per WebSocket message.

A `Wire` reads one frame at a time and writes one frame at a time; nothing above it
knows which transport it is. ``open_wire`` dials either:

- ``"tcp"``: the client ports (5222 plaintext on loopback, 5223 TLS);
- ``"ws"``: HAProxy's WebSocket ports (5280 ``ws://`` on loopback, 5281 ``wss://``),
  path ``/ws``, one JSON frame per text message (docs/protocol.md, "WebSocket
  transport"), with aiohttp's client: no extra dependency.

TLS verifies the server the same way on both (``ssl.SSLContext``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import aiohttp

from app import sockopts
from app.client.errors import ConnectionLost, Timeout, UntrustedServer

Transport = Literal["tcp", "ws"]
TRANSPORTS: Final = ("tcp", "ws")
WS_PATH: Final = "/ws"


class WireError(Exception):
    """The wire broke while reading: the text says why (becomes the close reason)."""


class Wire(Protocol):
    async def read_frame(self) -> bytes | None:
        """The next frame without its line end; None at a clean end (EOF, close)."""
        ...

    async def send(self, frame: bytes) -> None:
        """Write one frame (no line end) and wait until the transport took it."""
        ...

    def close(self) -> None:
        """Start closing; `wait_closed` waits for the end."""
        ...

    async def wait_closed(self) -> None: ...

    def extra_info(self, name: str) -> object:
        """The transport's ``get_extra_info(name)`` (``"ssl_object"``, ``"peername"``)."""
        ...


class StreamWire:
    """Newline-delimited frames on a TCP (or TLS) stream."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_line_bytes: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max = max_line_bytes

    async def read_frame(self) -> bytes | None:
        while True:
            try:
                line = await self._reader.readline()
            except ValueError:  # the stream's limit: a line over max_line_bytes
                raise WireError(f"the server sent a line over {self._max} bytes") from None
            except OSError as exc:
                raise WireError(f"connection error: {exc}") from exc
            if not line.endswith(b"\n"):
                return None  # EOF; a partial last line is not a frame
            if line.strip():
                return line

    async def send(self, frame: bytes) -> None:
        self._writer.write(frame + b"\n")
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError):  # a reset connection is closed all the same
            await self._writer.wait_closed()

    def extra_info(self, name: str) -> object:
        return self._writer.get_extra_info(name)


class WebSocketWire:
    """One frame per WebSocket text message (aiohttp's client)."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._session = session
        self._ws = ws
        self._closer: asyncio.Task[None] | None = None

    async def read_frame(self) -> bytes | None:
        while True:
            msg = await self._ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                data = msg.data
                frame = data.encode() if isinstance(data, str) else data
                if frame.strip():
                    return bytes(frame)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                raise WireError("the server sent a binary WebSocket message")
            elif msg.type is aiohttp.WSMsgType.ERROR:
                raise WireError(f"connection error: {msg.data}")
            else:  # CLOSE, CLOSING, CLOSED
                return None

    async def send(self, frame: bytes) -> None:
        try:
            await self._ws.send_frame(frame, aiohttp.WSMsgType.TEXT)
        except (aiohttp.ClientError, RuntimeError) as exc:  # RuntimeError: closing
            raise ConnectionError(f"the WebSocket is closed: {exc}") from exc

    def close(self) -> None:
        if self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ws.close(), 2.0)
        await self._session.close()

    def extra_info(self, name: str) -> object:
        return self._ws.get_extra_info(name)

    async def wait_closed(self) -> None:
        self.close()
        assert self._closer is not None
        await asyncio.shield(self._closer)


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    timeout: float
    max_line_bytes: int
    context: ssl.SSLContext | None
    server_hostname: str | None

    @property
    def name(self) -> str:
        """The name the server's certificate must hold."""
        return self.server_hostname or self.host

    @property
    def sni(self) -> str | None:
        return self.name if self.context else None


async def open_wire(
    transport: Transport,
    host: str,
    port: int,
    *,
    timeout: float,
    max_line_bytes: int,
    context: ssl.SSLContext | None,
    server_hostname: str | None,
    tcp_keepalive_s: float | None = None,
) -> Wire:
    """Connect; `Timeout`, `UntrustedServer` or `ConnectionLost` when that fails.
    With ``tcp_keepalive_s``, the socket sends TCP keepalive probes (`tcp_keepalive`)."""
    target = _Target(host, port, timeout, max_line_bytes, context, server_hostname)
    if transport == "ws":
        wire = await _open_ws(target)
    elif transport == "tcp":
        wire = await _open_tcp(target)
    else:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if tcp_keepalive_s is not None:
        tcp_keepalive(wire.extra_info("socket"), tcp_keepalive_s)
    return wire


KEEPALIVE_PROBES = 3


def tcp_keepalive(sock: object, idle_s: float) -> None:
    """Kernel keepalive probes after ``idle_s`` of silence, then every half of it, 3
    unanswered ones ending the connection (`app.sockopts.tcp_keepalive`). They cost no
    server CPU to speak of, and a balancer that took over a virtual IP answers one for
    a connection it never had with a reset, so a client that only receives notices a
    dead balancer within about ``idle_s``; a client whose request went out just as its
    balancer died notices as soon (TCP_USER_TIMEOUT)."""
    idle = max(1, round(idle_s))
    sockopts.tcp_keepalive(sock, idle, max(1, idle // 2), KEEPALIVE_PROBES)


async def _open_tcp(t: _Target) -> Wire:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                t.host,
                t.port,
                limit=t.max_line_bytes,
                ssl=t.context,
                server_hostname=t.sni,
                ssl_handshake_timeout=t.timeout if t.context else None,
            ),
            t.timeout,
        )
    except TimeoutError:
        raise Timeout(f"cannot connect to {t.host}:{t.port} within {t.timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise UntrustedServer(f"cannot verify {t.name}:{t.port}: {exc.verify_message}") from exc
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConnectionLost(f"cannot connect to {t.host}:{t.port}: {why}") from exc
    return StreamWire(reader, writer, t.max_line_bytes)


def ws_url(host: str, port: int, tls: bool) -> str:
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{'wss' if tls else 'ws'}://{name}:{port}{WS_PATH}"


async def _open_ws(t: _Target) -> Wire:
    url = ws_url(t.host, t.port, t.context is not None)
    # One connection per session: a connector of its own, closed with the wire.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, force_close=True))
    try:
        ws = await asyncio.wait_for(
            session.ws_connect(
                url,
                ssl=t.context if t.context is not None else False,
                server_hostname=t.sni,
                max_msg_size=t.max_line_bytes,
                compress=0,
                autoping=True,
            ),
            t.timeout,
        )
    except BaseException as exc:
        await session.close()
        if isinstance(exc, TimeoutError):
            raise Timeout(f"cannot connect to {url} within {t.timeout:g} s") from None
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            raise UntrustedServer(
                f"cannot verify {t.name}:{t.port}: {exc.certificate_error}"
            ) from exc
        if isinstance(exc, aiohttp.WSServerHandshakeError):
            raise ConnectionLost(f"{url} refused the WebSocket: HTTP {exc.status}") from exc
        if isinstance(exc, aiohttp.ClientError | OSError):
            raise ConnectionLost(f"cannot connect to {url}: {exc}") from exc
        raise
    return WebSocketWire(session, ws)
