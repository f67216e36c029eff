"""How fast `switchboard report` answers on a large, generated history.

    .venv/bin/python -m bench.report_speed [--messages 1000000] [--sessions 100000]

Starts a fresh cluster (always stopped and purged at the end), fills it with
bulk-generated SQL (this is a benchmark: the data does not go through the
protocol) shaped like what the workers write: users, rooms, messages with
their inbox rows, devices with acked positions (a few users behind), session
rows, and the events log (session opened, resumed, detached and closed,
deliveries, acks, worker deaths, failovers) over ``--days`` days, in daily
partitions. Then it refreshes the materialized views on the primary, waits
for a replica to replay the refresh, and runs every report there ``--runs``
times, printing timings (connect + query + close, as the CLI does) and a
markdown table for docs/reporting.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from app.cluster.launcher import LocalCluster
from app.reporting.catalog import REPORTS
from app.reporting.queries import refresh, run_report
from app.settings import Settings
from app.store import eventlog
from app.store.db import dsn
from tests.cluster_fixture import make_settings

WORKERS = ("w1", "w2", "w3")

USERS = """
INSERT INTO users (id, username, password_hash, created_at)
SELECT g, 'bench' || g, 'not-a-hash', now() - interval '60 days' FROM generate_series(1, $1) g
"""

ROOMS = """
INSERT INTO rooms (id, name, created_by)
SELECT g, 'room ' || g, 1 + (g * 7919) % $2 FROM generate_series(1, $1) g
"""

ROOM_MEMBERS = """
INSERT INTO room_members (room_id, user_id, status)
SELECT r, 1 + floor(random() * $2)::bigint, 'member'
FROM generate_series(1, $1) r, generate_series(1, $3) k
ON CONFLICT DO NOTHING
"""

# Messages spread evenly over the period; a room message's sender is a member.
MESSAGES = """
WITH rm AS MATERIALIZED (
    SELECT room_id, array_agg(user_id ORDER BY user_id) AS members
    FROM room_members GROUP BY room_id
), plan AS (
    SELECT g, random() < $3 AS is_room, 1 + floor(random() * $4)::bigint AS room,
           floor(random() * 1e9)::bigint AS r1, floor(random() * 1e9)::bigint AS r2
    FROM generate_series(1, $1) g
)
INSERT INTO messages (id, sender_id, cmid, sender_device, recipient_id, room_id, body, created_at)
SELECT p.g,
       CASE WHEN p.is_room THEN rm.members[1 + p.r1 % cardinality(rm.members)]
            ELSE 1 + p.r1 % $2 END,
       'b' || p.g, 'laptop',
       CASE WHEN p.is_room THEN NULL ELSE 1 + (p.r1 % $2 + 1 + p.r2 % ($2 - 1)) % $2 END,
       CASE WHEN p.is_room THEN p.room END,
       'benchmark message number ' || p.g,
       $5::timestamptz + (p.g::float8 / $1) * $6 * interval '1 second'
FROM plan p LEFT JOIN rm ON rm.room_id = p.room
"""

INBOX = """
WITH targets AS (
    SELECT id AS message_id, recipient_id AS user_id, created_at FROM messages
    WHERE recipient_id IS NOT NULL
    UNION ALL
    SELECT id, sender_id, created_at FROM messages
    UNION ALL
    SELECT m.id, rm.user_id, m.created_at FROM messages m
    JOIN room_members rm ON rm.room_id = m.room_id AND rm.user_id <> m.sender_id
)
INSERT INTO inbox (user_id, seq, kind, message_id, created_at)
SELECT user_id, row_number() OVER (PARTITION BY user_id ORDER BY message_id), 1, message_id,
       created_at
FROM targets
"""

COUNTERS = """
INSERT INTO inbox_counters (user_id, last_seq)
SELECT u.id, coalesce(max(i.seq), 0) FROM users u LEFT JOIN inbox i ON i.user_id = u.id
GROUP BY u.id
"""

# Most users have acked everything; a few are behind (the backlog report).
DEVICES = """
INSERT INTO devices (user_id, device, acked_seq)
SELECT user_id, 'laptop',
       CASE WHEN random() < $1 THEN floor(last_seq * random())::bigint ELSE last_seq END
