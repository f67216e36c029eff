"""Worker memory per idle logged-in session, measured from the worker's VmRSS.

    .venv/bin/python -m bench.session_memory [--sessions 15000] [--concurrency 200]

Starts a 1-worker cluster (cheap argon2), connects DIRECTLY to worker w1's port
(through HAProxy each connection would cost HAProxy 2 of its 20,000 file
descriptors; each connection opens with a PROXY v2 LOCAL header, as a worker
refuses connections without one), registers --sessions users, logs in --warm sessions to warm up and
reads the worker's VmRSS from /proc/<pid>/status, logs in the rest (at most
--concurrency logins in flight), waits --settle seconds, reads VmRSS again and
prints (after - before) / (sessions - warm) in KB per session. All connections
stay open and idle until the second reading. With --state-dir (and/or --port and
--pid) it measures worker --worker of a running cluster instead (start that one with
long auth and idle timeouts, e.g. SWITCHBOARD_AUTH_TIMEOUT_S=3600
SWITCHBOARD_IDLE_TIMEOUT_S=3600: the registering connections stay anonymous and the
sessions silent for minutes); it always stops what it started.

With --transport ws the sessions are WebSockets to worker w1's own WebSocket port
(with the X-Forwarded-For header HAProxy would set): RSS per idle WebSocket session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from app.protocol.proxy import build_proxy_header
from bench._common import add_target_args, cluster_target
from bench._wire import Wire, WsWire, close_ws_sessions, connect, connect_ws, hello, register

# The header a proxy sends for a connection of its own: the worker keeps the socket's address.
LOCAL = build_proxy_header(None)
# What HAProxy's websockets frontend adds: the worker's WebSocket port requires it.
FORWARDED = {"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Source-Port": "1"}


def read_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, RssAnon, VmHWM, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def fd_count(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return -1


async def _bounded(
    what: str, count: int, limit: int, job: Callable[[int], Awaitable[None]], offset: int = 0
) -> float:
    """Run job(offset..offset+count-1) with at most ``limit`` in flight; print progress."""
    done = 0
    next_i = offset
    t0 = time.monotonic()
    last = t0

    async def lane() -> None:
        nonlocal done, next_i, last
        while next_i < offset + count:
            i = next_i
            next_i += 1
            await job(i)
            done += 1
            now = time.monotonic()
            if now - last >= 2.0:
                last = now
                print(f"  {what}: {done}/{count} ({done / (now - t0):,.0f}/s)", flush=True)

    await asyncio.gather(*(lane() for _ in range(min(limit, count))))
    elapsed = time.monotonic() - t0
    print(f"  {what}: {done}/{count} in {elapsed:.1f} s ({done / elapsed:,.0f}/s)", flush=True)
    return elapsed


async def measure(args: argparse.Namespace, host: str, port: int, pid: int) -> None:
    run_id = secrets.token_hex(3)
    users = [f"m{run_id}u{i}" for i in range(args.sessions)]
    sessions: list[Wire | WsWire] = []

    async def dial(on_frame: Any = None) -> Wire | WsWire:
        if args.transport == "ws":
            return await connect_ws(host, port, on_frame, headers=FORWARDED)
        return await connect(host, port, on_frame, preamble=LOCAL)

    closed_by_server = 0

    def on_frame(frame: dict[str, Any]) -> None:
        nonlocal closed_by_server
        if frame.get("op") == "error":
            closed_by_server += 1

    print(
        f"session memory ({args.transport}): worker pid {pid} at {host}:{port}, "
        f"{args.sessions:,} users "
        f"(run id {run_id}), {args.concurrency} in flight",
        flush=True,
    )
    start = read_status(pid)
    print(f"  worker at start: VmRSS {start['VmRSS']:,} kB", flush=True)
    try:
        # Register over a pool of connections that are closed before any reading.
        pool = [await dial() for _ in range(min(args.concurrency, args.sessions))]
        free = list(pool)

        async def reg(i: int) -> None:
            wire = free.pop()
            try:
                await register(wire, users[i])
            finally:
                free.append(wire)

        await _bounded("register", args.sessions, len(pool), reg)
        for wire in pool:
            wire.close()
        await asyncio.sleep(1.0)
        print(
            f"  after registering (connections closed): VmRSS {read_status(pid)['VmRSS']:,} kB",
            flush=True,
        )

        async def login(i: int) -> None:
            for attempt in range(5):
                try:
                    wire = await dial(on_frame)
                    await hello(wire, users[i])
                except (OSError, ConnectionError, TimeoutError, aiohttp.ClientError):
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * 2**attempt)
                    continue
                sessions.append(wire)
                return

        warm = min(args.warm, args.sessions)
        await _bounded("log in (warm-up)", warm, args.concurrency, login)
        await asyncio.sleep(args.settle)
        before = read_status(pid)
        fds_before = fd_count(pid)
        print(
            f"  before: {warm} sessions, VmRSS {before['VmRSS']:,} kB, "
            f"RssAnon {before.get('RssAnon', 0):,} kB, fds {fds_before}",
            flush=True,
        )
        rest = args.sessions - warm
        elapsed = await _bounded("log in", rest, args.concurrency, login, offset=warm)
        print(f"  idle for {args.settle:.0f} s ...", flush=True)
        await asyncio.sleep(args.settle)
        after = read_status(pid)
        fds_after = fd_count(pid)
        open_now = sum(1 for w in sessions if not w.closed)
        print(
            f"  after: {open_now:,} sessions open, VmRSS {after['VmRSS']:,} kB, "
            f"RssAnon {after.get('RssAnon', 0):,} kB, VmHWM {after.get('VmHWM', 0):,} kB, "
            f"fds {fds_after}",
            flush=True,
        )
        added = open_now - warm
        if added <= 0:
            raise SystemExit("no sessions were added")
        per = (after["VmRSS"] - before["VmRSS"]) / added
        per_anon = (after.get("RssAnon", 0) - before.get("RssAnon", 0)) / added
        print()
        print(f"== session_memory: {open_now:,} idle logged-in sessions on one worker")
        print(
            f"worker VmRSS {before['VmRSS'] / 1024:,.1f} MiB with {warm} sessions -> "
            f"{after['VmRSS'] / 1024:,.1f} MiB with {open_now:,} sessions"
        )
        print(
            f"worker memory per idle session: {per:.2f} KB VmRSS ({per_anon:.2f} KB RssAnon)"
            f" over {added:,} sessions; target <= 4 KB"
        )
        print(
            f"logins: {rest / elapsed:,.0f}/s with {args.concurrency} in flight; "
            f"errors/closes from the server during the idle period: {closed_by_server}"
        )
    finally:
        for wire in sessions:
            wire.close()
        await asyncio.sleep(0.5)
        await close_ws_sessions()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="See docs/benchmarks.md for the measured numbers.",
    )
    parser.add_argument("--sessions", type=int, default=15_000, help="logged-in sessions")
    parser.add_argument("--warm", type=int, default=100, help="sessions before the baseline")
    parser.add_argument("--concurrency", type=int, default=200, help="logins in flight")
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before reading")
    parser.add_argument("--worker", default="w1", help="worker id to measure")
    parser.add_argument(
        "--transport",
        choices=["tcp", "ws"],
        default="tcp",
        help="idle sessions over TCP or WebSockets (the worker's own ports either way)",
    )
    parser.add_argument("--pid", type=int, help="worker pid (default: from the state dir)")
    add_target_args(parser, "port of the worker itself (not HAProxy's) in a running cluster")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.sessions + args.concurrency + 100
    if soft < need:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with cluster_target(args, workers=1, argon2_memory_kib=1024, argon2_time_cost=1) as target:
        ports = target.worker_ws_ports if args.transport == "ws" else target.worker_ports
        port = args.port if args.port is not None else ports.get(args.worker)
        pid = args.pid if args.pid is not None else target.worker_pid(args.worker)
        if port is None or pid is None:
            raise SystemExit("need the worker's port and pid: --state-dir, or --port and --pid")
        uvloop.run(measure(args, target.host, port, pid))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
