"""The server side's exceptions, and the one place they become error frames.

The tree a request handler may raise (anything else is a bug)::

    Exception
     +-- RequestError            a documented code and a message safe for the peer
     +-- StoreError              app/store/errors.py
     |    +-- UserExists         -> user_exists (raised as RequestError by the handler)
     |    +-- NotFound           -> not_found
     |    +-- Forbidden          -> forbidden
     |    +-- StoreUnavailable   -> internal: a group commit ran out of its retry budget
 |    +-- StoreRejected      -> bad_field: a group commit refused this request's data
 |                              for good (not to be retried; logged by the batcher)
     +-- TRANSIENT_DB_ERRORS     -> internal, logged as a warning: a connection cut or
                                    a failover (app/store/errors.py decides which)

Any other exception costs one request: ``internal``, and a traceback in the log.
"""

from __future__ import annotations

from typing import Any

from app.logs import get_logger
from app.protocol import ErrorCode, error_frame
from app.store.errors import (
    TRANSIENT_DB_ERRORS,
    Forbidden,
    NotFound,
    StoreRejected,
    StoreUnavailable,
)
from app.worker import metrics

log = get_logger("session")


class RequestError(Exception):
    """A request failed with a documented code; the message is safe for the peer."""

    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


# The answer to a request whose data the database refused (`StoreRejected`): not
# `internal`, which clients retry, since the same request would fail again.
REJECTED_MESSAGE = "the server cannot store this {what}; do not resend it unchanged"


def error_reply(code: ErrorCode, message: str, rid: str | int | None, **extra: Any) -> bytes:
    """An error frame, counted by code in the metrics."""
    metrics.ERRORS.labels(code.value).inc()
    return error_frame(code, message, rid, **extra)


def reply_for(exc: Exception, op: str, rid: str | int | None) -> tuple[bytes, bool]:
    """The error frame that answers a request which raised ``exc``, and whether the
    connection must close (a fatal code). Call it from the ``except`` block."""
    if isinstance(exc, RequestError):
        return error_reply(exc.code, exc.message, rid, **exc.extra), exc.code.fatal
    if isinstance(exc, NotFound):
        return error_reply(ErrorCode.NOT_FOUND, str(exc), rid), False
    if isinstance(exc, Forbidden):
        return error_reply(ErrorCode.FORBIDDEN, str(exc), rid), False
    if isinstance(exc, StoreRejected):
        return error_reply(ErrorCode.BAD_FIELD, REJECTED_MESSAGE.format(what="request"), rid), False
    if isinstance(exc, StoreUnavailable):
        return error_reply(ErrorCode.INTERNAL, "the database is unavailable; retry", rid), False
    if isinstance(exc, TRANSIENT_DB_ERRORS):
        # A connection cut or a failover is not a bug (an error in a statement still
        # is, and is logged with its traceback below).
        log.warning("request_failed", op=op, error=type(exc).__name__)
        return error_reply(ErrorCode.INTERNAL, "temporary server error, retry", rid), False
    # A bug must cost one request, never the worker or the connection's order.
    log.exception("request_crashed", op=op)  # called in the except block
    return error_reply(ErrorCode.INTERNAL, "internal server error", rid), False
