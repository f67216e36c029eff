"""The group-commit statements as pg_stat_activity shows them."""

from __future__ import annotations

from app.store.messages import _READ_BATCH, _STORE_BATCH

# PostgreSQL's default track_activity_query_size: pg_stat_activity.query is cut there.
SHOWN_BYTES = 1024


def test_what_a_batch_inserts_is_within_what_pg_stat_activity_shows() -> None:
    """Operators (and the unanswered-commit tests) find a batch waiting for the standby
    by the table it inserts into."""
    for statement, table in ((_STORE_BATCH, "messages"), (_READ_BATCH, "receipts")):
        marker = f"INSERT INTO {table}".encode()
        assert 0 <= statement.encode().find(marker) <= SHOWN_BYTES - len(marker)
