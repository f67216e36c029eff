"""events log and reporting schema

The ``events`` table (partitioned by day; partitions in schema
``event_partitions``), and schema ``reporting``: documented views over it and
over the application tables, materialized where expensive, readable by the
``reporting`` role and nothing else. docs/reporting.md describes every view.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies: a migration must not change when app code does.
CLUSTER_KINDS = (
    "'worker_started', 'worker_draining', 'worker_drained', 'worker_stopped', "
    "'worker_died', 'db_failover'"
)

# An interval per (session, epoch): from login or resume to detach, close or takeover.
# Materialized: four reports read it. DISTINCT ON: events are written at least once.
SESSION_INTERVALS = """
CREATE MATERIALIZED VIEW reporting.session_intervals AS
WITH starts AS (
    SELECT DISTINCT ON (session_id, epoch)
           session_id, epoch, user_id, worker_id, at AS started_at,
           CASE kind WHEN 'session_opened' THEN 'opened' ELSE 'resumed' END AS started_by
    FROM public.events
    WHERE kind IN ('session_opened', 'session_resumed')
    ORDER BY session_id, epoch, at
), ends AS (
    SELECT DISTINCT ON (session_id, epoch) session_id, epoch, at AS ended_at, reason
    FROM public.events
    WHERE kind IN ('session_detached', 'session_closed')
    ORDER BY session_id, epoch, at
), chained AS (
    SELECT s.*,
           lead(s.started_at) OVER (PARTITION BY s.session_id ORDER BY s.epoch) AS next_started_at
    FROM starts s
), ended AS (
    SELECT c.*, e.reason,
           CASE
               WHEN e.ended_at IS NOT NULL OR c.next_started_at IS NOT NULL
                   THEN least(e.ended_at, c.next_started_at)
               -- No end event (lost with a worker that died before writing it):
               -- fall back on the session row.
               WHEN r.epoch = c.epoch AND r.state = 'active' THEN NULL
               WHEN r.epoch = c.epoch THEN coalesce(r.detached_at, r.closed_at, c.started_at)
               ELSE coalesce(r.last_seen_at, c.started_at)
           END AS raw_ended_at,
           CASE
               WHEN e.ended_at IS NOT NULL
                    AND (c.next_started_at IS NULL OR e.ended_at <= c.next_started_at)
                   THEN e.reason
               WHEN c.next_started_at IS NOT NULL THEN 'taken_over'
               WHEN r.epoch = c.epoch AND r.state = 'active' THEN NULL
               ELSE 'unknown'
           END AS end_reason
    FROM chained c
    LEFT JOIN ends e ON e.session_id = c.session_id AND e.epoch = c.epoch
    LEFT JOIN public.sessions r ON r.id = c.session_id
)
SELECT session_id, epoch, user_id, worker_id, started_at, started_by,
       CASE WHEN raw_ended_at IS NOT NULL THEN greatest(started_at, raw_ended_at) END
           AS ended_at,
       end_reason
FROM ended
"""

ACTIVE_USERS_HOURLY = """
CREATE MATERIALIZED VIEW reporting.active_users_hourly AS
SELECT h.hour, count(DISTINCT i.user_id) AS active_users
FROM reporting.session_intervals i
CROSS JOIN LATERAL generate_series(
    date_trunc('hour', i.started_at, 'UTC'),
    date_trunc('hour', coalesce(i.ended_at, now()), 'UTC'),
    interval '1 hour'
) AS h(hour)
GROUP BY h.hour
"""

ACTIVE_USERS_DAILY = """
CREATE MATERIALIZED VIEW reporting.active_users_daily AS
SELECT d.day::date AS day, count(DISTINCT i.user_id) AS active_users
FROM reporting.session_intervals i
CROSS JOIN LATERAL generate_series(
    (i.started_at AT TIME ZONE 'UTC')::date::timestamp,
    (coalesce(i.ended_at, now()) AT TIME ZONE 'UTC')::date::timestamp,
    interval '1 day'
) AS d(day)
GROUP BY 1
"""

# The number of connected sessions steps up at each start and down at each end;
# an hour's peak is the highest level inside it, or the level it began with.
CONCURRENT_SESSIONS_HOURLY = """
CREATE MATERIALIZED VIEW reporting.concurrent_sessions_hourly AS
WITH steps AS (
    SELECT started_at AS at, 1 AS delta FROM reporting.session_intervals
    UNION ALL
    SELECT ended_at, -1 FROM reporting.session_intervals WHERE ended_at IS NOT NULL
), levels AS (
    SELECT at, sum(delta) OVER w AS level, row_number() OVER w AS n
    FROM steps
    WINDOW w AS (ORDER BY at, delta ROWS UNBOUNDED PRECEDING)
), per_hour AS (
    SELECT date_trunc('hour', at, 'UTC') AS hour, max(level) AS peak_in_hour,
           (array_agg(level ORDER BY n DESC))[1] AS closing_level
    FROM levels GROUP BY 1
), hours AS (
    SELECT generate_series(min(hour), date_trunc('hour', now(), 'UTC'), interval '1 hour') AS hour
    FROM per_hour
), filled AS (
    SELECT h.hour, p.peak_in_hour, p.closing_level,
           count(p.closing_level) OVER (ORDER BY h.hour) AS grp
    FROM hours h LEFT JOIN per_hour p ON p.hour = h.hour
), carried AS (
    SELECT hour, peak_in_hour,
           first_value(closing_level) OVER (PARTITION BY grp ORDER BY hour) AS level_at_end
    FROM filled
)
SELECT hour,
       greatest(coalesce(lag(level_at_end) OVER (ORDER BY hour), 0),
                coalesce(peak_in_hour, 0))::bigint AS peak_sessions
