"""Messages on the wire: send (group-committed), ack, read receipts, history, typing."""

from __future__ import annotations

import asyncio
from functools import partial

import asyncpg

from app.logs import get_logger
from app.protocol import Ack, ErrorCode, History, Read, Send, Typing, encode_sent, frames, rfc3339
from app.settings import Settings
from app.store import messages as message_store
from app.store import social
from app.store.errors import DB_ERRORS, Forbidden, NotFound, StoreRejected
from app.store.eventlog import EventLog
from app.store.messages import AckRequest, NewMessage, ReadRequest, Stored
from app.worker.announce import Announcer
from app.worker.commits import Commits
from app.worker.errors import REJECTED_MESSAGE, error_reply
from app.worker.registry import Registry
from app.worker.session import OK
from app.worker.states import Peer, Session, SessionState, active_session

# Bytes of a history item besides its body: names, ids, the time, the cmid, JSON.
_HISTORY_ITEM_OVERHEAD = 256

log = get_logger("session")


class Messaging:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        registry: Registry,
        commits: Commits,
        announcer: Announcer,
        events: EventLog,
    ) -> None:
        self._pool = pool
        self._max_inflight = settings.max_inflight_sends
        self._history_reply_bytes = settings.max_history_reply_bytes
        self._registry = registry
        self._commits = commits
        self._announcer = announcer
        self._events = events

    async def send(self, conn: Peer, req: Send) -> None:
        """Queue the message for the next group commit and return at once.

        Sends pipelined on one connection join the same batches; the `sent`
        reply is written when the batch commits (`_sent`). A connection may have
        ``max_inflight_sends`` uncommitted sends; past that, it reads no further
        requests until the oldest commits.
        """
        session = active_session(conn)
        recipient_id = await self._registry.user_id(req.to) if req.to is not None else None
        await conn.send_slot()
        self._queue_send(conn, req, session, recipient_id)

    def send_now(self, conn: Peer, req: Send) -> bool:
        """The common case without a task: logged in, recipient's id cached, a free
        slot. False: nothing was done, `send` (awaiting what is missing) must run."""
        session = conn.session
        if (
            conn.state is not SessionState.ACTIVE
            or session is None
            or conn.inflight_sends >= self._max_inflight
        ):
            return False
        recipient_id = None
        if req.to is not None:
            recipient_id = self._registry.cached_user_id(req.to)
            if recipient_id is None:
                return False
        self._queue_send(conn, req, session, recipient_id)
        return True

    def _queue_send(
        self, conn: Peer, req: Send, session: Session, recipient_id: int | None
    ) -> None:
        message = NewMessage(
            session.user_id, session.device, req.cmid, recipient_id, req.room, req.body
        )
        conn.inflight_sends += 1
        self._commits.send(message, partial(self._sent, conn, req))

    def _sent(self, conn: Peer, req: Send, result: Stored | Exception | None) -> None:
        conn.send_done()
        if isinstance(result, Stored):
            ts = rfc3339(result.created_at)
            conn.write(encode_sent(req.cmid, result.id, ts, result.sender_seq, req.rid))
        elif isinstance(result, StoreRejected):
            # Only this message: the rest of its group commit went through.
            message = REJECTED_MESSAGE.format(what="message")
            conn.write(error_reply(ErrorCode.BAD_FIELD, message, req.rid))
        elif isinstance(result, Exception):
            conn.write(
                error_reply(ErrorCode.INTERNAL, "the database is unavailable; retry", req.rid)
            )
        else:
            task = asyncio.get_running_loop().create_task(self._refused(conn, req))
            self._registry.keep(task)

    async def _refused(self, conn: Peer, req: Send) -> None:
        """The store refused a room message: say why (no such room, or not a member)."""
        user_id = conn.session.user_id if conn.session is not None else 0
        try:
            await social.require_member(self._pool, req.room or 0, user_id)
            conn.write(
                error_reply(ErrorCode.FORBIDDEN, "you are not a member of that room", req.rid)
            )
        except NotFound as exc:
            conn.write(error_reply(ErrorCode.NOT_FOUND, str(exc), req.rid))
        except Forbidden as exc:
            conn.write(error_reply(ErrorCode.FORBIDDEN, str(exc), req.rid))
        except DB_ERRORS as exc:
            log.warning("request_failed", op=req.op, error=type(exc).__name__)
            conn.write(error_reply(ErrorCode.INTERNAL, "temporary server error, retry", req.rid))

    async def ack(self, conn: Peer, req: Ack) -> None:
        session = active_session(conn)
        acked = await self._commits.ack(AckRequest(session.user_id, session.device, req.seq))
        conn.write(OK.encode(req.rid))
        self._events.acked(session.user_id, session.session_id, session.epoch, acked)

    async def read(self, conn: Peer, req: Read) -> None:
        session = active_session(conn)
        if not await self._commits.record_receipt(ReadRequest(session.user_id, req.msg_id)):
            raise NotFound("no such message")
        conn.write(OK.encode(req.rid))

    async def history(self, conn: Peer, req: History) -> None:
        session = active_session(conn)
        pool = self._pool
        other_id = None
        if req.with_user is not None:
            other_id = await self._registry.user_id(req.with_user)
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
        # At most max_history_reply_bytes of bodies (and at least one message) per
        # reply, so one reply never fills the write buffer by itself: `more` says
        # there is more, and the client pages on with `before`.
        budget = self._history_reply_bytes
        items: list[frames.HistoryMessage] = []
        for row in rows[: req.limit]:
            size = len(row.body.encode()) + _HISTORY_ITEM_OVERHEAD
            if items and size > budget:
                break
            budget -= size
            items.append(
                frames.HistoryMessage(
                    row.id,
                    row.sender,
                    row.recipient if row.room_id is None else None,
                    row.room_id,
                    row.body,
                    rfc3339(row.created_at),
                    row.cmid,
                )
            )
        more = len(rows) > len(items)
        conn.write(frames.HistoryPage(items, more).encode(req.rid))

    async def typing(self, conn: Peer, req: Typing) -> None:
        session = active_session(conn)
        if req.to is not None:
            # Only to an accepted contact; an unknown name gets the same answer, so
            # typing cannot tell who exists.
            try:
                target = await self._registry.user_id(req.to)
            except NotFound:
                raise Forbidden("that user is not one of your contacts") from None
            await social.require_contact(self._pool, session.user_id, target)
            targets = [target]
            frame = frames.Typing(session.username, req.to, None, req.active)
        else:
            room = req.room or 0
            await social.require_member(self._pool, room, session.user_id)
            targets = [
                u for u in await social.room_member_ids(self._pool, room) if u != session.user_id
            ]
            frame = frames.Typing(session.username, None, room, req.active)
        await self._announcer.push(targets, frame)
        conn.write(OK.encode(req.rid))
