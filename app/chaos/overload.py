"""`switchboard chaos overload`: a login storm at a multiple of what the cluster can
take, while established sessions keep messaging (issue #21).

1. register ``login_users`` users for the storm and log ``established`` others in
   with `ResilientClient`; they send 1:1 messages at ``rate`` per second each;
2. **calibrate**: password logins in a closed loop (``calibrate_concurrency`` at a
   time) for ``calibrate_s``: the capacity, in logins per second;
3. **overload**: for ``overload_s``, start new password logins at
   ``overload_factor`` x capacity (open loop: each is a new connection that
   honours ``overloaded``/``retry_after``, then says ``bye``);
4. wait until every offered login got its welcome and no worker sheds load any
   more (at most ``settle_s``), then judge.

Steps 2 and 3 run in a spawned process of their own (on uvloop): at 3x capacity the
storm's clients are enough work to starve a loop they share with the established
sessions, and the verdict would then measure the load generator, not the cluster.
For the same reason capacity and goodput are the logins the workers committed in
each window (their ``/health`` ``password_logins``, read at its start and end), not
the welcomes the generator got round to reading; the generator's own count is
reported beside them.

The verdict holds: no worker declared dead or registered again (fenced) while
its process lived; no established session dropped (no reconnect, no resume);
every acknowledged message delivered, and the send latency of the established
sessions (p50/p99/max, and per second); login goodput during the overload as a
share of the capacity; every offered login done; how long until the cluster was
back to normal. It prints a per-second timeline of the storm.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import os
import random
import signal
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import orjson

from app.chaos import cpu
from app.chaos.checker import Ledger, judge
from app.chaos.runner import PASSWORD, Peer, bounded, db_now, liveness_events, register_user
from app.cluster.health import http_json
from app.cluster.launcher import LocalCluster

Say = Callable[[str], None]
SHED_CODES = frozenset({"overloaded", "rate_limited"})


@dataclass(frozen=True, slots=True)
class OverloadConfig:
    established: int = 300
    rate: float = 0.5  # messages per second per established user
    login_users: int = 400
    calibrate_s: float = 6.0
    calibrate_concurrency: int = 48
    overload_factor: float = 3.0
    overload_s: float = 12.0
    settle_s: float = 90.0
    # Goodput during the overload must reach this share of the capacity.
    min_goodput: float = 0.8
    seed: int | None = None


@dataclass(slots=True)
class _Second:
    logins: int = 0
    committed: int = 0  # password logins the workers committed (their /health)
    shed: int = 0
    sends: list[float] = field(default_factory=list)
    max_lag_ms: float = 0.0
    shedding_workers: int = 0


@dataclass(slots=True)
class _Storm:
    """Counts of the login side, and a per-second timeline from t0."""

    t0: float
    seconds: dict[int, _Second] = field(default_factory=dict)
    done: int = 0
    shed: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def second(self, at: float | None = None) -> _Second:
        index = int((time.monotonic() if at is None else at) - self.t0)
        return self.seconds.setdefault(index, _Second())


@dataclass(frozen=True, slots=True)
class OverloadVerdict:
    capacity_per_s: float
    offered: int
    offered_per_s: float
    goodput_per_s: float
    # The same two as the generator counted its welcomes (late when it is starved).
    client_capacity_per_s: float
    client_goodput_per_s: float
    # CPU per committed login, calibration and overload: "machine 3.1 ms (workers ...)".
    cpu_per_login: tuple[str, str]
    logged_in: int
    shed_answers: int
    errors: dict[str, int]
    established: int
    established_dropped: int
    acknowledged: int
    lost: int
    duplicated: int
    send_p50_ms: float
    send_p99_ms: float
    send_max_ms: float
    declared_dead: int
    registered_again: int
    recovered_s: float | None
    min_goodput: float
    timeline: tuple[str, ...] = ()

    @property
    def goodput_share(self) -> float:
        return self.goodput_per_s / self.capacity_per_s if self.capacity_per_s else 0.0

    @property
    def ok(self) -> bool:
        return (
            self.declared_dead == 0
            and self.registered_again == 0
            and self.established_dropped == 0
            and self.lost == 0
            and self.duplicated == 0
            and self.logged_in == self.offered
            and self.goodput_share >= self.min_goodput
            and self.recovered_s is not None
        )

    def format(self) -> str:
        recovered = "never" if self.recovered_s is None else f"{self.recovered_s:.1f} s"
        lines = [
            f"scenario overload: {'PASS' if self.ok else 'FAIL'}",
            f"  capacity {self.capacity_per_s:.0f} logins/s; offered {self.offered} at"
            f" {self.offered_per_s:.0f}/s; goodput {self.goodput_per_s:.0f}/s"
            f" ({self.goodput_share:.0%}, at least {self.min_goodput:.0%});"
            f" logged in by the end {self.logged_in}/{self.offered}",
            f"  (committed by the workers; as the generator counted its welcomes: capacity"
            f" {self.client_capacity_per_s:.0f}/s, goodput {self.client_goodput_per_s:.0f}/s)",
            f"  CPU per committed login: calibrating {self.cpu_per_login[0]};"
            f" overloaded {self.cpu_per_login[1]}",
            f"  answered overloaded/rate_limited {self.shed_answers}"
            f" ({self.shed_answers / max(1, self.offered):.2f} per login); other errors"
            f" {dict(self.errors) or 0}",
            f"  established sessions {self.established}, dropped {self.established_dropped};"
            f" messages acknowledged {self.acknowledged}, lost {self.lost}, duplicated"
            f" {self.duplicated}; send latency p50 {self.send_p50_ms:.0f} ms, p99"
            f" {self.send_p99_ms:.0f} ms, max {self.send_max_ms:.0f} ms",
            f"  workers declared dead {self.declared_dead}, registered again"
            f" {self.registered_again}; back to normal {recovered} after the overload",
        ]
        return "\n".join(lines + list(self.timeline))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True, slots=True)
class _StormJob:
    """What the storm's process is given (``t0``: the parent's timeline's start)."""

    host: str
    port: int
    users: list[str]
    config: OverloadConfig
    t0: float
    health_urls: list[str]


