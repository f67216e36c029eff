"""The thin asyncio adapter: socket bytes to the codec, decoded requests to the session.

One ``ClientConnection`` per client connection: a TCP one (this is its asyncio
protocol), or a WebSocket, whose adapter (websocket.py) plays an asyncio transport
and hands over whole messages (``message_received``). Requests are handled strictly in
order by a task that exists only while there is work, so an idle connection
costs a protocol object, a decoder and a small buffer, not a coroutine.

Only HAProxy connects here (edge.py): the first bytes are its PROXY v2 header,
which names the client; ``peer`` is that client's ``host:port`` (``[v6]:port``).
Deadlines (log in within auth_timeout_s, never silent for idle_timeout_s) are
kept by timeouts.py, which only reads the time of the last frame stamped here.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import cast

from app.protocol import (
    Decoder,
    ErrorCode,
    FrameError,
    Limits,
    Request,
    Send,
    encode_error,
)
from app.protocol.proxy import Refusal, format_peer, parse_proxy_header
from app.settings import Settings
from app.worker import metrics
from app.worker.delivery import Delivery
from app.worker.dispatch import Dispatcher
from app.worker.edge import Edge
from app.worker.errors import error_reply
from app.worker.session import Sessions
from app.worker.states import Session, SessionState
from app.worker.timeouts import NO_SLOT, Deadlines


@dataclass(frozen=True, slots=True)
class ConnectionParts:
    """What every connection of a worker shares (one object, one pointer each)."""

    settings: Settings
    limits: Limits
    dispatcher: Dispatcher
    sessions: Sessions
    delivery: Delivery
    edge: Edge
    deadlines: Deadlines


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_bucket",
        "_bucket_at",
        "_out",
        "_paused",
        "_pending",
        "_preamble",
        "_reading_paused",
        "_send_waiter",
        "_slow_timer",
        "_task",
        "_throttle_timer",
        "_write_waiter",
        "closed",
        "connected_at",
        "deadline_slot",
        "decoder",
        "inflight_sends",
        "login_wait_until",
        "parts",
        "peer",
        "session",
        "settings",
        "state",
        "transport",
    )

    def __init__(self, parts: ConnectionParts) -> None:
        self.parts = parts
        self.settings = parts.settings
        self.decoder = Decoder(parts.limits)
        self.transport: asyncio.Transport | None = None
        # The client's "host:port" once the PROXY header has named it.
        self.peer = "?"
        # Bytes of the PROXY header received so far; None once it has been read.
        self._preamble: bytes | None = b""
        # Changed only by states.set_session_state.
        self.state = SessionState.ANONYMOUS
        self.session: Session | None = None
        self.closed = False
        self._pending: deque[Request | FrameError] = deque()
        self._task: asyncio.Task[None] | None = None
        self._paused = False  # too many requests pending
        self._throttle_timer: asyncio.TimerHandle | None = None  # over the frame rate
        self._reading_paused = False
        self._slow_timer: asyncio.TimerHandle | None = None
        # Set while a request waits for the peer to read what was written (_run).
        self._write_waiter: asyncio.Future[None] | None = None
        # Frames written during one event-loop iteration leave in one syscall.
        self._out: list[bytes] | None = None
        self._bucket = float(parts.settings.frame_burst)
        # The flood bucket's clock, stamped at every frame: also the idle deadline's.
        self._bucket_at = self.connected_at = time.monotonic()
        self.deadline_slot = NO_SLOT  # timeouts.py's bookkeeping
        # Until when the server asked this (not yet logged-in) client to wait before it
        # tries to log in again (an `overloaded` answer): the login deadline counts from
        # there, not from connecting (timeouts.py).
        self.login_wait_until = 0.0
        # Sends queued for a group commit and not yet answered (see send_slot).
        self.inflight_sends = 0
        self._send_waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if not peer:
            self._refuse(Refusal.UNTRUSTED_SOURCE)
            return
        self.peer = format_peer(peer[0], peer[1])  # HAProxy's, until its header names the client
        if not self.parts.edge.trusted(peer[0]):
            self._refuse(Refusal.UNTRUSTED_SOURCE)
            return
        self._opened()

    def attach(self, transport: asyncio.Transport, peer: str) -> None:
        """Start on a transport whose edge has already named the client (websocket.py:
        HAProxy's X-Forwarded-For, checked there), so no PROXY header follows."""
        self.transport = transport
        self.peer = peer
        self._preamble = None
        self._opened()

    def _opened(self) -> None:
        assert self.transport is not None
        # Past this much unsent output the kernel buffer is full: see write().
        self.transport.set_write_buffer_limits(high=self.settings.max_write_buffer_bytes)
        self.parts.deadlines.watch(self)
        self.parts.sessions.opened(self)

    def data_received(self, data: bytes) -> None:
        if self._preamble is not None:
            data = self._read_preamble(data)
            if not data:
                return
        self._received(self.decoder.receive_data(data))

    def message_received(self, data: bytes) -> None:
        """One whole frame from a message-framed transport (a WebSocket text message)."""
        self._received(self.decoder.receive_message(data))

    def frame_refused(self, message: str) -> None:
        """A message the transport cannot hand over as a frame (a binary one): `bad_frame`."""
        self._received(self.decoder.reject(ErrorCode.BAD_FRAME, message))

    def _received(self, items: list[Request | FrameError]) -> None:
        """Admit decoded frames under the flood budget and queue them for handling."""
        if not items:
            return
        admitted = self._take_tokens(len(items))
        if admitted < len(items):
            if self._bucket < -self.settings.flood_fatal_frames:
                # The frames within the budget are answered, then `flood` closes the
                # connection; the frames beyond get nothing (docs/protocol.md).
                del items[admitted:]
                items.append(
                    FrameError(ErrorCode.FLOOD, "far too many frames too fast", fatal=True)
                )
                self._paused = True  # read nothing more
                self._update_reading()
            else:
                self._over_rate(items, admitted)
        self._pending.extend(items)
        if self._task is None:
            self._send_now()
            if not self._pending:
                return
        if len(self._pending) >= self.settings.max_pending_requests and not self._paused:
            # Backpressure: stop reading until the backlog is handled.
            self._paused = True
            self._update_reading()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _read_preamble(self, data: bytes) -> bytes:
        """Read HAProxy's PROXY header; return the bytes after it (the client's)."""
        if self.closed:
            return b""
        buffered = self._preamble + data if self._preamble else data
        header = parse_proxy_header(buffered)
        if header is None:  # bounded: a header has at most 16 + MAX_PAYLOAD_BYTES
            self._preamble = buffered
            return b""
        if isinstance(header, Refusal):
            self._refuse(header)
            return b""
        self._preamble = None
        if header.source is not None:  # LOCAL (the proxy's own connection): no client
            self.peer = format_peer(*header.source)
        return buffered[header.length :]

    def _refuse(self, reason: Refusal) -> None:
        """Not HAProxy, or no valid header: close without a word (counted, logged)."""
        self.parts.edge.refused(reason, self.peer)
        self._preamble = b""
        self.abort()

    def _over_rate(self, items: list[Request | FrameError], admitted: int) -> None:
        """Answer the frames beyond the bucket `rate_limited` (in their place in the
        order) and stop reading until the bucket holds a token again."""
        retry_after = round((1.0 - self._bucket) / self.settings.frames_per_s, 3)
        for i in range(admitted, len(items)):
            item = items[i]
            if isinstance(item, FrameError) and item.fatal:
                continue  # frame_too_large, too_many_errors: still closes the connection
            items[i] = FrameError(
                ErrorCode.RATE_LIMITED,
                "too many frames too fast; this one was not handled",
                item.rid,
                retry_after=retry_after,
            )
        if self._throttle_timer is not None:
            self._throttle_timer.cancel()
        self._throttle_timer = asyncio.get_running_loop().call_later(
            retry_after, self._throttle_over
        )
        self._update_reading()

    def _throttle_over(self) -> None:
        self._throttle_timer = None
        self._update_reading()

    def _update_reading(self) -> None:
        """Read the socket unless requests are backed up or the client is over its rate."""
        pause = self._paused or self._throttle_timer is not None
        if pause == self._reading_paused or self.closed or self.transport is None:
            return
        self._reading_paused = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None
        if self._throttle_timer is not None:
            self._throttle_timer.cancel()
            self._throttle_timer = None
        self._wake_writer()
        self._pending.clear()
        self.parts.deadlines.forget(self)
        self.parts.sessions.lost(self)

    def pause_writing(self) -> None:
        # The peer reads slower than we write: stop pushing inbox entries to it
        # (they stay in its durable inbox) and give it a while to catch up.
        if self._slow_timer is None:
            self._slow_timer = asyncio.get_running_loop().call_later(
                self.settings.slow_reader_timeout_s, self._slow_reader
            )

    def resume_writing(self) -> None:
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None
        self._wake_writer()
        if self.state is SessionState.ACTIVE and self.session is not None:
            self.parts.delivery.mark_dirty([self.session.user_id])

    def _slow_reader(self) -> None:
        # Still stuck: drop it. Nothing is lost; the client resumes from its inbox.
        self._slow_timer = None
        metrics.SLOW_READERS.value += 1
        self.abort()

    def _wake_writer(self) -> None:
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def writable(self) -> bool:
        return not self.closed and self._slow_timer is None

    @property
    def write_room(self) -> int:
        """Bytes that may still be written before the peer is a slow reader (the
        transport's high-water mark): writers of long output (delivery's pages) stop
        once it is used up, and go on when ``resume_writing`` says the peer read."""
        if self.transport is None or self.closed:
            return 0
        queued = sum(len(b) for b in self._out) if self._out else 0
        return (
            self.settings.max_write_buffer_bytes - self.transport.get_write_buffer_size() - queued
        )

    @property
    def last_frame_at(self) -> float:
        """When the client last sent a frame (a blank line is none), time.monotonic()."""
        return self._bucket_at

    @property
    def busy(self) -> bool:
        """A request is being handled or a send awaits its commit: not idle."""
        return self._task is not None or self.inflight_sends > 0

    # ---- used by the session -----------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        if self._out is None:
            self._out = [data]
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, None
        if not out or self.closed or self.transport is None:
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        # A hard cap on top of the slow-reader timer: memory per connection stays bounded.
        if self.transport.get_write_buffer_size() > 4 * self.settings.max_write_buffer_bytes:
            metrics.SLOW_READERS.value += 1
            self.abort()

    def fail(self, code: ErrorCode, message: str, rid: str | int | None = None) -> None:
        """Send an error; fatal codes also close the connection."""
        self.write(error_reply(code, message, rid))
        if code.fatal:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self._flush()  # what was written before close still goes out
            self.closed = True
            self._pending.clear()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self._pending.clear()
            self.transport.abort()

    async def send_slot(self) -> None:
        """Wait while this connection has ``max_inflight_sends`` uncommitted sends."""
        limit = self.settings.max_inflight_sends
        while self.inflight_sends >= limit and not self.closed:
            self._send_waiter = asyncio.get_running_loop().create_future()
            await self._send_waiter

    def send_done(self) -> None:
        self.inflight_sends -= 1
        waiter = self._send_waiter
        if waiter is not None:
            self._send_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # ---- internals ---------------------------------------------------------
    def _send_now(self) -> None:
        """Queue leading `send`s for the group commit here, without a task.

        Only from the head of the queue and only while nothing else is being
        handled, so requests still take effect in the order they arrived.
        """
        pending, send_now = self._pending, self.parts.dispatcher.send_now
        while pending and not self.closed:
            item = pending[0]
            if type(item) is not Send:
                return
            try:
                if not send_now(self, item):
                    return
            except Exception:
                return  # the task's handler reports whatever this was
            pending.popleft()

    def _take_tokens(self, n: int) -> int:
        """Spend a token per frame; return how many of the n frames had one. Frames
        beyond still count, so a client that keeps pushing goes into debt (and waits
        it off, or reaches flood_fatal_frames)."""
        now = time.monotonic()
        s = self.settings
        self._bucket = min(
            float(s.frame_burst), self._bucket + (now - self._bucket_at) * s.frames_per_s
        )
        self._bucket_at = now
        admitted = min(n, max(0, int(self._bucket)))
        self._bucket -= n
        return admitted

    async def _run(self) -> None:
        try:
            while self._pending and not self.closed:
                if self._slow_timer is not None:
                    # The peer is not reading what we wrote: handle nothing more (and,
                    # as pending requests pile up, read nothing more) until it does.
                    self._write_waiter = asyncio.get_running_loop().create_future()
                    await self._write_waiter
                    continue
                item = self._pending.popleft()
                if isinstance(item, FrameError):
                    metrics.ERRORS.labels(item.code.value).inc()
                    self.write(encode_error(item))
                    if item.fatal:
                        self.close()
                else:
                    await self.parts.dispatcher.handle(self, item)
                if self._paused and len(self._pending) < self.settings.max_pending_requests // 2:
                    self._paused = False
                    self._update_reading()
        finally:
            self._task = None
