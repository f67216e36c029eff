"""Faults of whole hosts and of the network between them (many hosts: ``hosts_net``).

A host dies as a machine does: its link goes down first (no FIN, no RST: its peers
learn of it from their own timeouts), then every process in its namespace is killed
with -9, found through ``/proc/PID/ns/net`` (never by name). Its components are held
meanwhile, so the supervisor does not start them again on a host that is off;
recovery puts the link back up and lets the supervisor start them. A partition is a
set of nftables rules inside a host's namespace (``hostnet.cut``); healing removes
them. Each recovery waits until the tier has converged: the host's components
serve again, the Patroni cluster streams, a balancer holds the virtual IP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from pathlib import Path

from app.chaos.faults import Fault, Say
from app.client.resilient import ReconnectPolicy
from app.cluster import hostnet, patroni
from app.cluster.health import wait_for
from app.cluster.launcher import LocalCluster
from app.cluster.process import PidRecord, wait_gone
from app.settings import Settings

# The holds of hosts that are off, from inject to recover (one scenario at a time).
_HELD: dict[str, contextlib.ExitStack] = {}
# A host that dies sends no reset: its peers notice at their next keepalive. A dead
# balancer's clients: TCP keepalive after this many idle seconds (the balancer that
# took the virtual IP over resets the probe; the SDK's default is none). A dead worker
# host's clients need nothing of their own: HAProxy's probes towards the workers
# (backend_keepalive_*) end their connections. docs/operations.md, "Many hosts".
BALANCER_DEATH_TCP_KEEPALIVE_S = 2.0


def processes_on(settings: Settings, host: str) -> list[int]:
    """Every process in ``host``'s network namespace."""
    ns = os.stat(Path("/run/netns") / hostnet.netns(settings, host))
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(entry / "ns" / "net")
                if (st.st_ino, st.st_dev) == (ns.st_ino, ns.st_dev):
                    found.append(int(entry.name))
    return found


def _hold(cluster: LocalCluster, key: str, *names: str) -> None:
    """Hold ``names`` (the supervisor leaves them alone) until ``_HELD.pop(key).close()``."""
    stack = contextlib.ExitStack()
    stack.enter_context(cluster.held(*names))
    _HELD[key] = stack


def components_on(cluster: LocalCluster, host: str) -> list[str]:
    return [n for n in cluster.supervised_names() if cluster.settings.host_of(n) == host]


def kill_host_processes(settings: Settings, host: str) -> int:
    """kill -9 every process in ``host``'s namespace, until none is left; how many."""
    killed: set[int] = set()
    for _ in range(20):  # a process may fork while we look (Patroni, postmaster)
        pids = processes_on(settings, host)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        wait_gone([PidRecord(pid, None) for pid in pids], 5)
    return len(killed)


async def _host_off(cluster: LocalCluster, say: Say, host: str) -> str:
    """The host dies: held, link down, every process killed."""
    names = components_on(cluster, host)
    _hold(cluster, host, *names)
    await asyncio.to_thread(hostnet.set_link, cluster.settings, host, False)
    killed = await asyncio.to_thread(kill_host_processes, cluster.settings, host)
    say(f"host {host} off: link down, kill -9 of its {killed} processes ({', '.join(names)})")
    return host


async def _host_on(cluster: LocalCluster, say: Say, host: str) -> None:
    """The host is back: link up, its components started again by the supervisor."""
    t0 = time.monotonic()
    await asyncio.to_thread(hostnet.set_link, cluster.settings, host, True)
    _HELD.pop(host).close()
    await asyncio.to_thread(_converge, cluster, components_on(cluster, host))
    say(f"host {host} back, its components serving, after {time.monotonic() - t0:.1f} s")


def _converge(cluster: LocalCluster, names: list[str]) -> None:
    """Wait until each component is started again (by the supervisor) and serves,
    then until the Patroni cluster streams again and a balancer holds the address."""
    supervised = cluster.pid_of("supervisor") is not None
    for name in names:
        if supervised:
            wait_for(
                f"{name} started again by the supervisor",
                lambda name=name: (cluster.pid_of(name) is not None, "still down"),  # type: ignore[misc]
                60,
            )
        else:
            cluster.start_component(name)
    for name in names:
        if not name.startswith(("n", "etcd")):
            cluster.wait_ready(name, 60)
    cluster.wait_db_healthy(120)
    wait_for(
        "virtual IP on a balancer",
        lambda: (hostnet.vip_holder(cluster.settings) is not None, "no balancer holds it"),
        30,
    )


def _vip_holder(cluster: LocalCluster) -> str:
    holder = hostnet.vip_holder(cluster.settings)
    if holder is None:
        raise RuntimeError("no balancer holds the virtual IP")
    return holder


async def _wait_vip_moved(cluster: LocalCluster, say: Say, old: str, t0: float) -> None:
    def moved() -> tuple[bool, str]:
        now = hostnet.vip_holder(cluster.settings)
        return now not in (None, old), f"still on {now}"

    await asyncio.to_thread(
        functools.partial(
            wait_for, "the virtual IP on the other balancer", moved, 30, interval=0.05
        )
    )
    say(
        f"virtual IP {cluster.settings.vip()} on the other balancer after "
        f"{time.monotonic() - t0:.2f} s"
    )


# ---- the balancers ----------------------------------------------------------------------


async def _kill_balancer(cluster: LocalCluster, say: Say) -> str:
    """kill -9 the HAProxy of the balancer holding the virtual IP (its host lives on:
    the kernel resets the clients' connections), held down: keepalived's check fails
    and the address moves to the other balancer."""
    holder = _vip_holder(cluster)
    name = next(n for n in components_on(cluster, holder) if n.startswith("haproxy"))
    pid = cluster.pid_of(name)
    if pid is None:
        raise RuntimeError(f"{name} is not running")
    _hold(cluster, name, name)
    t0 = time.monotonic()
    say(f"kill -9 {name} on {holder}, the active balancer (pid {pid})")
    os.kill(pid, signal.SIGKILL)
    await _wait_vip_moved(cluster, say, holder, t0)
    return name


