"""Payloads of ``sb_push``, the signed NOTIFY by which workers (and the dashboard) reach
every worker: one frozen dataclass per kind, defined once.

Not part of the client protocol. app/store/social.py signs and sends a payload
(``push``, with the time of signing and a nonce); a worker checks the signature
(``verify_push``) and that it is fresh and new (``PushWindow``), then reads it
with `parse_push`, which returns None for a payload that is not one of these.
``encode()`` is the JSON the signature covers (no newline: it is not a line).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

import orjson

from app.protocol.errors import BadServerFrame
from app.protocol.fields import INTEGER, STRING, FieldError, Fields, Spec, optional, required
from app.protocol.frames import ServerFrame, parse_server_frame


@dataclass(frozen=True, slots=True)
class Forward:
    """Write ``frame`` to every local session of these users (presence, typing, invitations)."""

    to: list[int]
    frame: ServerFrame

    def encode(self) -> bytes:
        # The frame's own encoding, embedded as it is: one definition of its bytes.
        return orjson.dumps({"to": self.to, "f": orjson.Fragment(self.frame.encode()[:-1])})


@dataclass(frozen=True, slots=True)
class Replaced:
    """Close the connections holding these (user, session) below ``epoch``, with
    ``session_replaced``: a new login of the device (epoch None: any) or a resume took them."""

    sessions: list[tuple[int, int, int | None]]

    def encode(self) -> bytes:
        return orjson.dumps({"replaced": self.sessions})


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Every worker reads its users' inboxes from the tables: commits may have gone unannounced."""

    reason: str

    def encode(self) -> bytes:
        return orjson.dumps({"catch_up": self.reason})


@dataclass(frozen=True, slots=True)
class Kicked:
    """Close the connections holding these (user, session) with ``kicked``; ``reason`` is
    ``kicked`` (an administrator closed the session) or ``disabled`` (the account)."""

    sessions: list[tuple[int, int]]
    reason: str = "kicked"

    def encode(self) -> bytes:
        return orjson.dumps({"kicked": self.sessions, "reason": self.reason})


Push: TypeAlias = Forward | Replaced | CatchUp | Kicked


def _user_ids(value: object) -> list[int] | None:
    if isinstance(value, list) and all(INTEGER.check(v) is not None for v in value):
        return value
    return None


def _session(item: object) -> tuple[int, int] | None:
    """A [user, session] pair, from the first two elements of an array."""
    if not isinstance(item, list) or len(item) < 2:
        return None
    user, session = INTEGER.check(item[0]), INTEGER.check(item[1])
    return None if user is None or session is None else (user, session)


def _replaced(value: object) -> list[tuple[int, int, int | None]] | None:
    if not isinstance(value, list):
        return None
    out: list[tuple[int, int, int | None]] = []
    for item in value:
        pair = _session(item)
        if pair is None or len(item) != 3:
            return None
        epoch = INTEGER.check(item[2])
        if epoch is None and item[2] is not None:
            return None
        out.append((*pair, epoch))
    return out


def _kicked(value: object) -> list[tuple[int, int]] | None:
    if not isinstance(value, list):
        return None
    out: list[tuple[int, int]] = []
    for item in value:
        pair = _session(item)
        if pair is None or len(item) != 2:
            return None
        out.append(pair)
    return out


USER_IDS: Final = Spec("a list of integers", _user_ids)
REPLACED: Final = Spec("a list of [user, session, epoch or null]", _replaced)
KICKED: Final = Spec("a list of [user, session]", _kicked)


def _frame(value: object) -> ServerFrame | None:
    if not isinstance(value, dict):
        return None
    try:
        return parse_server_frame(value)
    except BadServerFrame:
        return None


FRAME: Final[Spec[ServerFrame]] = Spec("a server frame", _frame)


def parse_push(event: Mapping[str, object]) -> Push | None:
    """The payload (a verified, decoded ``sb_push``) as its class; None if it is malformed.

    Its kind is its key, looked for in this order: ``replaced``, ``catch_up``,
    ``kicked``, else a frame ``f`` to forward ``to`` users.
    """
    try:
        return _parse(event)
    except FieldError:
        return None


def _parse(event: Fields) -> Push:
    if "replaced" in event:
        return Replaced(required(event, "replaced", REPLACED))
    if "catch_up" in event:
        return CatchUp(required(event, "catch_up", STRING))
    if "kicked" in event:
        reason = optional(event, "reason", STRING)
        return Kicked(required(event, "kicked", KICKED), "kicked" if reason is None else reason)
    return Forward(required(event, "to", USER_IDS), required(event, "f", FRAME))
