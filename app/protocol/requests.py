"""Typed client -> server requests: one frozen dataclass per wire ``op``.

Instances are only built by the decoder after validation, so the server can
trust every field's type and range. ``rid`` is always the last field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Final, TypeAlias

Rid: TypeAlias = str | int | None


class PresenceState(StrEnum):
    ONLINE = "online"
    AWAY = "away"
    DND = "dnd"
    OFFLINE = "offline"  # only ever set by the server (no session left)


CLIENT_PRESENCE_STATES: Final = frozenset(
    {PresenceState.ONLINE, PresenceState.AWAY, PresenceState.DND}
)


@dataclass(frozen=True, slots=True)
class Hello:
    """Log in with a password on a named device."""

    op: ClassVar[str] = "hello"
    user: str
    password: str = field(repr=False)
    device: str
    v: int = 1
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class Register:
    """Create an account (does not log in)."""

    op: ClassVar[str] = "register"
    user: str
    password: str = field(repr=False)
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class Resume:
    """Log in again with a resume token, replaying the inbox after `last_seq`."""

    op: ClassVar[str] = "resume"
    user: str
    device: str
    token: str = field(repr=False)
    last_seq: int
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class LoginToken:
    """Log in without the password, with the device token an earlier welcome gave."""

    op: ClassVar[str] = "login_token"
    user: str
    device: str
    device_token: str = field(repr=False)
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class Send:
    """Send `body` to exactly one of a user (`to`) or a room."""

    op: ClassVar[str] = "send"
    cmid: str
    body: str
    to: str | None = None
    room: int | None = None
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class Ack:
    """This device has processed its inbox up to and including `seq`."""

    op: ClassVar[str] = "ack"
    seq: int
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class SetPresence:
    op: ClassVar[str] = "presence"
    state: PresenceState
    text: str | None = None
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class ContactAdd:
    op: ClassVar[str] = "contact_add"
    user: str
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class ContactAccept:
    op: ClassVar[str] = "contact_accept"
    user: str
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class ContactRemove:
    op: ClassVar[str] = "contact_remove"
    user: str
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class ContactList:
    op: ClassVar[str] = "contacts"
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class RoomCreate:
    """Create a room; `name` arrives stripped of surrounding whitespace."""

    op: ClassVar[str] = "room_create"
    name: str
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class RoomInvite:
    op: ClassVar[str] = "room_invite"
    room: int
    user: str
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class RoomJoin:
    op: ClassVar[str] = "room_join"
    room: int
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class RoomLeave:
    op: ClassVar[str] = "room_leave"
    room: int
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class RoomMembers:
    op: ClassVar[str] = "room_members"
    room: int
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class RoomList:
    op: ClassVar[str] = "rooms"
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class History:
    """A page of stored messages, newest first, with ids below `before`."""

    op: ClassVar[str] = "history"
    with_user: str | None = None  # wire field "with"
    room: int | None = None
    before: int | None = None
    limit: int = 50
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class Typing:
    """Ephemeral typing indicator; never stored."""

    op: ClassVar[str] = "typing"
    to: str | None = None
    room: int | None = None
    active: bool = True
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class Read:
    """Durable read receipt for message `msg_id`."""

    op: ClassVar[str] = "read"
    msg_id: int
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class PasswordChange:
    op: ClassVar[str] = "password"
    old: str = field(repr=False)
    new: str = field(repr=False)
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class Ping:
    op: ClassVar[str] = "ping"
    rid: Rid = None


@dataclass(frozen=True, slots=True)
class Bye:
    """The client is leaving; the server closes the connection cleanly. With
    ``forget``, the device's token is revoked too (the device logs out for good)."""

    op: ClassVar[str] = "bye"
    forget: bool = False
    rid: Rid = None


Request: TypeAlias = (
    Hello
    | Register
    | Resume
    | LoginToken
    | Send
    | Ack
    | SetPresence
    | ContactAdd
    | ContactAccept
    | ContactRemove
    | ContactList
    | RoomCreate
    | RoomInvite
    | RoomJoin
    | RoomLeave
    | RoomMembers
    | RoomList
    | History
    | Typing
    | Read
    | PasswordChange
    | Ping
    | Bye
)

# Wire op -> request class.
OPS: Final[Mapping[str, type[Request]]] = {
    cls.op: cls
    for cls in (
        Hello,
        Register,
        Resume,
        LoginToken,
        Send,
        Ack,
        SetPresence,
        ContactAdd,
        ContactAccept,
        ContactRemove,
        ContactList,
        RoomCreate,
        RoomInvite,
        RoomJoin,
        RoomLeave,
        RoomMembers,
        RoomList,
        History,
        Typing,
        Read,
        PasswordChange,
        Ping,
        Bye,
    )
}

# Requests allowed before login; anything else gets not_authenticated.
PRE_AUTH_OPS: Final[frozenset[type[Request]]] = frozenset(
    {Hello, Register, Resume, LoginToken, Ping, Bye}
)