async def _balancer_back(cluster: LocalCluster, say: Say, name: str) -> None:
    _HELD.pop(name).close()
    await asyncio.to_thread(_converge, cluster, [name])
    say(f"{name} serving again; the virtual IP stays on {hostnet.vip_holder(cluster.settings)}")


async def _kill_balancer_host(cluster: LocalCluster, say: Say) -> str:
    holder = _vip_holder(cluster)
    t0 = time.monotonic()
    await _host_off(cluster, say, holder)
    await _wait_vip_moved(cluster, say, holder, t0)
    return holder


# ---- worker hosts -----------------------------------------------------------------------


def _busiest_worker_host(cluster: LocalCluster) -> str:
    workers = cluster.settings.worker_ids()
    host = cluster.settings.host_of(workers[len(workers) // 2])
    assert host is not None
    return host


async def _kill_worker_host(cluster: LocalCluster, say: Say) -> str:
    return await _host_off(cluster, say, _busiest_worker_host(cluster))


async def _cut_worker_host(cluster: LocalCluster, say: Say) -> str:
    """Cut a worker host off from the database: from the database hosts and from the
    virtual IP (the balancers' database ports); the balancers' own addresses, which
    carry its clients, stay reachable."""
    s = cluster.settings
    host = _busiest_worker_host(cluster)
    peers = [s.vip(), *(addr for h, addr in s.hosts().items() if h.startswith("db"))]
    await asyncio.to_thread(hostnet.cut, s, host, peers)
    say(f"host {host} cut off from the database hosts and the virtual IP ({', '.join(peers)})")
    return host


async def _heal(cluster: LocalCluster, say: Say, host: str) -> None:
    t0 = time.monotonic()
    await asyncio.to_thread(hostnet.heal, cluster.settings, host)
    names = components_on(cluster, host)
    await asyncio.to_thread(_converge, cluster, names)
    say(f"host {host} healed; {', '.join(names)} serving after {time.monotonic() - t0:.1f} s")


# ---- database hosts ---------------------------------------------------------------------


async def _isolate_leader_host(cluster: LocalCluster, say: Say) -> str:
    """Take the Patroni leader's host off the network, its processes running: its
    Patroni loses etcd (its own member is cut off too) and demotes it; the others
    elect a new leader once the leader key expires (patroni_ttl)."""
    s = cluster.settings
    view = await asyncio.to_thread(patroni.cluster_view, s)
    if view is None or view.leader is None:
        raise RuntimeError("no Patroni leader")
    old = view.leader.name
    host = s.host_of(old)
    assert host is not None
    t0 = time.monotonic()
    await asyncio.to_thread(hostnet.set_link, s, host, False)
    say(f"host {host} (leader {old}) isolated: link down, processes running")

    def new_leader() -> tuple[bool, str]:
        v = patroni.cluster_view(s)
        leader = v.leader.name if v is not None and v.leader is not None else None
        return leader not in (None, old), f"leader {leader}"

    await asyncio.to_thread(wait_for, "a new Patroni leader", new_leader, s.patroni_ttl * 3)
    say(f"new Patroni leader after {time.monotonic() - t0:.1f} s")
    return host


async def _rejoin(cluster: LocalCluster, say: Say, host: str) -> None:
    """Put the host back, then wait until the old leader streams from the new one, as
    the other nodes see it (the isolated node's own view may still be the old one)."""
    s = cluster.settings
    old = next(n for n in s.node_names() if s.host_of(n) == host)
    t0 = time.monotonic()
    await asyncio.to_thread(hostnet.set_link, s, host, True)

    def rejoined() -> tuple[bool, str]:
        for node in s.node_names():
            if node == old:
                continue
            view = patroni.cluster_view_of(s, node)
            if view is None:
                continue
            member = next((m for m in view.members if m.name == old), None)
            if member is None or member.role == "leader" or member.state != "streaming":
                return False, f"{old} is {member.role + ' ' + member.state if member else 'gone'}"
            return view.healthy(s.db_nodes)
        return False, "no other node answers"

    await asyncio.to_thread(wait_for, f"{old} streaming again", rejoined, 180)
    await asyncio.to_thread(cluster.wait_db_healthy, 60)
    say(f"host {host} back on the network; {old} streams again after {time.monotonic() - t0:.1f} s")


HOST_FAULTS: dict[str, Fault] = {
    "kill-balancer": Fault(
        "kill-balancer",
        "kill -9 the active balancer's HAProxy; the virtual IP moves to the other one",
        _kill_balancer,
        _balancer_back,
    ),
    "kill-balancer-host": Fault(
        "kill-balancer-host",
        "the active balancer's host dies (link down, every process killed)",
        _kill_balancer_host,
        _host_on,
        client_policy=ReconnectPolicy(tcp_keepalive_s=BALANCER_DEATH_TCP_KEEPALIVE_S),
    ),
    "kill-worker-host": Fault(
        "kill-worker-host",
        "a worker host dies (link down, every process killed)",
        _kill_worker_host,
        _host_on,
        expect_dead=1,
    ),
    "cut-worker-host": Fault(
        "cut-worker-host",
        "cut a worker host off from the database (nftables), then heal",
        _cut_worker_host,
        _heal,
        expect_dead=1,
    ),
    "isolate-db-leader": Fault(
        "isolate-db-leader",
        "isolate the Patroni leader's host from etcd and the others, then heal",
        _isolate_leader_host,
        _rejoin,
    ),
}
