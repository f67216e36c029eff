"""Requests to handlers: the session table's gate first, then one handler per request type.

Every request gets exactly one reply: the handler's, or the error frame that
errors.py makes of whatever it raised. A logged-in user's costly ops pass its
per-op budget (ratelimit.py) first.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.protocol import (
    Ack,
    Bye,
    ContactAccept,
    ContactAdd,
    ContactList,
    ContactRemove,
    ErrorCode,
    Hello,
    History,
    LoginToken,
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
)
from app.worker.capacity import SessionCap
from app.worker.contacts import Contacts
from app.worker.errors import RequestError, reply_for
from app.worker.login import Login
from app.worker.messaging import Messaging
from app.worker.ratelimit import OP_CLASSES, OpBudgets
from app.worker.session import Sessions
from app.worker.states import Peer, SessionState, next_session_state, request_event

Handler = Callable[[Peer, Any], Awaitable[None]]

# Requests that open a session the cluster did not hold (worker_max_sessions applies).
NEW_LOGINS = (Hello, LoginToken)

# What the gate says when the session table refuses a request.
REFUSALS = {
    ErrorCode.NOT_AUTHENTICATED: "log in first (op hello)",
    ErrorCode.ALREADY_AUTHENTICATED: "already logged in",
}


class Dispatcher:
    def __init__(
        self,
        sessions: Sessions,
        login: Login,
        messaging: Messaging,
        contacts: Contacts,
        budgets: OpBudgets,
        cap: SessionCap | None = None,
    ) -> None:
        self.send_now = messaging.send_now
        self._budgets = budgets
        self._cap = cap
        self._handlers: dict[type, Handler] = {
            Hello: login.hello,
            Register: login.register,
            Resume: login.resume,
            LoginToken: login.login_token,
            PasswordChange: login.change_password,
            Ping: sessions.ping,
            Bye: sessions.bye,
            Send: messaging.send,
            Ack: messaging.ack,
            Read: messaging.read,
            History: messaging.history,
            Typing: messaging.typing,
            SetPresence: contacts.set_presence,
            ContactAdd: contacts.contact_add,
            ContactAccept: contacts.contact_accept,
            ContactRemove: contacts.contact_remove,
            ContactList: contacts.contact_list,
            RoomCreate: contacts.room_create,
            RoomInvite: contacts.room_invite,
            RoomJoin: contacts.room_join,
            RoomLeave: contacts.room_leave,
            RoomMembers: contacts.room_members,
            RoomList: contacts.room_list,
        }

    async def handle(self, peer: Peer, req: Request) -> None:
        try:
            refused = next_session_state(peer.state, request_event(req))
            if isinstance(refused, ErrorCode):
                raise RequestError(refused, REFUSALS[refused])
            handler = self._handlers.get(type(req))
            if handler is None:
                raise RequestError(ErrorCode.UNKNOWN_OP, f"op {req.op!r} is not supported yet")
            if self._cap is not None and isinstance(req, NEW_LOGINS):
                self._cap.admit_login()
            session = peer.session
            if session is not None:
                retry_after = self._budgets.take(session.user_id, req)
                if retry_after is not None:
                    raise RequestError(
                        ErrorCode.RATE_LIMITED,
                        f"too many {OP_CLASSES[type(req)].value} requests; slow down",
                        retry_after=round(retry_after, 3),
                    )
            await handler(peer, req)
        except Exception as exc:
            frame, fatal = reply_for(exc, req.op, req.rid)
            if (
                isinstance(exc, RequestError)
                and exc.code is ErrorCode.OVERLOADED
                and peer.state is SessionState.ANONYMOUS
            ):
                # Told to wait its turn: it is not the slow client auth_timeout is for.
                wait = exc.extra.get("retry_after")
                peer.login_wait_until = time.monotonic() + (
                    wait if isinstance(wait, float | int) else 0.0
                )
            peer.write(frame)
            if fatal:
                peer.close()
