"""The asyncio client of Switchboard's v1 wire protocol (see docs/protocol.md).

::

    async with await Client.connect("chat.example.com", 5223, tls=True) as client:
        await client.login("alice", "correct horse battery", "laptop")
        await client.send("hi bob", to="bob")
        async for event in client.events():
            if isinstance(event, Msg):
                await client.ack(event.seq)

``transport="ws"`` speaks the same frames over a WebSocket instead (HAProxy's ports
5280 ``ws://`` on loopback and 5281 ``wss://``; `app.client.wire`).

``tls=True`` speaks TLS (the server's port 5223, or 5281 for WebSockets) and verifies
the server: its certificate must chain to a trusted CA (the system's, or ``cafile``, such as a local
cluster's ``<state_dir>/tls/ca.pem``) and name ``server_hostname`` (the host dialled
by default); `UntrustedServer` otherwise. Without it the connection is plaintext,
which a server offers on loopback only (port 5222).

Framing is newline-delimited orjson on TCP, a text message per frame on a WebSocket.
Every request carries a fresh integer ``rid``; one background task reads the socket,
resolves the pending request whose ``rid`` a reply echoes, and queues every other
frame as an `Event`, in arrival order. Inbox entries (`Msg`, `Receipt`) are deduplicated by ``seq``
(delivery is at least once), and ``last_seq`` is the highest one received.

When the connection ends, pending requests fail with `ConnectionLost` and the
event stream ends: if the application did not call `close()`, its last event
is `ServerClosed` with the reason (EOF, a fatal ``error`` such as
``session_replaced``, a frame the client could not read, ...).

A `Client` is one connection and never reconnects; `app.client.resilient.ResilientClient`
builds failover (reconnect, ``resume``, resends) on top of it, using ``on_event``,
`Client.resume`, `Client.abort` and `Client.wait_closed`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

import orjson

from app.client.errors import (
    ClientError,
    ConnectionLost,
    ProtocolError,
    ServerError,
    Timeout,
)
from app.client.events import (
    ErrorEvent,
    Event,
    Frame,
    Msg,
    Receipt,
    Sent,
    ServerClosed,
    Unknown,
    Welcome,
    parse_event,
    read_reply,
    server_error,
)
from app.client.requests import Requests, exactly_one
from app.client.retry import RetryBudget, retry_delay
from app.client.wire import Transport, Wire, WireError, open_wire
from app.protocol import FATAL_CODES, PROTOCOL_VERSION

log = logging.getLogger(__name__)

# Longest line accepted from the server. A history page of 100 maximal bodies can
# exceed it; raise it with `connect(max_line_bytes=...)` if you ask for such pages.
MAX_LINE_BYTES: Final = 1 << 20
# Events received but not yet taken by the application. Past this the client drops
# the connection rather than buffer without bound (the inbox is replayed on login).
MAX_EVENTS: Final = 10_000
# `send` repeats a request that got a retryable error or no reply this many times.
SEND_RETRIES: Final = 2
RETRY_BACKOFF_S: Final = 0.25
MAX_RETRY_WAIT_S: Final = 30.0
BYE_TIMEOUT_S: Final = 2.0

# Ops that answer a request (they echo its rid); everything else is an event.
REPLY_OPS: Final = frozenset(
    {
        "registered",
        "welcome",
        "sent",
        "ok",
        "pong",
        "contacts",
        "room",
        "rooms",
        "members",
        "history",
        "error",
    }
)


class _End:
    """Queue marker: no event will follow."""


_END: Final = _End()


def tls_context(cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and host name: against
    ``cafile`` when given, else the system's CAs. Make one and share it between
    connections: loading a CA bundle costs more than a handshake."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def new_cmid() -> str:
    """A fresh client message id; keep it to resend the same message on another connection."""
    return uuid.uuid4().hex


class Client(Requests):
    """One connection to a Switchboard server. Create it with `Client.connect`."""

    def __init__(
        self,
        wire: Wire,
        *,
        timeout: float,
        max_line_bytes: int,
        max_events: int,
        keep_events: bool,
        on_event: Callable[[Event], str | None] | None = None,
        retry_budget: RetryBudget | None = None,
    ) -> None:
        self._wire = wire
        self._timeout = timeout
        self._max_line_bytes = max_line_bytes
        self._max_events = max_events
        self._keep_events = keep_events
        self._on_event = on_event
        # Retries of `send` take from it (app/client/retry.py): share one between the
        # connections of one client.
        self.retry_budget = RetryBudget() if retry_budget is None else retry_budget
        # Session state, kept for resuming on another connection later.
        self.user: str | None = None
        self.device: str | None = None
        self.session: str | None = None
        self.resume_token: str | None = None
        # The device's token from the latest welcome to hello or login_token.
        self.device_token: str | None = None
        self.last_seq = 0  # highest msg/receipt seq received
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._events: asyncio.Queue[Event | _End] = asyncio.Queue()
        self._closing = False  # the application asked to close: EOF is expected
        self._close_reason: str | None = None  # set once, when the connection is gone
        self._fatal_error: str | None = None
        self._reader_task = asyncio.create_task(self._read_loop(), name="switchboard-client-reader")

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_events: int = MAX_EVENTS,
        keep_events: bool = True,
        on_event: Callable[[Event], str | None] | None = None,
        tls: bool | ssl.SSLContext = False,
        cafile: str | os.PathLike[str] | None = None,
        server_hostname: str | None = None,
        retry_budget: RetryBudget | None = None,
        transport: Transport = "tcp",
        tcp_keepalive_s: float | None = None,
    ) -> Client:
        """Open a connection. ``timeout`` bounds the connect (and the TLS handshake) and
        is each request's default.

        ``tls=True`` makes a `tls_context` (with ``cafile``); an `ssl.SSLContext` is used
        as it is. ``server_hostname`` is the name the certificate must hold (default
        ``host``).

        With ``keep_events=False`` server-initiated frames are discarded (``last_seq``
        is still tracked): for one-shot tools that never read `events()`.

        With ``on_event``, every event is handed to that callback instead, synchronously
        from the reader task and in arrival order, without deduplication (``last_seq``
        is not tracked, `events()` is not available, and no `ServerClosed` is made:
        use `wait_closed` and `close_reason`). A string it returns drops the
        connection with that reason.

        ``retry_budget`` bounds `send`'s retries (default: a budget of its own).

        ``transport``: ``"tcp"`` (the client ports) or ``"ws"`` (a WebSocket to the
        WebSocket ports, path ``/ws``); everything else is the same.

        ``tcp_keepalive_s``: kernel keepalive probes after that many idle seconds
        (`wire.tcp_keepalive`); None (the default): none.
        """
        context = tls_context(cafile) if tls is True else tls or None
        wire = await open_wire(
            transport,
            host,
            port,
            timeout=timeout,
            max_line_bytes=max_line_bytes,
            context=context,
            server_hostname=server_hostname,
            tcp_keepalive_s=tcp_keepalive_s,
        )
        return cls(
            wire,
            timeout=timeout,
            max_line_bytes=max_line_bytes,
            max_events=max_events,
            keep_events=keep_events,
            on_event=on_event,
            retry_budget=retry_budget,
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._close_reason is not None

    @property
    def close_reason(self) -> str | None:
        """Why the connection ended, or None while it is open."""
        return self._close_reason

    def extra_info(self, name: str) -> object:
        """The connection's transport information (``"ssl_object"``, ``"peername"``)."""
        return self._wire.extra_info(name)

    # --- requests ------------------------------------------------------------------

    async def register(self, user: str, password: str) -> None:
        await self._request("register", "registered", {"user": user, "password": password})

    async def login(self, user: str, password: str, device: str) -> Welcome:
        """Log in (``hello``); the server then replays the inbox after this device's ack."""
        fields = {"user": user, "password": password, "device": device, "v": PROTOCOL_VERSION}
        return self._welcomed(await self._request("hello", "welcome", fields))

    async def login_token(
        self, user: str, device: str, device_token: str, *, timeout: float | None = None
    ) -> Welcome:
        """Log in with a device token, without the password.

        The welcome's ``device_token`` replaces the one presented (it rotates at every
        use): store it at once. ``auth_failed`` (a `ServerError`) means the token is
        unknown, expired or revoked: log in with the password instead.
        """
        fields = {"user": user, "device": device, "device_token": device_token}
        reply = await self._request("login_token", "welcome", fields, timeout=timeout)
        return self._welcomed(reply)

    def _welcomed(self, reply: Frame) -> Welcome:
        welcome = read_reply(Welcome, reply)
        self.user, self.device = welcome.user, welcome.device
        self.session, self.resume_token = welcome.session, welcome.resume_token
        if welcome.device_token is not None:
            self.device_token = welcome.device_token
        return welcome

    async def resume(
        self, user: str, device: str, token: str, last_seq: int, *, timeout: float | None = None
    ) -> Welcome:
        """Take over a session with the ``resume_token`` of an earlier `Welcome`.

        The server replays the inbox after ``last_seq``; ``bad_token`` (a `ServerError`)
        means the token is unknown, expired or already rotated: log in instead.
        """
        fields = {"user": user, "device": device, "token": token, "last_seq": last_seq}
        return self._welcomed(await self._request("resume", "welcome", fields, timeout=timeout))

    async def send(
        self,
        body: str,
        *,
        to: str | None = None,
        room: int | None = None,
        cmid: str | None = None,
        retries: int = SEND_RETRIES,
    ) -> Sent:
        """Send a message and wait until it is durably committed.

        ``cmid`` defaults to a fresh uuid4 hex. A retryable error (``internal``,
        ``overloaded``, ``rate_limited``, an unknown code) or a missing reply is
        retried up to ``retries`` times with the same cmid, which the server
        deduplicates, so the message is stored at most once. Each retry waits a
        jittered, doubling backoff, at least the server's ``retry_after`` and at
        most 30 s (the cap, also when `retry_budget` is spent).
        """
        exactly_one("send", to, room)
        cmid = new_cmid() if cmid is None else cmid
        fields = {"cmid": cmid, "body": body, "to": to, "room": room}
        attempt = 0
        while True:
            try:
                return read_reply(Sent, await self._request("send", "sent", fields))
            except (ServerError, Timeout) as exc:
                if attempt >= retries or (isinstance(exc, ServerError) and not exc.retryable):
                    raise
                delay = retry_delay(
                    attempt,
                    exc.retry_after if isinstance(exc, ServerError) else None,
                    self.retry_budget,
                    base_s=RETRY_BACKOFF_S,
                    cap_s=MAX_RETRY_WAIT_S,
                )
                log.info("send cmid=%s: %s; resending in %.2f s", cmid, exc, delay)
                await asyncio.sleep(delay)
                attempt += 1

    async def ack(self, seq: int) -> None:
        """This device has processed its inbox up to and including ``seq``."""
        await self._request("ack", "ok", {"seq": seq})

    async def change_password(self, old: str, new: str) -> None:
        await self._request("password", "ok", {"old": old, "new": new})

    async def close(self, *, forget: bool = False) -> None:
        """Say ``bye`` if the connection is still up, then close it. Idempotent.

        ``forget``: also revoke this device's token (sign out for good).
        """
        if not self.closed and not self._closing:
            self._closing = True
            try:
                fields = {"forget": True} if forget else {}
                await self._request("bye", "ok", fields, timeout=BYE_TIMEOUT_S)
            except ClientError as exc:
                log.debug("bye: %s", exc)
        self._closing = True
        self._reader_task.cancel()
        await asyncio.wait([self._reader_task])
        self._wire.close()
        await self._wire.wait_closed()

    def abort(self, reason: str) -> None:
        """Drop the connection now, without ``bye`` (the session stays resumable).

        Pending requests fail with `ConnectionLost` (``reason``); call `close()` later
        to release the socket.
        """
        self._shutdown(reason)

    async def wait_closed(self) -> None:
        """Wait until the connection is gone (then `close_reason` says why)."""
        await asyncio.wait([self._reader_task])

    async def _call(self, op: str, expect: str, fields: dict[str, Any]) -> Frame:
        return await self._request(op, expect, fields)

    async def _request(
        self, op: str, expect: str, fields: dict[str, Any], *, timeout: float | None = None
    ) -> Frame:
        """Send one request and return its reply; fields set to None are left out."""
        if self._close_reason is not None:
            raise ConnectionLost(self._close_reason)
        rid = next(self._rids)
        frame = {"op": op, **{k: v for k, v in fields.items() if v is not None}, "rid": rid}
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        limit = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                await self._wire.send(orjson.dumps(frame))
                reply = await future
        except ClientError:
            raise
        except TimeoutError:
            raise Timeout(f"no reply to {op!r} within {limit:g} s") from None
        except OSError as exc:
            raise ConnectionLost(f"connection error: {exc}") from exc
        finally:
            self._pending.pop(rid, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # mark it retrieved: a failed drain may have won the race
        if reply["op"] == "error":
            raise server_error(reply)
        if reply["op"] != expect:
            raise ProtocolError(f"expected {expect!r} in reply to {op!r}, got {reply['op']!r}")
        return reply

    # --- events --------------------------------------------------------------------

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event; `Timeout` after ``timeout`` s, `ConnectionLost` once they ended."""
        if not self._keep_events:
            raise ClientError("this client was connected with keep_events=False")
        if self._on_event is not None:
            raise ClientError("this client hands its events to on_event")
        try:
            async with asyncio.timeout(timeout):
                item = await self._events.get()
        except TimeoutError:
            raise Timeout(f"no event within {timeout:g} s") from None
        if isinstance(item, _End):
            self._events.put_nowait(item)  # so every later call (or other reader) ends too
            raise ConnectionLost(self._close_reason or "connection closed")
        return item

    # --- the reader task -----------------------------------------------------------

    async def _read_loop(self) -> None:
        reason = "the server closed the connection"
        try:
            while True:
                try:
                    line = await self._wire.read_frame()
                except WireError as exc:
                    reason = str(exc)
                    break
                if line is None:
                    break  # EOF, or the WebSocket closed
                try:
                    frame = orjson.loads(line)
                except orjson.JSONDecodeError:
                    reason = "the server sent a line that is not JSON"
                    break
                if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
                    reason = "the server sent a frame that is not an object with an 'op'"
                    break
                overflow = self._dispatch(frame)
                if overflow is not None:
                    reason = overflow
                    break
        except Exception:  # a bug here must still fail the pending requests, not hang them
            log.exception("client reader failed")
            reason = "the client's reader failed"
        finally:
            self._shutdown(reason)

    def _dispatch(self, frame: Frame) -> str | None:
        """Route one frame; returns a reason to drop the connection, if any."""
        if self._close_reason is not None:
            return None  # read after abort(): the connection is already given up
        op = frame["op"]
        if op in REPLY_OPS:
            rid = frame.get("rid")
            future = None
            if isinstance(rid, int) and not isinstance(rid, bool):
                future = self._pending.get(rid)
            if future is not None:
                if not future.done():
                    future.set_result(frame)
                return None
            if op != "error" or rid is not None:
                # The request timed out or was cancelled; its late reply has no taker.
                log.debug("dropping %r reply for rid %r that nobody awaits", op, rid)
                return None
        try:
            event = parse_event(frame)
        except ProtocolError as exc:
            log.warning("unreadable %r frame, passed on as Unknown: %s", op, exc)
            event = Unknown(frame)
        if isinstance(event, ErrorEvent) and event.code in FATAL_CODES:
            self._fatal_error = f"{event.code}: {event.message}"
        if self._on_event is not None:
            return self._on_event(event)
        if isinstance(event, Msg | Receipt):
            if event.seq <= self.last_seq:
                return None  # delivered again (at least once); already handed out
            self.last_seq = event.seq
        if not self._keep_events:
            return None
        if self._events.qsize() >= self._max_events:
            return f"more than {self._max_events} events were not consumed"
        self._events.put_nowait(event)
        return None

    def _shutdown(self, reason: str) -> None:
        """The connection is gone: fail pending requests and end the event stream."""
        if self._close_reason is not None:
            return
        if self._closing:
            reason = "the client closed the connection"
        elif self._fatal_error is not None:
            reason = self._fatal_error
        self._close_reason = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason))
        self._pending.clear()
        if not self._closing and self._keep_events and self._on_event is None:
            self._events.put_nowait(ServerClosed(reason))
        self._events.put_nowait(_END)
        self._wire.close()
