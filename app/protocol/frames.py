"""Server -> client frames of the v1 protocol (docs/protocol.md, "Server frames"), defined once.

Each frame is a frozen dataclass. The worker builds one and writes ``encode()``,
its JSON line; a client reads one with ``from_frame(decoded JSON object)``,
which checks the type of every field and raises `BadServerFrame` naming the op
and the field. `parse_server_frame` picks the class by ``op``. Unknown fields
are ignored, as the protocol asks; values are not checked against the request
rules (a sender the worker cannot name is ``"?"``), and a client takes a missing
``cmid`` for None.

A reply's ``rid`` is the request's, not part of the frame: it is an argument of
``encode`` and left out when None. The wire's ``from`` is ``sender`` here
(``from`` is a Python keyword). ``msg``, ``typing`` and history messages carry
exactly one of ``to`` and ``room``.

`encode_msg` and `encode_sent` write the two frames sent once per message
without building the object first, for the worker's hot paths: constructing a
frozen dataclass costs about 90 ns per field on CPython 3.11 (an 8-field `Msg`
~750 ns, where writing its line takes ~450 ns).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final, Self, TypeAlias, get_args

import orjson

from app.protocol.errors import BadServerFrame
from app.protocol.fields import (
    BOOL,
    INTEGER,
    NUMBER,
    STRING,
    FieldError,
    Fields,
    Spec,
    exactly_one,
    optional,
    required,
)
from app.protocol.limits import PROTOCOL_VERSION
from app.protocol.requests import Rid

_LINE: Final = orjson.OPT_APPEND_NEWLINE


def _objects(value: object) -> list[Fields] | None:
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return value
    return None


def _strings(value: object) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


OBJECTS: Final = Spec("a list of objects", _objects)
STRINGS: Final = Spec("a list of strings", _strings)


def _line(frame: dict[str, object], rid: Rid = None) -> bytes:
    if rid is not None:
        frame["rid"] = rid
    return orjson.dumps(frame, option=_LINE)


class _Frame:
    """What every frame class has: its ``op``, and ``from_frame`` over its ``_read``."""

    __slots__ = ()
    op: ClassVar[str]

    @classmethod
    def from_frame(cls, frame: Fields) -> Self:
        """Read a decoded frame whose op is this class's; `BadServerFrame` if a field is wrong."""
        try:
            return cls._read(frame)
        except FieldError as exc:
            raise BadServerFrame(cls.op, exc.key, str(exc)) from None

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        raise NotImplementedError


# --- replies ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome(_Frame):
    """Reply to ``hello``/``resume``/``login_token``: who is logged in, and where the
    inbox stands. ``device_token`` (hello and login_token only) is the device's new
    long-lived token; a resume's welcome has none.

    ``v`` on the wire is always `PROTOCOL_VERSION`; it is not kept.
    """

    op: ClassVar[str] = "welcome"
    user: str
    device: str
    session: str
    worker: str
    resume_token: str = field(repr=False)
    seq: int
    acked: int
    device_token: str | None = field(default=None, repr=False)

    def encode(self, rid: Rid = None) -> bytes:
        frame: dict[str, object] = {
            "op": "welcome",
            "v": PROTOCOL_VERSION,
            "user": self.user,
            "device": self.device,
            "session": self.session,
            "worker": self.worker,
            "resume_token": self.resume_token,
            "seq": self.seq,
            "acked": self.acked,
        }
        if self.device_token is not None:
            frame["device_token"] = self.device_token
        return _line(frame, rid)

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(
            user=required(frame, "user", STRING),
            device=required(frame, "device", STRING),
            session=required(frame, "session", STRING),
            worker=required(frame, "worker", STRING),
            resume_token=required(frame, "resume_token", STRING),
            seq=required(frame, "seq", INTEGER),
            acked=required(frame, "acked", INTEGER),
            device_token=optional(frame, "device_token", STRING),
        )


@dataclass(frozen=True, slots=True)
class Registered(_Frame):
    """Reply to ``register``."""

    op: ClassVar[str] = "registered"
    user: str

    def encode(self, rid: Rid = None) -> bytes:
        return _line({"op": "registered", "user": self.user}, rid)

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(required(frame, "user", STRING))


