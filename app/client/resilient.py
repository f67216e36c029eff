"""`ResilientClient`: a Switchboard session that survives worker restarts and kills.

::

    client = await ResilientClient.connect("127.0.0.1", 5222)
    async with client:
        await client.login("alice", "correct horse battery", "laptop")
        await client.send("hi bob", to="bob")  # resolves across reconnects
        async for event in client.events():  # each inbox entry once, in seq order
            if isinstance(event, Msg | Receipt):
                await client.ack(event.seq)
            elif isinstance(event, Resumed):
                print("now on worker", event.worker)

It has the request methods of `Client` and uses one `Client` per TCP connection
(a *link*). Its lifecycle, `LinkState`, changes only in `_set_state`::

    CONNECTED --login()--> ONLINE --lost--> CONNECTING --resume or hello--> ONLINE
    any state --close(), session_replaced, kicked, a failed login--> CLOSED

**Lost** means: EOF or a reset (worker killed, DB failover), the fatal
``shutting_down``, a ``reconnect`` frame (the link is closed at once, without
``bye``, and reconnected after its ``after_ms``), an inbox gap, no ``pong`` to the
keep-alive ping, or more unread events than ``max_events``. The client reconnects to
the same host and port with exponential backoff and full jitter (`ReconnectPolicy`:
the first try after 0-100 ms, at most 2 s apart; at least a server's ``retry_after``
when it answers ``overloaded``/``rate_limited``), sends ``resume`` with the rotated
token and `last_seq`; on ``bad_token`` it logs in with the device token (``login_token``,
from its `TokenStore`), and on that token's ``auth_failed`` with the remembered
password (``hello``), if it has one. Every welcome's new device token is put in the
store at once. It stops for good after `close()`, ``session_replaced`` (another
connection of this device took over), ``kicked`` (an administrator closed the
session or disabled the account), the fatal codes a client bug causes (``flood``,
``frame_too_large``, ``too_many_errors``) and a refused fallback login
(``auth_failed``, ...): pending calls then fail with `ConnectionLost` and the event
stream ends with `ServerClosed`.

**Sends** are idempotent on their cmid: `send` keeps its message in an outbox until
``sent`` arrives, writes it again, same cmid, on every new link, and raises only on a
permanent error or after ``send_timeout_s`` (120 s). Retryable errors are retried on
the same link after ``retry_after`` (or backoff). Other requests wait for a link
(within ``timeout``) and are sent once; read-only ones are sent again after a loss,
and any answered ``overloaded`` (not carried out) again after its ``retry_after``,
within ``timeout``.

**Retries are budgeted** (app/client/retry.py): every retry after a refusal with
``retry_after`` (``overloaded``, ``rate_limited``; a reconnect after a refused
login too) takes a token from the client's `RetryBudget` (`retry_budget_per_min`
10 a minute, bursts of `retry_budget_burst` 10); with none left, it waits
``max_retry_after_s`` (30 s). A storm of refusals therefore gets a few quick
retries from each client, then a trickle. Reconnects after a lost connection,
and retries after ``internal``, keep their capped backoff.

**Events** come out once each: `Msg`/`Receipt` in seq order with no seq twice, the
highest in `last_seq`. A seq past ``last_seq + 1`` is a gap, except for this device's
own messages, which the server never delivers to it (their seqs come in ``sent``
replies, so while a send is unanswered a gap waits for it). A gap makes the client
drop the link and resume from `last_seq`; if the same gap comes again right after,
it is taken as skipped on purpose (e.g. a message this device sent from another
process) rather than reconnecting in a loop. Around a loss the stream carries
`Disconnected(reason)` and then `Resumed(worker, seq, fallback_login)`.

**Acks** never move backwards: `ack` sends the highest seq asked so far, survives
losses, and after each resume the client re-sends it when the server's ``acked`` is
behind.

`stats` counts reconnects, resumes, fallback logins, resent sends and gaps.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Final

from app.client.errors import ClientError, ConnectionLost, ProtocolError, ServerError, Timeout
from app.client.events import (
    Disconnected,
    ErrorEvent,
    Event,
    Frame,
    Msg,
    Receipt,
    Reconnect,
    Resumed,
    Sent,
    ServerClosed,
    Welcome,
    read_reply,
)
from app.client.requests import Requests, exactly_one
from app.client.retry import RetryBudget, full_jitter
from app.client.sdk import MAX_EVENTS, MAX_LINE_BYTES, Client, new_cmid, tls_context
from app.client.tokens import MemoryTokenStore, TokenStore
from app.client.wire import Transport
from app.protocol import ErrorCode

log = logging.getLogger(__name__)

# Fatal codes after which reconnecting would only repeat the failure (or steal the
# session back from the connection that replaced this one).
TERMINAL_CODES: Final = frozenset(
    {
        ErrorCode.SESSION_REPLACED,
        ErrorCode.KICKED,
        ErrorCode.FLOOD,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.TOO_MANY_ERRORS,
    }
)
# Requests with no effect but their reply: sent again on the next link after a loss.
READ_ONLY_OPS: Final = frozenset({"ping", "contacts", "rooms", "room_members", "history"})
CLOSED_BY_APP: Final = "the client closed the connection"


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How a `ResilientClient` retries; times in seconds."""

    backoff_base_s: float = 0.1  # the first reconnect comes after 0..base
    backoff_cap_s: float = 2.0  # ... and none later than this after the previous one
    send_timeout_s: float = 120.0  # `send` gives up after this long without ``sent``
    # Ping this often; drop a link with no pong within as long. A worker answers requests
    # in order, so a ping waits behind a send stalled by a DB failover (~20 s): keep
    # it well above that. None: no keep-alive.
    keepalive_s: float | None = 30.0
    # Kernel TCP keepalive probes after this many idle seconds (None: off). Cheap (the
    # peer's kernel answers), and the way a client that only receives notices a
    # balancer host that died without a word: the balancer that took the virtual IP
    # over resets the probe (docs/operations.md, "Many hosts").
    tcp_keepalive_s: float | None = None
    # Cap on a server's ``retry_after``, and the wait of a retry when the budget is spent.
    max_retry_after_s: float = 30.0
    # The retry budget (app/client/retry.py): each retry the server asked to delay
    # (overloaded, rate_limited: a retry_after) takes a token; this many come back
    # per minute, up to the burst. Without one, it waits max_retry_after_s.
    retry_budget_per_min: float = 10.0
    retry_budget_burst: int = 10

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return full_jitter(attempt, self.backoff_base_s, self.backoff_cap_s)

    def retry_delay(self, exc: ServerError, attempt: int) -> float:
        """The wait before repeating a request that got a retryable error: the
        backoff, but never less than the server's ``retry_after`` (capped)."""
        delay = self.backoff(attempt)
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        return min(max(delay, 0.0), self.max_retry_after_s)


