"""Password logins per second, and the cluster's CPU per login.

    python -m bench.logins --users 3000 --concurrency 64

Starts a cluster of its own (the code path of ``switchboard up``; stopped and purged
at the end) with the test suite's cheap argon2 cost (1 MiB, 1 pass: what is measured
is what a login costs besides its hash), writes ``--users`` accounts straight into
the database (one hash computed once, shared by all), connects one client per user
through HAProxy's client port from 127.0.0.1 (a shared address for the throttle, as
a NAT would be), then says ``hello`` for every user, ``--concurrency`` at a time.
An ``overloaded`` or ``rate_limited`` answer is retried after its ``retry_after``
and counted.

Printed: logins per second (from the first hello sent to the last welcome), the
latency of a login (p50/p99, retries included), the answers that asked for a retry,
the transactions that opened the sessions (workers' /health), and the CPU the
cluster used meanwhile (utime + stime from /proc of every cluster process: workers,
HAProxy, Patroni, etcd, PostgreSQL's postmasters and backends), in milliseconds
per login, by role and in all.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

from app.chaos.cpu import cpu_s
from app.settings import Settings

PASSWORD = "bench password 1234"


def _cpu_by_pid(state_dir: Path) -> dict[int, tuple[str, float]]:
    from bench._common import cluster_pids

    out: dict[int, tuple[str, float]] = {}
    for role, pids in cluster_pids(state_dir).items():
        for pid in pids:
            cpu = cpu_s(pid)
            if cpu is not None:
                out[pid] = (role, cpu)
    return out


def _cpu_used(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds by role between two samples (a process started meanwhile counts whole;
    one that ended meanwhile is lost: the pools keep their backends, so few do)."""
    used: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        used[role] = used.get(role, 0.0) + max(0.0, cpu - start)
    return used


async def _setup(settings: Settings, users: list[str]) -> None:
    import asyncpg
    from argon2 import PasswordHasher, Type

    from app.store.db import dsn

    s = settings
    hasher = PasswordHasher(
        time_cost=s.argon2_time_cost,
        memory_cost=s.argon2_memory_kib,
        parallelism=s.argon2_parallelism,
        type=Type.ID,
    )
    conn = await asyncpg.connect(dsn(s))
    try:
        await conn.execute(
            """
            WITH u AS (
                INSERT INTO users (username, password_hash)
                SELECT name, $2 FROM unnest($1::text[]) AS name RETURNING id
            )
            INSERT INTO inbox_counters (user_id) SELECT id FROM u
            """,
            users,
            hasher.hash(PASSWORD),
        )
    finally:
        await conn.close()


async def _logins(
    settings: Settings, users: list[str], concurrency: int
) -> tuple[float, list[float], dict[str, int], dict[str, int], dict[str, float]]:
    from bench._wire import connect

    wires: list[Any] = []
    for i in range(0, len(users), 500):
        wires += await asyncio.gather(
            *(connect(settings.host, settings.client_port) for _ in users[i : i + 500])
        )
    print(f"{len(wires)} clients connected; logging in {concurrency} at a time", flush=True)
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    retries: dict[str, int] = {}
    failed: dict[str, int] = {}
    step = max(1, len(users) // 5)

    async def one(wire: Any, user: str) -> None:
        frame = {"op": "hello", "user": user, "password": PASSWORD, "device": "bench", "v": 1}
        async with sem:
            t0 = time.monotonic()
            while True:
                reply = await wire.request(frame, timeout=600.0)
                code = reply.get("code")
                if code in ("overloaded", "rate_limited"):
                    retries[code] = retries.get(code, 0) + 1
                    await asyncio.sleep(float(reply.get("retry_after") or 1.0))
                    continue
                break
            if reply["op"] == "welcome":
                latencies.append(time.monotonic() - t0)
                if len(latencies) % step == 0:
                    print(f"  {len(latencies)}/{len(users)} logged in", flush=True)
            else:
                failed[str(code)] = failed.get(str(code), 0) + 1

    state_dir = settings.state_dir
    before = _cpu_by_pid(state_dir)
    t0 = time.monotonic()
    await asyncio.gather(*(one(w, u) for w, u in zip(wires, users, strict=True)))
    elapsed = time.monotonic() - t0
    cpu = _cpu_used(before, _cpu_by_pid(state_dir))
    for wire in wires:
        wire.close()
    return elapsed, latencies, retries, failed, cpu


def _batch_sizes(settings: Settings) -> tuple[int, int] | None:
    """(password logins, their transactions) from the workers' /health; None before
    password logins were group-committed."""
    from app.cluster.health import http_json

    logins = batches = 0
    for worker in settings.worker_ids():
        url = f"http://{settings.host}:{settings.worker_health_port(worker)}/health"
        _, health = http_json(url)
        if "password_login_batches" not in health:
            return None
        logins += int(health["password_logins"])
        batches += int(health["password_login_batches"])
    return logins, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=3000, help="users to log in (default 3000)")
    parser.add_argument("--concurrency", type=int, default=64, help="hellos in flight (64)")
    parser.add_argument("--workers", type=int, default=Settings().workers)
    args = parser.parse_args()

    import uvloop

    from app.cluster.launcher import LocalCluster
    from tests.cluster_fixture import make_settings

    settings = make_settings(workers=args.workers, auth_timeout_s=3600.0, idle_timeout_s=3600.0)
    cluster = LocalCluster(settings, say=lambda line: print(f"  [cluster] {line}", flush=True))
    users = [f"lg{secrets.token_hex(3)}_{i}" for i in range(args.users)]
    print(f"starting a {args.workers}-worker cluster in {settings.state_dir} ...", flush=True)
    try:
        cluster.up()
        asyncio.run(_setup(settings, users))
        time.sleep(2.0)  # let the start-up settle before measuring
        elapsed, latencies, retries, failed, cpu = uvloop.run(
            _logins(settings, users, args.concurrency)
        )
        batches = _batch_sizes(settings)
    finally:
        print("stopping the cluster ...", flush=True)
        cluster.down(purge=True)
    n = len(latencies)
    latencies.sort()
    total_ms = 1000.0 * sum(cpu.values())
    per_role = ", ".join(f"{role} {1000.0 * s / max(n, 1):.2f}" for role, s in cpu.items())
    print(
        f"password logins: {n}/{args.users} in {elapsed:.1f} s = {n / elapsed:,.0f} logins/s"
        f" (concurrency {args.concurrency}, {args.workers} workers, argon2"
        f" {settings.argon2_memory_kib} KiB t={settings.argon2_time_cost})",
        flush=True,
    )
    if n:
        print(
            f"latency p50 {1000 * latencies[n // 2]:.0f} ms,"
            f" p99 {1000 * latencies[min(n - 1, int(n * 0.99))]:.0f} ms;"
            f" retries asked: {retries or 'none'}; failed: {failed or 'none'}",
            flush=True,
        )
    if batches is not None:
        print(f"group commits: {batches[0]} logins in {batches[1]} transactions", flush=True)
    print(
        f"cluster CPU: {total_ms / max(n, 1):.2f} ms per login ({per_role} ms by role)",
        flush=True,
    )


if __name__ == "__main__":
    main()
