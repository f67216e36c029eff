"""Typed server -> client frames, as the client SDK hands them out.

Server-initiated frames (`Event`) come out of `Client.events()`; reply frames
become the return values of `Client` methods (`Welcome`, `Sent`, `Contact`,
`HistoryPage`). Each is a frozen dataclass built once, from a decoded JSON
object, by `parse_event` or a ``from_frame`` constructor, which raise
`ProtocolError` when a field is missing or of the wrong type. Unknown fields
are ignored, as the protocol asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

from app.client.errors import ProtocolError

Frame: TypeAlias = dict[str, Any]


# --- field readers -------------------------------------------------------------------


def _int(frame: Frame, key: str) -> int:
    value = frame.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{frame.get('op')!r} frame: field {key!r} must be an integer")
    return value


def _opt_int(frame: Frame, key: str) -> int | None:
    return None if frame.get(key) is None else _int(frame, key)


def _str(frame: Frame, key: str) -> str:
    value = frame.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{frame.get('op')!r} frame: field {key!r} must be a string")
    return value


def _opt_str(frame: Frame, key: str) -> str | None:
    return None if frame.get(key) is None else _str(frame, key)


def _bool(frame: Frame, key: str, default: bool) -> bool:
    value = frame.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{frame.get('op')!r} frame: field {key!r} must be a boolean")
    return value


def _objects(frame: Frame, key: str) -> list[Frame]:
    value = frame.get(key)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ProtocolError(f"{frame.get('op')!r} frame: field {key!r} must be a list of objects")
    return value


# --- server-initiated frames (events) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Msg:
    """A message in this user's inbox (wire ``msg``); ``sender`` is the wire ``from``."""

    seq: int
    id: int
    sender: str
    to: str | None
    room: int | None
    body: str
    ts: str
    cmid: str | None

    @classmethod
    def from_frame(cls, frame: Frame) -> Msg:
        return cls(
            seq=_int(frame, "seq"),
            id=_int(frame, "id"),
            sender=_str(frame, "from"),
            to=_opt_str(frame, "to"),
            room=_opt_int(frame, "room"),
            body=_str(frame, "body"),
            ts=_str(frame, "ts"),
            cmid=_opt_str(frame, "cmid"),
        )


@dataclass(frozen=True, slots=True)
class Receipt:
    """User ``by`` read message ``msg_id`` (an inbox entry)."""

    seq: int
    by: str
    msg_id: int
    ts: str

    @classmethod
    def from_frame(cls, frame: Frame) -> Receipt:
        return cls(
            seq=_int(frame, "seq"),
            by=_str(frame, "by"),
            msg_id=_int(frame, "msg_id"),
            ts=_str(frame, "ts"),
        )


@dataclass(frozen=True, slots=True)
class Presence:
    """A contact's presence changed; ``state`` may be ``offline``."""

    user: str
    state: str
    text: str | None

    @classmethod
    def from_frame(cls, frame: Frame) -> Presence:
        return cls(
            user=_str(frame, "user"), state=_str(frame, "state"), text=_opt_str(frame, "text")
        )


@dataclass(frozen=True, slots=True)
class ContactRequest:
    """``sender`` (wire ``from``) asks to become a contact."""

    sender: str

    @classmethod
    def from_frame(cls, frame: Frame) -> ContactRequest:
        return cls(sender=_str(frame, "from"))