@dataclass(frozen=True, slots=True)
class ResilienceStats:
    """Counters of a `ResilientClient` since it connected (a snapshot)."""

    reconnects: int = 0  # connections opened after a loss
    resumes: int = 0  # sessions taken over with ``resume``
    fallback_logins: int = 0  # ``hello`` after a loss, when ``resume`` was refused
    resent_sends: int = 0  # sends written again on a new connection
    gaps: int = 0  # inbox gaps that made the client resume


class LinkState(enum.Enum):
    CONNECTING = "connecting"  # no usable link: backing off, dialling or logging in again
    CONNECTED = "connected"  # a link, not logged in yet
    ONLINE = "online"  # logged in: requests and sends flow
    CLOSED = "closed"  # for good; `close_reason` says why


@dataclass(frozen=True, slots=True)
class _Credentials:
    user: str
    device: str
    password: str | None = field(repr=False)  # None: the device token only


class _Link:
    """One connection (a `Client`) and what is in flight on it."""

    __slots__ = ("authenticated", "client", "number", "sends_in_flight")

    def __init__(self, number: int, client: Client) -> None:
        self.number = number
        self.client = client
        self.authenticated = False  # hello/resume answered: inbox entries may flow
        self.sends_in_flight = 0  # sends written here and not answered yet


@dataclass(eq=False, slots=True)
class _OutgoingSend:
    """A `send` not confirmed yet; ``link`` is where it was last written."""

    cmid: str
    fields: dict[str, Any]
    future: asyncio.Future[Sent]
    deadline: float
    link: _Link | None = None
    waiters: int = 0