def encode_sent(cmid: str, id: int, ts: str, seq: int | None, rid: Rid) -> bytes:
    """``Sent(cmid, id, ts, seq).encode(rid)``, without building the object."""
    frame: dict[str, object] = {"op": "sent", "cmid": cmid, "id": id, "ts": ts}
    if seq is not None:
        frame["seq"] = seq
    if rid is not None:
        frame["rid"] = rid
    return orjson.dumps(frame, option=_LINE)


@dataclass(frozen=True, slots=True)
class Sent(_Frame):
    """Reply to ``send``: the message is durably committed as ``id``.

    ``seq``, when set, is the entry holding it in the sender's own inbox.
    """

    op: ClassVar[str] = "sent"
    cmid: str
    id: int
    ts: str
    seq: int | None

    def encode(self, rid: Rid = None) -> bytes:
        return encode_sent(self.cmid, self.id, self.ts, self.seq, rid)

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(
            cmid=required(frame, "cmid", STRING),
            id=required(frame, "id", INTEGER),
            ts=required(frame, "ts", STRING),
            seq=optional(frame, "seq", INTEGER),
        )


class _Bare(_Frame):
    """A reply with no fields but its ``op`` (and the ``rid``)."""

    __slots__ = ()

    def encode(self, rid: Rid = None) -> bytes:
        return _line({"op": self.op}, rid)

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class Ok(_Bare):
    """Generic success."""

    op: ClassVar[str] = "ok"


@dataclass(frozen=True, slots=True)
class Pong(_Bare):
    """Reply to ``ping``."""

    op: ClassVar[str] = "pong"


@dataclass(frozen=True, slots=True)
class Error(_Frame):
    """An error: the reply to a request, or unsolicited (``session_replaced``, ``kicked``, ...).

    ``code`` is an `ErrorCode` when the server builds it, and a plain string when
    read: a client treats a code it does not know like ``internal``.
    """

    op: ClassVar[str] = "error"
    code: str
    message: str
    retry_after: float | None = None

    def encode(self, rid: Rid = None) -> bytes:
        frame: dict[str, object] = {"op": "error", "code": self.code, "message": self.message}
        if rid is not None:
            frame["rid"] = rid
        if self.retry_after is not None:
            frame["retry_after"] = self.retry_after
        return orjson.dumps(frame, option=_LINE)

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(
            code=required(frame, "code", STRING),
            message=required(frame, "message", STRING),
            retry_after=optional(frame, "retry_after", NUMBER),
        )

    @classmethod
    def lenient(cls, frame: Fields) -> Self:
        """Read an ``error`` frame whatever its fields: a broken one must still fail the
        request it answers. A bad ``code`` reads as ``internal``, a bad ``message`` as
        empty, a bad ``retry_after`` as None."""
        code = STRING.check(frame.get("code"))
        return cls(
            code="internal" if code is None else code,
            message=STRING.check(frame.get("message")) or "",
            retry_after=NUMBER.check(frame.get("retry_after")),
        )


@dataclass(frozen=True, slots=True)
class Room(_Frame):
    """Reply to ``room_create``/``room_join``; also one entry of ``rooms``."""

    op: ClassVar[str] = "room"
    room: int
    name: str

    def encode(self, rid: Rid = None) -> bytes:
        return _line({"op": "room", "room": self.room, "name": self.name}, rid)

    def _object(self) -> dict[str, object]:
        return {"room": self.room, "name": self.name}

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(required(frame, "room", INTEGER), required(frame, "name", STRING))


@dataclass(frozen=True, slots=True)
class Rooms(_Frame):
    """Reply to ``rooms``: the rooms the user belongs to, and the invitations it has
    not taken up yet (each as the ``room_invite`` push had it, without ``op``)."""

    op: ClassVar[str] = "rooms"
    rooms: list[Room]
    invites: list[RoomInvite] = field(default_factory=list)

    def encode(self, rid: Rid = None) -> bytes:
        return _line(
            {
                "op": "rooms",
                "rooms": [r._object() for r in self.rooms],
                "invites": [i._object() for i in self.invites],
            },
            rid,
        )

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(
            [Room._read(r) for r in required(frame, "rooms", OBJECTS)],
            [RoomInvite._read(i) for i in optional(frame, "invites", OBJECTS) or []],
        )


@dataclass(frozen=True, slots=True)
class Members(_Frame):
    """Reply to ``room_members``."""

    op: ClassVar[str] = "members"
    room: int
    members: list[str]

    def encode(self, rid: Rid = None) -> bytes:
        return _line({"op": "members", "room": self.room, "members": self.members}, rid)

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(required(frame, "room", INTEGER), required(frame, "members", STRINGS))