FROM carried
"""

SESSIONS_PER_WORKER_HOURLY = """
CREATE MATERIALIZED VIEW reporting.sessions_per_worker_hourly AS
WITH steps AS (
    SELECT worker_id, started_at AS at, 1 AS delta FROM reporting.session_intervals
    UNION ALL
    SELECT worker_id, ended_at, -1 FROM reporting.session_intervals WHERE ended_at IS NOT NULL
), levels AS (
    SELECT worker_id, at, sum(delta) OVER w AS level, row_number() OVER w AS n
    FROM steps
    WINDOW w AS (PARTITION BY worker_id ORDER BY at, delta ROWS UNBOUNDED PRECEDING)
), per_hour AS (
    SELECT worker_id, date_trunc('hour', at, 'UTC') AS hour, max(level) AS peak_in_hour,
           (array_agg(level ORDER BY n DESC))[1] AS closing_level
    FROM levels GROUP BY 1, 2
), hours AS (
    SELECT worker_id,
           generate_series(min(hour), date_trunc('hour', now(), 'UTC'), interval '1 hour') AS hour
    FROM per_hour GROUP BY worker_id
), filled AS (
    SELECT h.worker_id, h.hour, p.peak_in_hour, p.closing_level,
           count(p.closing_level) OVER (PARTITION BY h.worker_id ORDER BY h.hour) AS grp
    FROM hours h
    LEFT JOIN per_hour p ON p.worker_id = h.worker_id AND p.hour = h.hour
), carried AS (
    SELECT worker_id, hour, peak_in_hour,
           first_value(closing_level) OVER (PARTITION BY worker_id, grp ORDER BY hour)
               AS level_at_end
    FROM filled
), peaks AS (
    SELECT worker_id, hour,
           greatest(coalesce(lag(level_at_end) OVER (PARTITION BY worker_id ORDER BY hour), 0),
                    coalesce(peak_in_hour, 0)) AS peak_sessions
    FROM carried
), counts AS (
    SELECT i.worker_id, h.hour, count(DISTINCT i.session_id) AS sessions,
           count(*) FILTER (WHERE i.started_at >= h.hour) AS started
    FROM reporting.session_intervals i
    CROSS JOIN LATERAL generate_series(
        date_trunc('hour', i.started_at, 'UTC'),
        date_trunc('hour', coalesce(i.ended_at, now()), 'UTC'),
        interval '1 hour'
    ) AS h(hour)
    GROUP BY 1, 2
)
SELECT p.hour, p.worker_id, coalesce(c.sessions, 0) AS sessions,
       coalesce(c.started, 0) AS started, p.peak_sessions::bigint AS peak_sessions
FROM peaks p
LEFT JOIN counts c ON c.worker_id = p.worker_id AND c.hour = p.hour
WHERE p.peak_sessions > 0 OR coalesce(c.sessions, 0) > 0
"""

MESSAGES_HOURLY = """
CREATE MATERIALIZED VIEW reporting.messages_hourly AS
SELECT date_trunc('hour', created_at, 'UTC') AS hour,
       count(*) AS messages,
       count(*) FILTER (WHERE room_id IS NULL) AS direct_messages,
       count(*) FILTER (WHERE room_id IS NOT NULL) AS room_messages,
       count(DISTINCT sender_id) AS senders