@dataclass(frozen=True, slots=True)
class Typing:
    """``sender`` is (or stopped) typing to a user or in a room. Ephemeral, no seq."""

    sender: str
    to: str | None
    room: int | None
    active: bool

    @classmethod
    def from_frame(cls, frame: Frame) -> Typing:
        return cls(
            sender=_str(frame, "from"),
            to=_opt_str(frame, "to"),
            room=_opt_int(frame, "room"),
            active=_bool(frame, "active", True),
        )


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The server asks the client to reconnect (and resume) after ``after_ms``."""

    after_ms: int

    @classmethod
    def from_frame(cls, frame: Frame) -> Reconnect:
        return cls(after_ms=_int(frame, "after_ms"))


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """An ``error`` frame that answers no pending request (e.g. ``session_replaced``)."""

    code: str
    message: str
    retry_after: float | None

    @classmethod
    def from_frame(cls, frame: Frame) -> ErrorEvent:
        return cls(*error_fields(frame))


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
    | Typing
    | Reconnect
    | ErrorEvent
    | ServerClosed
    | Disconnected
    | Resumed
    | Unknown
)

_EVENT_TYPES: dict[str, Any] = {
    "msg": Msg,
    "receipt": Receipt,
    "presence": Presence,
    "contact_request": ContactRequest,
    "typing": Typing,
    "reconnect": Reconnect,
    "error": ErrorEvent,
}


def parse_event(frame: Frame) -> Event:
    """The event for a server-initiated frame; `Unknown` for an op this SDK does not know."""
    event_type = _EVENT_TYPES.get(frame["op"])
    if event_type is None:
        return Unknown(frame)
    event: Event = event_type.from_frame(frame)
    return event


# --- replies ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome:
    """Reply to ``hello``/``resume``: who is logged in, and where the inbox stands."""

    user: str
    device: str
    session: str
    worker: str
    resume_token: str = field(repr=False)
    seq: int
    acked: int

    @classmethod
    def from_frame(cls, frame: Frame) -> Welcome:
        return cls(
            user=_str(frame, "user"),
            device=_str(frame, "device"),
            session=_str(frame, "session"),
            worker=_str(frame, "worker"),
            resume_token=_str(frame, "resume_token"),
            seq=_int(frame, "seq"),
            acked=_int(frame, "acked"),
        )


@dataclass(frozen=True, slots=True)
class Sent:
    """Reply to ``send``: the message is durably committed as ``id``."""

    cmid: str
    id: int
    ts: str
    seq: int | None

    @classmethod
    def from_frame(cls, frame: Frame) -> Sent:
        return cls(
            cmid=_str(frame, "cmid"),
            id=_int(frame, "id"),
            ts=_str(frame, "ts"),
            seq=_opt_int(frame, "seq"),
        )


@dataclass(frozen=True, slots=True)
class Contact:
    """One entry of ``contacts``; ``state``/``text`` are set for accepted contacts only."""

    user: str
    status: str
    state: str | None
    text: str | None

    @classmethod
    def from_frame(cls, frame: Frame) -> Contact:
        return cls(
            user=_str(frame, "user"),
            status=_str(frame, "status"),
            state=_opt_str(frame, "state"),
            text=_opt_str(frame, "text"),
        )


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    """A stored message as ``history`` returns it; ``sender`` is the wire ``from``."""

    id: int
    sender: str
    to: str | None
    room: int | None
    body: str
    ts: str
    cmid: str | None

    @classmethod
    def from_frame(cls, frame: Frame) -> HistoryMessage:
        return cls(
            id=_int(frame, "id"),
            sender=_str(frame, "from"),
            to=_opt_str(frame, "to"),
            room=_opt_int(frame, "room"),
            body=_str(frame, "body"),
            ts=_str(frame, "ts"),
            cmid=_opt_str(frame, "cmid"),
        )


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Newest first; when ``more``, ask again with ``before`` = the smallest id here."""

    messages: list[HistoryMessage]
    more: bool

    @classmethod
    def from_frame(cls, frame: Frame) -> HistoryPage:
        return cls(
            messages=[HistoryMessage.from_frame(m) for m in _objects(frame, "messages")],
            more=_bool(frame, "more", False),
        )


def parse_contacts(frame: Frame) -> list[Contact]:
    return [Contact.from_frame(c) for c in _objects(frame, "contacts")]


def parse_rooms(frame: Frame) -> list[tuple[int, str]]:
    return [(_int(r, "room"), _str(r, "name")) for r in _objects(frame, "rooms")]


def parse_members(frame: Frame) -> list[str]:
    members = frame.get("members")
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise ProtocolError("'members' frame: field 'members' must be a list of strings")
    return members


def parse_room(frame: Frame) -> int:
    return _int(frame, "room")


def error_fields(frame: Frame) -> tuple[str, str, float | None]:
    """(code, message, retry_after) of an ``error`` frame.

    Tolerant of odd values: a broken error frame must still fail the request it answers.
    """
    code = frame.get("code")
    message = frame.get("message")
    retry_after = frame.get("retry_after")
    return (
        code if isinstance(code, str) else "internal",
        message if isinstance(message, str) else "",
        float(retry_after)
        if isinstance(retry_after, int | float) and not isinstance(retry_after, bool)
        else None,
    )
