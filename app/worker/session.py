"""Session logic: turns decoded requests into store calls and reply frames.

The lifecycle of a client connection lives here, in one place:

    CONNECTED --hello/resume--> AUTHENTICATED --bye/close/replaced--> CLOSED

Requests other than hello, register, resume, ping and bye are refused until
the connection is AUTHENTICATED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import asyncpg

from app.logs import get_logger
from app.protocol import (
    PRE_AUTH_OPS,
    PROTOCOL_VERSION,
    Bye,
    ErrorCode,
    Hello,
    Ping,
    Register,
    Request,
    encode,
)
from app.store import accounts
from app.store import sessions as session_store
from app.store.errors import UserExists

if TYPE_CHECKING:
    from app.worker.connection import ClientConnection
    from app.worker.server import Worker

log = get_logger("session")


class SessionState(Enum):
    CONNECTED = "connected"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


@dataclass(slots=True)
class Session:
    """What an authenticated connection knows about its user; all of it is also in the DB."""

    session_id: int
    user_id: int
    username: str
    device: str
    epoch: int
    state: SessionState = SessionState.AUTHENTICATED


class RequestError(Exception):
    """A request failed with a documented code; the message is safe for the peer."""

    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


Handler = Callable[["ClientConnection", Any], Awaitable[None]]


class SessionLogic:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings = worker.settings
        self._handlers: dict[type, Handler] = {
            Hello: self.hello,
            Register: self.register,
            Ping: self.ping,
            Bye: self.bye,
        }

    async def handle(self, conn: ClientConnection, req: Request) -> None:
        handler = self._handlers.get(type(req))
        rid = req.rid
        try:
            if conn.session is None and type(req) not in PRE_AUTH_OPS:
                raise RequestError(ErrorCode.NOT_AUTHENTICATED, "log in first (op hello)")
            if handler is None:
                raise RequestError(ErrorCode.UNKNOWN_OP, f"op {req.op!r} is not supported yet")
            await handler(conn, req)
        except RequestError as exc:
            conn.write(_error(exc.code, exc.message, rid, **exc.extra))
            if exc.code.fatal:
                conn.close()
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("request_failed", op=req.op, error=type(exc).__name__)
            conn.write(_error(ErrorCode.INTERNAL, "temporary server error, retry", rid))

    # ---- accounts ----------------------------------------------------------
    async def register(self, conn: ClientConnection, req: Register) -> None:
        if conn.session is not None:
            raise RequestError(ErrorCode.ALREADY_AUTHENTICATED, "already logged in")
        if len(req.password) < self.settings.min_password_chars:
            raise RequestError(
                ErrorCode.WEAK_PASSWORD,
                f"password must have at least {self.settings.min_password_chars} characters",
            )
        async with self.worker.auth_slot():
            password_hash = await self.worker.passwords.hash(req.password)
            try:
                await accounts.create_user(self.worker.pool, req.user, password_hash)
            except UserExists:
                raise RequestError(ErrorCode.USER_EXISTS, "that username is taken") from None
        log.info("user_registered", user=req.user)
        conn.write(encode({"op": "registered", "user": req.user, **_rid(req.rid)}))

    async def hello(self, conn: ClientConnection, req: Hello) -> None:
        if conn.session is not None:
            raise RequestError(ErrorCode.ALREADY_AUTHENTICATED, "already logged in")
        if req.v != PROTOCOL_VERSION:
            raise RequestError(
                ErrorCode.UNSUPPORTED_VERSION, f"this server speaks v{PROTOCOL_VERSION}"
            )
        pool = self.worker.pool
        addr = conn.peer.rsplit(":", 1)[0]
        keys = [f"user:{req.user}", f"addr:{addr}"]
        s = self.settings
        async with self.worker.auth_slot():
            counts = await accounts.failure_counts(pool, keys, s.login_failure_window_s)
            if (
                counts[keys[0]] >= s.max_login_failures_per_user
                or counts[keys[1]] >= s.max_login_failures_per_addr
            ):
                raise RequestError(
                    ErrorCode.RATE_LIMITED,
                    "too many failed logins; wait before trying again",
                    retry_after=int(s.login_failure_window_s),
                )
            account = await accounts.find_user(pool, req.user)
            ok = await self.worker.passwords.verify(
                account.password_hash if account else None, req.password
            )
            if not ok or account is None:
                await accounts.record_failure(pool, keys, s.login_failure_window_s)
                log.info("login_failed", user=req.user, addr=addr)
                raise RequestError(ErrorCode.AUTH_FAILED, "wrong username or password")
            if account.disabled:
                raise RequestError(ErrorCode.ACCOUNT_DISABLED, "this account is disabled")
            if counts[keys[0]]:
                await accounts.clear_failures(pool, keys[0])
        opened = await session_store.open_session(
            pool, account.id, req.device, self.worker.worker_id, conn.peer
        )
        session = Session(opened.session_id, account.id, account.username, req.device, opened.epoch)
        conn.session = session
        self.worker.session_attached(conn)
        log.info(
            "session_opened", user=account.username, device=req.device, session=session.session_id
        )
        conn.write(
            encode(
                {
                    "op": "welcome",
                    "v": PROTOCOL_VERSION,
                    "user": account.username,
                    "device": req.device,
                    "session": session.session_id,
                    "worker": self.worker.worker_id,
                    **_rid(req.rid),
                }
            )
        )

    # ---- misc --------------------------------------------------------------
    async def ping(self, conn: ClientConnection, req: Ping) -> None:
        conn.write(encode({"op": "pong", **_rid(req.rid)}))

    async def bye(self, conn: ClientConnection, req: Bye) -> None:
        conn.write(encode({"op": "ok", **_rid(req.rid)}))
        await self.end_session(conn, "bye")
        conn.close()

    async def end_session(self, conn: ClientConnection, reason: str) -> None:
        session = conn.session
        if session is None or session.state is SessionState.CLOSED:
            return
        session.state = SessionState.CLOSED
        self.worker.session_detached(conn)
        await session_store.close_session(self.worker.pool, session.session_id, reason)
        log.info("session_closed", user=session.username, device=session.device, reason=reason)


def _rid(rid: str | int | None) -> dict[str, str | int]:
    return {} if rid is None else {"rid": rid}


def _error(code: ErrorCode, message: str, rid: str | int | None, **extra: Any) -> bytes:
    from app.protocol import error_frame

    return error_frame(code, message, rid, **extra)
