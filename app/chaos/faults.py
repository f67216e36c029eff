"""The faults the chaos scenarios inject, and how each is undone afterwards.

Each fault is real: ``kill -9`` of processes the local cluster started (found by
their pid files, never by name), a rolling restart, a drain through the worker's
admin endpoint. A killed process is not started again here: the supervisor
(app/cluster/supervisor.py) must bring it back by itself, and the scenario fails
if it is not back and serving within COMEBACK_TIMEOUT_S (a cluster started with
supervise = false gets it started by hand). Blocking calls run in threads so
client traffic keeps flowing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.client.resilient import ReconnectPolicy
from app.cluster import patroni
from app.cluster.health import wait_for
from app.cluster.launcher import LocalCluster
from app.cluster.process import PidRecord, wait_gone

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    description: str
    inject: Callable[[LocalCluster, Say], Awaitable[str]]
    recover: Callable[[LocalCluster, Say, str], Awaitable[None]]
    # Workers the others must declare dead during the run (None: not judged). A
    # stall shorter than the lease must cost none; a longer one exactly the victim.
    expect_dead: int | None = None
    # How this scenario's clients reconnect (None: the SDK's defaults).
    client_policy: ReconnectPolicy | None = None


def _kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_gone([PidRecord(pid, None)], 10)


# How long a killed component may take to be started again by the supervisor and
# serve: its restart comes within a tick, then it starts as `up` starts it.
COMEBACK_TIMEOUT_S = 60.0


def _came_back(cluster: LocalCluster, name: str, old_pid: int, timeout: float) -> None:
    """Wait for the supervisor to start ``name`` again by itself, then until it serves;
    without a supervisor (supervise = false), start it by hand."""
    if cluster.pid_of("supervisor") is None:
        cluster.start_component(name)
    else:
        wait_for(
            f"{name} started again by the supervisor",
            lambda: (cluster.pid_of(name) not in (None, old_pid), f"{name} is still down"),
            timeout,
        )
    cluster.wait_ready(name, timeout)


async def _comeback(cluster: LocalCluster, say: Say, detail: str) -> None:
    """Undo a kill: ``detail`` is ``name pid`` of what was killed."""
    name, pid = detail.split()
    supervised = cluster.pid_of("supervisor") is not None
    say(f"waiting for {name} to come back by itself" if supervised else f"starting {name} again")
    t0 = time.monotonic()
    await asyncio.to_thread(_came_back, cluster, name, int(pid), COMEBACK_TIMEOUT_S)
    if name in cluster.settings.node_names() or name in cluster.settings.etcd_names():
        await asyncio.to_thread(cluster.wait_db_healthy, 120)
    say(f"{name} back (pid {cluster.pid_of(name)}) after {time.monotonic() - t0:.1f} s")


async def _kill_component(cluster: LocalCluster, say: Say, name: str, what: str) -> str:
    pid = cluster.pid_of(name)
    if pid is None:
        raise RuntimeError(f"{name} is not running")
    say(f"kill -9 {what} {name} (pid {pid})")
    await asyncio.to_thread(_kill9, pid)
    return f"{name} {pid}"


async def _kill_worker(cluster: LocalCluster, say: Say) -> str:
    # The middle worker: with three, it holds about a third of the sessions.
    workers = cluster.settings.worker_ids()
    return await _kill_component(cluster, say, workers[len(workers) // 2], "worker")


async def _kill_haproxy(cluster: LocalCluster, say: Say) -> str:
    # The first process: it also carries the workers' database connections.
    return await _kill_component(cluster, say, "haproxy", "HAProxy process")


async def _kill_etcd(cluster: LocalCluster, say: Say) -> str:
    return await _kill_component(cluster, say, cluster.settings.etcd_names()[0], "Patroni's DCS")


async def _kill_node(cluster: LocalCluster, say: Say, node: str, what: str) -> str:
    """kill -9 of Patroni and of the postmaster it detached: the whole node."""
    patroni_pid = cluster.pid_of(node)
    postmaster_pid = cluster.postmaster_pid(node)
    if patroni_pid is None:
        raise RuntimeError(f"{node} is not running")
    say(f"kill -9 {what} {node}: patroni {patroni_pid}, postmaster {postmaster_pid}")
    for pid in (patroni_pid, postmaster_pid):
        if pid is not None:
            await asyncio.to_thread(_kill9, pid)
    return f"{node} {patroni_pid}"


async def _kill_leader(cluster: LocalCluster, say: Say) -> str:
    view = await asyncio.to_thread(patroni.cluster_view, cluster.settings)
    if view is None or view.leader is None:
        raise RuntimeError("no Patroni leader to kill")
    node = view.leader.name

    def new_leader() -> bool:
        v = patroni.cluster_view(cluster.settings)
        return v is not None and v.leader is not None and v.leader.name != node

    # Held until another node leads: started again at once, its Patroni would find its
    # leader key still valid (patroni_ttl) and lead again, and nothing would fail over.
    with cluster.held(node):
        detail = await _kill_node(cluster, say, node, "Patroni leader")
        t0 = time.monotonic()
        deadline = t0 + cluster.settings.patroni_ttl * 3 + 60
        while not await asyncio.to_thread(new_leader):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no new Patroni leader {deadline - t0:.0f} s after the kill")
            await asyncio.sleep(0.5)
    say(f"new Patroni leader after {time.monotonic() - t0:.1f} s; {node} no longer held")
    return detail


async def _kill_replica(cluster: LocalCluster, say: Say) -> str:
    view = await asyncio.to_thread(patroni.cluster_view, cluster.settings)
    if view is None:
        raise RuntimeError("no Patroni REST API answers")
    replicas = [m for m in view.members if m.role != "leader"]
    if not replicas:
        raise RuntimeError("no Patroni replica to kill")
    # An asynchronous one when there is one: commits go on without waiting for it.
    victim = next((m for m in replicas if m.role == "replica"), replicas[0])
    return await _kill_node(cluster, say, victim.name, f"Patroni {victim.role}")


async def _rolling_restart(cluster: LocalCluster, say: Say) -> str:
    say("rolling restart of every worker")
    await asyncio.to_thread(cluster.restart_workers)
    return ""


async def _nothing(cluster: LocalCluster, say: Say, detail: str) -> None:
    return None


async def _drain(cluster: LocalCluster, say: Say) -> str:
    victim = cluster.settings.worker_ids()[0]
    say(f"drain worker {victim}")
    await asyncio.to_thread(cluster.drain_worker, victim)
    return victim


async def _undrain(cluster: LocalCluster, say: Say, victim: str) -> None:
    say(f"undrain worker {victim}")
    await asyncio.to_thread(cluster.drain_worker, victim, True)


def _middle_worker(cluster: LocalCluster) -> tuple[str, int]:
    workers = cluster.settings.worker_ids()
    victim = workers[len(workers) // 2]
    pid = cluster.pid_of(victim)
    if pid is None:
        raise RuntimeError(f"worker {victim} is not running")
    return victim, pid


def _stall(
    seconds: Callable[[LocalCluster], float],
) -> Callable[[LocalCluster, Say], Awaitable[str]]:
    """SIGSTOP a worker for a while, then SIGCONT: a worker starved of CPU, swapping,
    or paused by a debugger, as far as the rest of the cluster can tell."""

    async def inject(cluster: LocalCluster, say: Say) -> str:
        victim, pid = _middle_worker(cluster)
        stall_s = seconds(cluster)
        say(f"kill -STOP worker {victim} (pid {pid}) for {stall_s:.0f} s")
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(stall_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        say(f"kill -CONT worker {victim}")
        return victim

    return inject


FAULTS: dict[str, Fault] = {
    "kill-worker": Fault("kill-worker", "kill -9 one worker under load", _kill_worker, _comeback),
    "kill-leader": Fault(
        "kill-leader",
        "kill -9 the Patroni leader (patroni and postmaster) under load",
        _kill_leader,
        _comeback,
    ),
    "kill-replica": Fault(
        "kill-replica",
        "kill -9 a Patroni replica (patroni and postmaster) under load",
        _kill_replica,
        _comeback,
    ),
    "kill-haproxy": Fault(
        "kill-haproxy",
        "kill -9 the first HAProxy process (clients and database connections) under load",
        _kill_haproxy,
        _comeback,
    ),
    "kill-etcd": Fault(
        "kill-etcd", "kill -9 etcd (Patroni's DCS) under load", _kill_etcd, _comeback
    ),
    "rolling-restart": Fault(
        "rolling-restart", "restart every worker, one at a time", _rolling_restart, _nothing
    ),
    "drain": Fault("drain", "drain one worker under load", _drain, _undrain),
    "stall": Fault(
        "stall",
        "stop one worker (SIGSTOP) for less than its lease, then let it go on",
        # 5 s with the default 15 s lease: longer than the 3 s an old lease was.
        _stall(lambda c: min(5.0, c.settings.worker_lease_s / 2)),
        _nothing,
        expect_dead=0,
    ),
    "stall-long": Fault(
        "stall-long",
        "stop one worker (SIGSTOP) for longer than its lease, then let it go on",
        _stall(lambda c: c.settings.worker_lease_s + 5),
        _nothing,
        expect_dead=1,
    ),
}
