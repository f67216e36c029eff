"""Failover benchmarks: resume after kill -9 of a worker, send stall through a DB failover.

    .venv/bin/python -m bench.failover --scenario kill-worker --sessions 10000
    .venv/bin/python -m bench.failover --scenario kill-primary --sessions 2000
    .venv/bin/python -m bench.failover --scenario switchover --sessions 2000

Starts its own cluster (3 workers; cheap argon2 parameters, which only make the
set-up logins faster: a resume hashes no password). Every client is a lean
resilient client: on a dropped connection it reconnects through HAProxy after
0-100 ms of jitter and resumes with its token and last seq (falling back to a
password login on ``bad_token``); unacknowledged sends are resent with the same
cmid. A background flow of 1:1 messages runs throughout, and at the end every
acknowledged message is checked: received exactly once by its recipient.

One HAProxy process holds at most ~9,000 client connections under this
machine's 20,000 open-files limit (two descriptors per proxied connection): the
cluster it starts runs one HAProxy process per 8,000 sessions (at least two, the
default), which share the client port (``haproxy_processes``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop

from bench._wire import PASSWORD, Frame, Wire, connect, register

DEVICE = "bench"


@dataclass
class Stats:
    dropped: int = 0
    resumes: int = 0
    fallback_logins: int = 0
    duplicates: int = 0
    acked: dict[int, str] = field(default_factory=dict)  # message id -> recipient
    sent_latency: list[tuple[float, float]] = field(default_factory=list)  # (acked at, latency)


class BenchClient:
    """One session; survives its worker's death by resuming anywhere."""

    def __init__(self, user: str, host: str, port: int, stats: Stats) -> None:
        self.user = user
        self.host = host
        self.port = port
        self.stats = stats
        self.wire: Wire | None = None
        self.token = ""
        self.worker = ""
        self.last_seq = 0
        self.received: set[int] = set()
        self.lost_at: float | None = None
        self.resumed_at: float | None = None
        self.online = asyncio.Event()
        self.stopping = False
        self.reconnecting = False
        self.pending: dict[str, Frame] = {}  # cmid -> send frame awaiting `sent`
        self._sent_waiters: dict[str, asyncio.Future[Frame]] = {}

    async def login(self) -> None:
        wire = await connect(self.host, self.port, self._on_frame)
        wire.on_close = self._on_close
        await register(wire, self.user)
        frame = {"op": "hello", "user": self.user, "password": PASSWORD, "device": DEVICE}
        welcome = await wire.request(frame)
        assert welcome["op"] == "welcome", welcome
        self._welcomed(wire, welcome)

    def _welcomed(self, wire: Wire, welcome: Frame) -> None:
        self.wire = wire
        self.token = welcome["resume_token"]
        self.worker = welcome["worker"]
        self.online.set()
        for frame in self.pending.values():  # same cmid: idempotent on the server
            wire.write(orjson.dumps(frame, option=orjson.OPT_APPEND_NEWLINE))

    def _on_frame(self, frame: Frame) -> None:
        op = frame.get("op")
        if op == "msg":
            seq = frame["seq"]
            if seq <= self.last_seq:
                return  # a replay of what we had: the SDK's dedupe by seq
            self.last_seq = seq
            if frame["id"] in self.received:
                self.stats.duplicates += 1
            self.received.add(frame["id"])
        elif op == "sent":
            fut = self._sent_waiters.pop(frame["cmid"], None)
            self.pending.pop(frame["cmid"], None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
        elif op == "reconnect" and self.wire is not None:
            self.wire.close()

    def _on_close(self, exc: Exception | None) -> None:
        # Only the connection in use counts, and only one reconnect loop at a time.
        if self.stopping or self.reconnecting:
            return
        self.reconnecting = True
        self.online.clear()
        self.lost_at = time.monotonic()
        self.stats.dropped += 1
        asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        while not self.stopping:
            await asyncio.sleep(random.uniform(0, 0.1) * (2 ** min(attempt, 4)))
            attempt += 1
            try:
                wire = await connect(self.host, self.port, self._on_frame)
            except OSError:
                continue
            frame = {
                "op": "resume",
                "user": self.user,
                "device": DEVICE,
                "token": self.token,
                "last_seq": self.last_seq,
            }
            try:
                reply = await wire.request(frame, timeout=30)
                if reply.get("code") == "bad_token":
                    self.stats.fallback_logins += 1
                    reply = await wire.request(
                        {"op": "hello", "user": self.user, "password": PASSWORD, "device": DEVICE}
                    )
            except (ConnectionError, TimeoutError):
                continue
            if reply.get("op") == "welcome":
                self.stats.resumes += 1
                self.resumed_at = time.monotonic()
                self.reconnecting = False
                wire.on_close = self._on_close
                self._welcomed(wire, reply)
                if wire.closed:  # lost again before we started watching it
                    self._on_close(None)
                return
            wire.close()
            await asyncio.sleep(float(reply.get("retry_after") or 0.2))

    async def send(self, to: str, cmid: str) -> None:
        frame = {"op": "send", "to": to, "cmid": cmid, "body": f"{time.time():.3f}"}
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._sent_waiters[cmid] = fut
        self.pending[cmid] = frame
        t0 = time.monotonic()
        if self.online.is_set() and self.wire is not None:
            self.wire.write(orjson.dumps(frame, option=orjson.OPT_APPEND_NEWLINE))
        sent = await fut
        now = time.monotonic()
        self.stats.acked[sent["id"]] = to
        self.stats.sent_latency.append((now, now - t0))

    def close(self) -> None:
        self.stopping = True
        if self.wire is not None:
            self.wire.close()


async def _gather_bounded(n: int, coros: list[Any]) -> None:
    gate = asyncio.Semaphore(n)

    async def one(c: Any) -> None:
        async with gate:
            await c

    await asyncio.gather(*(one(c) for c in coros))


async def _switchover(cluster: Any) -> str:
    from app.cluster import patroni

    view = patroni.cluster_view(cluster.settings)
    assert view is not None and view.leader is not None
    candidate = next(m.name for m in view.members if m.role == "sync_standby")
    await asyncio.to_thread(patroni.switchover, cluster.settings, view.leader.name, candidate, 30)
    return f"switchover {view.leader.name} -> {candidate}"


async def run(args: argparse.Namespace) -> None:
    from app.cluster import haproxy, patroni
    from app.cluster.launcher import LocalCluster
    from tests.cluster_fixture import make_settings

    settings = make_settings(
        workers=3,
        max_auth_queue=4096,
        max_concurrent_auth=64,
        # Each HAProxy process holds haproxy.MAXCONN client connections: keep a margin.
        haproxy_processes=max(2, -(-args.sessions // int(haproxy.MAXCONN * 0.9))),
        # The killed worker or leader stays down: this times the resumes on the
        # survivors and Patroni's failover, not the supervisor's restart (which would
        # bring a killed leader back in seconds, leading again, with no failover).
        supervise=False,
    )
    cluster = LocalCluster(settings, say=lambda line: print(f"  [cluster] {line}", flush=True))
    clients: list[BenchClient] = []
    try:
        await asyncio.to_thread(cluster.up)
        stats = Stats()
        host, port = settings.host, settings.client_port
        clients = [BenchClient(f"fo{i}", host, port, stats) for i in range(args.sessions)]
        t0 = time.monotonic()
        await _gather_bounded(200, [c.login() for c in clients])
        per_worker = {w: sum(1 for c in clients if c.worker == w) for w in settings.worker_ids()}
        print(
            f"{len(clients)} sessions logged in after {time.monotonic() - t0:.1f} s: {per_worker}",
            flush=True,
        )
        stats.dropped = 0

        sending = True
        senders = clients[: args.senders]
        counter = iter(range(10**9))
        in_flight: set[asyncio.Task[None]] = set()

        async def flow(client: BenchClient) -> None:
            interval = args.senders / args.rate
            while sending:
                await asyncio.sleep(random.expovariate(1 / interval))
                to = random.choice(clients).user
                while to == client.user:  # a device never gets its own sends as `msg`
                    to = random.choice(clients).user
                task = asyncio.get_running_loop().create_task(
                    client.send(to, f"{client.user}-{next(counter)}")
                )
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)

        flows = [asyncio.get_running_loop().create_task(flow(c)) for c in senders]
        await asyncio.sleep(3)
        fault_at = time.monotonic()
        victims: list[BenchClient] = []
        if args.scenario == "kill-worker":
            victim = max(per_worker, key=lambda w: per_worker[w])
            pid = cluster.pid_of(victim)
            assert pid is not None
            victims = [c for c in clients if c.worker == victim]
            print(
                f"kill -9 worker {victim} (pid {pid}) holding {len(victims)} sessions", flush=True
            )
            fault_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
        elif args.scenario == "kill-primary":
            view = patroni.cluster_view(settings)
            assert view is not None and view.leader is not None
            node = view.leader.name
            pids = [cluster.pid_of(node), cluster.postmaster_pid(node)]
            print(f"kill -9 Patroni leader {node}: patroni and postmaster {pids}", flush=True)
            fault_at = time.monotonic()
            for p in pids:
                if p:
                    os.kill(p, signal.SIGKILL)
        else:
            fault_at = time.monotonic()
            print(await _switchover(cluster), flush=True)

        if victims:
            while True:
                done = sum(1 for c in victims if c.resumed_at is not None)
                if done >= len(victims) or time.monotonic() - fault_at > 60:
                    break
                await asyncio.sleep(0.05)
            times = sorted((c.resumed_at or 1e9) - fault_at for c in victims)
            p99 = times[max(0, int(len(times) * 0.99) - 1)]
            print(
                f"resumed on the surviving workers: 50% after {statistics.median(times):.2f} s, "
                f"99% after {p99:.2f} s, all after {times[-1]:.2f} s",
                flush=True,
            )
        await asyncio.sleep(args.after)
        sending = False
        await asyncio.gather(*flows)
        if in_flight:
            await asyncio.wait(list(in_flight), timeout=120)
        # Settle: every acknowledged message at its recipient.
        by_user = {c.user: c for c in clients}
        for _ in range(120):
            lost = sum(1 for mid, to in stats.acked.items() if mid not in by_user[to].received)
            if lost == 0:
                break
            await asyncio.sleep(0.5)
        during = [lat for at, lat in stats.sent_latency if at >= fault_at]
        stall = max(during) if during else 0.0
        acked_times = sorted(at for at, _ in stats.sent_latency)
        gaps = [b - a for a, b in itertools.pairwise(acked_times) if a >= fault_at - 1]
        print(
            f"== failover --scenario {args.scenario}, {len(clients)} sessions, {args.rate} msgs/s"
        )
        print(
            f"messages acknowledged {len(stats.acked)}, lost {lost}, duplicated {stats.duplicates}"
        )
        print(
            f"client connections dropped {stats.dropped}, resumed {stats.resumes}, "
            f"fallback logins {stats.fallback_logins}"
        )
        print(
            f"longest send (send -> sent) after the fault: {stall:.2f} s; "
            f"longest gap between acknowledgements: {max(gaps, default=0):.2f} s"
        )
    finally:
        for c in clients:
            c.close()
        if args.keep_logs:
            import shutil

            shutil.copytree(cluster.layout.logs, args.keep_logs, dirs_exist_ok=True)
        await asyncio.to_thread(cluster.down, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", choices=["kill-worker", "kill-primary", "switchover"], required=True
    )
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--senders", type=int, default=200, help="sessions that send")
    parser.add_argument("--rate", type=float, default=200.0, help="total msgs/s of the flow")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of flow after recovery")
    parser.add_argument("--keep-logs", help="copy the cluster's logs here before purging it")
    args = parser.parse_args()
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
