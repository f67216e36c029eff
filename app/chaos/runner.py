"""Run one chaos scenario: real clients, real traffic, a real fault, then the checker.

1. register ``clients`` users (a few get a second device) and log every device
   in through HAProxy with the SDK's `ResilientClient`;
2. each user sends 1:1 messages to random others at ``rate`` per second;
3. after ``warmup_s`` the fault is injected; traffic goes on for ``after_s``;
4. traffic stops, every send waits for its ``sent`` (sends stall through a DB
   failover), the fault is undone (a killed process must be back by itself,
   started again by the supervisor; a drained worker is undrained);
5. wait until each acknowledged message reached each device of its recipient
   (or ``settle_s`` passes), compare the database's active sessions with where
   the clients really are, and judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.chaos.checker import Ledger, SessionLog, Verdict, judge, quantile
from app.chaos.faults import FAULTS
from app.chaos.hostfaults import HOST_FAULTS
from app.client import Client, Msg, ResilientClient, Resumed, ServerError
from app.client.resilient import LinkState, ReconnectPolicy
from app.client.wire import Transport
from app.cluster.launcher import LocalCluster
from app.store.db import dsn

Say = Callable[[str], None]
PASSWORD = "chaos-password-not-secret"


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    clients: int = 1000
    second_devices: int = 50
    rate: float = 0.5  # messages per second per user
    warmup_s: float = 3.0
    after_s: float = 6.0
    settle_s: float = 60.0
    login_concurrency: int = 100
    seed: int | None = None
    # "tcp" (the plaintext client port) or "ws" (WebSockets through client_ws_port):
    # every client registers, logs in, sends and resumes over it.
    transport: Transport = "tcp"


class Peer:
    """One device of one user: a resilient client and its log."""

    def __init__(self, user: str, device: str, log: SessionLog) -> None:
        self.user = user
        self.device = device
        self.log = log
        self.client: ResilientClient | None = None
        self._reader: asyncio.Task[None] | None = None
        self.resumed_at: list[float] = []  # time.monotonic() of each Resumed event

    async def start(
        self,
        host: str,
        port: int,
        transport: Transport = "tcp",
        policy: ReconnectPolicy | None = None,
    ) -> None:
        self.client = await ResilientClient.connect(
            host, port, timeout=30.0, transport=transport, policy=policy
        )
        welcome = await self.client.login(self.user, PASSWORD, self.device)
        self.log.worker = welcome.worker
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.client is not None
        pending_ack = 0
        async for event in self.client.events():
            if isinstance(event, Msg):
                self.log.received.append((event.seq, event.id))
                pending_ack += 1
                if pending_ack >= 20:
                    pending_ack = 0
                    with contextlib.suppress(Exception):
                        await self.client.ack(event.seq)
            elif isinstance(event, Resumed):
                self.log.worker = event.worker
                self.resumed_at.append(time.monotonic())

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.state is LinkState.ONLINE

    def sync_stats(self) -> None:
        if self.client is not None:
            stats = self.client.stats
            self.log.resumes = stats.resumes + stats.fallback_logins
            self.log.reconnects = stats.reconnects
            if self.client.worker:
                self.log.worker = self.client.worker

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def bounded(n: int, jobs: list[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines with at most ``n`` at a time."""
    gate = asyncio.Semaphore(n)

    async def run(job: Coroutine[Any, Any, None]) -> None:
        async with gate:
            await job

    await asyncio.gather(*(run(j) for j in jobs))


async def register_user(host: str, port: int, user: str, transport: Transport = "tcp") -> None:
    for attempt in range(20):
        try:
            client = await Client.connect(host, port, timeout=30.0, transport=transport)
            try:
                await client.register(user, PASSWORD)
            finally:
                await client.close()
            return
        except ServerError as exc:
            if exc.code == "user_exists":
                return
            await asyncio.sleep(exc.retry_after or 0.2 * (attempt + 1))
    raise RuntimeError(f"could not register {user}")


async def _presence_mismatches(cluster: LocalCluster, peers: list[Peer], prefix: str) -> int:
    """Active sessions in the database versus where the clients really are."""
    expected = {(p.user, p.device, p.log.worker) for p in peers if p.connected}
    conn = await asyncpg.connect(dsn(cluster.settings))
    try:
        rows = await conn.fetch(
            "SELECT u.username, s.device, s.worker_id FROM sessions s "
            "JOIN users u ON u.id = s.user_id "
            "WHERE s.state = 'active' AND u.username LIKE $1",
            prefix + "%",
        )
    finally:
        await conn.close()
    actual = {(r["username"], r["device"], r["worker_id"]) for r in rows}
    return len(expected ^ actual)


async def db_now(cluster: LocalCluster) -> Any:
    conn = await asyncpg.connect(dsn(cluster.settings))
    try:
        return await conn.fetchval("SELECT now()")
    finally:
        await conn.close()