FROM inbox_counters
"""

SESSION_PLAN = """
CREATE TEMP TABLE bench_sessions AS
SELECT g AS id, 1 + floor(random() * $2)::bigint AS user_id, w AS w1, 1 + w % 3 AS w2,
       t0, t0 + least(-ln(1 - random()) * 2700, 43200) * interval '1 second' AS t1,
       random() < 0.2 AS resumed, random() AS f, random() < 0.5 AS was_detached,
       CASE WHEN random() < 0.3 THEN 'bye' ELSE 'disconnected' END AS end_reason
FROM generate_series(1, $1) g,
     LATERAL (SELECT 1 + floor(random() * 3)::int AS w,
                     $3::timestamptz + random() * $4 * interval '1 second' + g * interval '0'
                         AS t0) x
"""

# A resume happens inside the session, and never in the future.
NO_FUTURE_RESUMES = """
UPDATE bench_sessions SET resumed = false WHERE t0 + (t1 - t0) * f > now() - interval '3 seconds'
"""

SESSIONS = """
INSERT INTO sessions (id, user_id, device, worker_id, remote_addr, state, epoch, connected_at,
                      last_seen_at, detached_at, closed_at, close_reason)
SELECT id, user_id, 'laptop', 'w' || CASE WHEN resumed THEN w2 ELSE w1 END, '127.0.0.1:40000',
       CASE WHEN t1 > now() THEN 'active' WHEN end_reason = 'bye' THEN 'closed'
            ELSE 'detached' END,
       CASE WHEN resumed THEN 2 ELSE 1 END, t0, t0,
       CASE WHEN t1 <= now() AND end_reason <> 'bye' THEN t1 END,
       CASE WHEN t1 <= now() AND end_reason = 'bye' THEN t1 END,
       CASE WHEN t1 <= now() THEN end_reason END
FROM bench_sessions
"""

SESSION_EVENTS = """
INSERT INTO events (at, kind, worker_id, user_id, session_id, epoch, reason, detail)
SELECT t0, 'session_opened', 'w' || w1, user_id, id, 1, NULL, NULL::jsonb FROM bench_sessions
UNION ALL
SELECT t0 + (t1 - t0) * f - interval '2 seconds', 'session_detached', 'w' || w1, user_id, id, 1,
       'disconnected', NULL
FROM bench_sessions WHERE resumed AND was_detached
UNION ALL
SELECT t0 + (t1 - t0) * f, 'session_resumed', 'w' || w2, user_id, id, 2, NULL,
       jsonb_build_object('previous_worker', 'w' || w1,
                          'previous_state', CASE WHEN was_detached THEN 'detached'
                                                 ELSE 'active' END)
FROM bench_sessions WHERE resumed
UNION ALL
SELECT t1, CASE WHEN end_reason = 'bye' THEN 'session_closed' ELSE 'session_detached' END,
       'w' || CASE WHEN resumed THEN w2 ELSE w1 END, user_id, id,
       CASE WHEN resumed THEN 2 ELSE 1 END, end_reason, NULL
FROM bench_sessions WHERE t1 <= now()
"""

# One delivery and one ack event per message received: more than the workers
# write (they log ranges, one per write or ack), so the timings err on the slow side.
MESSAGE_EVENTS = """
INSERT INTO events (at, kind, worker_id, user_id, epoch, seq)
SELECT i.created_at + (5 + random() * 200) * interval '1 millisecond', e.kind, 'w1',
       i.user_id, 1, i.seq
FROM inbox i
JOIN messages m ON m.id = i.message_id
JOIN devices d ON d.user_id = i.user_id AND i.seq <= d.acked_seq
CROSS JOIN (VALUES ('message_delivered'), ('message_acked')) AS e(kind)
WHERE i.user_id <> m.sender_id
"""

CLUSTER_EVENTS = """
INSERT INTO events (at, kind, worker_id, detail)
SELECT t, 'worker_died', 'w2',
       jsonb_build_object('last_renewed_at', t - interval '3.4 seconds',
                          'lease_expired_at', t - interval '0.4 seconds')
FROM generate_series($1::timestamptz + interval '5 hours', now(), interval '31 hours') t
UNION ALL
SELECT t + interval '2 seconds', 'worker_started', 'w2', '{"detached_sessions": 0}'::jsonb
FROM generate_series($1::timestamptz + interval '5 hours', now(), interval '31 hours') t
UNION ALL
SELECT t, 'db_failover', w,
       jsonb_build_object('from', 'n1', 'to', 'n2', 'outage_ms', 2400)
FROM generate_series($1::timestamptz + interval '11 hours', now(), interval '47 hours') t,
     unnest(ARRAY['w1', 'w2', 'w3']) w