FROM public.messages
GROUP BY 1
"""

# Per (message, recipient): first delivery and first ack. A delivered or acked
# event says "everything up to seq S", so an inbox entry's first delivery is the
# earliest such event of its user with seq >= its own: a running minimum over
# the user's entries and events in descending seq order.
MESSAGE_DELIVERY = """
CREATE VIEW reporting.message_delivery AS
WITH recipients AS (
    SELECT i.user_id, i.seq, m.id AS message_id, m.created_at AS committed_at,
           CASE WHEN m.room_id IS NULL THEN 'direct' ELSE 'room' END AS kind
    FROM public.inbox i
    JOIN public.messages m ON m.id = i.message_id
    WHERE i.kind = 1 AND i.user_id <> m.sender_id
      AND m.created_at >= (SELECT min(at) FROM public.events)
), marks AS (
    SELECT user_id, seq,
           CASE WHEN kind = 'message_delivered' THEN at END AS delivered_at,
           CASE WHEN kind = 'message_acked' THEN at END AS acked_at
    FROM public.events
    WHERE kind IN ('message_delivered', 'message_acked')
), merged AS (
    SELECT user_id, seq, 0 AS ord, message_id, committed_at, kind,
           NULL::timestamptz AS delivered_at, NULL::timestamptz AS acked_at
    FROM recipients
    UNION ALL
    SELECT user_id, seq, -1, NULL, NULL, NULL, delivered_at, acked_at FROM marks
), covered AS (
    SELECT message_id, user_id, seq, ord, kind, committed_at,
           min(delivered_at) OVER w AS delivered_at, min(acked_at) OVER w AS acked_at
    FROM merged
    WINDOW w AS (PARTITION BY user_id ORDER BY seq DESC, ord ROWS UNBOUNDED PRECEDING)
)
SELECT message_id, user_id AS recipient_id, seq, kind, committed_at,
       least(delivered_at, acked_at) AS first_delivered_at,
       acked_at AS first_acked_at,
       round(greatest(extract(epoch FROM least(delivered_at, acked_at) - committed_at), 0)
             * 1000, 1) AS delivery_ms,
       round(greatest(extract(epoch FROM acked_at - committed_at), 0) * 1000, 1) AS ack_ms
FROM covered
WHERE ord = 0
"""

DELIVERY_LATENCY_HOURLY = """
CREATE MATERIALIZED VIEW reporting.delivery_latency_hourly AS
SELECT date_trunc('hour', committed_at, 'UTC') AS hour,
       count(*) AS recipients,
       count(first_delivered_at) AS delivered,
       count(first_acked_at) AS acked,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY delivery_ms)::numeric, 1)
           AS delivery_p50_ms,
       round(percentile_cont(0.9) WITHIN GROUP (ORDER BY delivery_ms)::numeric, 1)
           AS delivery_p90_ms,
       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY delivery_ms)::numeric, 1)
           AS delivery_p99_ms,
       max(delivery_ms) AS delivery_max_ms,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ack_ms)::numeric, 1) AS ack_p50_ms,
       round(percentile_cont(0.9) WITHIN GROUP (ORDER BY ack_ms)::numeric, 1) AS ack_p90_ms,
       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ack_ms)::numeric, 1) AS ack_p99_ms,
       max(ack_ms) AS ack_max_ms
FROM reporting.message_delivery
GROUP BY 1
"""

# Live (not materialized): what waits now. "Acknowledged" is what is durable;
# the user's own messages (synced to their other devices) and receipts are not counted.
UNDELIVERED_BACKLOG = """
CREATE VIEW reporting.undelivered_backlog AS
SELECT u.id AS user_id, u.username, c.last_seq, coalesce(d.acked_seq, 0) AS acked_seq,
       p.pending, p.oldest_pending_at,
       round(extract(epoch FROM now() - p.oldest_pending_at), 1) AS oldest_pending_age_s
FROM public.inbox_counters c
JOIN public.users u ON u.id = c.user_id
LEFT JOIN (SELECT user_id, max(acked_seq) AS acked_seq FROM public.devices GROUP BY user_id) d
    ON d.user_id = c.user_id
