"""The faults the chaos scenarios inject, and how each is undone afterwards.

Each fault is real: ``kill -9`` of processes the local cluster started (found by
their pid files, never by name), a rolling restart, a drain through the worker's
admin endpoint. Blocking calls run in threads so client traffic keeps flowing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.cluster import patroni
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


def _kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_gone([PidRecord(pid, None)], 10)


async def _kill_worker(cluster: LocalCluster, say: Say) -> str:
    # The middle worker: with three, it holds about a third of the sessions.
    workers = cluster.settings.worker_ids()
    victim = workers[len(workers) // 2]
    pid = cluster.pid_of(victim)
    if pid is None:
        raise RuntimeError(f"worker {victim} is not running")
    say(f"kill -9 worker {victim} (pid {pid})")
    await asyncio.to_thread(_kill9, pid)
    return victim


async def _restart_worker(cluster: LocalCluster, say: Say, victim: str) -> None:
    say(f"starting worker {victim} again")
    await asyncio.to_thread(cluster.restart_worker, victim)


async def _kill_leader(cluster: LocalCluster, say: Say) -> str:
    view = await asyncio.to_thread(patroni.cluster_view, cluster.settings)
    if view is None or view.leader is None:
        raise RuntimeError("no Patroni leader to kill")
    node = view.leader.name
    patroni_pid = cluster.pid_of(node)
    postmaster_pid = cluster.postmaster_pid(node)
    say(f"kill -9 Patroni leader {node}: patroni {patroni_pid}, postmaster {postmaster_pid}")
    for pid in (patroni_pid, postmaster_pid):
        if pid is not None:
            await asyncio.to_thread(_kill9, pid)
    t0 = time.monotonic()

    def new_leader() -> bool:
        v = patroni.cluster_view(cluster.settings)
        return v is not None and v.leader is not None and v.leader.name != node

    while not await asyncio.to_thread(new_leader):
        await asyncio.sleep(0.5)
    say(f"new Patroni leader after {time.monotonic() - t0:.1f} s")
    return node


async def _restart_node(cluster: LocalCluster, say: Say, node: str) -> None:
    say(f"starting node {node} again (it rejoins as a replica)")
    await asyncio.to_thread(cluster.start_node, node)
    await asyncio.to_thread(cluster.wait_db_healthy, 120)


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
    "kill-worker": Fault(
        "kill-worker", "kill -9 one worker under load", _kill_worker, _restart_worker
    ),
    "kill-leader": Fault(
        "kill-leader",
        "kill -9 the Patroni leader (patroni and postmaster) under load",
        _kill_leader,
        _restart_node,
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
