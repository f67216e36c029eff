"""Resume on any worker with a rotated token; liveness leases detach a dead worker's sessions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from app.cluster.launcher import LocalCluster
from app.cluster.patroni import cluster_view
from app.store import messages as message_store
from app.store.db import dsn
from app.store.messages import NewMessage
from tests.integration.helpers import (
    client_port,
    contacts_on_two_workers,
    db,
    login,
    new_user,
    only_worker,
    register,
)
from tests.linechat import LineClient
from tests.linechat import connect as connect_line


async def _resume(
    cluster: LocalCluster,
    user: str,
    token: str,
    last_seq: int,
    worker: str | None = None,
    transport: str = "tcp",
) -> tuple[LineClient, dict]:
    s = cluster.settings
    frame = {"op": "resume", "user": user, "device": "laptop", "token": token, "last_seq": last_seq}
    port = client_port(cluster, transport)
    if worker:
        with only_worker(cluster, worker):
            client = await connect_line(s.host, port, transport)
            return client, await client.request(frame)
    client = await connect_line(s.host, port, transport)
    return client, await client.request(frame)


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_resume_on_another_worker_replays_after_last_seq(
    cluster: LocalCluster, transport: str
) -> None:
    alice, bob = new_user("alice"), new_user("bob")
    a, _ = await login(cluster, alice, worker="w3", transport=transport)
    b, welcome = await login(cluster, bob, worker="w1", transport=transport)
    for i in range(4):
        await a.request({"op": "send", "to": bob, "cmid": f"r{i}", "body": f"m{i}"})
    assert [(await b.recv())["seq"] for _ in range(4)] == [1, 2, 3, 4]
    await b.close()  # a dropped connection: the session is detached, not closed
    b2, resumed = await _resume(
        cluster, bob, welcome["resume_token"], 2, worker="w2", transport=transport
    )
    assert resumed["op"] == "welcome" and resumed["worker"] == "w2"
    assert resumed["resume_token"] != welcome["resume_token"]  # rotated
    assert resumed["session"] == welcome["session"]
    assert [(await b2.recv())["seq"] for _ in range(2)] == [3, 4]
    sent = await a.request({"op": "send", "to": bob, "cmid": "live", "body": "after"})
    assert (await b2.recv())["id"] == sent["id"]
    # The old token is spent; a wrong one is refused the same way.
    stale, reply = await _resume(cluster, bob, welcome["resume_token"], 0)
    assert reply["code"] == "bad_token"
    wrong, reply2 = await _resume(cluster, bob, "x" * 32, 0)
    assert reply2["code"] == "bad_token"
    async with db(cluster) as conn:
        row = await conn.fetchrow(
            "SELECT worker_id, state, epoch FROM sessions WHERE id = $1", int(welcome["session"])
        )
    assert (row["worker_id"], row["state"], row["epoch"]) == ("w2", "active", 2)
    for c in (a, b2, stale, wrong):
        await c.close()


async def test_resume_fences_out_a_connection_that_is_still_open(cluster: LocalCluster) -> None:
    bob = new_user("bob")
    old, welcome = await login(cluster, bob, worker="w1")
    new, reply = await _resume(cluster, bob, welcome["resume_token"], 0, worker="w3")
    assert reply["op"] == "welcome"
    replaced = await old.recv_until("error")
    assert replaced["code"] == "session_replaced"
    assert await old.closed()
    assert (await new.request({"op": "ping"}))["op"] == "pong"
    await old.close()
    await new.close()


async def test_a_killed_workers_sessions_detach_and_presence_goes_offline(
    cluster: LocalCluster,
) -> None:
    _, bob, a, b, welcome = await contacts_on_two_workers(cluster)
    pid = cluster.pid_of("w2")
    assert pid is not None
    # A worker judges nobody in its first lease after start (reap_tick): an earlier
    # test may have restarted the survivors, so let them be older than a lease first.
    async with db(cluster) as conn:
        youngest_age_s = await conn.fetchval(
            "SELECT extract(epoch FROM now() - max(started_at)) FROM workers WHERE id <> 'w2'"
            " AND state = 'active'"
        )
    await asyncio.sleep(max(0.0, cluster.settings.worker_lease_s + 1 - float(youngest_age_s or 0)))
    # Held: w2 stays dead until the test starts it again, not the supervisor.
    with cluster.held("w2"):
        try:
            os.kill(pid, signal.SIGKILL)
            # Nobody is left to say goodbye, but its lease connection died with it: another
            # worker reaps it after worker_dead_after_s, long before the lease runs out.
            # (13 s here, where the lease is 15 s.)
            timeout = cluster.settings.worker_dead_after_s + 10
            offline = await a.recv_until("presence", timeout=timeout)
            assert offline == {"op": "presence", "user": bob, "state": "offline", "text": None}
            async with db(cluster) as conn:
                row = await conn.fetchrow(
                    "SELECT state, close_reason FROM sessions WHERE id = $1",
                    int(welcome["session"]),
                )
                worker_state = await conn.fetchval("SELECT state FROM workers WHERE id = 'w2'")
            assert (row["state"], row["close_reason"]) == ("detached", "worker_died")
            assert worker_state == "dead"
            # Its client resumes on a survivor and is online again.
            b2, reply = await _resume(cluster, bob, welcome["resume_token"], 0)
            assert reply["op"] == "welcome" and reply["worker"] != "w2"
            assert (await a.recv_until("presence"))["state"] == "online"
            await b2.close()
        finally:
            await asyncio.to_thread(cluster.restart_worker, "w2")
    await a.close()
    await b.close()


async def test_drain_moves_clients_and_refuses_new_ones(cluster: LocalCluster) -> None:
    bob = new_user("bob")
    b, welcome = await login(cluster, bob, worker="w3")
    await asyncio.to_thread(cluster.drain_worker, "w3")
    try:
        reconnect = await b.recv_until("reconnect")
        s = cluster.settings
        assert int(s.agent_interval_s * 1000) <= reconnect["after_ms"] <= s.drain_spread_s * 1000
        await b.close()
        await asyncio.sleep(s.agent_interval_s + 0.5)  # HAProxy's agent check sees "drain"
        b2, reply = await _resume(cluster, bob, welcome["resume_token"], 0)
        assert reply["op"] == "welcome" and reply["worker"] != "w3"
        await b2.close()
    finally:
        await asyncio.to_thread(cluster.drain_worker, "w3", True)


async def test_a_message_committed_by_a_worker_that_died_before_announcing_it_arrives(
    cluster: LocalCluster,
) -> None:
    """kill -9 between a commit and its NOTIFY: the recipient's worker, still connected
    to the database, hears nothing; the reaper's catch-up makes it read the tables."""
    sender, bob = new_user("s"), new_user("bob")
    await register(cluster, sender)
    b, _ = await login(cluster, bob, worker="w2")
    async with db(cluster) as conn:
        rows = await conn.fetch(
            "SELECT username, id FROM users WHERE username = ANY($1)", [sender, bob]
        )
        ids = {row["username"]: row["id"] for row in rows}
        # What w3 committed just before it died: stored, acknowledged, never announced.
        stored, _ = await message_store.store_batch(
            conn, [NewMessage(ids[sender], "phone", "orphan", ids[bob], None, "unannounced")]
        )
    assert stored[0] is not None
    with pytest.raises(TimeoutError):
        await b.recv_until("msg", timeout=1.0)  # nobody told bob's worker
    pid = cluster.pid_of("w3")
    assert pid is not None
    with cluster.held("w3"):  # the reaper's catch-up, not a restarted w3's, must do it
        try:
            os.kill(pid, signal.SIGKILL)
            frame = await b.recv_until("msg", timeout=cluster.settings.worker_lease_s + 10)
            assert (frame["from"], frame["body"], frame["id"]) == (
                sender,
                "unannounced",
                stored[0].id,
            )
        finally:
            await asyncio.to_thread(cluster.restart_worker, "w3")
    await b.close()


