"""Field checks, shared by the request decoder (codec.py) and the server-frame readers (frames.py).

A `Spec` pairs a check (the accepted value, or None when invalid) with the
expectation a `FieldError` quotes: ``field 'cmid' must be a string of 1..64
printable ASCII characters``. Each reader turns a `FieldError` into its own error: the decoder
into a ``bad_field`` reply, the frame readers into `BadServerFrame`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

T = TypeVar("T")
Fields = Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Spec(Generic[T]):
    expect: str
    check: Callable[[object], T | None]


class FieldError(ValueError):
    """A field is missing, of the wrong type or out of range; the message names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def string(
    lo: int, hi: int, pattern: str | None = None, *, forbid: re.Pattern[str] | None = None
) -> Callable[[object], str | None]:
    """A string of ``lo..hi`` code points that fully matches ``pattern`` and in which
    ``forbid`` finds nothing (one of the classes of app/protocol/text.py, which hold
    only characters that ``str.isprintable`` refuses)."""
    compiled = re.compile(pattern) if pattern else None

    def check(value: object) -> str | None:
        if not isinstance(value, str) or not lo <= len(value) <= hi:
            return None
        if compiled is not None and compiled.fullmatch(value) is None:
            return None
        # A printable string holds none of the classes' characters (all unprintable):
        # isprintable() is a C loop three times faster than the search it skips.
        if forbid is not None and not value.isprintable() and forbid.search(value) is not None:
            return None
        return value

    return check


def integer(lo: int, hi: int) -> Callable[[object], int | None]:
    def check(value: object) -> int | None:
        # bool is a subclass of int, but JSON true is not a number.
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
            return value
        return None

    return check


def boolean(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _any_string(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


BOOL: Final = Spec("true or false", boolean)
# Type-only specs, for what the server sends: the client checks shapes, not policies.
STRING: Final = Spec("a string", _any_string)
INTEGER: Final = Spec("an integer", integer(-(2**64), 2**64))  # orjson ints fit
NUMBER: Final = Spec("a number", _number)


def invalid(key: str, spec: Spec[T]) -> FieldError:
    return FieldError(key, f"field '{key}' must be {spec.expect}")


def required(frame: Fields, key: str, spec: Spec[T]) -> T:
    """A required field; JSON null counts as missing."""
    raw = frame.get(key)
    value = None if raw is None else spec.check(raw)
    if value is None:
        raise invalid(key, spec)
    return value


def optional(frame: Fields, key: str, spec: Spec[T]) -> T | None:
    """An optional field; absent and null both give None."""
    raw = frame.get(key)
    if raw is None:
        return None
    value = spec.check(raw)
    if value is None:
        raise invalid(key, spec)
    return value


def exactly_one(a: object, b: object, a_key: str, b_key: str) -> None:
    if (a is None) == (b is None):
        raise FieldError(
            f"{a_key}/{b_key}", f"exactly one of fields '{a_key}' and '{b_key}' must be given"
        )
