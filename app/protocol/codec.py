"""Sans-I/O codec for the v1 line protocol: bytes in, typed requests out.

`Decoder.receive_data` never raises: every problem becomes a `FrameError`
whose message is ours (never exception text), so it is safe to echo.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import orjson

from app.protocol import text
from app.protocol.errors import ErrorCode, FrameError
from app.protocol.fields import (
    BOOL,
    INTEGER,
    FieldError,
    Spec,
    exactly_one,
    integer,
    optional,
    required,
    string,
)
from app.protocol.frames import Error
from app.protocol.limits import (
    DEFAULT_LIMITS,
    MAX_CMID_CHARS,
    MAX_DEVICE_CHARS,
    MAX_ID,
    MAX_PASSWORD_CHARS,
    MAX_RID_CHARS,
    MAX_ROOM_NAME_CHARS,
    MAX_TOKEN_CHARS,
    MAX_USERNAME_CHARS,
    MIN_TOKEN_CHARS,
    MIN_USERNAME_CHARS,
    PROTOCOL_VERSION,
    Limits,
)
from app.protocol.requests import (
    CLIENT_PRESENCE_STATES,
    Ack,
    Bye,
    ContactAccept,
    ContactAdd,
    ContactList,
    ContactRemove,
    Hello,
    History,
    LoginToken,
    PasswordChange,
    Ping,
    PresenceState,
    Read,
    Register,
    Request,
    Resume,
    Rid,
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

Frame = dict[str, object]

# ---------------------------------------------------------------------------
# Field specs (app/protocol/fields.py): the expectation text is what the peer
# reads in the bad_field message.

_rid_int = integer(0, MAX_ID - 1)


_rid_str = string(0, MAX_RID_CHARS, forbid=text.NUL)


def _rid(value: object) -> str | int | None:
    if isinstance(value, str):
        return _rid_str(value)
    return _rid_int(value)


def _presence(value: object) -> PresenceState | None:
    if isinstance(value, str) and value in CLIENT_PRESENCE_STATES:
        return PresenceState(value)
    return None


def _room_name(value: object) -> str | None:
    # Checked as stored: stripped (so surrounding newlines or tabs are harmless) and
    # NFC-normalised (so the same name is the same code points, whatever the keyboard).
    if not isinstance(value, str) or len(value) > MAX_ROOM_NAME_CHARS:
        return None
    name = unicodedata.normalize("NFC", value.strip())
    if not name or len(name) > MAX_ROOM_NAME_CHARS or text.LINE.search(name) is not None:
        return None
    return name


# What each text field accepts (app/protocol/text.py): no string takes U+0000;
# bodies take no other control character but tab and newline; room names and
# presence text no control, format (bidi, zero-width) or line-separator character.
_NO_NUL: Final = "with no U+0000"
_PLAIN: Final = "with no control character other than tab and newline"
_LABEL: Final = "with no control, format or line-separator character"

RID: Final[Spec[str | int]] = Spec(
    f"a string of at most {MAX_RID_CHARS} characters {_NO_NUL} or an integer 0..{MAX_ID - 1}",
    _rid,
)
USERNAME: Final = Spec(
    f"a user name of {MIN_USERNAME_CHARS}..{MAX_USERNAME_CHARS} characters from"
    " a-z 0-9 _ . - (not starting with . or -)",
    string(
        MIN_USERNAME_CHARS,
        MAX_USERNAME_CHARS,
        rf"[a-z0-9_][a-z0-9_.-]{{{MIN_USERNAME_CHARS - 1},{MAX_USERNAME_CHARS - 1}}}",
    ),
)
DEVICE: Final = Spec(
    f"a device name of 1..{MAX_DEVICE_CHARS} characters from A-Z a-z 0-9 _ . : -",
    string(1, MAX_DEVICE_CHARS, r"[A-Za-z0-9_.:-]+"),
)
PASSWORD: Final = Spec(
    f"a string of 1..{MAX_PASSWORD_CHARS} characters {_NO_NUL}",
    string(1, MAX_PASSWORD_CHARS, forbid=text.NUL),
)
CMID: Final = Spec(
    f"a string of 1..{MAX_CMID_CHARS} printable ASCII characters",
    string(1, MAX_CMID_CHARS, r"[\x20-\x7e]+"),
)
TOKEN: Final = Spec(
    f"a string of {MIN_TOKEN_CHARS}..{MAX_TOKEN_CHARS} characters {_NO_NUL}",
    string(MIN_TOKEN_CHARS, MAX_TOKEN_CHARS, forbid=text.NUL),
)
ROOM: Final = Spec(f"an integer 1..{MAX_ID}", integer(1, MAX_ID))
SEQ: Final = Spec(f"an integer 0..{MAX_ID}", integer(0, MAX_ID))
MSG_ID: Final = Spec(f"an integer 1..{MAX_ID}", integer(1, MAX_ID))
VERSION: Final = INTEGER  # any integer: another one than ours is unsupported_version
PRESENCE: Final = Spec("one of 'online', 'away', 'dnd'", _presence)
ROOM_NAME: Final = Spec(
    f"a string of 1..{MAX_ROOM_NAME_CHARS} characters, not all whitespace, {_LABEL}",
    _room_name,
)


@dataclass(frozen=True, slots=True)
class _LimitSpecs:
    """Specs whose bounds come from `Limits`, built once per distinct `Limits`."""

    limits: Limits
    body: Spec[str]
    status: Spec[str]
    history_limit: Spec[int]


@lru_cache(maxsize=16)
def _limit_specs(limits: Limits) -> _LimitSpecs:
    return _LimitSpecs(
        limits=limits,
        body=Spec(
            f"a string of 1..{limits.max_body_chars} characters {_PLAIN}",
            string(1, limits.max_body_chars, forbid=text.BODY),
        ),
        status=Spec(
            f"a string of 0..{limits.max_status_chars} characters {_LABEL}",
            string(0, limits.max_status_chars, forbid=text.LINE),
        ),
        history_limit=Spec(
            f"an integer 1..{limits.max_history_limit}",
            integer(1, limits.max_history_limit),
        ),
    )


class _Reject(Exception):
    """Internal: a frame failed a check other than a field's (`FieldError`), e.g. its
    protocol version. Never escapes the decoder."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------
