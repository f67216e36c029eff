"""Session logic: turns decoded requests into store calls and reply frames.

The lifecycle of a client connection lives here, in one place:

    CONNECTED --hello/resume--> AUTHENTICATED --bye/close/replaced--> CLOSED

Requests other than hello, register, resume, ping and bye are refused until
the connection is AUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any

from app.logs import get_logger
from app.protocol import (
    PRE_AUTH_OPS,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    ContactAccept,
    ContactAdd,
    ContactList,
    ContactRemove,
    ErrorCode,
    Hello,
    History,
    PasswordChange,
    Ping,
    Read,
    Register,
    Request,
    Resume,
    RoomCreate,
    RoomInvite,
    RoomJoin,
    RoomLeave,
    RoomList,
    RoomMembers,
    Send,
    SetPresence,
    Typing,
    encode,
)
from app.store import accounts, social
from app.store import messages as message_store
from app.store import sessions as session_store
from app.store.errors import (
    DB_ERRORS,
    TRANSIENT_DB_ERRORS,
    Forbidden,
    NotFound,
    StoreUnavailable,
    UserExists,
)
from app.store.messages import AckRequest, NewMessage, ReadRequest, Stored
from app.store.sessions import ResumeRequest
from app.worker import metrics
from app.worker.delivery import rfc3339

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
    # Highest inbox seq written to this connection (or known to the client).
    delivered_seq: int = 0
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
            Resume: self.resume,
            Ping: self.ping,
            Bye: self.bye,
            Send: self.send,
            Ack: self.ack,
            SetPresence: self.set_presence,
            ContactAdd: self.contact_add,
            ContactAccept: self.contact_accept,
            ContactRemove: self.contact_remove,
            ContactList: self.contact_list,
            RoomCreate: self.room_create,
            RoomInvite: self.room_invite,
            RoomJoin: self.room_join,
            RoomLeave: self.room_leave,
            RoomMembers: self.room_members,
            RoomList: self.room_list,
            History: self.history,
            Typing: self.typing,
            Read: self.read,
            PasswordChange: self.change_password,
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
        except NotFound as exc:
            conn.write(_error(ErrorCode.NOT_FOUND, str(exc), rid))
        except Forbidden as exc:
            conn.write(_error(ErrorCode.FORBIDDEN, str(exc), rid))
        except StoreUnavailable:
            conn.write(_error(ErrorCode.INTERNAL, "the database is unavailable; retry", rid))
        except TRANSIENT_DB_ERRORS as exc:
            # Before the catch-all: a connection cut or a failover is not a bug (an
            # error in a statement still is, and is logged with its traceback below).
            log.warning("request_failed", op=req.op, error=type(exc).__name__)
            conn.write(_error(ErrorCode.INTERNAL, "temporary server error, retry", rid))
        except Exception:
            # A bug must cost one request, never the worker or the connection's order.
            log.exception("request_crashed", op=req.op)
            conn.write(_error(ErrorCode.INTERNAL, "internal server error", rid))

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
                metrics.LOGINS.labels("failed").inc()
                raise RequestError(ErrorCode.AUTH_FAILED, "wrong username or password")
            if account.disabled:
                raise RequestError(ErrorCode.ACCOUNT_DISABLED, "this account is disabled")
            if counts[keys[0]]:
                await accounts.clear_failures(pool, keys[0])
        token = secrets.token_urlsafe(24)  # 192 random bits; only its hash is stored
        opened = await session_store.open_session(
            pool, account.id, req.device, self.worker.worker_id, conn.peer, token_hash(token)
        )
        events = self.worker.events
        if opened.replaced_session_id is not None:  # logged first: never two at once
            events.session_replaced(
                account.id, opened.replaced_session_id, opened.epoch - 1, opened.replaced_worker_id
            )
        events.session_opened(account.id, opened.session_id, opened.epoch)
        last_seq, acked = await message_store.inbox_position(pool, account.id, req.device)
        session = Session(
            opened.session_id, account.id, account.username, req.device, opened.epoch, acked
        )
        log.info(
            "session_opened", user=account.username, device=req.device, session=session.session_id
        )
        metrics.LOGINS.labels("ok").inc()
        await self._attach(conn, session, token, last_seq, acked, req.rid)
        if opened.replaced_session_id is not None:
            self.worker.delivery.replace_session(account.id, opened.replaced_session_id, None)

    async def resume(self, conn: ClientConnection, req: Resume) -> None:
        """Take over a session on this worker with its resume token: no password hash needed."""
        if conn.session is not None:
            raise RequestError(ErrorCode.ALREADY_AUTHENTICATED, "already logged in")
        pool = self.worker.pool
        bad = RequestError(
            ErrorCode.BAD_TOKEN, "unknown or expired resume token; log in with hello"
        )
        async with self.worker.auth_slot(resume=True):
            token = secrets.token_urlsafe(24)  # rotated at every takeover
            resumed = await self.worker.take_over(
                ResumeRequest(
                    req.user, req.device, token_hash(req.token), token_hash(token), conn.peer
                )
            )
        if resumed is None:
            account = await accounts.find_user(pool, req.user)
            if account is not None and account.disabled:
                raise RequestError(ErrorCode.ACCOUNT_DISABLED, "this account is disabled")
            raise bad
        last_seq, acked = resumed.last_seq, resumed.acked or 0
        session = Session(
            resumed.session_id,
            resumed.user_id,
            req.user,
            req.device,
            resumed.epoch,
            min(req.last_seq, last_seq),
        )
        log.info(
            "session_resumed",
            user=req.user,
            device=req.device,
            session=session.session_id,
            previous_worker=resumed.previous_worker_id,
            previous_state=resumed.previous_state,
            last_seq=req.last_seq,
        )
        self.worker.resumes += 1
        self.worker.events.session_resumed(
            resumed.user_id,
            resumed.session_id,
            resumed.epoch,
            resumed.previous_worker_id,
            resumed.previous_state,
        )
        await self._attach(conn, session, token, last_seq, acked, req.rid, resumed.has_contacts)
        if resumed.previous_state == "active":
            # Its previous owner may still hold a connection: the new epoch fences it out.
            self.worker.delivery.replace_session(resumed.user_id, resumed.session_id, resumed.epoch)

    async def _attach(
        self,
        conn: ClientConnection,
        session: Session,
        token: str,
        last_seq: int,
        acked: int,
        rid: object,
        has_contacts: bool = True,
    ) -> None:
        """Send welcome, then the replay after ``session.delivered_seq``, then live entries."""
        conn.session = session
        frame = {
            "op": "welcome",
            "v": PROTOCOL_VERSION,
            "user": session.username,
            "device": session.device,
            "session": str(session.session_id),
            "worker": self.worker.worker_id,
            "resume_token": token,
            "seq": last_seq,
            "acked": acked,
        }
        if rid is not None:
            frame["rid"] = rid
        conn.write(encode(frame))
        self.worker.session_attached(conn)
        self.worker.delivery.mark_dirty([session.user_id])
        if has_contacts:  # nobody to tell otherwise: spare the query in a resume storm
            await self.broadcast_presence(session.user_id)

    # ---- misc --------------------------------------------------------------
    async def ping(self, conn: ClientConnection, req: Ping) -> None:
        conn.write(encode({"op": "pong", **_rid(req.rid)}))

    async def bye(self, conn: ClientConnection, req: Bye) -> None:
        conn.write(_ok(req.rid))
        await self.end_session(conn, "bye", resumable=False)
        conn.close()

    async def end_session(self, conn: ClientConnection, reason: str, resumable: bool) -> None:
        """The connection ends: a dropped one stays resumable (detached), ``bye`` closes it.

        Both writes are fenced by the epoch: a session another worker has taken
        over is left alone.
        """
        session = conn.session
        if session is None or session.state is SessionState.CLOSED:
            return
        session.state = SessionState.CLOSED
        self.worker.session_detached(conn)
        pool = self.worker.pool
        if resumable:
            changed = await session_store.detach_session(
                pool, session.session_id, session.epoch, reason
            )
        else:
            changed = await session_store.close_session(
                pool, session.session_id, session.epoch, reason
            )
        log.info(
            "session_detached" if resumable else "session_closed",
            user=session.username,
            device=session.device,
            reason=reason,
            fenced=not changed,
        )
        if changed:
            self.worker.events.session_ended(
                session.user_id, session.session_id, session.epoch, reason, resumable
            )
            await self.broadcast_presence(session.user_id)

    async def broadcast_presence(self, user_id: int) -> None:
        """Tell every accepted contact, on any worker, this user's effective presence."""
        pool = self.worker.pool
        contacts = await social.accepted_contact_ids(pool, user_id)
        if contacts:
            view = await social.presence_of(pool, user_id)
            await self.worker.delivery.push(
                contacts,
                {"op": "presence", "user": view.username, "state": view.state, "text": view.text},
            )

    # ---- messages ----------------------------------------------------------
    async def _user_id(self, username: str) -> int:
        return await self.worker.user_id(username)

    async def send(self, conn: ClientConnection, req: Send) -> None:
        """Queue the message for the next group commit and return at once.

        Sends pipelined on one connection join the same batches; the `sent`
        reply is written when the batch commits (`_sent`). A connection may have
        ``max_inflight_sends`` uncommitted sends; past that, it reads no further
        requests until the oldest commits.
        """
        session = _session(conn)
        recipient_id = await self._user_id(req.to) if req.to is not None else None
        await conn.send_slot()
        self._queue_send(conn, req, session, recipient_id)

    def send_now(self, conn: ClientConnection, req: Send) -> bool:
        """The common case without a task: logged in, recipient's id cached, a free
        slot. False: nothing was done, `send` (awaiting what is missing) must run."""
        session = conn.session
        if session is None or conn.inflight_sends >= self.settings.max_inflight_sends:
            return False
        recipient_id = None
        if req.to is not None:
            recipient_id = self.worker.cached_user_id(req.to)
            if recipient_id is None:
                return False
        self._queue_send(conn, req, session, recipient_id)
        return True

    def _queue_send(
        self, conn: ClientConnection, req: Send, session: Session, recipient_id: int | None
    ) -> None:
        message = NewMessage(
            session.user_id, session.device, req.cmid, recipient_id, req.room, req.body
        )
        conn.inflight_sends += 1
        self.worker.writer.send(message, partial(self._sent, conn, req))

    def _sent(self, conn: ClientConnection, req: Send, result: Stored | Exception | None) -> None:
        conn.send_done()
        if isinstance(result, Stored):
            frame: dict[str, Any] = {
                "op": "sent",
                "cmid": req.cmid,
                "id": result.id,
                "ts": rfc3339(result.created_at),
            }
            if result.sender_seq is not None:
                frame["seq"] = result.sender_seq
            if req.rid is not None:
                frame["rid"] = req.rid
            conn.write(encode(frame))
        elif isinstance(result, Exception):
            conn.write(_error(ErrorCode.INTERNAL, "the database is unavailable; retry", req.rid))
        else:
            task = asyncio.get_running_loop().create_task(self._refused(conn, req))
            self.worker.keep(task)

    async def _refused(self, conn: ClientConnection, req: Send) -> None:
        """The store refused a room message: say why (no such room, or not a member)."""
        user_id = conn.session.user_id if conn.session is not None else 0
        try:
            await social.require_member(self.worker.pool, req.room or 0, user_id)
            conn.write(_error(ErrorCode.FORBIDDEN, "you are not a member of that room", req.rid))
        except NotFound as exc:
            conn.write(_error(ErrorCode.NOT_FOUND, str(exc), req.rid))
        except Forbidden as exc:
            conn.write(_error(ErrorCode.FORBIDDEN, str(exc), req.rid))
        except DB_ERRORS as exc:
            log.warning("request_failed", op=req.op, error=type(exc).__name__)
            conn.write(_error(ErrorCode.INTERNAL, "temporary server error, retry", req.rid))

    async def ack(self, conn: ClientConnection, req: Ack) -> None:
        session = _session(conn)
        acked = await self.worker.ack(AckRequest(session.user_id, session.device, req.seq))
        conn.write(_ok(req.rid))
        self.worker.events.acked(session.user_id, session.session_id, session.epoch, acked)

    async def read(self, conn: ClientConnection, req: Read) -> None:
        session = _session(conn)
        result = await self.worker.read(ReadRequest(session.user_id, req.msg_id))
        if result is None:
            raise NotFound("no such message")
        if isinstance(result, tuple):
            author, seq = result
            self.worker.delivery.inbox_moved({author: seq})
        conn.write(_ok(req.rid))

    async def history(self, conn: ClientConnection, req: History) -> None:
        session = _session(conn)
        pool = self.worker.pool
        other_id = None
        if req.with_user is not None:
            other_id = await self._user_id(req.with_user)
        else:
            await social.require_member(pool, req.room or 0, session.user_id)
        rows = await message_store.conversation(
            pool,
            session.user_id,
            other_id=other_id,
            room_id=req.room,
            before=req.before,
            limit=req.limit,
        )
        page = rows[: req.limit]
        items = []
        for row in page:
            item: dict[str, Any] = {"id": row.id, "from": row.sender}
            if row.room_id is not None:
                item["room"] = row.room_id
            else:
                item["to"] = row.recipient
            item.update(body=row.body, ts=rfc3339(row.created_at), cmid=row.cmid)
            items.append(item)
        conn.write(
            encode(
                {"op": "history", "messages": items, "more": len(rows) > req.limit, **_rid(req.rid)}
            )
        )

    async def typing(self, conn: ClientConnection, req: Typing) -> None:
        session = _session(conn)
        frame: dict[str, Any] = {"op": "typing", "from": session.username, "active": req.active}
        if req.to is not None:
            targets = [await self._user_id(req.to)]
            frame["to"] = req.to
        else:
            room = req.room or 0
            await social.require_member(self.worker.pool, room, session.user_id)
            targets = [
                u
                for u in await social.room_member_ids(self.worker.pool, room)
                if u != session.user_id
            ]
            frame["room"] = room
        await self.worker.delivery.push(targets, frame)
        conn.write(_ok(req.rid))

    # ---- presence and contacts ---------------------------------------------
    async def set_presence(self, conn: ClientConnection, req: SetPresence) -> None:
        session = _session(conn)
        await social.set_presence(self.worker.pool, session.user_id, req.state.value, req.text)
        conn.write(_ok(req.rid))
        await self.broadcast_presence(session.user_id)

    async def contact_add(self, conn: ClientConnection, req: ContactAdd) -> None:
        session = _session(conn)
        other = await self._user_id(req.user)
        status = await social.contact_add(self.worker.pool, session.user_id, other)
        conn.write(_ok(req.rid))
        if status == "accepted":
            await self.broadcast_presence(session.user_id)
            await self.broadcast_presence(other)
        else:
            await self.worker.delivery.push(
                [other], {"op": "contact_request", "from": session.username}
            )

    async def contact_accept(self, conn: ClientConnection, req: ContactAccept) -> None:
        session = _session(conn)
        other = await self._user_id(req.user)
        await social.contact_accept(self.worker.pool, session.user_id, other)
        conn.write(_ok(req.rid))
        await self.broadcast_presence(session.user_id)
        await self.broadcast_presence(other)

    async def contact_remove(self, conn: ClientConnection, req: ContactRemove) -> None:
        session = _session(conn)
        other = await self._user_id(req.user)
        if not await social.contact_remove(self.worker.pool, session.user_id, other):
            raise NotFound("not a contact")
        conn.write(_ok(req.rid))

    async def contact_list(self, conn: ClientConnection, req: ContactList) -> None:
        session = _session(conn)
        contacts = await social.contact_list(self.worker.pool, session.user_id)
        items = [
            {"user": c.username, "status": c.status, "state": c.state, "text": c.text}
            for c in contacts
        ]
        conn.write(encode({"op": "contacts", "contacts": items, **_rid(req.rid)}))

    # ---- rooms -------------------------------------------------------------
    async def room_create(self, conn: ClientConnection, req: RoomCreate) -> None:
        session = _session(conn)
        room = await social.room_create(self.worker.pool, session.user_id, req.name)
        conn.write(encode({"op": "room", "room": room, "name": req.name, **_rid(req.rid)}))

    async def room_invite(self, conn: ClientConnection, req: RoomInvite) -> None:
        session = _session(conn)
        invitee = await self._user_id(req.user)
        name = await social.room_invite(self.worker.pool, req.room, session.user_id, invitee)
        conn.write(_ok(req.rid))
        await self.worker.delivery.push(
            [invitee],
            {"op": "room_invite", "room": req.room, "name": name, "from": session.username},
        )

    async def room_join(self, conn: ClientConnection, req: RoomJoin) -> None:
        session = _session(conn)
        name = await social.room_join(self.worker.pool, req.room, session.user_id)
        conn.write(encode({"op": "room", "room": req.room, "name": name, **_rid(req.rid)}))

    async def room_leave(self, conn: ClientConnection, req: RoomLeave) -> None:
        session = _session(conn)
        await social.room_leave(self.worker.pool, req.room, session.user_id)
        conn.write(_ok(req.rid))

    async def room_members(self, conn: ClientConnection, req: RoomMembers) -> None:
        session = _session(conn)
        members = await social.room_members(self.worker.pool, req.room, session.user_id)
        conn.write(encode({"op": "members", "room": req.room, "members": members, **_rid(req.rid)}))

    async def room_list(self, conn: ClientConnection, req: RoomList) -> None:
        session = _session(conn)
        rooms = await social.rooms_of(self.worker.pool, session.user_id)
        items = [{"room": room, "name": name} for room, name in rooms]
        conn.write(encode({"op": "rooms", "rooms": items, **_rid(req.rid)}))

    # ---- account -----------------------------------------------------------
    async def change_password(self, conn: ClientConnection, req: PasswordChange) -> None:
        session = _session(conn)
        if len(req.new) < self.settings.min_password_chars:
            raise RequestError(
                ErrorCode.WEAK_PASSWORD,
                f"password must have at least {self.settings.min_password_chars} characters",
            )
        pool = self.worker.pool
        async with self.worker.auth_slot():
            account = await accounts.find_user(pool, session.username)
            if account is None or not await self.worker.passwords.verify(
                account.password_hash, req.old
            ):
                raise RequestError(ErrorCode.AUTH_FAILED, "the old password is wrong")
            await accounts.set_password(
                pool, session.user_id, await self.worker.passwords.hash(req.new)
            )
        log.info("password_changed", user=session.username)
        conn.write(_ok(req.rid))


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _session(conn: ClientConnection) -> Session:
    assert conn.session is not None, "the dispatcher admits only authenticated requests here"
    return conn.session


def _ok(rid: str | int | None) -> bytes:
    return encode({"op": "ok", **_rid(rid)})


def _rid(rid: str | int | None) -> dict[str, str | int]:
    return {} if rid is None else {"rid": rid}


def _error(code: ErrorCode, message: str, rid: str | int | None, **extra: Any) -> bytes:
    from app.protocol import error_frame

    metrics.ERRORS.labels(code.value).inc()
    return error_frame(code, message, rid, **extra)
