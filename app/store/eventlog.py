"""The events log: what happened to sessions, workers, the database and messages.

Workers record events in memory (``EventLog.record`` appends a tuple) and one
background task writes them in batches, one ``INSERT ... SELECT FROM unnest``
per batch, off the request path. Transitions the database makes set-wise (the
reaper detaching a dead worker's sessions, a stopping worker detaching its
own) log their events in the same statement, through the ``log_*`` CTEs
below. A message's commit is not logged again: its ``messages`` row (with
``created_at``) is that record; deliveries and acks are logged as "this
session has everything up to seq S", once per write or ack, not per message.

Events are telemetry, written at least once: a worker killed with -9 loses at
most ``events_flush_interval_s`` of its buffer, and a batch retried after a
connection cut may be written twice. docs/reporting.md has the details.

Retention: ``events`` is partitioned by UTC day into schema
``event_partitions``; ``maintain`` creates the coming days' partitions and
drops those past ``events_retention_days``. A default partition catches rows
for days without one (moved out when that day's partition is made).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg
import orjson

from app.logs import get_logger
from app.settings import Settings
from app.store.errors import DB_ERRORS, TRANSIENT_DB_ERRORS

log = get_logger("events")

PARTITION_SCHEMA = "event_partitions"
DEFAULT_PARTITION = f"{PARTITION_SCHEMA}.events_default"
# pg_advisory lock key: one maintainer at a time across the workers.
MAINTENANCE_LOCK_KEY = 0x5B0A_E7E7
# Partitions made ahead of today, so rows rarely land in the default partition.
DAYS_AHEAD = 2


class EventKind(StrEnum):
    SESSION_OPENED = "session_opened"
    SESSION_RESUMED = "session_resumed"
    SESSION_DETACHED = "session_detached"
    SESSION_CLOSED = "session_closed"
    WORKER_STARTED = "worker_started"
    WORKER_DRAINING = "worker_draining"
    WORKER_DRAINED = "worker_drained"
    WORKER_STOPPED = "worker_stopped"
    WORKER_DIED = "worker_died"
    DB_FAILOVER = "db_failover"
    MESSAGE_DELIVERED = "message_delivered"
    MESSAGE_ACKED = "message_acked"


# at (unix time), kind, worker_id, user_id, session_id, epoch, seq, reason, detail (JSON)
Row = tuple[
    float, str, str | None, int | None, int | None, int | None, int | None, str | None, str | None
]

_INSERT = """
INSERT INTO events (at, kind, worker_id, user_id, session_id, epoch, seq, reason, detail)
SELECT to_timestamp(at), kind, worker_id, user_id, session_id, epoch, seq, reason, detail::jsonb
FROM unnest($1::float8[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::int[],
            $7::bigint[], $8::text[], $9::text[])
    AS t(at, kind, worker_id, user_id, session_id, epoch, seq, reason, detail)
"""


async def write_events(conn: asyncpg.Connection | asyncpg.Pool, rows: list[Row]) -> None:
    """Insert a batch of events in one statement."""
    columns = [list(c) for c in zip(*rows, strict=True)]
    await conn.execute(_INSERT, *columns)


# ---- events logged inside the statements that make the transitions ----------


def log_sessions_cte(source: str, kind: EventKind) -> str:
    """A CTE logging one event per row of CTE ``source``.

    ``source`` must return ``id, user_id, epoch, worker_id, close_reason`` of sessions.
    """
    return (
        f"logged_{source} AS (INSERT INTO events "
        "(kind, worker_id, user_id, session_id, epoch, reason) "
        f"SELECT '{kind.value}', worker_id, user_id, id, epoch, close_reason FROM {source})"
    )


def log_dead_workers_cte(source: str) -> str:
    """A CTE logging ``worker_died`` per row of CTE ``source``
    (``id, lease_expires_at, renewed_at, reason``): when the worker was last known
    alive (its last renewal), when its lease ran out, and why it was declared dead.
    """
    return (
        f"logged_{source} AS (INSERT INTO events (kind, worker_id, detail) "
        f"SELECT '{EventKind.WORKER_DIED.value}', id, jsonb_build_object("
        "'lease_expired_at', lease_expires_at, 'last_renewed_at', renewed_at, "
        f"'reason', reason) FROM {source})"
    )


# ---- the buffer in each worker -----------------------------------------------


class EventLog:
    """A worker's events, buffered in memory and written in batches by one task."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self._buffer: deque[Row] = deque()
        self._full = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task[None] | None = None
        self._node_names = {settings.pg_port(n): n for n in settings.node_names()}
        # The primary the delivery listener last reached, and when it lost it.
        self._primary: tuple[str, datetime] | None = None
        self._primary_lost_at: float | None = None
        self.written = 0
        self.dropped = 0

    # ---- recording (cheap: called on request and delivery paths) ----------
    def record(
        self,
        kind: EventKind,
        *,
        user_id: int | None = None,
        session_id: int | None = None,
        epoch: int | None = None,
        seq: int | None = None,
        reason: str | None = None,
        detail: dict[str, Any] | None = None,
        worker_id: str | None = None,
    ) -> None:
        if len(self._buffer) >= self.settings.events_buffer_max:
            self.dropped += 1  # the database is away for long: keep memory bounded
            return
        self._buffer.append(
            (
                time.time(),
                kind.value,
                worker_id or self.worker_id,
                user_id,
                session_id,
                epoch,
                seq,
                reason,
                orjson.dumps(detail).decode() if detail is not None else None,
            )
        )
        if len(self._buffer) >= self.settings.events_batch_max:
            self._full.set()

    def session_opened(self, user_id: int, session_id: int, epoch: int) -> None:
        self.record(EventKind.SESSION_OPENED, user_id=user_id, session_id=session_id, epoch=epoch)

    def session_replaced(
        self, user_id: int, session_id: int, epoch: int, worker_id: str | None
    ) -> None:
        """A new login of the same device closed this session (wherever it was)."""
        self.record(
            EventKind.SESSION_CLOSED,
            user_id=user_id,
            session_id=session_id,
            epoch=epoch,
            reason="replaced",
            worker_id=worker_id,
        )

    def session_resumed(
        self,
        user_id: int,
        session_id: int,
        epoch: int,
        previous_worker: str,
        previous_state: str,
    ) -> None:
        self.record(
            EventKind.SESSION_RESUMED,
            user_id=user_id,
            session_id=session_id,
            epoch=epoch,
            detail={"previous_worker": previous_worker, "previous_state": previous_state},
        )

    def session_ended(
        self, user_id: int, session_id: int, epoch: int, reason: str, resumable: bool
    ) -> None:
        kind = EventKind.SESSION_DETACHED if resumable else EventKind.SESSION_CLOSED
        self.record(kind, user_id=user_id, session_id=session_id, epoch=epoch, reason=reason)

    def delivered(self, user_id: int, session_id: int, epoch: int, seq: int) -> None:
        """This session has been written every inbox entry up to ``seq``."""
        self.record(
            EventKind.MESSAGE_DELIVERED,
            user_id=user_id,
            session_id=session_id,
            epoch=epoch,
            seq=seq,
        )

    def acked(self, user_id: int, session_id: int, epoch: int, seq: int) -> None:
        """This session's device acknowledged every inbox entry up to ``seq``."""
        self.record(
            EventKind.MESSAGE_ACKED, user_id=user_id, session_id=session_id, epoch=epoch, seq=seq
        )

    def worker_started(self, detached_sessions: int) -> None:
        self.record(
            EventKind.WORKER_STARTED,
            detail={"pid": os.getpid(), "detached_sessions": detached_sessions},
        )

    def worker_draining(self, connections: int) -> None:
        self.record(EventKind.WORKER_DRAINING, detail={"connections": connections})

    def worker_drained(self, forced: int, seconds: float) -> None:
        self.record(
            EventKind.WORKER_DRAINED, detail={"forced": forced, "seconds": round(seconds, 3)}
        )

    def worker_stopped(self) -> None:
        self.record(EventKind.WORKER_STOPPED)

    # ---- which node is the primary, as the delivery listener sees it -------
    def primary_lost(self) -> None:
        if self._primary_lost_at is None:
            self._primary_lost_at = time.time()

    def primary_connected(self, port: int, started_at: datetime) -> None:
        """The listener (re)connected; a different primary than before is a failover."""
        node = self._node_names.get(port, str(port))
        previous = self._primary
        if previous is not None and previous != (node, started_at):
            detail: dict[str, Any] = {"from": previous[0], "to": node}
            if previous[0] == node:
                detail["restarted"] = True
            if self._primary_lost_at is not None:
                detail["lost_at"] = datetime.fromtimestamp(self._primary_lost_at, UTC).isoformat()
                detail["outage_ms"] = round((time.time() - self._primary_lost_at) * 1000)
            self.record(EventKind.DB_FAILOVER, detail=detail)
            log.warning("db_failover_observed", **detail)
        self._primary = (node, started_at)
        self._primary_lost_at = None

    # ---- writing -----------------------------------------------------------
    def start(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop the writer task and write what is left (bounded by the shutdown grace)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pool is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), self.settings.shutdown_grace_s)

    async def _run(self) -> None:
        s = self.settings
        next_maintenance = 0.0
        while True:
            if time.monotonic() >= next_maintenance:
                done = await self._maintain()
                # After a failure try again soon; the default partition holds the rows meanwhile.
                next_maintenance = time.monotonic() + (
                    s.events_maintenance_interval_s if done else 60.0
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), s.events_flush_interval_s)
            self._full.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write the buffer in batches; on a connection problem keep the rest for later."""
        assert self._pool is not None, "flush needs start() first"
        while self._buffer:
            n = min(self.settings.events_batch_max, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(n)]
            try:
                await write_events(self._pool, batch)
            except asyncio.CancelledError:
                # Stopping mid-write: close() writes it again (at least once).
                self._buffer.extendleft(reversed(batch))
                raise
            except TRANSIENT_DB_ERRORS as exc:
                self._buffer.extendleft(reversed(batch))
                log.warning("events_write_retry", events=len(batch), error=type(exc).__name__)
                return
            except asyncpg.PostgresError as exc:
                # Not a connection problem: retrying the same rows would fail forever.
                self.dropped += len(batch)
                log.error("events_write_failed", events=len(batch), error=type(exc).__name__)
                continue
            self.written += len(batch)

    async def _maintain(self) -> bool:
        assert self._pool is not None
        try:
            result = await maintain(self._pool, self.settings.events_retention_days)
        except DB_ERRORS as exc:
            log.warning("events_maintenance_failed", error=type(exc).__name__)
            return False
        if result.created or result.dropped:
            log.info("events_partitions", created=result.created, dropped=result.dropped)
        return True


# ---- partitions and retention --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Maintenance:
    created: list[str]
    dropped: list[str]
    # Another worker held the maintenance lock: nothing was done here.
    skipped: bool = False


def partition_name(day: date) -> str:
    return f"events_{day:%Y%m%d}"


_LIST_PARTITIONS = f"""
SELECT c.relname FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.inhparent = 'public.events'::regclass AND n.nspname = '{PARTITION_SCHEMA}'
  AND c.relname ~ '^events_[0-9]{{8}}$'