# One parser per op: (validated frame object, limit specs, rid) -> Request.

_Parser = Callable[[Frame, _LimitSpecs, Rid], Request]


def _hello(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    # Check the version first: with another version the other fields may mean other things.
    version = optional(f, "v", VERSION)
    if version is not None and version != PROTOCOL_VERSION:
        raise _Reject(
            ErrorCode.UNSUPPORTED_VERSION,
            f"unsupported protocol version; this server speaks v{PROTOCOL_VERSION}",
        )
    return Hello(
        user=required(f, "user", USERNAME),
        password=required(f, "password", PASSWORD),
        device=required(f, "device", DEVICE),
        v=PROTOCOL_VERSION,
        rid=rid,
    )


def _register(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    return Register(required(f, "user", USERNAME), required(f, "password", PASSWORD), rid)


def _resume(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    return Resume(
        user=required(f, "user", USERNAME),
        device=required(f, "device", DEVICE),
        token=required(f, "token", TOKEN),
        last_seq=required(f, "last_seq", SEQ),
        rid=rid,
    )


def _login_token(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    return LoginToken(
        user=required(f, "user", USERNAME),
        device=required(f, "device", DEVICE),
        device_token=required(f, "device_token", TOKEN),
        rid=rid,
    )


def _bye(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    return Bye(forget=optional(f, "forget", BOOL) is True, rid=rid)


def _send(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    cmid = required(f, "cmid", CMID)
    body = required(f, "body", s.body)
    to, room = optional(f, "to", USERNAME), optional(f, "room", ROOM)
    exactly_one(to, room, "to", "room")
    return Send(cmid=cmid, body=body, to=to, room=room, rid=rid)


def _ack(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    return Ack(required(f, "seq", SEQ), rid)


def _presence_op(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    return SetPresence(required(f, "state", PRESENCE), optional(f, "text", s.status), rid)


def _user_op(cls: type[ContactAdd | ContactAccept | ContactRemove]) -> _Parser:
    def parse(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
        return cls(required(f, "user", USERNAME), rid)

    return parse


def _room_op(cls: type[RoomJoin | RoomLeave | RoomMembers]) -> _Parser:
    def parse(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
        return cls(required(f, "room", ROOM), rid)

    return parse


def _no_fields(cls: type[ContactList | RoomList | Ping]) -> _Parser:
    def parse(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
        return cls(rid)

    return parse


def _room_create(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    return RoomCreate(required(f, "name", ROOM_NAME), rid)


def _room_invite(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    return RoomInvite(required(f, "room", ROOM), required(f, "user", USERNAME), rid)


def _history(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    with_user, room = optional(f, "with", USERNAME), optional(f, "room", ROOM)
    exactly_one(with_user, room, "with", "room")
    limit = optional(f, "limit", s.history_limit)
    return History(
        with_user=with_user,
        room=room,
        before=optional(f, "before", MSG_ID),
        limit=s.limits.default_history_limit if limit is None else limit,
        rid=rid,
    )


def _typing(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    to, room = optional(f, "to", USERNAME), optional(f, "room", ROOM)
    exactly_one(to, room, "to", "room")
    active = optional(f, "active", BOOL)
    return Typing(to=to, room=room, active=True if active is None else active, rid=rid)


def _read(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    return Read(required(f, "msg_id", MSG_ID), rid)


def _password(f: Frame, s: _LimitSpecs, rid: Rid) -> Request:
    return PasswordChange(required(f, "old", PASSWORD), required(f, "new", PASSWORD), rid)


_PARSERS: Final[Mapping[str, _Parser]] = {
    "hello": _hello,
    "register": _register,
    "resume": _resume,
    "login_token": _login_token,
    "send": _send,
    "ack": _ack,
    "presence": _presence_op,
    "contact_add": _user_op(ContactAdd),
    "contact_accept": _user_op(ContactAccept),
    "contact_remove": _user_op(ContactRemove),
    "contacts": _no_fields(ContactList),
    "room_create": _room_create,
    "room_invite": _room_invite,
    "room_join": _room_op(RoomJoin),
    "room_leave": _room_op(RoomLeave),
    "room_members": _room_op(RoomMembers),
    "rooms": _no_fields(RoomList),
    "history": _history,
    "typing": _typing,
    "read": _read,
    "password": _password,
    "ping": _no_fields(Ping),
    "bye": _bye,
}

_OP_NAME = re.compile(r"[a-z_]{1,32}")


def _unknown_op_message(op: str) -> str:
    # Echo the op only when it is short and plain, so the reply stays readable.
    return f"unknown op '{op}'" if _OP_NAME.fullmatch(op) else "unknown op"


def _bad_json_message(line: bytes | bytearray) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return "frame is not valid UTF-8"
    return "frame is not valid JSON"


def parse_frame(line: bytes | bytearray, limits: Limits = DEFAULT_LIMITS) -> Request | FrameError:
    """Parse one frame (without its line terminator). Never raises."""
    return _parse_safely(line, _limit_specs(limits))


def _parse_safely(line: bytes | bytearray, specs: _LimitSpecs) -> Request | FrameError:
    try:
        return _parse(line, specs)
    except Exception:
        # Safety net: a decoder bug must not take the connection down or leak text.
        return FrameError(ErrorCode.INTERNAL, "internal error while decoding the frame")


def _parse(line: bytes | bytearray, specs: _LimitSpecs) -> Request | FrameError:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return FrameError(ErrorCode.BAD_JSON, _bad_json_message(line))
    if not isinstance(obj, dict):
        return FrameError(ErrorCode.BAD_FRAME, "frame must be a JSON object")
    frame: Frame = obj
    rid: Rid = None
    if frame.get("rid") is not None:
        try:
            rid = required(frame, "rid", RID)
        except FieldError as exc:
            return FrameError(ErrorCode.BAD_FIELD, str(exc))
    op = frame.get("op")
    if not isinstance(op, str):
        return FrameError(ErrorCode.BAD_FRAME, "frame must have a string field 'op'", rid)
    parser = _PARSERS.get(op)
    if parser is None:
        return FrameError(ErrorCode.UNKNOWN_OP, _unknown_op_message(op), rid)
    try:
        return parser(frame, specs, rid)
    except FieldError as exc:
        return FrameError(ErrorCode.BAD_FIELD, str(exc), rid)
    except _Reject as exc:
        return FrameError(exc.code, exc.message, rid)


# ---------------------------------------------------------------------------


class Decoder:
    """Incremental decoder for one connection (model: h11 / websockets protocol).

    Feed it whatever the socket returned; it yields requests and errors in
    order. After a fatal error it is `closed` and ignores further data.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._specs = _limit_specs(limits)
        self._buf = bytearray()
        self._scanned = 0  # prefix of _buf already known to hold no b"\n"
        self._errors = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def error_count(self) -> int:
        """Non-fatal protocol errors seen so far."""
        return self._errors

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered for a frame whose newline has not arrived yet."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> list[Request | FrameError]:
        """Consume `data`; return the requests and errors it completed."""
        out: list[Request | FrameError] = []
        if self._closed or not data:
            return out
        buf = self._buf
        buf += data
        max_frame = self._limits.max_frame_bytes
        start = 0
        # Only the new bytes are searched, so a frame trickling in stays O(n).
        scan = self._scanned
        while (nl := buf.find(b"\n", scan)) >= 0:
            if nl - start > max_frame:
                self._fail(out, ErrorCode.FRAME_TOO_LARGE, self._too_large_message())
                return out
            line = buf[start:nl]  # a copy, so the buffer stays resizable
            start = scan = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                continue  # blank line: a human pressed Enter
            self._handle(out, _parse_safely(line, self._specs))
            if self._closed:
                return out
        del buf[:start]
        self._scanned = len(buf)
        if len(buf) > max_frame:
            self._fail(out, ErrorCode.FRAME_TOO_LARGE, self._too_large_message())
        return out

    def receive_message(self, data: bytes) -> list[Request | FrameError]:
        """Consume one whole frame of a message-framed transport (a WebSocket text
        message): no newline splitting, the same limits and error budget.

        A message of only whitespace is ignored like a blank line. Newlines inside are
        JSON whitespace (a raw one inside a string is invalid JSON: ``bad_json``).
        """
        out: list[Request | FrameError] = []
        if self._closed:
            return out
        if len(data) > self._limits.max_frame_bytes:
            self._fail(out, ErrorCode.FRAME_TOO_LARGE, self._too_large_message())
        elif data.strip():
            self._handle(out, _parse_safely(data, self._specs))
        return out

    def reject(self, code: ErrorCode, message: str) -> list[Request | FrameError]:
        """A frame the transport could not hand over (a binary WebSocket message):
        a protocol error like the decoder's own, counted towards the budget."""
        out: list[Request | FrameError] = []
        if not self._closed:
            self._handle(out, FrameError(code, message))
        return out

    def _too_large_message(self) -> str:
        return f"frame exceeds {self._limits.max_frame_bytes} bytes"

    def _handle(self, out: list[Request | FrameError], item: Request | FrameError) -> None:
        out.append(item)
        if not isinstance(item, FrameError):
            return
        self._errors += 1
        if self._errors > self._limits.max_errors_per_connection:
            self._fail(out, ErrorCode.TOO_MANY_ERRORS, "too many protocol errors")

    def _fail(self, out: list[Request | FrameError], code: ErrorCode, message: str) -> None:
        out.append(FrameError(code, message, fatal=True))
        self._closed = True
        self._buf = bytearray()  # release the memory now; nothing more will be parsed
        self._scanned = 0


# ---------------------------------------------------------------------------
# Encoding (server -> client).


def encode(frame: Mapping[str, object]) -> bytes:
    """One frame as a JSON line. Raises TypeError on unserialisable values (a server bug)."""
    # orjson only serialises real dicts; enums and dataclasses are handled natively.
    obj = frame if isinstance(frame, dict) else dict(frame)
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


def error_frame(
    code: ErrorCode, message: str, rid: Rid = None, *, retry_after: float | None = None
) -> bytes:
    """An ``error`` frame (`frames.Error`); `rid` and `retry_after` are omitted when None."""
    return Error(code, message, retry_after).encode(rid)


def encode_error(error: FrameError) -> bytes:
    """The wire form of a decoder `FrameError`."""
    return Error(error.code, error.message, error.retry_after).encode(error.rid)