@dataclass(frozen=True, slots=True)
class Contact:
    """One entry of ``contacts``; ``state``/``text`` are set for accepted contacts only."""

    user: str
    status: str
    state: str | None
    text: str | None

    def _object(self) -> dict[str, object]:
        return {"user": self.user, "status": self.status, "state": self.state, "text": self.text}

    @classmethod
    def _read(cls, entry: Fields) -> Self:
        return cls(
            user=required(entry, "user", STRING),
            status=required(entry, "status", STRING),
            state=optional(entry, "state", STRING),
            text=optional(entry, "text", STRING),
        )


@dataclass(frozen=True, slots=True)
class Contacts(_Frame):
    """Reply to ``contacts``: contacts and pending requests."""

    op: ClassVar[str] = "contacts"
    contacts: list[Contact]

    def encode(self, rid: Rid = None) -> bytes:
        return _line({"op": "contacts", "contacts": [c._object() for c in self.contacts]}, rid)

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls([Contact._read(c) for c in required(frame, "contacts", OBJECTS)])


def _put_to_or_room(frame: dict[str, object], to: str | None, room: int | None) -> None:
    if room is not None:
        frame["room"] = room
    else:
        frame["to"] = to


def _to_or_room(frame: Fields) -> tuple[str | None, int | None]:
    to, room = optional(frame, "to", STRING), optional(frame, "room", INTEGER)
    exactly_one(to, room, "to", "room")
    return to, room


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

    def _object(self) -> dict[str, object]:
        entry: dict[str, object] = {"id": self.id, "from": self.sender}
        _put_to_or_room(entry, self.to, self.room)
        entry["body"] = self.body
        entry["ts"] = self.ts
        entry["cmid"] = self.cmid
        return entry

    @classmethod
    def _read(cls, entry: Fields) -> Self:
        id = required(entry, "id", INTEGER)
        sender = required(entry, "from", STRING)
        to, room = _to_or_room(entry)
        body = required(entry, "body", STRING)
        ts = required(entry, "ts", STRING)
        return cls(id, sender, to, room, body, ts, optional(entry, "cmid", STRING))


@dataclass(frozen=True, slots=True)
class HistoryPage(_Frame):
    """Reply to ``history``, newest first; when ``more``, ask again with ``before`` = the
    smallest id here."""

    op: ClassVar[str] = "history"
    messages: list[HistoryMessage]
    more: bool

    def encode(self, rid: Rid = None) -> bytes:
        messages = [m._object() for m in self.messages]
        return _line({"op": "history", "messages": messages, "more": self.more}, rid)

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        messages = [HistoryMessage._read(m) for m in required(frame, "messages", OBJECTS)]
        return cls(messages, optional(frame, "more", BOOL) or False)


# --- server-initiated frames -----------------------------------------------------------


def encode_msg(
    seq: int,
    id: int,
    sender: str,
    to: str | None,
    room: int | None,
    body: str,
    ts: str,
    cmid: str | None,
) -> bytes:
    """``Msg(seq, id, sender, to, room, body, ts, cmid).encode()``, without building the object."""
    frame: dict[str, object] = {"op": "msg", "seq": seq, "id": id, "from": sender}
    if room is not None:  # `_put_to_or_room`, inline: a call here costs ~50 ns
        frame["room"] = room
    else:
        frame["to"] = to
    frame["body"] = body
    frame["ts"] = ts
    frame["cmid"] = cmid
    return orjson.dumps(frame, option=_LINE)


@dataclass(frozen=True, slots=True)
class Msg(_Frame):
    """A message in this user's inbox, entry ``seq``; ``sender`` is the wire ``from``."""

    op: ClassVar[str] = "msg"
    seq: int
    id: int
    sender: str
    to: str | None
    room: int | None
    body: str
    ts: str
    cmid: str | None

    def encode(self) -> bytes:
        return encode_msg(
            self.seq, self.id, self.sender, self.to, self.room, self.body, self.ts, self.cmid
        )

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        seq = required(frame, "seq", INTEGER)
        m = HistoryMessage._read(frame)
        return cls(seq, m.id, m.sender, m.to, m.room, m.body, m.ts, m.cmid)