"""


async def partitions(conn: asyncpg.Connection | asyncpg.Pool) -> dict[date, str]:
    """The daily partitions of ``events``, by day."""
    rows = await conn.fetch(_LIST_PARTITIONS)
    return {
        datetime.strptime(r["relname"][len("events_") :], "%Y%m%d").date(): r["relname"]
        for r in rows
    }


async def maintain(
    pool: asyncpg.Pool, retention_days: int, *, now: datetime | None = None
) -> Maintenance:
    """Create the partitions for yesterday to ``DAYS_AHEAD`` days on; drop expired ones.

    A day's partition covers [day 00:00 UTC, next day 00:00 UTC) and is dropped
    once the whole day is more than ``retention_days`` days old.
    """
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    oldest_kept = today - timedelta(days=retention_days)
    created: list[str] = []
    dropped: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", MAINTENANCE_LOCK_KEY):
            return Maintenance([], [], skipped=True)
        # Never queue for long behind a reader: inserts would queue behind us.
        await conn.execute("SET LOCAL lock_timeout = '1s'")
        existing = await partitions(conn)
        for offset in range(-1, DAYS_AHEAD + 1):
            day = today + timedelta(days=offset)
            if day not in existing and day >= oldest_kept:
                await _create_partition(conn, day)
                created.append(partition_name(day))
        for day, name in sorted(existing.items()):
            if day < oldest_kept:
                await conn.execute(f"DROP TABLE {PARTITION_SCHEMA}.{name}")
                dropped.append(name)
        await conn.execute(
            f"DELETE FROM {DEFAULT_PARTITION} WHERE at < $1",
            datetime(oldest_kept.year, oldest_kept.month, oldest_kept.day, tzinfo=UTC),
        )
    return Maintenance(created, dropped)


async def _create_partition(conn: asyncpg.Connection, day: date) -> None:
    """Make ``day``'s partition, moving any of its rows out of the default partition first."""
    name = f"{PARTITION_SCHEMA}.{partition_name(day)}"
    lower = datetime(day.year, day.month, day.day, tzinfo=UTC)
    upper = lower + timedelta(days=1)
    await conn.execute(
        f"CREATE TABLE {name} (LIKE public.events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
    await conn.execute(
        f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE at >= $1 AND at < $2 "
        f"RETURNING *) INSERT INTO {name} SELECT * FROM moved",
        lower,
        upper,
    )
    # Bounds are literals: DDL takes no parameters.
    await conn.execute(
        f"ALTER TABLE public.events ATTACH PARTITION {name} "
        f"FOR VALUES FROM ('{lower.isoformat()}') TO ('{upper.isoformat()}')"
    )


async def primary_identity(conn: asyncpg.Connection) -> tuple[int, datetime]:
    """The port and start time of the PostgreSQL server behind this connection."""
    row = await conn.fetchrow("SELECT inet_server_port() AS port, pg_postmaster_start_time() AS t")
    return int(row["port"]), row["t"]
