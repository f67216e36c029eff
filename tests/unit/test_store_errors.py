"""The one classification of database errors (app/store/errors.py)."""

from __future__ import annotations

import asyncpg
import pytest

from app.store.errors import DB_ERRORS, StoreError, is_transient


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(),
        TimeoutError(),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
    ],
)
def test_failures_of_the_connection_node_or_transaction_are_transient(exc: Exception) -> None:
    assert is_transient(exc)
    assert isinstance(exc, DB_ERRORS)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.UndefinedTableError("relation does not exist"),
        asyncpg.InvalidPasswordError("password authentication failed"),
    ],
)
def test_a_statements_own_error_is_a_db_error_but_not_transient(exc: Exception) -> None:
    assert not is_transient(exc)
    assert isinstance(exc, DB_ERRORS)


def test_bugs_and_store_errors_are_neither() -> None:
    for exc in (KeyError("x"), ValueError("x"), StoreError("x")):
        assert not is_transient(exc)
        assert not isinstance(exc, DB_ERRORS)