class _End:
    """Queue marker: no event will follow."""


_END: Final = _End()


def _settle(future: asyncio.Future[Sent], outcome: Sent | BaseException) -> None:
    """Resolve a send's future unless its caller already gave up on it."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class ResilientClient(Requests):
    """A session that reconnects and resumes by itself. Create it with `connect`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        policy: ReconnectPolicy,
        timeout: float,
        max_line_bytes: int,
        max_events: int,
        keep_events: bool,
        tls: ssl.SSLContext | None,
        server_hostname: str | None,
        token_store: TokenStore | None = None,
        transport: Transport = "tcp",
    ) -> None:
        self._host = host
        self._transport: Transport = transport
        self._port = port
        self._tls = tls  # one context for every link: each reconnect verifies alike
        self._server_hostname = server_hostname
        self._server = f"{host}:{port}"
        self._tokens: TokenStore = MemoryTokenStore() if token_store is None else token_store
        self._policy = policy
        self._timeout = timeout
        self._max_line_bytes = max_line_bytes
        self._max_events = max_events
        self._keep_events = keep_events
        self._loop = asyncio.get_running_loop()
        self._state = LinkState.CONNECTED
        self._state_changed = asyncio.Event()
        self._link: _Link  # set by _open_link before anything reads it
        self._links_opened = 0
        self._credentials: _Credentials | None = None
        # Where the session stands; kept across links.
        self.user: str | None = None
        self.device: str | None = None
        self.session: str | None = None
        self.worker: str | None = None
        self.resume_token: str | None = None
        self.last_seq = 0  # highest inbox seq handed out (or known to be our own message)
        self._own_seqs: set[int] = set()  # seqs of our sent messages beyond last_seq
        self._gap_resumed_at: int | None = None  # last_seq when a gap last made us resume
        self._acked = 0  # the server's acked position, as far as we know
        self._ack_wanted = 0  # highest seq the application acked
        self._outbox: dict[str, _OutgoingSend] = {}
        self._held: deque[Event] = deque()  # received, not yet in the queue (see _pump)
        self._events: asyncio.Queue[Event | _End] = asyncio.Queue()
        self._events_taken = asyncio.Event()
        self._retry_hint: float | None = None  # the next reconnect delay, if the server set it
        self._attempt = 0  # reconnect attempts since the last link that stayed up
        self.retry_budget = RetryBudget(policy.retry_budget_per_min, policy.retry_budget_burst)
        self._refused_for_load = False  # the last login was refused with a retry_after
        self._online_since = 0.0
        self._terminal_reason: str | None = None
        self._close_reason: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reconnects = self._resumes = self._fallback_logins = 0
        self._resent_sends = self._gaps = 0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        policy: ReconnectPolicy | None = None,
        timeout: float = 10.0,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_events: int = MAX_EVENTS,
        keep_events: bool = True,
        tls: bool | ssl.SSLContext = False,
        cafile: str | os.PathLike[str] | None = None,
        server_hostname: str | None = None,
        token_store: TokenStore | None = None,
        transport: Transport = "tcp",
    ) -> ResilientClient:
        """Open the first connection (`ConnectionLost`/`Timeout` if that fails).

        ``timeout`` bounds each connect, login and request other than `send`;
        ``keep_events=False`` discards events, and ``tls``, ``cafile`` and
        ``server_hostname`` are as for `Client.connect`: every reconnect (and its
        resume) goes over TLS, verified the same way. ``token_store`` keeps the
        device tokens (default: in memory, for this object's life). ``transport``
        (``"tcp"`` or ``"ws"``) is every link's, as for `Client.connect`.
        """
        self = cls(
            host,
            port,
            policy=policy or ReconnectPolicy(),
            timeout=timeout,
            max_line_bytes=max_line_bytes,
            max_events=max_events,
            keep_events=keep_events,
            tls=tls_context(cafile) if tls is True else tls or None,
            server_hostname=server_hostname,
            token_store=token_store,
            transport=transport,
        )
        await self._open_link()
        self._spawn(self._supervise(), "switchboard-client-supervisor")
        if self._policy.keepalive_s is not None:
            self._spawn(self._keepalive(self._policy.keepalive_s), "switchboard-client-keepalive")
        return self

    async def __aenter__(self) -> ResilientClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is LinkState.CLOSED

    @property
    def close_reason(self) -> str | None:
        """Why the session ended for good, or None while it goes on."""
        return self._close_reason

    @property
    def stats(self) -> ResilienceStats:
        return ResilienceStats(
            reconnects=self._reconnects,
            resumes=self._resumes,
            fallback_logins=self._fallback_logins,
            resent_sends=self._resent_sends,
            gaps=self._gaps,
        )

    # --- requests ------------------------------------------------------------------

    async def register(self, user: str, password: str) -> None:
        await self._call("register", "registered", {"user": user, "password": password})

    async def login(self, user: str, password: str, device: str) -> Welcome:
        """Log in (``hello``); the credentials are kept to log in again after a loss."""
        link, welcome = await self._first_login(lambda client: client.login(user, password, device))
        self._credentials = _Credentials(user, device, password)
        self._logged_in(link, welcome, by_password=True, after_loss=False)
        return welcome

    def device_token(self, user: str, device: str) -> str | None:
        """The stored device token of ``user`` on ``device`` for this server, if any."""
        return self._tokens.get(self._server, user, device)

    async def login_token(self, user: str, device: str, password: str | None = None) -> Welcome:
        """Log in with the stored device token (``login_token``); after a loss the client
        resumes, then uses the token again, then ``password`` if given.

        `ServerError` ``auth_failed`` (the token is deleted from the store) or
        `ClientError` when there is no stored token: log in with the password.
        """
        token = self.device_token(user, device)
        if token is None:
            raise ClientError(f"no device token for {user} on {device}: log in with a password")
        try:
            link, welcome = await self._first_login(
                lambda client: client.login_token(user, device, token)
            )
        except ServerError as exc:
            if exc.code == ErrorCode.AUTH_FAILED:
                self._tokens.delete(self._server, user, device)
            raise
        self._credentials = _Credentials(user, device, password)
        self._logged_in(link, welcome, by_password=True, after_loss=False)
        return welcome

    async def send(
        self,
        body: str,
        *,
        to: str | None = None,
        room: int | None = None,
        cmid: str | None = None,
        timeout: float | None = None,
    ) -> Sent:
        """Send a message and wait until it is durably committed, across reconnects.

        ``cmid`` defaults to a fresh uuid4 hex; a second call with the cmid of a send
        still in flight waits for the same reply. Raises `ServerError` on a permanent
        error, `Timeout` after ``timeout`` (default ``send_timeout_s``), and
        `ConnectionLost` when the session ends for good.
        """
        exactly_one("send", to, room)
        cmid = new_cmid() if cmid is None else cmid
        limit = self._policy.send_timeout_s if timeout is None else timeout
        out = self._outbox.get(cmid)
        if out is None:
            if self._close_reason is not None:
                raise ConnectionLost(self._close_reason)
            fields = {"cmid": cmid, "body": body, "to": to, "room": room}
            future: asyncio.Future[Sent] = self._loop.create_future()
            out = _OutgoingSend(cmid, fields, future, self._loop.time() + limit)
            self._outbox[cmid] = out
            if self._state is LinkState.ONLINE:
                self._start_send(self._link, out)
            # Otherwise the next login writes it.
        out.waiters += 1
        try:
            async with asyncio.timeout(limit):
                return await asyncio.shield(out.future)
        except TimeoutError:
            raise Timeout(f"send cmid={cmid!r}: no 'sent' within {limit:g} s") from None
        finally:
            out.waiters -= 1
            if out.waiters == 0:
                if self._outbox.get(cmid) is out:
                    del self._outbox[cmid]
                if not out.future.done():
                    out.future.cancel()

    async def ack(self, seq: int) -> None:
        """Inbox processed up to ``seq``; never moves the acked position backwards.

        Returns at once if ``seq`` is already acked; otherwise it acks the highest seq
        asked so far and waits for the server, across reconnects, up to ``timeout``.
        """
        if seq <= self._acked:
            return
        self._ack_wanted = max(self._ack_wanted, seq)
        deadline = self._loop.time() + self._timeout
        while seq > self._acked:
            link = await self._usable_link(deadline)
            wanted = self._ack_wanted
            try:
                await link.client._request(
                    "ack", "ok", {"seq": wanted}, timeout=self._remaining(deadline)
                )
            except ConnectionLost:
                continue  # acked again on the next link
            self._acked = max(self._acked, wanted)

    async def change_password(self, old: str, new: str) -> None:
        """Change the password; the new one is what a fallback login then uses."""
        await self._call("password", "ok", {"old": old, "new": new})
        if self._credentials is not None:
            self._credentials = replace(self._credentials, password=new)

    async def close(self) -> None:
        """Stop reconnecting, say ``bye`` on a live link and close it. Idempotent.

        Sends still waiting fail with `ConnectionLost`; the event stream ends.
        """
        self._finish(CLOSED_BY_APP)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._link.client.close()

    async def _call(self, op: str, expect: str, fields: dict[str, Any]) -> Frame:
        """One request on the current link, waiting for one within ``timeout``.

        If the link is lost meanwhile, a read-only request is sent again on the next
        one; any other raises `ConnectionLost` (it may or may not have taken effect).
        ``overloaded`` (not carried out) is retried as `_wait_to_retry` says.
        """
        deadline = self._loop.time() + self._timeout
        attempt = 0
        while True:
            link = await self._usable_link(deadline)
            try:
                return await link.client._request(
                    op, expect, fields, timeout=self._remaining(deadline)
                )
            except ConnectionLost:
                if op not in READ_ONLY_OPS or self.closed:
                    raise
            except ServerError as exc:
                await self._wait_to_retry(exc, attempt, deadline)
                attempt += 1

    async def _first_login(
        self, log_in: Callable[[Client], Awaitable[Welcome]]
    ) -> tuple[_Link, Welcome]:
        """``log_in`` on the current link, again after ``overloaded`` (`_wait_to_retry`)."""
        deadline = self._loop.time() + self._timeout
        attempt = 0
        while True:
            link = await self._usable_link(deadline)
            try:
                return link, await log_in(link.client)
            except ServerError as exc:
                await self._wait_to_retry(exc, attempt, deadline)
                attempt += 1

    async def _wait_to_retry(self, exc: ServerError, attempt: int, deadline: float) -> None:
        """Wait before repeating a request answered ``overloaded``, or raise ``exc``:
        for any other error, or when the wait would end past ``deadline``."""
        if exc.code != ErrorCode.OVERLOADED:
            raise exc
        delay = self._retry_wait(exc, attempt)
        if self._loop.time() + delay > deadline:
            raise exc
        log.info("%s; again in %.2f s", exc, delay)
        await asyncio.sleep(delay)

    def _retry_wait(self, exc: ServerError, attempt: int) -> float:
        """The wait before retry number ``attempt`` (0 for the first): the policy's,
        or ``max_retry_after_s`` when the server gave a retry_after and the retry
        budget is spent."""
        if exc.retry_after is not None and not self.retry_budget.take():
            return self._policy.max_retry_after_s
        return self._policy.retry_delay(exc, attempt)

    async def _usable_link(self, deadline: float) -> _Link:
        """The current link once it is up (logged in, if the session is)."""
        while True:
            if self._close_reason is not None:
                raise ConnectionLost(self._close_reason)
            link = self._link
            if self._state is not LinkState.CONNECTING and not link.client.closed:
                return link
            # A dead link that is still current is replaced soon: wait for that.
            changed = self._state_changed
            try:
                async with asyncio.timeout(self._remaining(deadline)):
                    await changed.wait()
            except TimeoutError:
                raise Timeout(f"not reconnected to {self._host}:{self._port} in time") from None

    def _remaining(self, deadline: float) -> float:
        return max(deadline - self._loop.time(), 0.0)

    # --- sends ---------------------------------------------------------------------

    def _start_send(self, link: _Link, out: _OutgoingSend) -> None:
        if out.link is not None and out.link is not link:
            self._resent_sends += 1
            log.info("resending cmid=%s on a new connection", out.cmid)
        out.link = link
        self._spawn(self._send_on(link, out), f"switchboard-send-{out.cmid}")

    async def _send_on(self, link: _Link, out: _OutgoingSend) -> None:
        """Write ``out`` on ``link`` until it is answered, or until the link is lost."""
        attempt = 0
        while not out.future.done() and out.link is link and link is self._link:
            try:
                sent = await self._send_once(link, out)
            except ServerError as exc:
                if not exc.retryable:
                    _settle(out.future, exc)
                    return
                delay = self._retry_wait(exc, attempt)
                attempt += 1
                log.info("send cmid=%s: %s; again in %.2f s", out.cmid, exc, delay)
                await asyncio.sleep(delay)
                continue
            except ProtocolError as exc:
                _settle(out.future, exc)
                return
            except (ConnectionLost, Timeout):
                return  # written again after the next login, or `send` gave up
            _settle(out.future, sent)
            return

    async def _send_once(self, link: _Link, out: _OutgoingSend) -> Sent:
        link.sends_in_flight += 1
        try:
            reply = await link.client._request(
                "send", "sent", out.fields, timeout=self._remaining(out.deadline)
            )
            sent = read_reply(Sent, reply)
            if sent.seq is not None and sent.seq > self.last_seq:
                self._own_seqs.add(sent.seq)  # the server never delivers it to this device
            return sent
        finally:
            link.sends_in_flight -= 1
            if link is self._link and not link.client.closed:
                self._pump_or_drop(link)  # a gap may have waited for this reply

    # --- events --------------------------------------------------------------------

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event; `Timeout` after ``timeout`` s, `ConnectionLost` once they ended."""
        if not self._keep_events:
            raise ClientError("this client was connected with keep_events=False")
        try:
            async with asyncio.timeout(timeout):
                item = await self._events.get()
        except TimeoutError:
            raise Timeout(f"no event within {timeout:g} s") from None
        self._events_taken.set()
        if isinstance(item, _End):
            self._events.put_nowait(item)  # so every later call (or other reader) ends too
            raise ConnectionLost(self._close_reason or "connection closed")
        return item

    def _on_link_event(self, number: int, event: Event) -> str | None:
        """A link's reader hands over one event; a returned reason drops that link."""
        link = self._link
        if link.number != number or link.client.closed or self.closed:
            return None  # a late frame of a link given up
        if isinstance(event, ErrorEvent) and event.code in TERMINAL_CODES:
            self._terminal_reason = f"{event.code}: {event.message}"
        if len(self._held) >= self._max_events:
            return f"more than {self._max_events} events were held back"
        self._held.append(event)
        reason = self._pump()
        if isinstance(event, Reconnect):
            self._retry_hint = max(event.after_ms, 0) / 1000
            reason = reason or f"the server asked to reconnect in {event.after_ms} ms"
        return reason

    def _pump(self) -> str | None:
        """Move held events to the queue, inbox entries in seq order; why to drop the link.

        Inbox entries wait while the link is not logged in (a replay may arrive before
        the welcome is handled) and, at a gap, while sends are unanswered.
        """
        link = self._link
        while self._held:
            self._skip_own_seqs()
            event = self._held[0]
            if isinstance(event, Msg | Receipt):
                if not link.authenticated:
                    return None
                if event.seq <= self.last_seq:
                    self._held.popleft()  # delivered again (at least once)
                    continue
                if event.seq != self.last_seq + 1:
                    if link.sends_in_flight:
                        return None  # a `sent` may name the missing seqs as ours
                    if self._gap_resumed_at != self.last_seq:
                        self._gaps += 1
                        self._gap_resumed_at = self.last_seq
                        return f"inbox gap: expected seq {self.last_seq + 1}, got {event.seq}"
                    log.info(
                        "seqs %d..%d skipped again after resuming: taken as skipped on purpose",
                        self.last_seq + 1,
                        event.seq - 1,
                    )
                    self._own_seqs = {seq for seq in self._own_seqs if seq > event.seq}
            if self._keep_events and self._events.qsize() >= self._max_events:
                return f"more than {self._max_events} events were not consumed"
            self._held.popleft()
            if isinstance(event, Msg | Receipt):
                self.last_seq = event.seq
            self._put(event)
        self._skip_own_seqs()
        return None

    def _pump_or_drop(self, link: _Link) -> None:
        reason = self._pump()
        if reason is not None:
            link.client.abort(reason)

    def _skip_own_seqs(self) -> None:
        while self.last_seq + 1 in self._own_seqs:
            self.last_seq += 1
            self._own_seqs.discard(self.last_seq)

    def _put(self, event: Event | _End) -> None:
        if self._keep_events or isinstance(event, _End):
            self._events.put_nowait(event)

    # --- the session's lifecycle -----------------------------------------------------

    def _set_state(self, state: LinkState, why: str) -> None:
        """The one place the state changes; every change is logged."""
        if state is self._state:
            return
        log.info("switchboard client %s -> %s: %s", self._state.value, state.value, why)
        self._state = state
        self._state_changed.set()
        self._state_changed = asyncio.Event()

    async def _open_link(self) -> _Link:
        number = self._links_opened + 1
        client = await Client.connect(
            self._host,
            self._port,
            timeout=self._timeout,
            max_line_bytes=self._max_line_bytes,
            on_event=functools.partial(self._on_link_event, number),
            tls=self._tls or False,
            server_hostname=self._server_hostname,
            transport=self._transport,
            tcp_keepalive_s=self._policy.tcp_keepalive_s,
        )
        # No await since connect: the new link's reader has not run yet.
        self._links_opened = number
        self._link = _Link(number, client)
        self._held.clear()
        return self._link

    def _logged_in(
        self, link: _Link, welcome: Welcome, *, by_password: bool, after_loss: bool
    ) -> None:
        """``welcome`` arrived on ``link``: go ONLINE, then release what waited for it."""
        if welcome.device_token is not None:  # rotated: the one presented is on its way out
            self._tokens.put(self._server, welcome.user, welcome.device, welcome.device_token)
        self.user, self.device = welcome.user, welcome.device
        self.session, self.worker = welcome.session, welcome.worker
        self.resume_token = welcome.resume_token
        if by_password and welcome.acked > self.last_seq:
            # hello replays after the device's acked position: nothing below comes again.
            self.last_seq = welcome.acked
        self._acked = max(self._acked, welcome.acked)
        if link is not self._link or link.client.closed or self.closed:
            if self._state is LinkState.CONNECTED and link is not self._link:
                # The login raced a reconnect: log the new link in too.
                self._link.client.abort("logged in on a connection lost meanwhile")
            return
        link.authenticated = True
        how = "logged in" if by_password else "resumed"
        self._set_state(LinkState.ONLINE, f"{how} on worker {welcome.worker}")
        self._online_since = self._loop.time()
        if after_loss:
            self._put(Resumed(welcome.worker, self.last_seq, by_password))
        self._pump_or_drop(link)
        if link.client.closed:
            return
        if self._ack_wanted > self._acked:
            self._spawn(self._reapply_ack(link), "switchboard-client-reack")
        for out in list(self._outbox.values()):
            if not out.future.done():
                self._start_send(link, out)

    async def _reapply_ack(self, link: _Link) -> None:
        wanted = self._ack_wanted
        try:
            await link.client._request("ack", "ok", {"seq": wanted}, timeout=self._timeout)
        except ClientError as exc:
            log.info("re-ack of seq %d: %s", wanted, exc)  # the next ack or resume tries again
        else:
            self._acked = max(self._acked, wanted)

    async def _supervise(self) -> None:
        """Watch the current link; when it is lost, get a new one (or end the session)."""
        try:
            while True:
                link = self._link
                await link.client.wait_closed()
                if self.closed:
                    return
                reason = link.client.close_reason or "the connection closed"
                await link.client.close()  # releases the socket; no bye on a dead link
                if self._terminal_reason is not None:
                    self._finish(self._terminal_reason)
                    return
                self._lost(reason)
                if not await self._reconnect():
                    return
        except Exception:  # a bug here must end the session, not leave it hanging
            log.exception("switchboard client supervisor failed")
            self._finish("the client's reconnect logic failed")

    def _lost(self, reason: str) -> None:
        if self._loop.time() - self._online_since >= self._policy.backoff_cap_s:
            self._attempt = 0  # that link stayed up a while: back off from the start
        self._set_state(LinkState.CONNECTING, reason)
        # Inbox entries still held come again after resuming; the rest is passed on.
        for event in self._held:
            if not isinstance(event, Msg | Receipt):
                self._put(event)
        self._held.clear()
        self._put(Disconnected(reason))

    async def _reconnect(self) -> bool:
        """Connect and log in again until it works; False when the session is over."""
        while True:
            if self._retry_hint is not None:
                delay, self._retry_hint = self._retry_hint, None
            else:
                delay = self._policy.backoff(self._attempt)
            if self._refused_for_load and not self.retry_budget.take():
                delay = max(delay, self._policy.max_retry_after_s)  # the budget is spent
            self._refused_for_load = False
            self._attempt += 1
            log.info("reconnecting to %s:%d in %.3f s", self._host, self._port, delay)
            await asyncio.sleep(delay)
            await self._wait_for_event_room()
            try:
                link = await self._open_link()
            except ClientError as exc:
                log.info("reconnect failed: %s", exc)
                continue
            self._reconnects += 1
            if self._credentials is None:
                self._set_state(LinkState.CONNECTED, "reconnected; not logged in yet")
                return True
            try:
                welcome, by_password = await self._log_in_again(link, self._credentials)
            except ServerError as exc:
                await self._drop(link, f"login refused: {exc}")
                if not exc.retryable:
                    self._finish(f"cannot log in again: {exc}")
                    return False
                if exc.retry_after is not None:
                    self._retry_hint = self._policy.retry_delay(exc, self._attempt)
                    self._refused_for_load = True
                continue
            except ClientError as exc:
                await self._drop(link, f"login failed: {exc}")
                if self._terminal_reason is not None:
                    self._finish(self._terminal_reason)
                    return False
                continue
            self._logged_in(link, welcome, by_password=by_password, after_loss=True)
            return True

    async def _log_in_again(self, link: _Link, creds: _Credentials) -> tuple[Welcome, bool]:
        """``resume`` with the resume token, else ``login_token`` with the device token,
        else ``hello``; (welcome, whether it was a fresh login rather than a resume)."""
        if self.resume_token is not None:
            try:
                welcome = await link.client.resume(
                    creds.user, creds.device, self.resume_token, self.last_seq
                )
            except ServerError as exc:
                if exc.code != ErrorCode.BAD_TOKEN:
                    raise
                log.info("resume token refused; logging in with the device token")
                self.resume_token = None
            else:
                self._resumes += 1
                return welcome, False
        token = self._tokens.get(self._server, creds.user, creds.device)
        if token is not None:
            try:
                welcome = await link.client.login_token(creds.user, creds.device, token)
            except ServerError as exc:
                if exc.code != ErrorCode.AUTH_FAILED or creds.password is None:
                    if exc.code == ErrorCode.AUTH_FAILED:
                        self._tokens.delete(self._server, creds.user, creds.device)
                    raise
                log.info("device token refused; logging in with the password")
                self._tokens.delete(self._server, creds.user, creds.device)
            else:
                self._fallback_logins += 1
                return welcome, True
        if creds.password is None:
            raise ServerError(ErrorCode.AUTH_FAILED, "device token refused and no password")
        welcome = await link.client.login(creds.user, creds.password, creds.device)
        self._fallback_logins += 1
        return welcome, True

    async def _drop(self, link: _Link, reason: str) -> None:
        link.client.abort(reason)
        await link.client.close()

    async def _wait_for_event_room(self) -> None:
        # After an overflow, reconnecting before the application catches up would
        # only overflow again.
        while self._keep_events and self._events.qsize() > self._max_events // 2:
            self._events_taken.clear()
            await self._events_taken.wait()

    async def _keepalive(self, interval: float) -> None:
        while not self.closed:
            await asyncio.sleep(interval)
            link = self._link
            if self._state is not LinkState.ONLINE or link.client.closed:
                continue
            try:
                await link.client._request("ping", "pong", {}, timeout=interval)
            except Timeout:
                link.client.abort(f"no pong within {interval:g} s")
            except ClientError:
                pass  # lost anyway, or a refusal: either way the link answered

    def _finish(self, reason: str) -> None:
        """End the session for good: fail what waits, end the event stream."""
        if self.closed:
            return
        self._close_reason = reason
        self._set_state(LinkState.CLOSED, reason)
        for out in self._outbox.values():
            _settle(out.future, ConnectionLost(reason))
        if reason != CLOSED_BY_APP:
            for event in self._held:
                if not isinstance(event, Msg | Receipt):
                    self._put(event)
            self._put(ServerClosed(reason))
            self._link.client.abort(reason)
        self._held.clear()
        self._put(_END)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
