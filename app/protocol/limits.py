"""Numeric limits of the v1 wire protocol.

`Limits` holds the knobs an operator may tune (the worker builds it from
`Settings`, where each has a ``SWITCHBOARD_<NAME>`` variable); the module
constants below are part of the protocol itself and are deliberately not
configurable, since clients rely on them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

PROTOCOL_VERSION: Final = 1

# Fixed by the protocol (changing one would be a protocol change).
MAX_RID_CHARS: Final = 64
MAX_CMID_CHARS: Final = 64
MAX_PASSWORD_CHARS: Final = 1024
MAX_DEVICE_CHARS: Final = 64
MIN_USERNAME_CHARS: Final = 3
MAX_USERNAME_CHARS: Final = 32
MAX_ROOM_NAME_CHARS: Final = 64
MIN_TOKEN_CHARS: Final = 16
MAX_TOKEN_CHARS: Final = 256
# Largest integer every JSON implementation represents exactly (JavaScript's 2**53).
MAX_ID: Final = 2**53


@dataclass(frozen=True, slots=True)
class Limits:
    """Tunable limits; defaults are the documented v1 values."""

    max_frame_bytes: int = 65536
    max_errors_per_connection: int = 20
    max_body_chars: int = 16384
    max_status_chars: int = 200
    max_history_limit: int = 100
    default_history_limit: int = 50

    def __post_init__(self) -> None:
        # Fail at startup on a nonsensical configuration, not mid-connection.
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Limits.{f.name} must be an int")
            minimum = 0 if f.name in ("max_errors_per_connection", "max_status_chars") else 1
            if value < minimum:
                raise ValueError(f"Limits.{f.name} must be >= {minimum}, got {value}")
        if self.default_history_limit > self.max_history_limit:
            raise ValueError("Limits.default_history_limit must be <= max_history_limit")


DEFAULT_LIMITS: Final = Limits()
