"""Store errors.

StoreError
 +-- UserExists          the username is taken
 +-- NotFound            a user, room or message does not exist (or is not visible)
 +-- Forbidden           the caller may not do this
"""


class StoreError(Exception):
    pass


class UserExists(StoreError):
    pass


class NotFound(StoreError):
    pass


class Forbidden(StoreError):
    pass


# TEMPORARY (lead's working copy; replaced by the ground-floor branch on merge)
import asyncio  # noqa: E402

import asyncpg  # noqa: E402

TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.OperatorInterventionError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)
DB_ERRORS = (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError)


class StoreUnavailable(StoreError):
    """The database did not take the batch within the retry budget."""
