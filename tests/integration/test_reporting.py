"""SQL reporting: known activity through the real protocol, then exact report numbers.

The reports are cluster-wide and this module kills a worker and switches the
database over, so it runs on a cluster of its own (two workers): the shared
cluster's other tests would disturb the numbers, and be disturbed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.cluster import patroni
from app.cluster.launcher import LocalCluster
from app.cluster.process import PidRecord, wait_gone
from app.reporting import cli as report_cli
from app.reporting.catalog import BY_NAME
from app.reporting.queries import ReportResult, refresh, run_report
from app.store.db import dsn
from tests.cluster_fixture import make_settings, running_cluster
from tests.integration.helpers import login, new_user, only_worker, register
from tests.linechat import LineClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rcluster() -> Iterator[LocalCluster]:
    # Unsupervised: w2 is killed and must stay dead (its worker_died is reported).
    settings = make_settings(workers=2, events_flush_interval_s=0.2, supervise=False)
    with running_cluster(settings) as c:
        yield c


@dataclass(frozen=True, slots=True)
class Activity:
    started: datetime
    hour: datetime
    users: dict[str, int]  # name -> id
    old_leader: str
    new_leader: str
    refreshed_lsn: str


async def until(what: str, check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def primary(cluster: LocalCluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn(cluster.settings))
    try:
        yield conn
    finally:
        await conn.close()


async def events_seen(cluster: LocalCluster, sql: str, *args: Any) -> bool:
    """Whether the workers have written the expected events (read-only check)."""
    try:
        async with primary(cluster) as conn:
            return bool(await conn.fetchval(sql, *args))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False  # during the switchover


def switchover(cluster: LocalCluster) -> tuple[str, str]:
    """A planned Patroni switchover to the synchronous standby: (old leader, new leader)."""
    s = cluster.settings
    view = patroni.cluster_view(s)
    assert view is not None and view.leader is not None
    leader = view.leader.name
    candidate = next(m.name for m in view.members if m.role == "sync_standby")
    patroni.switchover(s, leader, candidate)  # raises unless Patroni answers 200
    cluster.wait_db_healthy(90)
    return leader, candidate


async def wait_out_the_hour(margin_s: float = 75.0) -> None:
    """Hourly numbers are exact only if the activity stays inside one hour."""
    now = datetime.now(UTC)
    left = 3600 - (now.minute * 60 + now.second)
    if left < margin_s:
        await asyncio.sleep(left + 1)


@pytest.fixture(scope="module")
async def activity(rcluster: LocalCluster) -> Activity:
    """Alice, Bob, Carol and Dave talk; Bob's worker dies; the database switches over.

    - alice (w1) sends bob (w2) 3 messages; bob gets them and acks;
    - alice makes a room with bob and carol (w1) and sends 2 messages there;
      bob acks them, carol reads but never acks;
    - alice sends dave (never logged in) 1 message;
    - w2 is killed with -9; bob resumes on w1; carol says bye;
    - a Patroni switchover moves the primary.
    """
    await wait_out_the_hour()
    started = datetime.now(UTC)
    cluster = rcluster
    alice, bob, carol, dave = (new_user(p) for p in ("alice", "bob", "carol", "dave"))
    await register(cluster, dave)
    a, _ = await login(cluster, alice, worker="w1")
    b, bob_welcome = await login(cluster, bob, worker="w2")
    c, _ = await login(cluster, carol, worker="w1")

    for i in range(3):
        sent = await a.request({"op": "send", "to": bob, "cmid": f"d{i}", "body": f"hi {i}"})
        assert sent["op"] == "sent"
    assert [(await b.recv_until("msg"))["seq"] for _ in range(3)] == [1, 2, 3]
    assert (await b.request({"op": "ack", "seq": 3}))["op"] == "ok"

    room = (await a.request({"op": "room_create", "name": "reports"}))["room"]
    for who, client in ((bob, b), (carol, c)):
        assert (await a.request({"op": "room_invite", "room": room, "user": who}))["op"] == "ok"
        assert (await client.request({"op": "room_join", "room": room}))["op"] == "room"
    for i in range(2):
        sent = await a.request({"op": "send", "room": room, "cmid": f"r{i}", "body": f"all {i}"})
        assert sent["op"] == "sent"
    assert [(await b.recv_until("msg"))["seq"] for _ in range(2)] == [4, 5]
    assert (await b.request({"op": "ack", "seq": 5}))["op"] == "ok"
    assert [(await c.recv_until("msg"))["seq"] for _ in range(2)] == [1, 2]
    sent = await a.request({"op": "send", "to": dave, "cmid": "x", "body": "are you there?"})
    assert sent["op"] == "sent"

    async with primary(cluster) as conn:
        ids = await conn.fetch(
            "SELECT username, id FROM users WHERE username = ANY($1::text[])",
            [alice, bob, carol, dave],
        )
    users = {r["username"]: r["id"] for r in ids}
    # Bob's login on w2 must be written before w2 dies (events are flushed every 0.2 s).
    await until(
        "session and delivery events",
        lambda: events_seen(
            cluster,
            "SELECT count(*) = 3 FROM events WHERE kind = 'session_opened' "
            "AND user_id = ANY($1::bigint[]) AND EXISTS (SELECT 1 FROM events "
            "WHERE kind = 'message_acked' AND user_id = $2 AND seq = 5) AND EXISTS "
            "(SELECT 1 FROM events WHERE kind = 'message_delivered' AND user_id = $3 AND seq = 2)",
            [users[alice], users[bob], users[carol]],
            users[bob],
            users[carol],
        ),
    )

    w2 = cluster.pid_of("w2")
    assert w2 is not None
    os.kill(w2, signal.SIGKILL)
    await asyncio.to_thread(wait_gone, [PidRecord(w2, None)], 10)
    with only_worker(cluster, "w1"):
        b2 = await LineClient.connect(cluster.settings.host, cluster.settings.client_port)
    welcome = await b2.request(
        {
            "op": "resume",
            "user": bob,
            "device": "laptop",
            "token": bob_welcome["resume_token"],
            "last_seq": 5,
        }
    )
    assert welcome["op"] == "welcome" and welcome["worker"] == "w1", welcome
    await until(
        "w2 declared dead",
        lambda: events_seen(
            cluster,
            "SELECT count(*) = 1 FROM events WHERE kind = 'worker_died' AND worker_id = 'w2'",
        ),
    )
    assert (await c.request({"op": "bye"}))["op"] == "ok"

    old_leader, new_leader = await asyncio.to_thread(switchover, cluster)
    await until(
        "the failover seen by w1",
        lambda: events_seen(
            cluster,
            "SELECT count(*) = 1 FROM events WHERE kind = 'db_failover' "
            "AND detail ->> 'to' = $1 AND EXISTS (SELECT 1 FROM events "
            "WHERE kind = 'session_closed' AND reason = 'bye' AND user_id = $2)",
            new_leader,
            users[carol],
        ),
        timeout=30,
    )
    for client in (a, b, b2, c):
        await client.close()
    done = await refresh(cluster.settings)
    return Activity(
        started,
        started.replace(minute=0, second=0, microsecond=0),
        users,
        old_leader,
        new_leader,
        done.lsn,
    )


async def report(cluster: LocalCluster, activity: Activity, name: str, **kw: Any) -> ReportResult:
    result = await run_report(
        cluster.settings, BY_NAME[name], after_lsn=activity.refreshed_lsn, **kw
    )
    # Read on a replica, never on the primary.
    assert result.server in cluster.settings.node_names()
    assert result.server != activity.new_leader
    return result


def rows(result: ReportResult) -> list[dict[str, Any]]:
    return [dict(zip(result.columns, r, strict=True)) for r in result.rows]


def the_hour(result: ReportResult, activity: Activity) -> dict[str, Any]:
    (row,) = [r for r in rows(result) if r["hour"] == activity.hour]
    return row


async def test_active_users_and_peak_sessions(rcluster: LocalCluster, activity: Activity) -> None:
    hourly = await report(rcluster, activity, "active-users-hourly", since=activity.started)
    assert rows(hourly) == [{"hour": activity.hour, "active_users": 3}]
    daily = await report(rcluster, activity, "active-users-daily")
    assert rows(daily) == [{"day": activity.hour.date(), "active_users": 3}]
    # alice, bob and carol at once; bob's resume replaced his old connection, never both.
    peak = await report(rcluster, activity, "peak-sessions", since=activity.started)
    assert the_hour(peak, activity)["peak_sessions"] == 3


async def test_sessions_per_worker(rcluster: LocalCluster, activity: Activity) -> None:
    result = await report(rcluster, activity, "sessions-per-worker", since=activity.started)
    by_worker = {r["worker_id"]: r for r in rows(result) if r["hour"] == activity.hour}
    assert set(by_worker) == {"w1", "w2"}
    w1, w2 = by_worker["w1"], by_worker["w2"]
    assert (w1["sessions"], w1["started"], w1["peak_sessions"]) == (3, 3, 3)
    assert (w2["sessions"], w2["started"], w2["peak_sessions"]) == (1, 1, 1)


async def test_messages_and_delivery_latency(rcluster: LocalCluster, activity: Activity) -> None:
    messages = await report(rcluster, activity, "messages-hourly")
    assert rows(messages) == [
        {
            "hour": activity.hour,
            "messages": 6,
            "direct_messages": 4,
            "room_messages": 2,
            "senders": 1,
        }
    ]
    latency = the_hour(await report(rcluster, activity, "delivery-latency"), activity)
    # Recipients: bob 3 + 2, carol 2, dave 1; dave never got his; bob acked his 5.
    assert (latency["recipients"], latency["delivered"], latency["acked"]) == (8, 7, 5)
    assert 0 <= latency["delivery_p50_ms"] <= latency["delivery_max_ms"] < 10_000
    assert 0 <= latency["ack_p50_ms"] <= latency["ack_max_ms"] < 30_000


async def test_backlog(rcluster: LocalCluster, activity: Activity) -> None:
    result = await report(rcluster, activity, "backlog")
    u = activity.users
    got = {(r["username"], r["pending"], r["acked_seq"]) for r in rows(result)}
    carol = next(n for n in u if n.startswith("carol"))
    dave = next(n for n in u if n.startswith("dave"))
    assert got == {(carol, 2, 0), (dave, 1, 0)}


async def test_resumes_after_a_worker_death(rcluster: LocalCluster, activity: Activity) -> None:
    result = the_hour(await report(rcluster, activity, "resumes"), activity)
    assert (result["resumes"], result["after_worker_death"], result["other"]) == (1, 1, 0)
    # From w2's last lease renewal to bob's resume: under a renewal interval plus the test's pace.
    assert 0 < result["after_death_p50_s"] == result["after_death_max_s"] < 10


async def test_failover_timeline(rcluster: LocalCluster, activity: Activity) -> None:
    result = await report(rcluster, activity, "failovers", since=activity.started)
    timeline = [(r["event"], r["worker_id"], r["from_node"], r["to_node"]) for r in rows(result)]
    assert timeline == [
        ("worker_died", "w2", None, None),
        ("db_failover", "w1", activity.old_leader, activity.new_leader),
    ]
    everything = await report(rcluster, activity, "failovers")
    started = [r["worker_id"] for r in rows(everything) if r["event"] == "worker_started"]
    assert started == ["w1", "w2"] or started == ["w2", "w1"]


async def test_cli_prints_table_csv_and_json(rcluster: LocalCluster, activity: Activity) -> None:
    config = rcluster.layout.root / "report-test.toml"
    values = rcluster.settings.to_env()
    config.write_text(
        "[switchboard]\n"
        + "".join(f'{k.removeprefix("SWITCHBOARD_").lower()} = "{v}"\n' for k, v in values.items())
    )

    def run(*argv: str) -> tuple[int, str]:
        parser = argparse.ArgumentParser(prog="switchboard")
        parser.add_argument("--config", type=Path)
        sub = parser.add_subparsers(dest="command", required=True)
        report_cli.add_commands(sub, lambda p: p.add_argument("--state-dir", type=Path))
        args = parser.parse_args(["--config", str(config), "report", *argv])
        out = io.StringIO()
        code = args.func(args, out=lambda text: print(text, file=out))
        return code, out.getvalue()

    code, listing = await asyncio.to_thread(run)
    assert code == 0 and "messages-hourly" in listing and "failover_timeline" in listing
    code, text = await asyncio.to_thread(run, "--refresh", "messages-hourly", "--format", "json")
    assert code == 0
    document = json.loads(text)
    assert document["server"] != activity.new_leader
    assert document["rows"] == [
        {
            "hour": activity.hour.isoformat().replace("+00:00", "Z"),
            "messages": 6,
            "direct_messages": 4,
            "room_messages": 2,
            "senders": 1,
        }
    ]
    code, text = await asyncio.to_thread(run, "messages-hourly", "--format", "csv")
    assert code == 0
    assert text.splitlines()[0] == "hour,messages,direct_messages,room_messages,senders"
    assert text.splitlines()[1].endswith(",6,4,2,1")
    since = (activity.started - timedelta(hours=2)).isoformat()
    code, text = await asyncio.to_thread(run, "messages-hourly", "--since", since)
    assert code == 0
    assert text.splitlines()[2].split()[-4:] == ["6", "4", "2", "1"]
    assert "from replica" in text.splitlines()[-1]
    code, text = await asyncio.to_thread(run, "no-such-report")
    assert code == 2


async def test_reporting_role_reads_only_the_reporting_schema(
    rcluster: LocalCluster, activity: Activity
) -> None:
    """On the primary, so that privileges (not recovery) are what refuses. The role
    cannot log in there (tests/integration/test_control_planes.py): the superuser
    takes it on with SET ROLE, and every check below is made for `reporting`."""
    s = rcluster.settings
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(dsn(s, role="reporting"))
    superuser = dsn(s, role="superuser").rsplit("/", 1)[0] + f"/{s.db_name}"
    conn = await asyncpg.connect(superuser)
    try:
        await conn.execute("SET ROLE reporting")
        assert await conn.fetchval("SELECT current_user") == "reporting"
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is False
        for sql in (
            "SELECT password_hash FROM public.users",
            "SELECT resume_token_hash FROM public.sessions",
            "SELECT token_hash FROM public.admin_sessions",
            "SELECT body FROM public.messages",
            "SELECT * FROM event_partitions.events_default",
            "INSERT INTO public.events (kind) VALUES ('x')",
            "INSERT INTO reporting.events (kind) VALUES ('x')",
            "UPDATE reporting.users SET username = 'x'",
            "DELETE FROM reporting.sessions",
            "CREATE TABLE reporting.x (i int)",
            "CREATE TEMP TABLE x (i int)",
            "REFRESH MATERIALIZED VIEW reporting.messages_hourly",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM reporting.messages") == 6
        # Every relation it can read is in schema reporting, and none has a secret column.
        readable = await conn.fetch(
            "SELECT n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p', 'v', 'm') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND has_table_privilege(c.oid, 'SELECT')"
        )
        assert readable and {r["nspname"] for r in readable} == {"reporting"}
        columns = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'reporting'"
        )
        names = {r["column_name"] for r in columns}
        assert not names & {"password_hash", "resume_token_hash", "token_hash", "csrf_token"}
        assert "body" not in names and "remote_addr" not in names
    finally:
        await conn.close()
