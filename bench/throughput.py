"""Durable 1:1 message throughput and latency, end to end through HAProxy's client port.

    .venv/bin/python -m bench.throughput --mode max  [--pairs 400] [--duration 15]
    .venv/bin/python -m bench.throughput --mode rate --rate 5000 [--duration 15]

N sender and N receiver users (pairs) are registered and logged in, each on its own
connection through HAProxy's client port. Sender i sends 1:1 messages to receiver i;
a message counts when the RECIPIENT has received its `msg` frame (the server replies
`sent` only after the synchronously replicated commit). Receivers ack every
--ack-every messages and, with --read-every N, send a read receipt for every Nth
(the senders count the `receipt` frames).

--mode max: every sender keeps --window sends outstanding (pipelined, refilled on each
`sent`), capped client-side just under the server's per-connection flood limit
(--frames-per-s). Prints messages/s received and sends acknowledged/s over --duration
seconds after --warmup seconds.

--mode rate: an open-loop fixed total rate, spread round-robin over the senders. Each
body carries the send-call timestamp; receivers compute send call -> `msg` received.
Prints p50/p90/p99/max latency and the achieved rate.

The generator is asyncio Protocols on uvloop with orjson; --procs N forks N generator
processes, each with a share of the pairs, results merged. Starts its own 3-worker
cluster unless --port/--state-dir name a running one; always stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import secrets
import ssl
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench._common import CpuSampler, add_target_args, cluster_pids, cluster_target, format_cpu
from bench._stalls import Second, StallProbe, header
from bench._wal import WalProbe, WalStats
from bench._wire import Frame, Wire, WsWire, close_ws_sessions, connect, connect_ws, hello, register

BIN_S = 0.1
CLIENT_BURST = 20.0
# Shared progress counters per generator process.
P_ACKED, P_RECEIVED, P_ERRORS, P_READY = range(4)


@dataclass
class Plan:
    host: str
    port: int
    mode: str
    rate: float  # this process's share of the offered rate (mode rate)
    window: int
    cap: float  # client-side frames/s per sender connection (mode max)
    body_bytes: int
    ack_every: int
    read_every: int
    warmup: float
    duration: float
    drain: float
    run_id: str
    pairs: list[int] = field(default_factory=list)
    setup_concurrency: int = 32
    cafile: str | None = None  # set: connect over TLS, trusting this CA
    transport: str = "tcp"  # "ws": WebSockets through HAProxy's websockets frontend


_tls: dict[str | None, ssl.SSLContext] = {}


def _tls_context(plan: Plan) -> ssl.SSLContext | None:
    """One verifying client context per generator process (loading the CA costs more
    than a handshake); None for plaintext."""
    if plan.cafile is None:
        return None
    if plan.cafile not in _tls:
        _tls[plan.cafile] = ssl.create_default_context(cafile=plan.cafile)
    return _tls[plan.cafile]


class Stats:
    """Everything one generator process measures; merged by the parent."""

    def __init__(self, seconds: float) -> None:
        self.t0 = 0.0
        self.win_start = 0.0
        self.win_end = 0.0
        n_bins = int(seconds / BIN_S) + 1
        self.recv_bins = [0] * n_bins
        self.ack_bins = [0] * n_bins
        self.latency: list[float] = []  # send call -> msg received, sends inside the window
        self.latency_at: list[float] = []  # ... and when each of those was sent (s after t0)
        self.sent_latency: list[float] = []  # send call -> `sent`, sends inside the window
        self.issued = 0
        self.issued_in_window = 0
        self.acked = 0
        self.received = 0
        self.errors: Counter[str] = Counter()
        self.gaps = 0
        self.duplicates = 0
        self.receipts = 0
        self.closed = 0
        self.sched_lag_max = 0.0
        self.closing = False

    def configure(self, t0: float, warmup: float, duration: float) -> None:
        self.t0 = t0
        self.win_start = t0 + warmup
        self.win_end = t0 + warmup + duration

    def _bin(self, now: float) -> int:
        return min(max(int((now - self.t0) / BIN_S), 0), len(self.recv_bins) - 1)

    def on_sent(self, now: float, t_send: float | None) -> None:
        self.acked += 1
        self.ack_bins[self._bin(now)] += 1
        if t_send is not None and self.win_start <= t_send < self.win_end:
            self.sent_latency.append(now - t_send)

    def on_msg(self, now: float, t_send: float) -> None:
        self.received += 1
        self.recv_bins[self._bin(now)] += 1
        if self.win_start <= t_send < self.win_end:
            self.latency.append(now - t_send)
            self.latency_at.append(t_send - self.t0)

    def result(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class Sender:
    __slots__ = (
        "cap",
        "loop",
        "n",
        "outstanding",
        "pad",
        "running",
        "stats",
        "t_sent",
        "t_tok",
        "timer",
        "to",
        "tokens",
        "window",
        "wire",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: Stats, to: str, plan: Plan) -> None:
        self.loop = loop
        self.stats = stats
        self.to = to.encode()
        self.window = plan.window
        self.cap = plan.cap
        self.pad = b" " + b"x" * max(0, plan.body_bytes - 19)
        self.wire: Wire | WsWire | None = None
        self.n = 0
        self.outstanding = 0
        self.t_sent: dict[int, float] = {}
        self.tokens = CLIENT_BURST
        self.t_tok = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.running = False

    def frame(self, now: float) -> bytes:
        self.n += 1
        n = self.n
        self.t_sent[n] = now
        self.outstanding += 1
        stats = self.stats
        stats.issued += 1
        if stats.win_start <= now < stats.win_end:
            stats.issued_in_window += 1
        return b'{"op":"send","cmid":"%d","to":"%s","body":"%.6f%s","rid":%d}\n' % (
            n,
            self.to,
            now,
            self.pad,
            n,
        )

    def send_one(self) -> None:
        assert self.wire is not None
        self.wire.write(self.frame(time.monotonic()))

    def pump(self) -> None:
        """Max mode: refill the window, within the client-side token bucket."""
        now = time.monotonic()
        tokens = min(CLIENT_BURST, self.tokens + (now - self.t_tok) * self.cap)
        self.t_tok = now
        k = min(self.window - self.outstanding, int(tokens))
        if k > 0:
            self.tokens = tokens - k
            assert self.wire is not None
            self.wire.write(b"".join([self.frame(now) for _ in range(k)]))
        else:
            self.tokens = tokens
        if self.outstanding < self.window and self.timer is None and self.running:
            self.timer = self.loop.call_later(max(0.002, (1 - self.tokens) / self.cap), self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.running:
            self.pump()

    def stop(self) -> None:
        self.running = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def on_frame(self, frame: Frame) -> None:
        op = frame["op"]
        if op == "sent":
            t_send = self.t_sent.pop(frame["rid"], None)
            self.outstanding -= 1
            self.stats.on_sent(time.monotonic(), t_send)
            if self.running:
                self.pump()
        elif op == "receipt":
            self.stats.receipts += 1
        elif op == "error":
            self.stats.errors[frame.get("code", "?")] += 1
            if self.t_sent.pop(frame.get("rid"), None) is not None:  # type: ignore[arg-type]
                self.outstanding -= 1
                if self.running:
                    self.pump()

    def on_close(self, exc: Exception | None) -> None:
        if not self.stats.closing:
            self.stats.closed += 1
        self.stop()


class Receiver:
    __slots__ = ("ack_every", "acked", "read_every", "seq", "stats", "wire")

    def __init__(self, stats: Stats, ack_every: int, read_every: int = 0) -> None:
        self.stats = stats
        self.ack_every = ack_every
        self.read_every = read_every
        self.seq = 0
        self.acked = 0
        self.wire: Wire | WsWire | None = None

    def on_frame(self, frame: Frame) -> None:
        op = frame["op"]
        if op == "msg":
            now = time.monotonic()
            seq = frame["seq"]
            if seq <= self.seq:
                self.stats.duplicates += 1
                return
            if seq != self.seq + 1:
                self.stats.gaps += 1
            self.seq = seq
            body = frame["body"]
            space = body.find(" ")
            self.stats.on_msg(now, float(body if space < 0 else body[:space]))
            if self.read_every and seq % self.read_every == 0 and self.wire is not None:
                self.wire.write(b'{"op":"read","msg_id":%d}\n' % frame["id"])
            if seq - self.acked >= self.ack_every and self.wire is not None:
                self.acked = seq
                self.wire.write(b'{"op":"ack","seq":%d}\n' % seq)
        elif op == "error":
            self.stats.errors[frame.get("code", "?")] += 1

    def on_close(self, exc: Exception | None) -> None:
        if not self.stats.closing:
            self.stats.closed += 1


# ---- one generator process ---------------------------------------------------------


async def _open_session(
    plan: Plan, user: str, on_frame: Any, sem: asyncio.Semaphore
) -> Wire | WsWire:
    """Connect, register (an existing user is fine) and log in, retrying resets."""
    async with sem:
        delay = 0.2
        for attempt in range(6):
            wire: Wire | WsWire | None = None
            try:
                if plan.transport == "ws":
                    wire = await connect_ws(plan.host, plan.port, on_frame, tls=_tls_context(plan))
                else:
                    wire = await connect(plan.host, plan.port, on_frame, tls=_tls_context(plan))
                await register(wire, user)
                await hello(wire, user)
                return wire
            except (OSError, ConnectionError, TimeoutError, aiohttp.ClientError):
                if wire is not None:
                    wire.close()
                if attempt == 5:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
    raise AssertionError("unreachable")


async def _progress(stats: Stats, shared: Any) -> None:
    while True:
        shared[P_ACKED] = stats.acked
        shared[P_RECEIVED] = stats.received
        shared[P_ERRORS] = sum(stats.errors.values()) + stats.closed
        await asyncio.sleep(0.2)


async def _generator(plan: Plan, pipe: mpc.Connection, shared: Any) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats(plan.warmup + plan.duration + plan.drain + 5.0)
    sem = asyncio.Semaphore(plan.setup_concurrency)
    senders: list[Sender] = []
    receivers: list[Receiver] = []
    wires: list[Wire | WsWire] = []

    async def pair(i: int) -> None:
        rcv_name = f"b{plan.run_id}r{i}"
        receiver = Receiver(stats, plan.ack_every, plan.read_every)
        sender = Sender(loop, stats, rcv_name, plan)
        receiver.wire = await _open_session(plan, rcv_name, receiver.on_frame, sem)
        receiver.wire.on_close = receiver.on_close
        shared[P_READY] += 1
        sender.wire = await _open_session(plan, f"b{plan.run_id}s{i}", sender.on_frame, sem)
        sender.wire.on_close = sender.on_close
        shared[P_READY] += 1
        receivers.append(receiver)
        senders.append(sender)
        wires.extend([receiver.wire, sender.wire])

    try:
        await asyncio.gather(*(pair(i) for i in plan.pairs))
        # This process is the measuring instrument: a cyclic-GC pass over its
        # objects paused it for up to ~110 ms, which read as message latency. The
        # set-up's objects are frozen and the collector is off until the drain
        # ends (reference counting still frees nearly everything).
        gc.collect()
        gc.freeze()
        gc.disable()
        pipe.send(("ready", len(wires)))
        t0 = await loop.run_in_executor(None, pipe.recv)
        stats.configure(t0, plan.warmup, plan.duration)
        ticker = loop.create_task(_progress(stats, shared))
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        t_end = stats.win_end
        if plan.mode == "max":
            for s in senders:
                s.running = True
                s.pump()
            await asyncio.sleep(max(0.0, t_end - time.monotonic()))
            for s in senders:
                s.stop()
        else:
            await _drive(senders, plan.rate, t0, t_end, stats)
        # Drain: let every message already sent arrive (or give up after plan.drain s).
        deadline = time.monotonic() + plan.drain
        while time.monotonic() < deadline:
            outstanding = sum(s.outstanding for s in senders)
            if outstanding == 0 and stats.received >= stats.acked:
                break
            await asyncio.sleep(0.05)
        ticker.cancel()
        _progress_now(stats, shared)
        pipe.send(("result", stats.result()))
    except Exception as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        gc.enable()
        stats.closing = True
        for wire in wires:
            wire.close()
        await asyncio.sleep(0.1)
        await close_ws_sessions()


def _progress_now(stats: Stats, shared: Any) -> None:
    shared[P_ACKED] = stats.acked
    shared[P_RECEIVED] = stats.received
    shared[P_ERRORS] = sum(stats.errors.values()) + stats.closed


async def _drive(senders: list[Sender], rate: float, t0: float, t_end: float, stats: Stats) -> None:
    """Open loop: the n-th message is due at t0 + n/rate, whatever the replies do."""
    n = 0
    i = 0
    count = len(senders)
    while True:
        now = time.monotonic()
        if now >= t_end:
            return
        due = int((now - t0) * rate)
        if due > n:
            lag = now - (t0 + (n + 1) / rate)
            if lag > stats.sched_lag_max:
                stats.sched_lag_max = lag
        while n < due:
            senders[i].send_one()
            i += 1
            if i == count:
                i = 0
            n += 1
        await asyncio.sleep(0.001)


def _child(plan: Plan, pipe: mpc.Connection, shared: Any) -> None:
    uvloop.run(_generator(plan, pipe, shared))


# ---- the parent: cluster, processes, merge, report -------------------------------


def _pct(sorted_xs: list[float], q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def _lat_line(xs: list[float]) -> str:
    if not xs:
        return "no samples"
    xs = sorted(xs)
    return (
        f"p50 {_pct(xs, 0.50) * 1e3:.1f} ms / p90 {_pct(xs, 0.90) * 1e3:.1f} ms / "
        f"p99 {_pct(xs, 0.99) * 1e3:.1f} ms / max {xs[-1] * 1e3:.1f} ms  (n={len(xs):,})"
    )


def _print_timeline(
    at: list[float],
    latency: list[float],
    suspects: dict[int, Second] | None = None,
    groups: list[str] | None = None,
) -> None:
    """p50/p99/max per second of send time: a stall shows as one bad second, a
    saturated box as every second bad. With ``suspects`` (bench/_stalls.py), what
    else happened in that second, to attribute a stall to its cause."""
    by_second: dict[int, list[float]] = {}
    for t, x in zip(at, latency, strict=True):
        by_second.setdefault(int(t), []).append(x)
    print(
        "latency by second of send time (s after start: n, p50 / p99 / max ms"
        + (f" | {header(groups or [])}" if suspects is not None else "")
        + "):"
    )
    p99s: dict[int, float] = {}
    for second in sorted(by_second):
        xs = sorted(by_second[second])
        p99s[second] = _pct(xs, 0.99)
        extra = ""
        if suspects is not None:
            extra = " | " + suspects.get(second, Second()).format(groups)
        print(
            f"  {second:4d}: {len(xs):6,}  {_pct(xs, 0.5) * 1e3:7.1f} / "
            f"{p99s[second] * 1e3:7.1f} / {xs[-1] * 1e3:7.1f}{extra}"
        )
    if p99s:
        median = statistics.median(p99s.values())
        worst = max(p99s, key=lambda s: p99s[s])
        over = sorted(s for s, p in p99s.items() if p > 2 * median)
        print(
            f"per-second p99: median {median * 1e3:.1f} ms, worst {p99s[worst] * 1e3:.1f} ms"
            f" (t={worst}, {p99s[worst] / median:.1f}x the median); seconds above 2x the"
            f" median: {len(over)}" + (f" (t={', '.join(map(str, over))})" if over else "")
        )


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key in ("recv_bins", "ack_bins"):
        merged[key] = [sum(col) for col in zip(*(r[key] for r in results), strict=True)]
    for key in ("latency", "latency_at", "sent_latency"):
        merged[key] = [x for r in results for x in r[key]]
    for key in (
        "issued",
        "issued_in_window",
        "acked",
        "received",
        "gaps",
        "duplicates",
        "receipts",
        "closed",
    ):
        merged[key] = sum(r[key] for r in results)
    merged["sched_lag_max"] = max(r["sched_lag_max"] for r in results)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    merged["errors"] = errors
    return merged


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="See docs/benchmarks.md for the measured numbers.",
    )
    parser.add_argument("--mode", choices=["max", "rate"], default="max")
    parser.add_argument("--rate", type=float, default=5000.0, help="total msgs/s (mode rate)")
    parser.add_argument("--pairs", type=int, default=400, help="sender/receiver pairs")
    parser.add_argument("--window", type=int, default=8, help="outstanding sends per sender")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--drain", type=float, default=10.0, help="max seconds to drain")
    parser.add_argument("--procs", type=int, default=1, help="generator processes")
    parser.add_argument("--body-bytes", type=int, default=64, help="message body size")
    parser.add_argument("--ack-every", type=int, default=100, help="receiver ack interval")
    parser.add_argument(
        "--read-every",
        type=int,
        default=0,
        help="receivers send a read receipt for every Nth message (default 0: none)",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="also print latency per second of send time (where the tail comes from), and "
        "what else happened in each second: disk writes, the workers' GC and event-loop "
        "lag, checkpoints and autovacuum runs (bench/_stalls.py)",
    )
    parser.add_argument(
        "--wal",
        action="store_true",
        help="also print the WAL the measured window wrote per delivered message, by record "
        "type (pg_waldump --stats on the primary; a cluster the benchmark starts)",
    )
    parser.add_argument(
        "--flame",
        type=Path,
        metavar="SVG",
        help="also record a flame graph of worker w1 over the measured window into SVG "
        "(py-spy --nonblocking at 100 Hz: the worker is not stopped to be sampled)",
    )
    parser.add_argument(
        "--frames-per-s",
        type=float,
        default=200.0,
        help="the server's per-connection flood limit; senders stay under 90%% of it",
    )
    parser.add_argument("--workers", type=int, default=3, help="workers of our own cluster")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="connect to the TLS client port (--port then names it), verifying the server",
    )
    parser.add_argument(
        "--cafile",
        type=Path,
        help="CA to trust with --tls (default: the cluster's <state_dir>/tls/ca.pem)",
    )
    parser.add_argument(
        "--transport",
        choices=["tcp", "ws"],
        default="tcp",
        help="tcp: the client ports; ws: WebSockets through HAProxy (ws://, wss:// with --tls)",
    )
    add_target_args(parser, "HAProxy client port of a running cluster")
    args = parser.parse_args(argv)
    if args.cafile and not args.tls:
        parser.error("--cafile needs --tls")
    if args.mode == "rate" and args.rate / args.pairs > 0.9 * args.frames_per_s:
        parser.error(
            f"{args.rate:.0f} msgs/s over {args.pairs} senders exceeds 90% of the "
            f"per-connection limit ({args.frames_per_s:.0f} frames/s): use more --pairs"
        )
    if args.procs < 1 or args.pairs < args.procs:
        parser.error("need 1 <= --procs <= --pairs")
    if args.wal and (args.port is not None or args.state_dir is not None):
        parser.error("--wal needs a cluster the benchmark starts (its settings name the primary)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with cluster_target(
        args,
        workers=args.workers,
        argon2_memory_kib=1024,
        argon2_time_cost=1,
        slow_reader_timeout_s=30.0,
    ) as target:
        run(args, target)


def run(args: argparse.Namespace, target: Any) -> None:
    run_id = secrets.token_hex(3)
    ctx = mp.get_context("fork")
    procs: list[Any] = []
    pipes: list[mpc.Connection] = []
    shared: list[Any] = []
    port, cafile = target.client_port, None
    if args.tls:
        port, cafile = target.client_tls_port, str(args.cafile or target.ca_file)
    if args.transport == "ws" and args.port is None:
        port = target.client_wss_port if args.tls else target.client_ws_port
    for k in range(args.procs):
        plan = Plan(
            host=target.host,
            port=port,
            cafile=cafile,
            transport=args.transport,
            mode=args.mode,
            rate=args.rate * len(range(k, args.pairs, args.procs)) / args.pairs,
            window=args.window,
            cap=0.9 * args.frames_per_s,
            body_bytes=args.body_bytes,
            ack_every=args.ack_every,
            read_every=args.read_every,
            warmup=args.warmup,
            duration=args.duration,
            drain=args.drain,
            run_id=run_id,
            pairs=list(range(k, args.pairs, args.procs)),
        )
        parent_end, child_end = ctx.Pipe()
        counters = ctx.RawArray("q", 4)
        proc = ctx.Process(target=_child, args=(plan, child_end, counters), daemon=True)
        procs.append(proc)
        pipes.append(parent_end)
        shared.append(counters)
    conns = 2 * args.pairs
    print(
        f"throughput, mode {args.mode}: {args.pairs} pairs ({conns} connections through "
        f"HAProxy :{port}{' over TLS' if cafile else ''}, {args.transport}), "
        f"{args.procs} generator process(es), run id {run_id}",
        flush=True,
    )
    probe: StallProbe | None = None
    try:
        for proc in procs:
            proc.start()
        t_setup = time.monotonic()
        _wait_ready(procs, pipes, shared, conns)
        print(f"  {conns} sessions logged in in {time.monotonic() - t_setup:.1f} s", flush=True)
        t0 = time.monotonic() + 0.5
        for pipe in pipes:
            pipe.send(t0)
        if args.timeline and target.state_dir is not None:
            groups = cluster_pids(target.state_dir)
            groups["generator"] = [os.getpid(), *(p.pid for p in procs)]
            probe = StallProbe(target.state_dir, t0, groups)
            probe.start()
        results, cpu, wal = _watch(args, target, procs, pipes, shared, t0)
    finally:
        suspects = probe.stop() if probe is not None else None
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)
    _report(args, results, cpu, suspects, list(probe.groups) if probe is not None else None, wal)


def _wait_ready(procs: list[Any], pipes: list[mpc.Connection], shared: list[Any], n: int) -> None:
    pending = set(range(len(pipes)))
    last = 0.0
    while pending:
        ready = mpc.wait([pipes[i] for i in pending] + [procs[i].sentinel for i in pending], 1.0)
        for i in list(pending):
            if pipes[i] in ready:
                kind, detail = pipes[i].recv()
                if kind != "ready":
                    raise SystemExit(f"generator {i} failed during set-up: {detail}")
                pending.discard(i)
            elif procs[i].sentinel in ready and not pipes[i].poll():
                raise SystemExit(f"generator {i} died during set-up")
        if time.monotonic() - last >= 2.0:
            last = time.monotonic()
            done = sum(c[P_READY] for c in shared)
            print(f"  set-up: {done}/{n} sessions registered and logged in", flush=True)


def _watch(
    args: argparse.Namespace,
    target: Any,
    procs: list[Any],
    pipes: list[mpc.Connection],
    shared: list[Any],
    t0: float,
) -> tuple[list[dict[str, Any]], dict[str, float], WalStats | None]:
    """Print progress every second, sample CPU (and with --wal the WAL written) over the
    measured window, collect results."""
    groups: dict[str, list[int]] = {}
    if target.state_dir is not None:
        groups = cluster_pids(target.state_dir)
    groups["load generator"] = [os.getpid(), *(p.pid for p in procs)]
    sampler = CpuSampler(groups)
    wal_probe = WalProbe(target.settings) if args.wal and target.settings else None
    wal: WalStats | None = None
    flame: subprocess.Popen[bytes] | None = None
    win_start = t0 + args.warmup
    win_end = win_start + args.duration
    cpu: dict[str, float] = {}
    sampling = False
    prev_acked = prev_received = 0
    t_prev = t0
    tick = t0 + 1.0
    while True:
        now = time.monotonic()
        if not sampling and now >= win_start:
            sampler.start()
            if wal_probe is not None:
                wal_probe.start()
            if args.flame is not None:
                flame = _record_flame(target, args.flame, args.duration)
            sampling = True
        if now >= win_end:
            cpu = sampler.stop()
            if wal_probe is not None:
                wal = wal_probe.stop()
            break
        if now >= tick:
            acked = sum(c[P_ACKED] for c in shared)
            received = sum(c[P_RECEIVED] for c in shared)
            errors = sum(c[P_ERRORS] for c in shared)
            dt = now - t_prev
            phase = "warm-up" if now < win_start else "measuring"
            print(
                f"  [{now - t0:5.1f} s] sent {(acked - prev_acked) / dt:8,.0f}/s   "
                f"received {(received - prev_received) / dt:8,.0f}/s   errors {errors}"
                f"   ({phase})",
                flush=True,
            )
            prev_acked, prev_received, t_prev = acked, received, now
            tick += 1.0
        wake = min(tick, win_end, win_start if not sampling else win_end)
        time.sleep(max(0.0, wake - time.monotonic()))
    if flame is not None:
        flame.wait(30)
        print(f"  flame graph of w1: {args.flame} (py-spy exit {flame.returncode})", flush=True)
    print("  draining ...", flush=True)
    results: list[dict[str, Any]] = []
    for i, pipe in enumerate(pipes):
        if not pipe.poll(args.drain + 30):
            raise SystemExit(f"generator {i} did not report")
        kind, detail = pipe.recv()
        if kind != "result":
            raise SystemExit(f"generator {i} failed: {detail}")
        results.append(detail)
    return results, cpu, wal


def _record_flame(target: Any, svg: Path, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy sampling worker w1 for ``seconds``, writing a flame graph to ``svg``."""
    spy = Path(sys.executable).with_name("py-spy")
    pid = target.worker_pid("w1")
    if not spy.exists() or pid is None:
        raise SystemExit("--flame needs py-spy in the venv (make bootstrap) and worker w1's pid")
    svg.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--nonblocking",
            "--rate",
            "100",
            "--duration",
            str(int(seconds)),
            "--pid",
            str(pid),
            "--format",
            "flamegraph",
            "--output",
            str(svg),
        ],
        stdout=subprocess.DEVNULL,
    )


