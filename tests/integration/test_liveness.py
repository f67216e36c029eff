"""A slow worker is not a dead worker (issue #21), against a real cluster.

A worker stopped with SIGSTOP (as a CPU-starved or swapping one would be) for
less than its lease keeps its lease connection, so nobody declares it dead: its
sessions stay where they are and its clients carry on when it wakes. A worker
killed with SIGKILL loses its lease connection with its process, and the others
detach its sessions after worker_dead_after_s, long before its lease runs out.
"""

from __future__ import annotations

import asyncio
import os
import signal

from app.cluster.health import wait_for
from app.cluster.launcher import LocalCluster
from app.store.sessions import lease_application_name
from tests.integration.helpers import contacts_on_two_workers, db


async def test_a_stopped_worker_is_slow_not_dead(cluster: LocalCluster) -> None:
    _, bob, a, b, welcome = await contacts_on_two_workers(cluster)
    pid = cluster.pid_of("w2")
    assert pid is not None
    async with db(cluster) as conn:
        since = await conn.fetchval("SELECT now()")
        holders = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            lease_application_name("w2"),
        )
    assert holders == 1  # the lease thread's own connection
    stall_s = cluster.settings.worker_dead_after_s * 2
    assert stall_s < cluster.settings.worker_lease_s
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(stall_s)
    finally:
        os.kill(pid, signal.SIGCONT)
    # Its client carries on where it was; nothing was detached or declared dead.
    assert (await b.request({"op": "ping"}))["op"] == "pong"
    await asyncio.sleep(cluster.settings.reaper_interval_s * 2)
    async with db(cluster) as conn:
        worker_state = await conn.fetchval("SELECT state FROM workers WHERE id = 'w2'")
        session = await conn.fetchrow(
            "SELECT state, worker_id, epoch FROM sessions WHERE id = $1", int(welcome["session"])
        )
        died = await conn.fetchval(
            "SELECT count(*) FROM events WHERE kind = 'worker_died' AND at >= $1", since
        )
    assert worker_state == "active"
    assert (session["state"], session["worker_id"], session["epoch"]) == ("active", "w2", 1)
    assert died == 0
    # Messages still flow both ways through the worker that was stopped.
    sent = await a.request({"op": "send", "to": bob, "cmid": "after-stall", "body": "hi"})
    assert (await b.recv_until("msg"))["id"] == sent["id"]
    await a.close()
    await b.close()
    # HAProxy may have marked it down for new clients during the stall (its health
    # check allows 2 s): the next tests want every worker routable again.
    await asyncio.to_thread(
        wait_for,
        "w2 up in HAProxy",
        lambda: cluster._workers_up_in_haproxy(),
        timeout=30,
    )