CROSS JOIN LATERAL (
    SELECT count(*) AS pending, min(m.created_at) AS oldest_pending_at
    FROM public.inbox i
    JOIN public.messages m ON m.id = i.message_id
    WHERE i.user_id = c.user_id AND i.seq > coalesce(d.acked_seq, 0)
      AND i.kind = 1 AND m.sender_id <> c.user_id
) p
WHERE c.last_seq > coalesce(d.acked_seq, 0) AND p.pending > 0
"""

# Why each resume happened. A worker's death is dated by its last lease renewal
# (it was alive then, and died within one renewal interval after).
RESUMES = """
CREATE VIEW reporting.resumes AS
WITH resumed AS (
    SELECT DISTINCT ON (session_id, epoch)
           at AS resumed_at, session_id, epoch, user_id, worker_id,
           detail ->> 'previous_worker' AS previous_worker,
           detail ->> 'previous_state' AS previous_state
    FROM public.events
    WHERE kind = 'session_resumed'
    ORDER BY session_id, epoch, at
), deaths AS MATERIALIZED (
    SELECT worker_id, at AS declared_dead_at,
           (detail ->> 'last_renewed_at')::timestamptz AS last_renewed_at
    FROM public.events
    WHERE kind = 'worker_died'
), drains AS MATERIALIZED (
    SELECT worker_id, at AS drain_started_at
    FROM public.events
    WHERE kind = 'worker_draining'
), classified AS (
    SELECT r.*, p.started_at AS previous_started_at, p.ended_at AS previous_ended_at,
           p.end_reason AS previous_end_reason,
           (SELECT d.last_renewed_at FROM deaths d
            WHERE d.worker_id = r.previous_worker
              AND d.declared_dead_at >= coalesce(p.started_at, '-infinity')
              AND d.last_renewed_at <= r.resumed_at
              AND coalesce(p.ended_at, 'infinity') >= d.last_renewed_at
            ORDER BY d.declared_dead_at LIMIT 1) AS worker_last_renewed_at,
           (SELECT max(dr.drain_started_at) FROM drains dr
            WHERE dr.worker_id = r.previous_worker
              AND dr.drain_started_at >= coalesce(p.started_at, '-infinity')
              AND dr.drain_started_at <= r.resumed_at
              AND coalesce(p.ended_at, 'infinity') >= dr.drain_started_at) AS drain_started_at
    FROM resumed r
    LEFT JOIN reporting.session_intervals p
        ON p.session_id = r.session_id AND p.epoch = r.epoch - 1
)
SELECT resumed_at, session_id, epoch, user_id, worker_id, previous_worker, previous_state,
       CASE
           WHEN worker_last_renewed_at IS NOT NULL THEN 'worker_died'
           WHEN drain_started_at IS NOT NULL THEN 'worker_drained'
           ELSE coalesce(previous_end_reason, 'unknown')
       END AS cause,
       round(extract(epoch FROM resumed_at - CASE
           WHEN worker_last_renewed_at IS NOT NULL THEN worker_last_renewed_at
           WHEN previous_end_reason <> 'taken_over' THEN previous_ended_at
       END), 3) AS seconds_to_resume
FROM classified
"""

RESUME_STATS_HOURLY = """
CREATE MATERIALIZED VIEW reporting.resume_stats_hourly AS
SELECT date_trunc('hour', resumed_at, 'UTC') AS hour,
       count(*) AS resumes,
       count(*) FILTER (WHERE cause = 'worker_died') AS after_worker_death,
       count(*) FILTER (WHERE cause = 'worker_drained') AS after_drain,
       count(*) FILTER (WHERE cause NOT IN ('worker_died', 'worker_drained')) AS other,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds_to_resume)
             FILTER (WHERE cause = 'worker_died')::numeric, 3) AS after_death_p50_s,
       round(percentile_cont(0.9) WITHIN GROUP (ORDER BY seconds_to_resume)
             FILTER (WHERE cause = 'worker_died')::numeric, 3) AS after_death_p90_s,
       max(seconds_to_resume) FILTER (WHERE cause = 'worker_died') AS after_death_max_s
FROM reporting.resumes
GROUP BY 1
"""

FAILOVER_TIMELINE = f"""
CREATE VIEW reporting.failover_timeline AS
SELECT at, kind AS event, worker_id,
       detail ->> 'from' AS from_node,
       detail ->> 'to' AS to_node,
       (detail ->> 'outage_ms')::numeric AS outage_ms,
       detail