def _storm_process(conn: Connection, job: _StormJob) -> None:
    """The storm's process (spawned by `run_overload`): the results go through ``conn``."""
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        uvloop.run(_storm(conn, job))
    except Exception as exc:
        conn.send(("failed", repr(exc)))


async def _lean_login(host: str, port: int, user: str, storm: _Storm) -> None:
    """One password login through to its welcome (a new connection when one drops),
    honouring overloaded/rate_limited; then bye. On a bare stream: the storm's process
    opens about three times the cluster's capacity of these a second, where the SDK's
    client (a reader task and an event queue per connection) would be the bottleneck."""
    hello = orjson.dumps(
        {"op": "hello", "user": user, "password": PASSWORD, "device": "storm", "v": 1, "rid": 1}
    )
    while True:
        try:
            async with asyncio.timeout(60.0):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            storm.errors[f"connect: {type(exc).__name__}"] += 1
            await asyncio.sleep(random.uniform(0.1, 0.5))
            continue
        try:
            while True:
                writer.write(hello + b"\n")
                reply = await _reply(reader, 1)
                if reply.get("op") == "welcome":
                    storm.done += 1
                    storm.second().logins += 1
                    writer.write(b'{"op":"bye","rid":2}\n')
                    with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                        await _reply(reader, 2, 5.0)
                    return
                code = str(reply.get("code"))
                if code not in SHED_CODES:
                    storm.errors[code] += 1
                    break  # try again on a new connection
                storm.shed += 1
                storm.second().shed += 1
                wait = reply.get("retry_after")
                wait = float(wait) if isinstance(wait, int | float) else 1.0
                await asyncio.sleep(wait * random.uniform(1.0, 1.5))
        except (OSError, TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
        await asyncio.sleep(random.uniform(0.1, 0.5))


async def _reply(reader: asyncio.StreamReader, rid: int, within: float = 60.0) -> dict[str, Any]:
    """The reply to request ``rid`` (other frames skipped), or a fatal error. (A timeout
    on the task, not `wait_for`: that wraps each read in a task of its own, and the
    storm's process reads tens of thousands of replies a second.)"""
    async with asyncio.timeout(within):
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            frame = orjson.loads(line)
            if not isinstance(frame, dict):
                raise ValueError("not a JSON object")
            if frame.get("rid") == rid or (frame.get("op") == "error" and "rid" not in frame):
                return frame


async def _healths(urls: list[str], timeout: float) -> list[Any]:
    """The workers' ``/health`` bodies (None for one that did not answer)."""
    answers = await asyncio.gather(*(asyncio.to_thread(http_json, u, timeout) for u in urls))
    return [body for _, body in answers]


def _password_logins(healths: list[Any]) -> int | None:
    """Password logins the workers have committed so far (the sum of their
    ``password_logins``), or None when one of them did not answer."""
    counts = [body.get("password_logins") if isinstance(body, dict) else None for body in healths]
    return sum(c for c in counts if isinstance(c, int)) if None not in counts else None


Counts = list[tuple[int, float]]  # each worker's password_logins, and when it said so


async def _committed_logins(health_urls: list[str]) -> Counts | None:
    """Each worker's committed password logins with the time of its report (``at``,
    the machine's monotonic clock), or None when one of them did not answer."""
    counts: Counts = []
    for body in await _healths(health_urls, 5.0):
        if not isinstance(body, dict):
            return None
        count, at = body.get("password_logins"), body.get("at")
        if not isinstance(count, int) or not isinstance(at, int | float):
            return None
        counts.append((count, float(at)))
    return counts


def _committed_rate(before: Counts | None, after: Counts | None) -> float | None:
    """Logins per second the workers committed between two reads: each worker's count
    over its own reports' times (a worker that answered late is still exact)."""
    if before is None or after is None or len(before) != len(after):
        return None
    return sum(
        (c1 - c0) / (a1 - a0) for (c0, a0), (c1, a1) in zip(before, after, strict=True) if a1 > a0
    )


class _Window:
    """Logins per second over a window, as the workers committed them and as the
    generator counted its welcomes (the first, unless a worker did not answer)."""

    def __init__(self, storm: _Storm, health_urls: list[str]) -> None:
        self._storm, self._urls = storm, health_urls

    async def __aenter__(self) -> _Window:
        self._committed = await _committed_logins(self._urls)
        self._done = self._storm.done
        self._started, self._cpu = time.monotonic(), time.process_time()
        return self

    async def __aexit__(self, *_: object) -> None:
        self.seconds = time.monotonic() - self._started
        self.cpu = (time.process_time() - self._cpu) / self.seconds
        self.counted = (self._storm.done - self._done) / self.seconds
        committed = _committed_rate(self._committed, await _committed_logins(self._urls))
        self.committed = committed if committed is not None else self.counted


async def _storm(conn: Connection, job: _StormJob) -> None:
    """Calibrate (closed loop), then overload (open loop at a multiple of it), then wait
    for every offered login, at most ``settle_s``. ``t0`` is the parent's (the monotonic
    clock is the machine's), so the seconds line up with its timeline."""
    host, port, config, health_urls = job.host, job.port, job.config, job.health_urls
    storm = _Storm(t0=job.t0)
    names = itertools.cycle(job.users)
    loop = asyncio.get_running_loop()

    calibrate_end = time.monotonic() + config.calibrate_s

    async def closed_loop() -> None:
        while time.monotonic() < calibrate_end:
            await _lean_login(host, port, next(names), storm)

    conn.send(("calibrating",))
    async with _Window(storm, health_urls) as calibration:
        await asyncio.gather(*(closed_loop() for _ in range(config.calibrate_concurrency)))
        conn.send(("calibrated",))  # the parent's CPU mark; the window's last read follows
    shed_before = storm.shed
    conn.send(
        (
            "capacity",
            calibration.committed,
            calibration.counted,
            calibration.cpu,
        )
    )

    offered_rate = max(1.0, calibration.committed * config.overload_factor)
    logins: list[asyncio.Task[None]] = []
    async with _Window(storm, health_urls) as overload:
        overload_end = time.monotonic() + config.overload_s
        while (now := time.monotonic()) < overload_end:
            due = int((now - (overload_end - config.overload_s)) * offered_rate) + 1
            while len(logins) < due:
                logins.append(loop.create_task(_lean_login(host, port, next(names), storm)))
            await asyncio.sleep(0.01)
        conn.send(("overload_ended",))
    waiting = sum(not t.done() for t in logins)
    conn.send(
        (
            "storm_over",
            len(logins),
            overload.committed,
            overload.counted,
            waiting,
            overload_end,
            overload.cpu,
        )
    )

    pending = [t for t in logins if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=config.settle_s)
    for task in logins:
        if not task.done():
            task.cancel()
    await asyncio.gather(*logins, return_exceptions=True)
    logged_in = sum(1 for t in logins if not t.cancelled() and t.exception() is None)
    seconds = {i: (sec.logins, sec.shed) for i, sec in storm.seconds.items()}
    conn.send(("done", logged_in, storm.shed - shed_before, dict(storm.errors), seconds))


async def _receive(conn: Connection, kind: str, timeout: float) -> tuple[Any, ...]:
    """The storm process's next message, which must be ``kind``: its fields."""
    end = time.monotonic() + timeout
    while not conn.poll():
        if time.monotonic() > end:
            raise RuntimeError(f"the storm process sent no {kind!r} within {timeout:.0f} s")
        await asyncio.sleep(0.05)
    try:
        message = conn.recv()
    except EOFError:
        raise RuntimeError(f"the storm process ended before {kind!r}") from None
    if message[0] != kind:
        raise RuntimeError(f"the storm process: {message[0]} {message[1:]} (waiting for {kind})")
    return tuple(message[1:])


async def _sample_workers(cluster: LocalCluster, storm: _Storm, stop: asyncio.Event) -> None:
    """Each second: the worst loop lag among the workers, how many shed load, and how
    many password logins they committed."""
    urls = cluster.worker_health_urls()
    last_committed: int | None = None
    while not stop.is_set():
        healths = await _healths(urls, 1.0)
        second = storm.second()
        total = _password_logins(healths)
        if total is not None and last_committed is not None:
            second.committed += total - last_committed
        last_committed = total if total is not None else last_committed
        for body in healths:
            if isinstance(body, dict):
                lag = body.get("loop_lag_ms")
                if isinstance(lag, int | float):
                    second.max_lag_ms = max(second.max_lag_ms, float(lag))
                if body.get("shedding"):
                    second.shedding_workers += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _cpu_mark(
    cluster: LocalCluster, generators: dict[str, list[int]]
) -> tuple[cpu.CpuMark, int | None]:
    """The CPU used so far by role, and the password logins committed so far."""
    committed = _password_logins(await _healths(cluster.worker_health_urls(), 5.0))
    return cpu.mark(cluster, generators), committed


def _cpu_per_login(
    before: tuple[cpu.CpuMark, int | None], after: tuple[cpu.CpuMark, int | None]
) -> str:
    if before[1] is None or after[1] is None:
        return "unknown (a worker did not answer)"
    return cpu.per_unit_ms(cpu.used(before[0], after[0]), after[1] - before[1])


async def _anyone_shedding(cluster: LocalCluster) -> bool:
    for url in cluster.worker_health_urls():
        _, body = await asyncio.to_thread(http_json, url)
        if not isinstance(body, dict) or body.get("shedding") or not body.get("healthy"):
            return True
    return False


async def run_overload(cluster: LocalCluster, config: OverloadConfig, say: Say) -> OverloadVerdict:
    rng = random.Random(config.seed)
    s = cluster.settings
    host, port = s.client_address(), s.client_port
    prefix = f"ovl{uuid.uuid4().hex[:6]}_"
    est_users = [f"{prefix}e{i}" for i in range(config.established)]
    storm_users = [f"{prefix}s{i}" for i in range(config.login_users)]
    ledger = Ledger()
    peers = [Peer(u, "main", ledger.session(u, "main")) for u in est_users]
    devices = {u: ["main"] for u in est_users}

    say(f"[overload] registering {len(est_users) + len(storm_users)} users")
    await bounded(64, [register_user(host, port, u) for u in est_users + storm_users])
    await bounded(64, [p.start(host, port) for p in peers])
    say(f"[overload] {len(peers)} established sessions logged in; traffic starts")

    storm = _Storm(t0=time.monotonic())
    sending = True
    in_flight: set[asyncio.Task[None]] = set()

    async def send_one(sender: Peer, recipient: str, cmid: str) -> None:
        assert sender.client is not None
        started = time.monotonic()
        with contextlib.suppress(Exception):  # an unacknowledged send is not in the ledger
            sent = await sender.client.send(cmid, to=recipient, cmid=cmid)
            ledger.record_ack(cmid, sent.id, recipient)
            if sent.seq is not None:
                sender.log.own_seqs.add(sent.seq)
            storm.second(started).sends.append((time.monotonic() - started) * 1000)

    async def traffic(sender: Peer) -> None:
        n = 0
        while sending:
            await asyncio.sleep(rng.expovariate(config.rate))
            if not sending:
                break
            recipient = rng.choice(est_users)
            if recipient == sender.user:
                continue
            n += 1
            task = asyncio.get_running_loop().create_task(
                send_one(sender, recipient, f"{sender.user}-{n}")
            )
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    loop = asyncio.get_running_loop()
    senders = [loop.create_task(traffic(p)) for p in peers]
    stop_sampling = asyncio.Event()
    sampler = loop.create_task(_sample_workers(cluster, storm, stop_sampling))
    since = await db_now(cluster)

    # ---- calibrate and overload, in a process of its own --------------------------------
    # The storm's clients are costly (a connection, a login and a bye each): sharing this
    # process's loop with the established sessions, at 3x capacity they starved it and
    # the verdict measured the generator. A spawned process, on uvloop, gets its own
    # share of the CPU, as clients on other machines would.
    say(f"[overload] calibrating: {config.calibrate_concurrency} logins at a time")
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(
        target=_storm_process,
        args=(
            theirs,
            _StormJob(host, port, storm_users, config, storm.t0, cluster.worker_health_urls()),
        ),
        daemon=True,
        name="overload-storm",
    )
    proc.start()
    theirs.close()
    try:
        await _receive(mine, "calibrating", 60)
        # This process runs the established sessions: a generator too.
        generators = {"storm": [proc.pid or 0], "established": [os.getpid()]}
        before = await _cpu_mark(cluster, generators)
        await _receive(mine, "calibrated", config.calibrate_s + 60)
        calibrated = await _cpu_mark(cluster, generators)
        capacity, client_capacity, calibrate_cpu = await _receive(mine, "capacity", 60)
        offered_rate = max(1.0, capacity * config.overload_factor)
        say(
            f"[overload] capacity {capacity:.0f} logins/s committed ({client_capacity:.0f}/s"
            f" welcomed as the storm's process counted; it used {calibrate_cpu:.0%} of a core)"
        )
        say(
            f"[overload] offering {offered_rate:.0f} logins/s for {config.overload_s:.0f} s"
            f" ({config.overload_factor:g}x)"
        )
        await _receive(mine, "overload_ended", config.overload_s + 60)
        stormed = await _cpu_mark(cluster, generators)
        cpu_per_login = (_cpu_per_login(before, calibrated), _cpu_per_login(calibrated, stormed))
        offered, goodput, client_goodput, waiting, overload_end, overload_cpu = await _receive(
            mine, "storm_over", 60
        )
        say(
            f"[overload] storm over; {waiting} logins still waiting (the storm's process"
            f" used {overload_cpu:.0%} of a core)"
        )
        deadline = time.monotonic() + config.settle_s
        logged_in, shed_answers, errors, seconds = await _receive(
            mine, "done", config.settle_s + 60
        )
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    storm.errors.update(errors)
    for index, (logins_done, shed) in seconds.items():
        second = storm.seconds.setdefault(index, _Second())
        second.logins += logins_done
        second.shed += shed

    # ---- back to normal ---------------------------------------------------------------
    recovered_s: float | None = None
    while logged_in == offered and time.monotonic() < deadline:
        if not await _anyone_shedding(cluster):
            recovered_s = time.monotonic() - overload_end
            break
        await asyncio.sleep(0.5)

    sending = False
    await asyncio.gather(*senders)
    if in_flight:
        await asyncio.wait(list(in_flight), timeout=60)
    settle_end = time.monotonic() + 30
    while time.monotonic() < settle_end:
        seen = {p.user: {mid for _, mid in p.log.received} for p in peers}
        if all(mid in seen[rcpt] for mid, rcpt in ledger.acked.items()):
            break
        await asyncio.sleep(0.5)
    stop_sampling.set()
    await sampler
    for p in peers:
        p.sync_stats()
    dropped = sum(1 for p in peers if p.log.reconnects or p.log.resumes or not p.connected)
    delivery = judge("overload", ledger, devices, len(peers) - dropped, 0)
    dead, registered = await liveness_events(cluster, since)
    await bounded(64, [p.stop() for p in peers])

    latencies = [ms for sec in storm.seconds.values() for ms in sec.sends]
    timeline = [
        "  t(s)  committed  logins  shed  sends  send_p99_ms  worst_lag_ms  shedding_workers"
    ]
    for index in sorted(storm.seconds):
        sec = storm.seconds[index]
        timeline.append(
            f"  {index:4d}  {sec.committed:9d}  {sec.logins:6d}  {sec.shed:4d}  {len(sec.sends):5d}"
            f"  {_percentile(sec.sends, 0.99):11.0f}  {sec.max_lag_ms:12.0f}"
            f"  {sec.shedding_workers:16d}"
        )
    verdict = OverloadVerdict(
        capacity_per_s=capacity,
        offered=offered,
        offered_per_s=offered_rate,
        goodput_per_s=goodput,
        client_capacity_per_s=client_capacity,
        client_goodput_per_s=client_goodput,
        cpu_per_login=cpu_per_login,
        logged_in=logged_in,
        shed_answers=shed_answers,
        errors=dict(storm.errors),
        established=len(peers),
        established_dropped=dropped,
        acknowledged=delivery.acknowledged,
        lost=delivery.lost,
        duplicated=delivery.duplicated,
        send_p50_ms=statistics.median(latencies) if latencies else 0.0,
        send_p99_ms=_percentile(latencies, 0.99),
        send_max_ms=max(latencies, default=0.0),
        declared_dead=dead,
        registered_again=registered,
        recovered_s=recovered_s,
        min_goodput=config.min_goodput,
        timeline=tuple(timeline),
    )
    say(verdict.format())
    return verdict