@dataclass(frozen=True, slots=True)
class Receipt(_Frame):
    """User ``by`` read message ``msg_id`` (an inbox entry, ``seq``)."""

    op: ClassVar[str] = "receipt"
    seq: int
    by: str
    msg_id: int
    ts: str

    def encode(self) -> bytes:
        return _line(
            {"op": "receipt", "seq": self.seq, "by": self.by, "msg_id": self.msg_id, "ts": self.ts}
        )

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(
            seq=required(frame, "seq", INTEGER),
            by=required(frame, "by", STRING),
            msg_id=required(frame, "msg_id", INTEGER),
            ts=required(frame, "ts", STRING),
        )


@dataclass(frozen=True, slots=True)
class Presence(_Frame):
    """A contact's presence changed; ``state`` may be ``offline``."""

    op: ClassVar[str] = "presence"
    user: str
    state: str
    text: str | None

    def encode(self) -> bytes:
        return _line({"op": "presence", "user": self.user, "state": self.state, "text": self.text})

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(
            user=required(frame, "user", STRING),
            state=required(frame, "state", STRING),
            text=optional(frame, "text", STRING),
        )


@dataclass(frozen=True, slots=True)
class Typing(_Frame):
    """``sender`` is (or stopped) typing to a user or in a room. Ephemeral, no seq."""

    op: ClassVar[str] = "typing"
    sender: str
    to: str | None
    room: int | None
    active: bool

    def encode(self) -> bytes:
        frame: dict[str, object] = {"op": "typing", "from": self.sender, "active": self.active}
        _put_to_or_room(frame, self.to, self.room)
        return _line(frame)

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        sender = required(frame, "from", STRING)
        to, room = _to_or_room(frame)
        active = optional(frame, "active", BOOL)
        return cls(sender, to, room, True if active is None else active)


@dataclass(frozen=True, slots=True)
class ContactRequest(_Frame):
    """``sender`` (wire ``from``) asks to become a contact."""

    op: ClassVar[str] = "contact_request"
    sender: str

    def encode(self) -> bytes:
        return _line({"op": "contact_request", "from": self.sender})

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(required(frame, "from", STRING))


@dataclass(frozen=True, slots=True)
class RoomInvite(_Frame):
    """``sender`` (wire ``from``) invited this user to ``room``; join with ``room_join``."""

    op: ClassVar[str] = "room_invite"
    room: int
    name: str
    sender: str

    def encode(self) -> bytes:
        return _line({"op": "room_invite", **self._object()})

    def _object(self) -> dict[str, object]:
        return {"room": self.room, "name": self.name, "from": self.sender}

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(
            room=required(frame, "room", INTEGER),
            name=required(frame, "name", STRING),
            sender=required(frame, "from", STRING),
        )


@dataclass(frozen=True, slots=True)
class Reconnect(_Frame):
    """The server asks the client to reconnect (and resume) after ``after_ms``."""

    op: ClassVar[str] = "reconnect"
    after_ms: int

    def encode(self) -> bytes:
        return _line({"op": "reconnect", "after_ms": self.after_ms})

    @classmethod
    def _read(cls, frame: Fields) -> Self:
        return cls(required(frame, "after_ms", INTEGER))


# --- dispatch --------------------------------------------------------------------------

ServerFrame: TypeAlias = (
    Welcome
    | Registered
    | Sent
    | Ok
    | Pong
    | Error
    | Room
    | Rooms
    | Members
    | Contacts
    | HistoryPage
    | Msg
    | Receipt
    | Presence
    | Typing
    | ContactRequest
    | RoomInvite
    | Reconnect
)

# Frames the server sends unasked; every other one answers a request (and echoes its rid).
EVENT_FRAMES: Final = (Msg, Receipt, Presence, Typing, ContactRequest, RoomInvite, Reconnect, Error)

_BY_OP: Final[Mapping[str, type[ServerFrame]]] = {cls.op: cls for cls in get_args(ServerFrame)}


def parse_server_frame(frame: Fields) -> ServerFrame | None:
    """The frame as its class, by ``op``; None for an op this module does not know (a
    client ignores those). `BadServerFrame` if ``op`` is not a string or a field is wrong."""
    op = frame.get("op")
    if not isinstance(op, str):
        raise BadServerFrame(None, "op", "a frame must have a string field 'op'")
    cls = _BY_OP.get(op)
    return None if cls is None else cls.from_frame(frame)
