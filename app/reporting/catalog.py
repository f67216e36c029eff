"""The reports ``switchboard report`` knows, and the views behind them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Report:
    name: str
    view: str  # in schema reporting
    description: str
    # The column --since/--until filter on, and how long one of its buckets
    # lasts (None: a point in time); no column: a live snapshot, not filterable.
    time_column: str | None
    bucket: timedelta | None
    order_by: str
    materialized: bool


REPORTS: tuple[Report, ...] = (
    Report(
        "active-users-daily",
        "active_users_daily",
        "users with a connected session during each UTC day",
        "day",
        DAY,
        "day",
        True,
    ),
    Report(
        "active-users-hourly",
        "active_users_hourly",
        "users with a connected session during each hour",
        "hour",
        HOUR,
        "hour",
        True,
    ),
    Report(
        "peak-sessions",
        "concurrent_sessions_hourly",
        "most sessions connected at the same time, per hour",
        "hour",
        HOUR,
        "hour",
        True,
    ),
    Report(
        "sessions-per-worker",
        "sessions_per_worker_hourly",
        "sessions on each worker per hour: seen, started there, peak at once",
        "hour",
        HOUR,
        "hour, worker_id",
        True,
    ),
    Report(
        "messages-hourly",
        "messages_hourly",
        "messages committed per hour, 1:1 and room",
        "hour",
        HOUR,
        "hour",
        True,
    ),
    Report(
        "delivery-latency",
        "delivery_latency_hourly",
        "commit to first delivery and to first ack, percentiles per hour of commit",
        "hour",
        HOUR,
        "hour",
        True,
    ),
    Report(
        "backlog",
        "undelivered_backlog",
        "messages from others that no device of the user has acknowledged (live)",
        None,
        None,
        "pending DESC, user_id",
        False,
    ),
    Report(
        "resumes",
        "resume_stats_hourly",
        "session resumes per hour by cause; time to resume after a worker death",
        "hour",
        HOUR,
        "hour",
        True,
    ),
    Report(
        "failovers",
        "failover_timeline",
        "workers started, drained, stopped or died and database failovers seen (live)",
        "at",
        None,
        "at",
        False,
    ),
)

BY_NAME = {r.name: r for r in REPORTS}

# Materialized views in refresh order (each after those it reads: the session
# intervals first), then the marker recording when the refresh finished.
MATERIALIZED = ("session_intervals", *(r.view for r in REPORTS if r.materialized))
REFRESH_MARKER = "refresh_info"
