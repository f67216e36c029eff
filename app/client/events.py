"""Typed server -> client frames, as the client SDK hands them out.

Server-initiated frames (`Event`) come out of `Client.events()`; reply frames
become the return values of `Client` methods (`Welcome`, `Sent`, `Contact`,
`HistoryPage`). The frame classes are the protocol's own (app/protocol/frames.py),
re-exported here; an ``error`` frame is an `ErrorEvent`. This module adds the
events only the SDK makes (`ServerClosed`, `Disconnected`, `Resumed`, `Unknown`)
and is the boundary where a frame that breaks the protocol (`BadServerFrame`)
becomes the SDK's `ProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeAlias, TypeVar

from app.client.errors import ProtocolError, ServerError
from app.protocol import BadServerFrame, parse_server_frame
from app.protocol.frames import (
    EVENT_FRAMES,
    Contact,
    ContactRequest,
    HistoryMessage,
    HistoryPage,
    Msg,
    Presence,
    Receipt,
    Reconnect,
    RoomInvite,
    Sent,
    Typing,
    Welcome,
)
from app.protocol.frames import Error as ErrorEvent

Frame: TypeAlias = dict[str, Any]


class _Reply(Protocol):
    @classmethod
    def from_frame(cls, frame: Frame) -> Self: ...


R = TypeVar("R", bound=_Reply)

__all__ = [
    "Contact",
    "ContactRequest",
    "Disconnected",
    "ErrorEvent",
    "Event",
    "Frame",
    "HistoryMessage",
    "HistoryPage",
    "Msg",
    "Presence",
    "Receipt",
    "Reconnect",
    "Resumed",
    "RoomInvite",
    "Sent",
    "ServerClosed",
    "Typing",
    "Unknown",
    "Welcome",
    "parse_event",
    "read_reply",
    "server_error",
]


@dataclass(frozen=True, slots=True)
class ServerClosed:
    """Last event when the server side ended the connection; ``reason`` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    """`ResilientClient` only: the connection was lost (``reason``); it is reconnecting."""

    reason: str


@dataclass(frozen=True, slots=True)
class Resumed:
    """`ResilientClient` only: logged in again, on ``worker``, after a `Disconnected`.

    Inbox entries continue after ``seq``. ``fallback_login`` is true when the resume
    token was refused and the client logged in with the password instead.
    """

    worker: str
    seq: int
    fallback_login: bool


@dataclass(frozen=True, slots=True)
class Unknown:
    """A frame with an op this SDK does not know (or could not read); safe to ignore."""

    frame: Frame


Event: TypeAlias = (
    Msg
    | Receipt
    | Presence
    | ContactRequest
    | RoomInvite
    | Typing
    | Reconnect
    | ErrorEvent
    | ServerClosed
    | Disconnected
    | Resumed
    | Unknown
)


def parse_event(frame: Frame) -> Event:
    """The event for a server-initiated frame; `Unknown` for an op this SDK does not know.

    An ``error`` is read leniently (a broken one is still an error); any other frame
    that breaks the protocol raises `ProtocolError`.
    """
    if frame["op"] == "error":
        return ErrorEvent.lenient(frame)
    try:
        event = parse_server_frame(frame)
    except BadServerFrame as exc:
        raise ProtocolError(str(exc)) from None
    return event if isinstance(event, EVENT_FRAMES) else Unknown(frame)


def read_reply(cls: type[R], frame: Frame) -> R:
    """A reply frame as ``cls`` (its op already matched); `ProtocolError` if a field is wrong."""
    try:
        return cls.from_frame(frame)
    except BadServerFrame as exc:
        raise ProtocolError(str(exc)) from None


def server_error(frame: Frame) -> ServerError:
    """The exception for an ``error`` reply, read leniently: it must fail its request."""
    error = ErrorEvent.lenient(frame)
    return ServerError(error.code, error.message, error.retry_after)
