"""Connections that never log in, or fall silent (review items H2, M7), against a real
cluster whose deadlines are short: auth_timeout_s 2 s, idle_timeout_s 6 s.

Every attacker gets the documented fatal error and is closed; the bystander, which
pings now and then as the SDK does, stays connected and answered throughout.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.client import (
    Disconnected,
    ErrorEvent,
    LinkState,
    ReconnectPolicy,
    ResilientClient,
    Resumed,
)
from app.cluster.launcher import LocalCluster
from app.worker.timeouts import TICK_S
from tests.cluster_fixture import make_settings, running_cluster
from tests.hostile.edge import client_from, login_from, resume_from
from tests.integration.helpers import PASSWORD, contacts_on_two_workers, db, new_user, register
from tests.linechat import LineClient

AUTH_S, IDLE_S = 2.0, 6.0
# A deadline fires at most one tick late; allow as much again for a loaded machine.
LATE_S = 1.0


@pytest.fixture(scope="module")
def tcluster() -> Iterator[LocalCluster]:
    settings = make_settings(workers=2, auth_timeout_s=AUTH_S, idle_timeout_s=IDLE_S)
    with running_cluster(settings) as cluster:
        yield cluster


async def ping_for(
    client: LineClient,
    seconds: float,
    every: float = 1.0,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any] | None:
    """Ping every ``every`` s for ``seconds`` (each answered within 1 s), or until a
    frame matching ``until`` arrives (returned)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        asked = time.monotonic()
        reply = await client.request({"op": "ping"}, timeout=5)
        assert reply["op"] == "pong", reply
        assert time.monotonic() - asked < 1.0, "the bystander's ping was slow"
        if until is not None:
            for frame in list(client.backlog):
                if until(frame):
                    client.backlog.remove(frame)
                    return frame
        await asyncio.sleep(every)
    assert until is None, "the awaited frame never came"
    return None


async def closed_with(client: LineClient, code: str, started: float) -> float:
    """Wait for the error frame ``code`` and the close after it; seconds since ``started``."""
    frame = await client.recv_until("error", timeout=AUTH_S + IDLE_S + 5)
    assert frame["code"] == code, frame
    assert await client.closed(timeout=5)
    return time.monotonic() - started


async def test_a_silent_connection_is_closed_after_auth_timeout(tcluster: LocalCluster) -> None:
    bystander, _ = await login_from(tcluster, new_user("by"), "127.0.0.2")
    started = time.monotonic()
    attacker = await client_from(tcluster, "127.0.0.3")
    waited, _ = await asyncio.gather(
        closed_with(attacker, "auth_timeout", started),
        ping_for(bystander, AUTH_S + LATE_S + 1, every=0.5),
    )
    assert AUTH_S - TICK_S <= waited <= AUTH_S + LATE_S, waited
    assert (await bystander.request({"op": "contacts"}))["op"] == "contacts"
    await asyncio.gather(attacker.close(), bystander.close())


async def test_pings_blank_lines_or_a_register_do_not_extend_it(tcluster: LocalCluster) -> None:
    bystander, _ = await login_from(tcluster, new_user("by"), "127.0.0.2")
    started = time.monotonic()
    pinger, blanker, registrar = [await client_from(tcluster, "127.0.0.3") for _ in range(3)]
    reply = await registrar.request({"op": "register", "user": new_user("r"), "password": PASSWORD})
    assert reply["op"] == "registered", reply

    async def keep_pinging() -> int:
        pongs = 0
        while True:
            try:
                reply = await pinger.request({"op": "ping"}, timeout=5)
            except ConnectionError:  # closed; the error frame (no rid) went to the backlog
                assert [f["code"] for f in pinger.backlog] == ["auth_timeout"]
                return pongs
            assert reply["op"] == "pong", reply
            pongs += 1
            await asyncio.sleep(0.2)

    async def keep_blanking() -> None:
        while not blanker.reader.at_eof():
            try:
                await blanker.send(b"\n   \n")
            except ConnectionError:
                break
            await asyncio.sleep(0.2)

    blanks = asyncio.create_task(keep_blanking())
    pongs, blanked, registered, _ = await asyncio.gather(
        keep_pinging(),
        closed_with(blanker, "auth_timeout", started),
        closed_with(registrar, "auth_timeout", started),
        ping_for(bystander, AUTH_S + LATE_S + 1, every=0.5),
    )
    blanks.cancel()
    assert pongs >= 3  # pings were answered, until the deadline
    assert time.monotonic() - started <= AUTH_S + LATE_S + 2
    assert blanked <= AUTH_S + LATE_S and registered <= AUTH_S + LATE_S
    for each in (pinger, blanker, registrar, bystander):
        await each.close()


async def session_state(cluster: LocalCluster, session_id: object) -> str:
    async with db(cluster) as conn:
        state = await conn.fetchval(
            "SELECT state FROM sessions WHERE id = $1", int(str(session_id))
        )
    assert isinstance(state, str)
    return state


