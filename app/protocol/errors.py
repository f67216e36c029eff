"""Error codes of the v1 protocol and the decoder's error item."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class ErrorCode(StrEnum):
    """Wire error codes; the value is what goes in ``{"op":"error","code":...}``."""

    BAD_JSON = "bad_json"  # the line is not valid UTF-8 JSON
    BAD_FRAME = "bad_frame"  # JSON, but not an object or no string "op"
    UNKNOWN_OP = "unknown_op"  # "op" names no known request
    BAD_FIELD = "bad_field"  # a field is missing, of the wrong type or out of range
    FRAME_TOO_LARGE = "frame_too_large"  # a line exceeds max_frame_bytes (fatal)
    TOO_MANY_ERRORS = "too_many_errors"  # too many protocol errors on one connection (fatal)
    UNSUPPORTED_VERSION = "unsupported_version"  # hello asked for a version other than 1
    NOT_AUTHENTICATED = "not_authenticated"  # the request needs a logged-in session
    ALREADY_AUTHENTICATED = "already_authenticated"  # hello/register/resume after login
    AUTH_FAILED = "auth_failed"  # wrong user or password
    ACCOUNT_DISABLED = "account_disabled"  # the account exists but may not log in
    RATE_LIMITED = "rate_limited"  # slow down; see retry_after
    OVERLOADED = "overloaded"  # the server is shedding load; see retry_after
    USER_EXISTS = "user_exists"  # register: the name is taken
    WEAK_PASSWORD = "weak_password"  # a new password is too short (< 12 characters)
    BAD_TOKEN = "bad_token"  # resume: the token is invalid or expired
    NOT_FOUND = "not_found"  # the user, room or message does not exist
    FORBIDDEN = "forbidden"  # the target exists but this user may not do that
    TOO_MANY_DEVICES = "too_many_devices"  # hello: max_devices_per_user other devices are in
    INTERNAL = "internal"  # a server fault; the request may be retried
    FLOOD = "flood"  # the client sent far too much too fast (fatal)
    SESSION_REPLACED = "session_replaced"  # the same device logged in elsewhere (fatal)
    KICKED = "kicked"  # an administrator closed the session or disabled the account (fatal)
    SHUTTING_DOWN = "shutting_down"  # the worker is stopping (fatal)
    AUTH_TIMEOUT = "auth_timeout"  # not logged in within auth_timeout_s of connecting (fatal)
    IDLE_TIMEOUT = "idle_timeout"  # logged in, but silent for idle_timeout_s (fatal)

    @property
    def fatal(self) -> bool:
        """Whether the server closes the connection after sending this code."""
        return self in FATAL_CODES


FATAL_CODES: Final = frozenset(
    {
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.TOO_MANY_ERRORS,
        ErrorCode.FLOOD,
        ErrorCode.SESSION_REPLACED,
        ErrorCode.KICKED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.AUTH_TIMEOUT,
        ErrorCode.IDLE_TIMEOUT,
    }
)

# The only codes `Decoder.receive_data` ever produces; the rest come from the server.
DECODER_CODES: Final = frozenset(
    {
        ErrorCode.BAD_JSON,
        ErrorCode.BAD_FRAME,
        ErrorCode.UNKNOWN_OP,
        ErrorCode.BAD_FIELD,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.TOO_MANY_ERRORS,
        ErrorCode.UNSUPPORTED_VERSION,
    }
)


@dataclass(frozen=True, slots=True)
class FrameError:
    """A request the decoder rejected; `message` is safe to send to the peer."""

    code: ErrorCode
    message: str
    rid: str | int | None = None
    fatal: bool = False
    # Seconds before the request may be sent again (`rate_limited` only).
    retry_after: float | None = None


class BadServerFrame(ValueError):
    """A frame from the server breaks the protocol: a field is missing or of the wrong type.

    Raised by the readers of app/protocol/frames.py on the client side; the message
    names the op and the field, e.g. ``'msg' frame: field 'seq' must be an integer``.
    """

    def __init__(self, op: str | None, field: str, message: str) -> None:
        super().__init__(message if op is None else f"{op!r} frame: {message}")
        self.op = op
        self.field = field