@contextlib.asynccontextmanager
async def _commit_cut_while_waiting_for_the_standby(
    cluster: LocalCluster, table: str
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Stop the synchronous standby's WAL receiver for the block; ``cut()`` then waits
    for a statement inserting into ``table`` to commit on the primary and wait for the
    standby, and terminates its backend: committed there, not replicated, reply lost."""
    s = cluster.settings
    view = cluster_view(s)
    assert view is not None
    standby = next(m.name for m in view.members if m.role == "sync_standby")
    node_dsn = dsn(s, role="superuser").replace(f":{s.db_primary_port}/", f":{s.pg_port(standby)}/")
    conn = await asyncpg.connect(node_dsn)
    try:
        walreceiver = await conn.fetchval("SELECT pid FROM pg_stat_wal_receiver")
    finally:
        await conn.close()
    assert walreceiver

    async def cut() -> None:
        async with db(cluster) as conn:
            for _ in range(50):
                pid = await conn.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
                    " AND query LIKE $1 LIMIT 1",
                    f"%INSERT INTO {table}%",
                )
                if pid:
                    assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
                    return
                await asyncio.sleep(0.01)
        raise AssertionError(f"no insert into {table} waited for the standby")

    # Leases renew through synchronous commits too. A lease lasts 3 s and is renewed
    # every second, so a stall under ~2 s expires none: callers keep it around 1 s.
    os.kill(walreceiver, signal.SIGSTOP)
    try:
        yield cut
    finally:
        os.kill(walreceiver, signal.SIGCONT)


async def _alice_on_w1_messaged_bob_on_w2(
    cluster: LocalCluster,
) -> tuple[LineClient, LineClient, str, dict[str, Any]]:
    """alice on w1 and bob on w2, and her first message to him delivered (seq 1):
    (her client, his client, his name, her `sent`)."""
    alice, bob = new_user("alice"), new_user("bob")
    a, _ = await login(cluster, alice, worker="w1")
    b, _ = await login(cluster, bob, worker="w2")
    sent = await a.request({"op": "send", "to": bob, "cmid": "c0", "body": "first"})
    assert (await b.recv_until("msg"))["id"] == sent["id"]
    return a, b, bob, sent


async def test_a_send_whose_commit_went_unanswered_is_replicated_before_sent_and_delivered(
    cluster: LocalCluster,
) -> None:
    """The worker's retry finds the message already there: its `sent` must still wait
    for the standby, and bob's worker (whose listener never lost its connection, so
    nothing else makes it look) must still be told."""
    a, b, bob, _ = await _alice_on_w1_messaged_bob_on_w2(cluster)
    async with _commit_cut_while_waiting_for_the_standby(cluster, "messages") as cut:
        await a.send({"op": "send", "to": bob, "cmid": "c1", "body": "in doubt", "rid": 1})
        await cut()
        with pytest.raises(TimeoutError):
            await a.recv(timeout=0.5)
    sent = await a.recv(timeout=10)
    assert (sent["op"], sent["cmid"], sent["rid"]) == ("sent", "c1", 1)
    msg = await b.recv_until("msg", timeout=10)
    assert (msg["id"], msg["seq"], msg["body"]) == (sent["id"], 2, "in doubt")
    await a.close()
    await b.close()


async def test_a_read_whose_commit_went_unanswered_is_replicated_before_ok_and_delivered(
    cluster: LocalCluster,
) -> None:
    """The same for a read receipt: bob's `ok` waits for the standby, and alice, on
    another worker, still gets the receipt."""
    a, b, bob, sent = await _alice_on_w1_messaged_bob_on_w2(cluster)
    async with _commit_cut_while_waiting_for_the_standby(cluster, "receipts") as cut:
        await b.send({"op": "read", "msg_id": sent["id"], "rid": 2})
        await cut()
        with pytest.raises(TimeoutError):
            await b.recv(timeout=0.5)
    assert await b.recv(timeout=10) == {"op": "ok", "rid": 2}
    receipt = await a.recv_until("receipt", timeout=10)
    assert (receipt["msg_id"], receipt["by"]) == (sent["id"], bob)
    await a.close()
    await b.close()
