"""Migrations up and down, and the events partitions, on throwaway databases.

Each test gets a database of its own on the shared cluster, created by the
superuser and owned by the application role (the role that runs migrations in
production), and dropped afterwards: the cluster's own database, which the
other tests use, is never migrated here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from app.cluster.launcher import LocalCluster
from app.settings import Settings
from app.store import eventlog
from app.store.db import dsn, sqlalchemy_url
from app.store.migrate import alembic_config
from app.store.schema import metadata

pytestmark = pytest.mark.integration


async def superuser(settings: Settings, sql: str) -> None:
    conn = await asyncpg.connect(dsn(settings, role="superuser"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def scratch(cluster: LocalCluster) -> AsyncIterator[Settings]:
    settings = cluster.settings.replace(db_name=f"migtest_{uuid.uuid4().hex[:10]}")
    name, owner = settings.db_name, settings.db_user
    await superuser(settings, f'CREATE DATABASE "{name}" OWNER "{owner}"')
    try:
        yield settings
    finally:
        await superuser(settings, f'DROP DATABASE "{name}" WITH (FORCE)')


async def migrate(settings: Settings, direction: str, revision: str) -> None:
    # Alembic's env.py runs its own event loop: give it a thread.
    action = command.upgrade if direction == "up" else command.downgrade
    await asyncio.to_thread(action, alembic_config(settings), revision)


async def schema_diff(settings: Settings) -> list[Any]:
    """What autogenerate would change: the migrated schema against app.store.schema."""
    engine = create_async_engine(sqlalchemy_url(settings))
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), metadata
                )
            )
    finally:
        await engine.dispose()


async def fetch(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn(settings))
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def relations(settings: Settings) -> set[str]:
    rows = await fetch(
        settings,
        "SELECT n.nspname || '.' || c.relname AS name FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p', 'v', 'm') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
    )
    return {r["name"] for r in rows}


async def test_up_down_up_and_the_metadata_matches(scratch: Settings) -> None:
    await migrate(scratch, "up", "head")
    assert await schema_diff(scratch) == []
    after_head = await relations(scratch)
    assert {
        "public.events",
        "event_partitions.events_default",
        "reporting.messages_hourly",
        "reporting.failover_timeline",
        "reporting.refresh_info",
    } <= after_head
    (temp,) = await fetch(
        scratch, "SELECT has_database_privilege('reporting', current_database(), 'TEMP') AS t"
    )
    assert temp["t"] is False

    await migrate(scratch, "down", "0002")
    at_0002 = await relations(scratch)
    assert not {r for r in at_0002 if r.split(".")[0] in ("reporting", "event_partitions")}
    assert "public.events" not in at_0002 and "public.messages" in at_0002
    (temp,) = await fetch(
        scratch, "SELECT has_database_privilege('reporting', current_database(), 'TEMP') AS t"
    )
    assert temp["t"] is True

    await migrate(scratch, "down", "base")
    assert await relations(scratch) == {"public.alembic_version"}

    await migrate(scratch, "up", "head")
    assert await schema_diff(scratch) == []
    assert await relations(scratch) == after_head


def _day(text: str) -> date:
    return date.fromisoformat(text)


async def test_event_partitions_are_made_ahead_and_dropped_after_retention(
    scratch: Settings,
) -> None:
    await migrate(scratch, "up", "head")
    pool = await asyncpg.create_pool(dsn(scratch), min_size=1, max_size=2)
    assert pool is not None
    try:
        jan10 = datetime(2026, 1, 10, 12, tzinfo=UTC)
        done = await eventlog.maintain(pool, 14, now=jan10)
        assert done.created == [f"events_202601{d:02d}" for d in (9, 10, 11, 12)]
        assert (await eventlog.maintain(pool, 14, now=jan10)).created == []

        # A day without a partition lands in the default one, and moves out with its day.
        await pool.execute(
            "INSERT INTO events (at, kind) VALUES ('2026-01-20 08:00+00', 'probe'), "
            "('2025-12-01 08:00+00', 'probe')"
        )
        where = (
            "SELECT tableoid::regclass::text AS part FROM events WHERE kind = 'probe' ORDER BY at"
        )
        assert [r["part"] for r in await pool.fetch(where)] == [eventlog.DEFAULT_PARTITION] * 2
        jan20 = datetime(2026, 1, 20, 12, tzinfo=UTC)
        done = await eventlog.maintain(pool, 14, now=jan20)
        assert "events_20260120" in done.created and done.dropped == []
        # The December row is past the retention: deleted from the default partition.
        assert [r["part"] for r in await pool.fetch(where)] == ["event_partitions.events_20260120"]

        done = await eventlog.maintain(pool, 5, now=jan20)
        assert done.dropped == [f"events_202601{d:02d}" for d in (9, 10, 11, 12)]
        assert min(await eventlog.partitions(pool)) == _day("2026-01-19")

        # Only one maintainer at a time, across workers.
        async with pool.acquire() as holder, holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock($1)", eventlog.MAINTENANCE_LOCK_KEY)
            assert (await eventlog.maintain(pool, 5, now=jan20)).skipped
    finally:
        await pool.close()
