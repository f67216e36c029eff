"""Running reports on a replica, and refreshing the materialized views on the primary.

Reports connect to HAProxy's replica port as the ``reporting`` role, which can
read schema ``reporting`` and nothing else, in read-only transactions. The
materialized views are refreshed by the application role (their owner) on the
primary; a report can then wait until its replica has replayed the refresh.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from app.reporting.catalog import MATERIALIZED, REFRESH_MARKER, Report
from app.settings import Settings
from app.store.db import dsn

# Refreshes sort millions of rows: let them do it in memory.
REFRESH_WORK_MEM = "256MB"
REPLAY_POLL_S = 0.05


class ReportError(Exception):
    """A report could not run; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class ReportResult:
    report: Report
    columns: list[str]
    rows: list[tuple[Any, ...]]
    # Which node answered ("n2"), and when the materialized views were last refreshed.
    server: str
    refreshed_at: datetime | None
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class Refreshed:
    timings: list[tuple[str, float]]
    # The primary's WAL position after the refresh: a replica past it shows it.
    lsn: str


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def _node(settings: Settings, port: int) -> str:
    names = {settings.pg_port(n): n for n in settings.node_names()}
    return names.get(port, f"port {port}")


async def connect_replica(settings: Settings) -> tuple[asyncpg.Connection, str]:
    """A read-only connection to a replica as the ``reporting`` role, and the node's name."""
    try:
        conn = await asyncpg.connect(
            dsn(settings, replica=True, role="reporting"),
            timeout=settings.db_connect_timeout_s,
            server_settings={
                "application_name": "switchboard-report",
                "default_transaction_read_only": "on",
                "statement_timeout": str(int(settings.report_timeout_s * 1000)),
                "TimeZone": "UTC",
                # Compiling a plan costs more than running it on these sizes.
                "jit": "off",
            },
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ReportError(
            f"no replica answered on port {settings.db_replica_port}: {type(exc).__name__}"
        ) from None
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_json_text, decoder=orjson.loads, format="text"
    )
    row = await conn.fetchrow("SELECT pg_is_in_recovery() AS replica, inet_server_port() AS port")
    if not row["replica"]:
        await conn.close()
        raise ReportError("the replica port reached a primary; reports run on replicas only")
    return conn, _node(settings, int(row["port"]))


async def wait_for_replay(conn: asyncpg.Connection, lsn: str, timeout_s: float) -> None:
    """Wait until the replica behind ``conn`` has replayed the primary's WAL up to ``lsn``."""
    deadline = time.monotonic() + timeout_s
    while not await conn.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn):
        if time.monotonic() > deadline:
            raise ReportError(f"the replica did not replay up to {lsn} within {timeout_s:.0f} s")
        await asyncio.sleep(REPLAY_POLL_S)


def report_query(
    report: Report, since: datetime | None, until: datetime | None, limit: int | None
) -> tuple[str, list[Any]]:
    """The SELECT for a report and its parameters."""
    where: list[str] = []
    args: list[Any] = []
    column = report.time_column
    if (since or until) and column is None:
        raise ReportError(f"{report.name} is a live snapshot: --since/--until do not apply")
    if since is not None and column is not None:
        args.append(since)
        if report.bucket is not None:
            # A bucket counts when any part of it is inside the range.
            seconds = int(report.bucket.total_seconds())
            where.append(f"{column} + interval '{seconds} seconds' > ${len(args)}::timestamptz")
        else:
            where.append(f"{column} >= ${len(args)}::timestamptz")
    if until is not None and column is not None:
        args.append(until)
        where.append(f"{column} < ${len(args)}::timestamptz")
    sql = f"SELECT * FROM reporting.{report.view}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {report.order_by}"
    if limit is not None:
        args.append(limit)
        sql += f" LIMIT ${len(args)}"
    return sql, args


async def run_report(
    settings: Settings,
    report: Report,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    after_lsn: str | None = None,
) -> ReportResult:
    """Run one report on a replica; with ``after_lsn``, first wait until it has replayed that."""
    sql, args = report_query(report, since, until, limit)
    conn, node = await connect_replica(settings)
    try:
        if after_lsn is not None:
            await wait_for_replay(conn, after_lsn, settings.report_timeout_s)
        started = time.monotonic()
        try:
            stmt = await conn.prepare(sql)
            rows = await stmt.fetch(*args)
        except asyncpg.QueryCanceledError:
            raise ReportError(
                f"{report.name} ran past report_timeout_s ({settings.report_timeout_s:g} s)"
            ) from None
        elapsed = time.monotonic() - started
        columns = [a.name for a in stmt.get_attributes()]
        refreshed_at = await conn.fetchval(f"SELECT refreshed_at FROM reporting.{REFRESH_MARKER}")
    finally:
        await conn.close()
    return ReportResult(report, columns, [tuple(r) for r in rows], node, refreshed_at, elapsed)


async def refresh(settings: Settings, views: Sequence[str] = MATERIALIZED) -> Refreshed:
    """Refresh the materialized views on the primary, as their owner (the application role).

    ``CONCURRENTLY``: readers on the primary and on replicas are not blocked
    while a view is recomputed.
    """
    conn = await asyncpg.connect(
        dsn(settings),
        timeout=settings.db_connect_timeout_s,
        server_settings={
            "application_name": "switchboard-report-refresh",
            "work_mem": REFRESH_WORK_MEM,
            "TimeZone": "UTC",
            "jit": "off",
        },
    )
    timings: list[tuple[str, float]] = []
    try:
        for view in views:
            started = time.monotonic()
            await conn.execute(f"REFRESH MATERIALIZED VIEW CONCURRENTLY reporting.{view}")
            timings.append((view, time.monotonic() - started))
        await conn.execute(f"REFRESH MATERIALIZED VIEW reporting.{REFRESH_MARKER}")
        lsn = str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
    finally:
        await conn.close()
    return Refreshed(timings, lsn)