FROM public.events
WHERE kind IN ({CLUSTER_KINDS})
"""

PLAIN_VIEWS = {
    "events": "SELECT id, at, kind, worker_id, user_id, session_id, epoch, seq, reason, detail "
    "FROM public.events",
    "users": "SELECT id, username, disabled, presence_state, created_at FROM public.users",
    "sessions": "SELECT id, user_id, device, worker_id, state, epoch, connected_at, "
    "last_seen_at, detached_at, closed_at, close_reason FROM public.sessions",
    "messages": "SELECT id, sender_id, sender_device, recipient_id, room_id, "
    "CASE WHEN room_id IS NULL THEN 'direct' ELSE 'room' END AS kind, "
    "created_at AS committed_at FROM public.messages",
    "workers": "SELECT id, address, state, started_at, lease_expires_at FROM public.workers",
}

# (name, DDL, unique key for REFRESH ... CONCURRENTLY or None), in dependency order.
VIEWS: list[tuple[str, str, str | None]] = [
    ("session_intervals", SESSION_INTERVALS, "session_id, epoch"),
    ("active_users_hourly", ACTIVE_USERS_HOURLY, "hour"),
    ("active_users_daily", ACTIVE_USERS_DAILY, "day"),
    ("concurrent_sessions_hourly", CONCURRENT_SESSIONS_HOURLY, "hour"),
    ("sessions_per_worker_hourly", SESSIONS_PER_WORKER_HOURLY, "hour, worker_id"),
    ("messages_hourly", MESSAGES_HOURLY, "hour"),
    ("message_delivery", MESSAGE_DELIVERY, None),
    ("delivery_latency_hourly", DELIVERY_LATENCY_HOURLY, "hour"),
    ("undelivered_backlog", UNDELIVERED_BACKLOG, None),
    ("resumes", RESUMES, None),
    ("resume_stats_hourly", RESUME_STATS_HOURLY, "hour"),
    ("failover_timeline", FAILOVER_TIMELINE, None),
]

ROLE = "reporting"


def _if_role(sql: str) -> str:
    """Run ``sql`` only where the reporting role exists (it is cluster-wide, made by bootstrap)."""
    body = sql.replace("'", "''")
    return (
        f"DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN "
        f"EXECUTE '{body}'; END IF; END $$"
    )


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("user_id", sa.BigInteger(), nullable=True),
        sa.Column("session_id", sa.BigInteger(), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", postgresql.JSONB(), nullable=True),
        sa.PrimaryKeyConstraint("at", "id", name=op.f("pk_events")),
        postgresql_partition_by="RANGE (at)",
    )
    op.create_index(
        "ix_events_cluster",
        "events",
        ["at"],
        unique=False,
        postgresql_where=sa.text(f"kind IN ({CLUSTER_KINDS})"),
    )
    op.execute("CREATE SCHEMA event_partitions")
    op.execute("CREATE TABLE event_partitions.events_default PARTITION OF public.events DEFAULT")

    op.execute("CREATE SCHEMA reporting")
    for name, select in PLAIN_VIEWS.items():
        op.execute(f"CREATE VIEW reporting.{name} AS {select}")
    for name, ddl, key in VIEWS:
        op.execute(ddl)
        if key is not None:
            op.execute(f"CREATE UNIQUE INDEX ux_{name} ON reporting.{name} ({key})")
    op.execute("CREATE MATERIALIZED VIEW reporting.refresh_info AS SELECT now() AS refreshed_at")

    # Read-only by construction: the role gets SELECT on this schema and nothing
    # else (no table in public, no temporary tables, which PUBLIC may create by default).
    op.execute(_if_role(f"GRANT USAGE ON SCHEMA reporting TO {ROLE}"))
    op.execute(_if_role(f"GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO {ROLE}"))
    op.execute(
        _if_role(f"ALTER DEFAULT PRIVILEGES IN SCHEMA reporting GRANT SELECT ON TABLES TO {ROLE}")
    )
    op.execute(
        "DO $$ BEGIN EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', "
        "current_database()); END $$"
    )


def downgrade() -> None:
    op.execute(
        "DO $$ BEGIN EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', "
        "current_database()); END $$"
    )
    op.execute(
        _if_role(
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA reporting REVOKE SELECT ON TABLES FROM {ROLE}"
        )
    )
    op.execute("DROP SCHEMA reporting CASCADE")
    op.drop_index(
        "ix_events_cluster",
        table_name="events",
        postgresql_where=sa.text(f"kind IN ({CLUSTER_KINDS})"),
    )
    op.drop_table("events")
    op.execute("DROP SCHEMA event_partitions CASCADE")
