"""The WebSocket transport: the same protocol for browsers, one frame per text message.

Each worker serves an aiohttp app on its worker_ws port, reached only through
HAProxy's ``websockets`` frontend (ws:// on client_ws_port, wss:// on
client_wss_port): ``/ws`` upgrades to a WebSocket, ``/chat/`` is the web chat page
(app/webchat). A WebSocket drives an ordinary ``ClientConnection``: this module is
only the adapter that plays the asyncio transport that connection writes to, and
hands it each text message as one whole frame. Sessions, limits, flood control,
deadlines, drain and resume are the connection's, as on TCP.

At the edge, before the upgrade (docs/security.md, "WebSocket"):

- the socket peer must be HAProxy (``Edge.trusted``, as for TCP), and the client's
  address is the ``X-Forwarded-For`` HAProxy sets (whatever the client sent is
  replaced there), with its port in ``X-Forwarded-Source-Port``;
- a browser's ``Origin`` must be the page's own (it names the Host dialled) or be
  listed in ``ws_allowed_origins``: else 403, so another site's page cannot use a
  visitor's browser to talk to the cluster. No Origin: not a browser, allowed.

After it: a binary message is `bad_frame` (counted like any protocol error); a
message over ``max_frame_bytes`` is the fatal `frame_too_large`; aiohttp stops
reading one over twice that and closes with 1009 (message too big). Pings every
``ws_heartbeat_s``; a peer that does not answer within half of it is dropped.

Closing lingers (``LingeringWebSocketResponse``): the worker half-closes after its
close frame and keeps reading, so a client still sending gets the close code rather
than a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections import deque
from typing import Any, Final, cast
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from app.logs import get_logger
from app.protocol.proxy import Refusal, format_peer
from app.webchat import add_routes as add_webchat_routes
from app.worker.connection import ClientConnection, ConnectionParts

log = get_logger("websocket")

WS_PATH: Final = "/ws"
PARTS = web.AppKey("parts", ConnectionParts)
# Headers HAProxy's websockets frontend sets (haproxy/haproxy.cfg.tmpl).
CLIENT_ADDR_HEADER: Final = "X-Forwarded-For"
CLIENT_PORT_HEADER: Final = "X-Forwarded-Source-Port"
BINARY_REFUSED: Final = "binary WebSocket messages are not frames: send each frame as text"
# How long a closed WebSocket's socket stays readable for the client's own close.
LINGER_S: Final = 1.0
LINGER_POLL_S: Final = 0.05


class LingeringWebSocketResponse(web.WebSocketResponse):
    """A WebSocketResponse whose close half-closes the socket instead of closing it.

    aiohttp closes the socket right after its close frame when it ends a connection
    itself: 1009 for a message far over the limit, which the client is then typically
    still sending. Closing a socket with unread input makes the kernel send a reset,
    and the reset can reach the client before it has read the close frame: it saw
    the connection drop, not 1009 (3-33 % of tries on this box). Like a web server's lingering
    close: FIN after the close frame, keep reading (aiohttp discards input once it
    has failed or closed), and ``handle`` closes once the client has closed its end
    or after ``LINGER_S``.
    """

    def _close_transport(self) -> None:  # aiohttp's one place that closes the socket
        request = self._req
        transport = request.transport if request is not None else None
        if transport is None or transport.is_closing():
            return
        # (uvloop's transports are not asyncio.WriteTransport subclasses: no isinstance.)
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()


async def linger(raw: asyncio.BaseTransport | None, seconds: float = LINGER_S) -> None:
    """Wait until the client has closed its end of ``raw`` (its FIN closes the
    transport), for at most ``seconds``; the caller then closes the socket."""
    if raw is None:
        return
    deadline = asyncio.get_running_loop().time() + seconds
    while not raw.is_closing() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(LINGER_POLL_S)


class WebSocketTransport(asyncio.Transport):
    """What a ``ClientConnection`` needs of a transport, over one WebSocket.

    ``write`` takes the connection's encoded lines and queues each as a text
    message; one task sends the queue and closes the WebSocket after it when asked.
    Write-buffer limits work as on a socket: past ``high`` queued bytes the
    connection is told ``pause_writing`` (its slow-reader timer), below ``high / 4``
    ``resume_writing``. ``pause_reading`` stops the message loop (``handle``).
    """

    def __init__(self, ws: web.WebSocketResponse, raw: asyncio.BaseTransport | None) -> None:
        super().__init__()
        self._ws = ws
        self._raw = raw
        self._connection: ClientConnection | None = None
        self._out: deque[bytes] = deque()
        self._queued = 0
        self._high = 64 * 1024
        self._writing_paused = False
        self._closing = False
        self._sender: asyncio.Task[None] | None = None
        self.readable = asyncio.Event()
        self.readable.set()

    def bind(self, connection: ClientConnection) -> None:
        self._connection = connection

    # ---- asyncio.Transport, as far as ClientConnection uses it --------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._raw.get_extra_info(name, default) if self._raw is not None else default

    def is_closing(self) -> bool:
        return self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else self._high

    def get_write_buffer_size(self) -> int:
        raw = cast(asyncio.WriteTransport | None, self._raw)
        below = raw.get_write_buffer_size() if raw is not None and not raw.is_closing() else 0
        return self._queued + below

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        # The connection writes JSON lines (no raw newline inside one): a message each.
        for line in bytes(data).split(b"\n"):
            if line:
                self._out.append(line)
                self._queued += len(line)
        if self._queued > self._high and not self._writing_paused:
            self._writing_paused = True
            if self._connection is not None:
                self._connection.pause_writing()
        self._start_sender()

    def close(self) -> None:
        """Send what is queued, then close the WebSocket (code 1000)."""
        if not self._closing:
            self._closing = True
            self.readable.set()  # the message loop sees the connection closed
            self._start_sender()

    def abort(self) -> None:
        self._closing = True
        self.readable.set()
        self._out.clear()
        self._queued = 0
        if self._sender is not None:
            self._sender.cancel()
        if self._raw is not None:
            cast(asyncio.Transport, self._raw).abort()

    def pause_reading(self) -> None:
        self.readable.clear()

    def resume_reading(self) -> None:
        self.readable.set()

    def is_reading(self) -> bool:
        return self.readable.is_set()

    async def flushed(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until what was written before close has been sent."""
        if self._sender is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._sender), timeout)

    # ---- internals -----------------------------------------------------------------
    def _start_sender(self) -> None:
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_queued())

    async def _send_queued(self) -> None:
        ws = self._ws
        try:
            while self._out:
                message = self._out.popleft()
                self._queued -= len(message)
                await ws.send_frame(message, WSMsgType.TEXT)
                if self._writing_paused and self._queued <= self._high // 4:
                    self._writing_paused = False
                    if self._connection is not None:
                        self._connection.resume_writing()
            if self._closing:
                await ws.close()
        except (ConnectionError, RuntimeError):
            # The peer went away while we wrote (RuntimeError: aiohttp's "closing"):
            # the message loop sees the close and tells the connection.
            self._out.clear()
            self._queued = 0
        finally:
            self._sender = None
            if self._out and not self._ws.closed:
                self._start_sender()  # written while the last send was finishing


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """A browser's Origin may open a WebSocket: its own page (the Origin names the
    Host it dialled) or a listed one. Without an Origin the client is no browser."""
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and host is not None
        and parts.netloc != ""
        and parts.netloc == host.strip().lower()
    )