async def liveness_events(cluster: LocalCluster, since: Any) -> tuple[int, int]:
    """Workers declared dead, and workers that registered (started) again, since then.
    Waits two events flushes first: a worker writes its events in batches."""
    await asyncio.sleep(cluster.settings.events_flush_interval_s * 2 + 0.5)
    conn = await asyncpg.connect(dsn(cluster.settings))
    try:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE kind = 'worker_died') AS dead, "
            "count(*) FILTER (WHERE kind = 'worker_started') AS started "
            "FROM events WHERE at >= $1",
            since,
        )
    finally:
        await conn.close()
    return int(row["dead"]), int(row["started"])


async def run_scenario(
    cluster: LocalCluster, scenario: str, config: ChaosConfig, say: Say
) -> Verdict:
    fault = FAULTS[scenario] if scenario in FAULTS else HOST_FAULTS[scenario]
    rng = random.Random(config.seed)
    s = cluster.settings
    transport = config.transport
    host, port = s.client_address(), s.client_ws_port if transport == "ws" else s.client_port
    prefix = f"chaos{uuid.uuid4().hex[:6]}_"
    users = [f"{prefix}{i}" for i in range(config.clients)]
    ledger = Ledger()
    devices = {u: ["main"] for u in users}
    for u in users[: config.second_devices]:
        devices[u].append("second")
    peers = [Peer(u, d, ledger.session(u, d)) for u in users for d in devices[u]]
    by_user_main = {p.user: p for p in peers if p.device == "main"}

    t0 = time.monotonic()
    say(
        f"[{scenario}] registering {len(users)} users, logging in {len(peers)} devices "
        f"over {transport}"
    )
    await bounded(
        config.login_concurrency, [register_user(host, port, u, transport) for u in users]
    )
    await bounded(
        config.login_concurrency,
        [p.start(host, port, transport, fault.client_policy) for p in peers],
    )
    say(f"[{scenario}] all logged in after {time.monotonic() - t0:.1f} s")

    sending = True
    in_flight: set[asyncio.Task[None]] = set()
    failures: list[str] = []
    longest_send = 0.0

    async def send_one(sender: Peer, recipient: str, cmid: str) -> None:
        nonlocal longest_send
        assert sender.client is not None
        asked = time.monotonic()
        try:
            sent = await sender.client.send(f"{cmid} {time.time():.3f}", to=recipient, cmid=cmid)
        except Exception as exc:  # a send that never got its ack is not in the ledger
            failures.append(f"{type(exc).__name__}: {exc}")
            return
        longest_send = max(longest_send, time.monotonic() - asked)
        ledger.record_ack(cmid, sent.id, recipient)
        if sent.seq is not None:
            sender.log.own_seqs.add(sent.seq)

    async def traffic(sender: Peer) -> None:
        n = 0
        while sending:
            await asyncio.sleep(rng.expovariate(config.rate))
            if not sending:
                break
            recipient = rng.choice(users)
            while recipient == sender.user:
                recipient = rng.choice(users)
            n += 1
            task = asyncio.get_running_loop().create_task(
                send_one(sender, recipient, f"{sender.user}-{n}")
            )
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    senders = [asyncio.get_running_loop().create_task(traffic(p)) for p in by_user_main.values()]
    db_started = await db_now(cluster)
    await asyncio.sleep(config.warmup_s)
    say(f"[{scenario}] {fault.description}")
    fault_at = time.monotonic()
    detail = await fault.inject(cluster, say)
    await asyncio.sleep(config.after_s)
    sending = False
    await asyncio.gather(*senders)
    say(f"[{scenario}] traffic stopped; waiting for {len(in_flight)} sends in flight")
    if in_flight:
        await asyncio.wait(list(in_flight), timeout=config.settle_s + 60)
    await fault.recover(cluster, say, detail)

    # Settle: every acknowledged message at every device of its recipient.
    deadline = time.monotonic() + config.settle_s
    while time.monotonic() < deadline:
        seen = {(p.user, p.device): {mid for _, mid in p.log.received} for p in peers}
        missing = sum(
            1
            for mid, rcpt in ledger.acked.items()
            for d in devices[rcpt]
            if mid not in seen[(rcpt, d)]
        )
        if missing == 0 and all(p.connected for p in peers):
            break
        await asyncio.sleep(0.5)
    # Presence converges: the reaper and detach/attach writes run asynchronously.
    mismatches = 0
    for _ in range(30):
        for p in peers:
            p.sync_stats()
        mismatches = await _presence_mismatches(cluster, peers, prefix)
        if mismatches == 0:
            break
        await asyncio.sleep(0.5)
    connected = sum(1 for p in peers if p.connected)
    notes = tuple(sorted(set(failures)))[:5]
    dead, registered = await liveness_events(cluster, db_started)
    took = [
        min(t for t in p.resumed_at if t >= fault_at) - fault_at
        for p in peers
        if any(t >= fault_at for t in p.resumed_at)
    ]
    verdict = dataclasses.replace(
        judge(scenario, ledger, devices, connected, mismatches, notes),
        declared_dead=dead,
        expect_dead=fault.expect_dead,
        registered_again=registered,
        resumed_after_fault=len(took),
        resume_p50_s=quantile(took, 0.5) if took else None,
        resume_p99_s=quantile(took, 0.99) if took else None,
        resume_max_s=max(took) if took else None,
        longest_send_s=longest_send,
    )
    await bounded(config.login_concurrency, [p.stop() for p in peers])
    say(verdict.format())
    return verdict
