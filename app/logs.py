"""Structured logs: one JSON object per line, naming the component and worker.

``log = get_logger("worker"); log.info("session_opened", user="alice")``
writes ``{"ts": ..., "level": "info", "component": "worker", "worker": "w1",
"event": "session_opened", "user": "alice"}``. Records from libraries go
through the same formatter with their logger name as the component.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson

_context: dict[str, str] = {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": getattr(record, "component", record.name),
        }
        entry.update(_context)
        entry["event"] = record.getMessage()
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class EventLogger:
    """A logger whose calls are an event name plus key/value fields."""

    def __init__(self, component: str) -> None:
        self._logger = logging.getLogger(f"switchboard.{component}")
        self._component = component

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level,
                event,
                exc_info=exc_info,
                extra={"component": self._component, "fields": fields},
            )

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, False, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, True, fields)


def get_logger(component: str) -> EventLogger:
    return EventLogger(component)


def configure(level: str = "INFO", stream: IO[str] | None = None, **context: str) -> None:
    """Send every log record to ``stream`` as JSON lines; ``context`` is added to each."""
    _context.clear()
    _context.update({k: v for k, v in context.items() if v})
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