async def test_a_silent_session_is_closed_detached_and_shown_offline(
    tcluster: LocalCluster,
) -> None:
    # alice (the bystander, w1) and bob (w2) are contacts; bob then says nothing.
    _, bob, a, b, welcome = await contacts_on_two_workers(tcluster)
    silent_since = time.monotonic()
    waited, offline = await asyncio.gather(
        closed_with(b, "idle_timeout", silent_since),
        ping_for(
            a,
            IDLE_S + LATE_S + 5,
            until=lambda f: f["op"] == "presence" and f["user"] == bob and f["state"] == "offline",
        ),
    )
    assert IDLE_S - TICK_S <= waited <= IDLE_S + LATE_S, waited
    assert offline is not None
    assert await session_state(tcluster, welcome["session"]) == "detached"
    # Detached, not ended: bob resumes it.
    again, resumed = await resume_from(tcluster, welcome)
    assert resumed["op"] == "welcome" and resumed["session"] == welcome["session"], resumed
    online = await ping_for(
        a, 10, until=lambda f: f["op"] == "presence" and f["user"] == bob and f["state"] == "online"
    )
    assert online is not None
    for each in (a, b, again):
        await each.close()


async def test_sdk_clients_never_hit_idle_timeout_and_recover_if_they_do(
    tcluster: LocalCluster,
) -> None:
    s = tcluster.settings
    pinging_user, quiet_user = new_user("sdk"), new_user("quiet")
    await register(tcluster, pinging_user)
    await register(tcluster, quiet_user)
    # Keep-alive at a fifth of idle_timeout_s, as the default 30 s is a third of 90 s.
    pinging = await ResilientClient.connect(
        s.host, s.client_port, policy=ReconnectPolicy(keepalive_s=IDLE_S / 5)
    )
    quiet = await ResilientClient.connect(
        s.host, s.client_port, policy=ReconnectPolicy(keepalive_s=None)
    )
    async with pinging, quiet:
        await pinging.login(pinging_user, PASSWORD, "phone")
        await quiet.login(quiet_user, PASSWORD, "phone")
        seen = [await quiet.next_event(timeout=IDLE_S + LATE_S + 5)]
        while not isinstance(seen[-1], Resumed):
            seen.append(await quiet.next_event(timeout=10))
        # The error frame, the loss it causes, then the session resumed (not a new login).
        assert [type(e) for e in seen] == [ErrorEvent, Disconnected, Resumed], seen
        error, lost, back = seen
        assert isinstance(error, ErrorEvent) and error.code == "idle_timeout"
        assert isinstance(lost, Disconnected) and "idle_timeout" in lost.reason
        assert isinstance(back, Resumed) and not back.fallback_login
        await asyncio.sleep(IDLE_S)  # the pinging client has now lived two idle periods
        assert pinging.state is LinkState.ONLINE
        assert pinging.stats.reconnects == 0
        assert quiet.stats.resumes >= 1
        assert await quiet.contacts() == []  # the resumed session answers


def keepalive_timers(port: int) -> list[bool]:
    """For each established TCP socket whose local port is ``port``: is its keepalive
    timer armed? (/proc/net/tcp's ``tr`` column is 2 for the keepalive timer.)"""
    armed = []
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            local, state, timer = fields[1], fields[3], fields[5]
            if state == "01" and int(local.split(":")[1], 16) == port:
                armed.append(timer.split(":")[0] == "02")
    return armed


def tcp_timers_of(pid: int, remote_port: int) -> dict[str, str]:
    """For each established TCP socket of process ``pid`` to ``remote_port``: its inode
    and the timer running on it (/proc/net/tcp's ``tr``: 2 keepalive, 1 retransmit)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    timers = {}
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            remote, state, timer, inode = fields[2], fields[3], fields[5], fields[9]
            if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == remote_port:
                timers[inode] = timer.split(":")[0]
    return timers


async def test_worker_database_connections_have_tcp_keepalive(tcluster: LocalCluster) -> None:
    """Each of a worker's connections to the primary port (its pools, the lease
    renewals, the LISTEN): a balancer that dies without a word must not leave them
    waiting out a command timeout, or a LISTEN deaf (app/store/db.py, Connection).
    A connection with data in flight shows the retransmit timer instead, so each
    must show the keepalive timer in one of several looks."""
    s = tcluster.settings
    for worker in s.worker_ids():
        pid = tcluster.pid_of(worker)
        assert pid is not None
        first = tcp_timers_of(pid, s.db_primary_port)
        seen_keepalive: set[str] = set()
        for _ in range(40):
            now = tcp_timers_of(pid, s.db_primary_port)
            seen_keepalive.update(inode for inode, timer in now.items() if timer == "02")
            if set(first) & set(now) <= seen_keepalive:
                break
            await asyncio.sleep(0.05)
        lasting = set(first) & set(tcp_timers_of(pid, s.db_primary_port))
        assert len(first) >= 3 and lasting <= seen_keepalive, (worker, first, seen_keepalive)


async def test_client_connections_have_tcp_keepalive(tcluster: LocalCluster) -> None:
    """At HAProxy (option clitcpka) and at the workers (set on their listening sockets)."""
    s = tcluster.settings
    clients = [await login_from(tcluster, new_user("ka"), "127.0.0.2") for _ in range(2)]
    at_haproxy = keepalive_timers(s.client_port)
    at_workers = [armed for w in s.worker_ids() for armed in keepalive_timers(s.worker_port(w))]
    assert len(at_haproxy) >= 2 and all(at_haproxy), at_haproxy
    assert len(at_workers) >= 2 and all(at_workers), at_workers
    for client, _ in clients:
        await client.close()