def _report(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    cpu: dict[str, float],
    suspects: dict[int, Second] | None = None,
    groups: list[str] | None = None,
    wal: WalStats | None = None,
) -> None:
    m = _merge(results)
    first = int(args.warmup / BIN_S)
    last = int((args.warmup + args.duration) / BIN_S)
    received = sum(m["recv_bins"][first:last])
    acked = sum(m["ack_bins"][first:last])
    d = args.duration
    print()
    print(
        f"== throughput --mode {args.mode}"
        + (f" --rate {args.rate:.0f}" if args.mode == "rate" else f" --window {args.window}")
        + f": {args.pairs} pairs, {args.procs} generator process(es), "
        f"{d:.0f} s measured after {args.warmup:.0f} s warm-up, body {args.body_bytes} B"
    )
    if args.mode == "rate":
        print(
            f"offered {args.rate:,.0f} msgs/s; achieved: sent {m['issued_in_window'] / d:,.0f}"
            f" msgs/s, received {received / d:,.0f} msgs/s, sent-acked {acked / d:,.0f} msgs/s"
        )
        missing = m["issued_in_window"] - len(m["latency"])
        print(
            f"latency send call -> msg received: {_lat_line(m['latency'])}; "
            f"{missing} of {m['issued_in_window']:,} sent in the window not received"
        )
        print(f"latency send call -> sent:         {_lat_line(m['sent_latency'])}")
        print(f"generator schedule lag max: {m['sched_lag_max'] * 1e3:.1f} ms")
        if received < 0.95 * m["issued_in_window"]:
            print(
                f"NOTE: the cluster did not keep up: it delivered {received / d:,.0f} of "
                f"{m['issued_in_window'] / d:,.0f} msgs/s sent; latency includes the backlog"
            )
    else:
        print(f"durable messages received end to end: {received / d:,.0f} msgs/s ({received:,})")
        print(f"sends acknowledged (`sent`):          {acked / d:,.0f} msgs/s ({acked:,})")
        print(f"latency send call -> msg received: {_lat_line(m['latency'])}")
        print(f"latency send call -> sent:         {_lat_line(m['sent_latency'])}")
    if args.timeline:
        _print_timeline(m["latency_at"], m["latency"], suspects, groups)
    errors = ", ".join(f"{k} {v}" for k, v in m["errors"].items()) or "none"
    print(
        f"errors: {errors}; connections closed by the server: {m['closed']}; inbox gaps "
        f"{m['gaps']}, duplicates {m['duplicates']}; in total {m['issued']:,} sends issued, "
        f"{m['acked']:,} acknowledged, {m['received']:,} received"
        + (f", {m['receipts']:,} read receipts received" if args.read_every else "")
    )
    if cpu:
        print(format_cpu(cpu))
        if received:
            print(_cpu_per_message(cpu, received / d))
    if wal is not None:
        print("\n".join(wal.lines(received)))


# The cluster's side of a message: every group but the load generator's, other
# processes' and the machine's total; the kernel's network softirq counts (loopback).
NOT_SERVER = ("load generator", "other processes", "whole machine")


def _cpu_per_message(cpu: dict[str, float], per_s: float) -> str:
    """Server-side CPU per delivered message, in µs, by group (% of one core / msgs/s)."""
    server = {name: pct for name, pct in cpu.items() if name not in NOT_SERVER}
    parts = ", ".join(f"{name} {1e4 * pct / per_s:.0f}" for name, pct in server.items())
    return (
        f"server CPU per delivered message: {1e4 * sum(server.values()) / per_s:.0f} µs ({parts})"
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