def client_peer(request: web.Request) -> str | None:
    """The client's ``host:port`` from HAProxy's headers, or None if they do not name one."""
    host = request.headers.get(CLIENT_ADDR_HEADER, "").split(",")[-1].strip()
    port_text = request.headers.get(CLIENT_PORT_HEADER, "0").strip()
    if not port_text.isdigit() or len(port_text) > 5:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return format_peer(str(address), int(port_text))


async def handle(request: web.Request) -> web.StreamResponse:
    parts = request.app[PARTS]
    settings = parts.settings
    edge = parts.edge
    raw = request.transport
    sock_peer = raw.get_extra_info("peername") if raw is not None else None
    if not sock_peer or not edge.trusted(sock_peer[0]):
        edge.refused(Refusal.UNTRUSTED_SOURCE, str(sock_peer))
        raise web.HTTPForbidden(text="forbidden\n")
    peer = client_peer(request)
    if peer is None:
        edge.refused(Refusal.NOT_PROXY, format_peer(sock_peer[0], sock_peer[1]))
        raise web.HTTPForbidden(text="forbidden\n")
    if not origin_allowed(
        request.headers.get("Origin"), request.headers.get("Host"), settings.ws_origin_list()
    ):
        log.info("ws_origin_refused", peer=peer, origin=request.headers.get("Origin", "")[:200])
        raise web.HTTPForbidden(text="origin not allowed\n")
    ws = LingeringWebSocketResponse(
        heartbeat=settings.ws_heartbeat_s,
        # Over max_frame_bytes is frame_too_large (the decoder's); far over it aiohttp
        # stops reading and closes with 1009.
        max_msg_size=2 * settings.max_frame_bytes,
        compress=False,  # a deflate context per connection costs ~100 KiB of memory
        decode_text=False,  # the codec reads bytes: no str round trip
        autoclose=True,
    )
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(text="this URL speaks WebSocket only\n")
    await ws.prepare(request)
    transport = WebSocketTransport(ws, raw)
    connection = ClientConnection(parts)
    transport.bind(connection)
    connection.attach(transport, peer)
    try:
        await _read_messages(ws, transport, connection)
        # A fatal error frame (or bye's ok) goes out before the close.
        await transport.flushed(settings.shutdown_grace_s)
    finally:
        connection.connection_lost(None)
        if not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
        await linger(raw)  # aiohttp closes the socket once this returns
    return ws


async def _read_messages(
    ws: web.WebSocketResponse, transport: WebSocketTransport, connection: ClientConnection
) -> None:
    while not connection.closed:
        if not transport.readable.is_set():
            await transport.readable.wait()
            continue
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT:
            data = msg.data
            connection.message_received(data if isinstance(data, bytes) else data.encode())
        elif msg.type is WSMsgType.BINARY:
            connection.frame_refused(BINARY_REFUSED)
        else:  # CLOSE, CLOSING, CLOSED, ERROR (1009 and such: aiohttp has closed it)
            return


def make_app(parts: ConnectionParts) -> web.Application:
    app = web.Application(client_max_size=4096)
    app[PARTS] = parts
    app.router.add_get(WS_PATH, handle)
    add_webchat_routes(app)
    return app


async def start_websockets(parts: ConnectionParts, sock: socket.socket) -> web.AppRunner:
    """Serve /ws and /chat/ on ``sock`` (this worker's worker_ws port, bound early:
    edge.bind_early)."""
    runner = web.AppRunner(
        make_app(parts), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    await web.SockSite(runner, sock, backlog=4096).start()
    return runner
