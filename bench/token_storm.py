"""A login storm after a long outage: N devices log in with their device tokens at once,
against a sample of the same logins with the password at the default argon2 cost.

    python -m bench.token_storm --sessions 20000 --procs 4

Set-up (a cluster of its own, stopped and purged at the end, with the DEFAULT argon2
cost): N users, each with one device that holds a device token and whose session
is long expired (resume tokens no longer work). ``--setup sql`` (the default) writes
them straight into the database (one argon2 hash computed once, shared by all: the
set-up would otherwise spend two argon2 hashes per user); ``--setup protocol``
registers and says ``hello`` for each over the wire (slow at the default cost), then
closes the sessions and expires them in the database.

Then ``--procs`` generator processes (the per-process open-files cap is 20,000)
connect N clients from 127.0.0.1 (exempt from HAProxy's per-address caps and a
shared address for the throttle), wait on a common start, and each sends
``login_token``: reported are token logins per second and the time until 99 % are
back. Then ``--password-sample`` of the users (default min(N, 500): N password
logins at the default cost would take minutes) log in with ``hello`` the same way,
and the ratio of the two rates is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import secrets
import time
from collections.abc import Iterator
from typing import Any

from app.settings import Settings

PASSWORD = "bench password 1234"


# ---- the generator processes --------------------------------------------------------


def _generator(
    host: str,
    port: int,
    logins: list[dict[str, Any]],
    ready: Any,
    start: Any,
    results: Any,
    name: str,
) -> None:
    import uvloop

    uvloop.run(_storm(host, port, logins, ready, start, results, name))


async def _storm(
    host: str,
    port: int,
    logins: list[dict[str, Any]],
    ready: Any,
    start: Any,
    results: Any,
    name: str,
) -> None:
    from bench._wire import connect

    wires = []
    for i in range(0, len(logins), 500):
        wires += await asyncio.gather(
            *(connect(host, port) for _ in range(min(500, len(logins) - i)))
        )
    ready.put(name)
    await asyncio.get_running_loop().run_in_executor(None, start.wait)
    t0 = time.time()
    done_at: list[float] = []
    failed: dict[str, int] = {}
    step = max(1, len(logins) // 5)

    async def one(wire: Any, frame: dict[str, Any]) -> None:
        while True:
            reply = await wire.request(frame, timeout=600.0)
            if reply.get("code") in ("overloaded", "rate_limited"):
                await asyncio.sleep(float(reply.get("retry_after") or 1.0))
                continue
            break
        if reply["op"] == "welcome":
            done_at.append(time.time())
            if len(done_at) % step == 0:
                print(f"  {name}: {len(done_at)}/{len(logins)} back", flush=True)
        else:
            failed[str(reply.get("code"))] = failed.get(str(reply.get("code")), 0) + 1

    await asyncio.gather(*(one(w, f) for w, f in zip(wires, logins, strict=True)))
    for wire in wires:
        wire.close()
    results.put((name, t0, done_at, failed))


def _run_storm(
    host: str, port: int, logins: list[dict[str, Any]], procs: int, label: str
) -> tuple[float, float, int, dict[str, int]]:
    """(logins per second, seconds until 99 % were back, logins back, failures by code)."""
    ctx = mp.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [logins[i::procs] for i in range(procs)]
    workers = [
        ctx.Process(
            target=_generator,
            args=(host, port, share, ready, start, results, f"{label}-{i + 1}"),
        )
        for i, share in enumerate(shares)
        if share
    ]
    for p in workers:
        p.start()
    try:
        for _ in workers:
            ready.get(timeout=600)
        print(f"{label}: {len(logins)} clients connected; go", flush=True)
        t0 = time.time()
        start.set()
        done: list[float] = []
        failed: dict[str, int] = {}
        for _ in workers:
            _, _, times, fails = results.get(timeout=3600)
            done += times
            for code, n in fails.items():
                failed[code] = failed.get(code, 0) + n
    finally:
        for p in workers:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    done.sort()
    if not done:
        return 0.0, float("nan"), 0, failed
    elapsed = max(done[-1] - t0, 1e-6)
    p99 = (
        done[max(0, int(len(logins) * 0.99) - 1)] - t0
        if len(done) >= len(logins) * 0.99
        else float("nan")
    )
    return len(done) / elapsed, p99, len(done), failed


# ---- set-up ---------------------------------------------------------------------------


async def _setup_sql(settings: Settings, users: list[str]) -> list[str]:
    """Users with the default-cost hash of PASSWORD and one device token each."""
    from app.store.db import dsn
    from bench._sessions import password_hash, preregister

    s = settings
    hashed = password_hash(PASSWORD, s.argon2_memory_kib, s.argon2_time_cost, s.argon2_parallelism)
    return await preregister(dsn(s), users, hashed)


async def _setup_protocol(settings: Settings, users: list[str]) -> list[str]:
    """register + hello over the wire (at the default argon2 cost), then the sessions
    closed and expired in the database."""
    import asyncpg

    from app.store.db import dsn
    from bench._wire import call, connect

    s = settings
    sem = asyncio.Semaphore(32)
    tokens: dict[str, str] = {}

    async def one(user: str) -> None:
        async with sem:
            wire = await connect(s.host, s.client_port)
            try:
                frame = {"op": "register", "user": user, "password": PASSWORD}
                await call(wire, frame, "registered", tolerate=("user_exists",))
                hello = {"op": "hello", "user": user, "password": PASSWORD, "device": "bench"}
                tokens[user] = (await call(wire, hello, "welcome"))["device_token"]
            finally:
                wire.close()
            if len(tokens) % max(1, len(users) // 10) == 0:
                print(f"  set-up: {len(tokens)}/{len(users)} devices", flush=True)

    await asyncio.gather(*(one(u) for u in users))
    await asyncio.sleep(1.0)
    conn = await asyncpg.connect(dsn(s))
    try:
        await conn.execute(
            "UPDATE sessions SET state = 'closed', closed_at = now(), close_reason = 'expired' "
            "WHERE state <> 'closed'"
        )
    finally:
        await conn.close()
    return [tokens[u] for u in users]


# ---- main --------------------------------------------------------------------------------


@contextlib.contextmanager
def _cluster(sessions: int) -> Iterator[Settings]:
    from app.cluster import haproxy
    from app.cluster.launcher import LocalCluster
    from tests.cluster_fixture import make_settings

    defaults = Settings()
    settings = make_settings(
        workers=3,
        # The default cost, not the test suite's cheap one.
        argon2_memory_kib=defaults.argon2_memory_kib,
        argon2_time_cost=defaults.argon2_time_cost,
        auth_timeout_s=3600.0,
        idle_timeout_s=3600.0,
        haproxy_processes=max(2, -(-sessions // int(haproxy.MAXCONN * 0.9))),
    )
    cluster = LocalCluster(settings, say=lambda line: print(f"  [cluster] {line}", flush=True))
    print(f"starting a 3-worker cluster in {settings.state_dir} ...", flush=True)
    try:
        cluster.up()
        yield settings
    finally:
        print("stopping the cluster ...", flush=True)
        cluster.down(purge=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20_000, help="devices (default 20000)")
    parser.add_argument("--procs", type=int, default=4, help="generator processes (default 4)")
    parser.add_argument(
        "--password-sample",
        type=int,
        help="password logins to time (default min(sessions, 500))",
    )
    parser.add_argument("--setup", choices=("sql", "protocol"), default="sql")
    args = parser.parse_args()
    n = args.sessions
    sample = min(n, 500) if args.password_sample is None else min(args.password_sample, n)
    run = secrets.token_hex(3)
    users = [f"ts{run}_{i}" for i in range(n)]
    with _cluster(n) as settings:
        t0 = time.monotonic()
        setup = _setup_sql if args.setup == "sql" else _setup_protocol
        tokens = asyncio.run(setup(settings, users))
        print(f"set-up ({args.setup}): {n} devices with a token in {time.monotonic() - t0:.1f} s")
        token_logins = [
            {"op": "login_token", "user": u, "device": "bench", "device_token": t}
            for u, t in zip(users, tokens, strict=True)
        ]
        rate, p99, back, failed = _run_storm(
            settings.host, settings.client_port, token_logins, args.procs, "tokens"
        )
        print(
            f"token logins: {back}/{n} back, {rate:,.0f} logins/s, 99 % back in {p99:.2f} s"
            + (f"; refused: {failed}" if failed else ""),
            flush=True,
        )
        hellos = [
            {"op": "hello", "user": u, "password": PASSWORD, "device": "bench2", "v": 1}
            for u in users[:sample]
        ]
        pw_rate, pw_p99, pw_back, pw_failed = _run_storm(
            settings.host, settings.client_port, hellos, args.procs, "passwords"
        )
        note = "" if sample == n else f" (a sample of {sample} of the {n}: N at this cost is slow)"
        print(
            f"password logins at the default argon2 cost ({settings.argon2_memory_kib} KiB,"
            f" t={settings.argon2_time_cost}){note}: {pw_back}/{sample} back,"
            f" {pw_rate:,.1f} logins/s, 99 % back in {pw_p99:.2f} s"
            + (f"; refused: {pw_failed}" if pw_failed else ""),
            flush=True,
        )
        if pw_rate > 0:
            print(
                f"token logins are {rate / pw_rate:,.1f}x the password logins' rate;"
                f" {n} password logins would take about {n / pw_rate:,.0f} s,"
                f" the token logins took {back / rate if rate else float('nan'):,.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
