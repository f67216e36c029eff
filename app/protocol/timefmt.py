"""The wire's timestamp format: RFC 3339 in UTC with milliseconds (docs/protocol.md)."""

from __future__ import annotations

from datetime import datetime

# The last conversion, (timestamp, text): see `rfc3339`.
_last: list[datetime | str | None] = [None, ""]


def rfc3339(ts: datetime) -> str:
    """UTC with milliseconds, 2026-11-26T14:46:12.185Z (PostgreSQL hands us UTC).

    Every message of a batch has the same timestamp (its transaction's start),
    so the last conversion is kept: most calls are answered from it.
    """
    if ts == _last[0]:
        return str(_last[1])
    text = ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    _last[0], _last[1] = ts, text
    return text