"""

TABLES = ("users", "messages", "inbox", "sessions", "events", "devices", "inbox_counters")


async def generate(settings: Settings, args: argparse.Namespace) -> None:
    span_s = args.days * 86400
    start = datetime.now(UTC) - timedelta(seconds=span_s)
    conn = await asyncpg.connect(
        dsn(settings), server_settings={"work_mem": "256MB", "TimeZone": "UTC"}
    )
    pool = await asyncpg.create_pool(dsn(settings), min_size=1, max_size=1)
    assert pool is not None
    try:
        for day in range(args.days + 1):
            await eventlog.maintain(pool, args.days + 7, now=start + timedelta(days=day))
        await conn.execute("SELECT setseed(0.42)")
        steps = [
            ("users", USERS, (args.users,)),
            ("rooms", ROOMS, (args.rooms, args.users)),
            ("room members", ROOM_MEMBERS, (args.rooms, args.users, args.room_size)),
            (
                "messages",
                MESSAGES,
                (args.messages, args.users, args.room_share, args.rooms, start, span_s),
            ),
            ("inbox", INBOX, ()),
            ("inbox counters", COUNTERS, ()),
            ("devices", DEVICES, (args.backlog_share,)),
            ("session plan", SESSION_PLAN, (args.sessions, args.users, start, span_s)),
            ("no future resumes", NO_FUTURE_RESUMES, ()),
            ("sessions", SESSIONS, ()),
            ("session events", SESSION_EVENTS, ()),
            ("message events", MESSAGE_EVENTS, ()),
            ("cluster events", CLUSTER_EVENTS, (start,)),
        ]
        for name, sql, params in steps:
            t0 = time.monotonic()
            status = await conn.execute(sql, *params)
            print(f"  {name}: {status} ({time.monotonic() - t0:.1f} s)", flush=True)
        for table in ("users", "rooms", "messages", "sessions"):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))"
            )
        t0 = time.monotonic()
        await conn.execute("VACUUM ANALYZE")
        print(f"  vacuum analyze ({time.monotonic() - t0:.1f} s)", flush=True)
        for table in TABLES:
            n = await conn.fetchval(f"SELECT count(*) FROM {table}")
            print(f"  {table}: {n:,} rows", flush=True)
    finally:
        await pool.close()
        await conn.close()


async def measure(settings: Settings, runs: int) -> None:
    print("refresh (primary, REFRESH MATERIALIZED VIEW CONCURRENTLY):", flush=True)
    for attempt in (1, 2):
        done = await refresh(settings)
        total = sum(s for _, s in done.timings)
        print(f"  refresh {attempt}: {total:.1f} s", flush=True)
    for view, seconds in done.timings:
        print(f"    {view}: {seconds:.2f} s", flush=True)
    lines = [
        "| report | view | rows | min | median | max |",
        "|---|---|---|---|---|---|",
    ]
    first = True
    for report in REPORTS:
        times = []
        rows = 0
        for _ in range(runs):
            t0 = time.monotonic()
            result = await run_report(settings, report, after_lsn=done.lsn if first else None)
            first = False
            times.append(time.monotonic() - t0)
            rows = len(result.rows)
        kind = "materialized" if report.materialized else "live view"
        lines.append(
            f"| `{report.name}` | {kind} | {rows:,} | {min(times) * 1000:.0f} ms | "
            f"{statistics.median(times) * 1000:.0f} ms | {max(times) * 1000:.0f} ms |"
        )
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--rooms", type=int, default=1_000)
    parser.add_argument("--room-size", type=int, default=6, help="members drawn per room")
    parser.add_argument("--room-share", type=float, default=0.1, help="share of room messages")
    parser.add_argument(
        "--backlog-share", type=float, default=0.05, help="users whose device is behind"
    )
    parser.add_argument("--days", type=int, default=7, help="history length")
    parser.add_argument("--runs", type=int, default=5, help="runs of each report")
    args = parser.parse_args()
    cluster = LocalCluster(make_settings(workers=1), say=lambda line: print(line, flush=True))
    try:
        cluster.up()
        t0 = time.monotonic()
        print(
            f"generating {args.messages:,} messages, {args.sessions:,} sessions, "
            f"{args.users:,} users over {args.days} days ...",
            flush=True,
        )
        asyncio.run(generate(cluster.settings, args))
        print(f"generated in {time.monotonic() - t0:.0f} s", flush=True)
        asyncio.run(measure(cluster.settings, args.runs))
    finally:
        cluster.down(purge=True)


if __name__ == "__main__":
    main()
