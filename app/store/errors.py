"""Store errors, and the one answer to "is this database error worth a retry?".

StoreError
 +-- UserExists          the username is taken
 +-- AdminExists         an admin of that name exists (``admin create``)
 +-- NotFound            a user, room or message does not exist (or is not visible)
 +-- Forbidden           the caller may not do this
 +-- StoreUnavailable    the database did not take a batch within the retry budget
 +-- StoreRejected       the database refused this item for good (its data, not the
                         connection): a batch statement failed on it alone

The database's own failures are not wrapped: callers catch asyncpg's and the
OS's classes through two tuples, decided here once for every caller:

- ``TRANSIENT_DB_ERRORS`` (or ``is_transient``): the connection, the node or the
  transaction failed, not the statement. Running the same statement again, on a
  fresh connection, may succeed; a write's outcome may be unknown, so only
  idempotent writes are retried. Use it where a retry follows.
- ``DB_ERRORS``: any trouble with the database, a statement's own error
  included. Use it where the caller gives up on this attempt and carries on
  (logs, answers "retry", tries again next tick) without telling the two apart.
"""

from __future__ import annotations

import asyncpg


class StoreError(Exception):
    pass


class UserExists(StoreError):
    pass


class AdminExists(StoreError):
    """``admin create`` for a name that is taken."""


class NotFound(StoreError):
    pass


class Forbidden(StoreError):
    pass


class StoreUnavailable(StoreError):
    """The database did not take the batch within the retry budget."""


class StoreRejected(StoreError):
    """The database refused this item for good: its statement failed with this item
    alone (a non-transient error such as a value PostgreSQL cannot store or a
    violated CHECK), so the same item would fail again. The message is the error's
    class name, never the database's text."""


TRANSIENT_DB_ERRORS: tuple[type[Exception], ...] = (
    # The socket failed: refused while HAProxy has no primary, reset on a failover.
    OSError,
    # connect or command_timeout ran out: the node may be gone, the outcome unknown.
    # (asyncio.TimeoutError is this class since Python 3.11.)
    TimeoutError,
    # asyncpg found the connection closed or unusable (closed mid-operation, pool closing).
    asyncpg.InterfaceError,
    # asyncpg's protocol state broke, in practice after a connection cut mid-message.
    asyncpg.InternalClientError,
    # Class 08: the server reports the connection lost or refused.
    asyncpg.PostgresConnectionError,
    # A demoted primary (or a standby) still behind the primary port for a moment.
    asyncpg.ReadOnlySQLTransactionError,
    # Class 57: shutdown, crash recovery, "cannot connect now" while a node starts,
    # a statement cancelled by statement_timeout or by an operator.
    asyncpg.OperatorInterventionError,
    # Class 40: PostgreSQL rolled the whole transaction back; running it again is the remedy.
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)

DB_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError)


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` is a database failure that a retry may get past."""
    return isinstance(exc, TRANSIENT_DB_ERRORS)
