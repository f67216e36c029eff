"""What the send batch statement costs per message, by batch size (issue #19).

    .venv/bin/python -m bench.batch_cost [--sizes 1,10,30,100,300,500] [--repeat 15]

Starts a 1-worker cluster of its own (stopped and purged at the end), registers
--users users in SQL, then on one
connection set up like the workers' writer pool (generic plans, as the lanes run
them) runs ``app.store.messages.store_batch`` inside a transaction that is rolled back,
--repeat times per batch size, each message between a pair of users not used before
in that transaction. It prints the statement's wall time (median and min) and per
message. Nothing commits: a commit (synchronous replication) costs per statement, not
per message, and bench.throughput measures it with the rest.

With a cost per message that stays flat as batches grow, batching pays as it should;
one that grows with the batch means a step is quadratic (it was, until 2026-12-07:
the planner joined CTE scans by nested loops, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time

from app.settings import Settings
from app.store.db import create_pool, dsn
from app.store.messages import NewMessage, store_batch
from bench._common import own_cluster
from bench._sessions import password_hash, preregister


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="See docs/benchmarks.md for the measured numbers.",
    )
    parser.add_argument(
        "--sizes", default="1,10,30,100,300,500", help="batch sizes, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=15, help="statements per size")
    parser.add_argument(
        "--users", type=int, default=2000, help="users registered (>= 2x the largest size)"
    )
    args = parser.parse_args(argv)
    args.size_list = [int(x) for x in args.sizes.split(",") if x.strip()]
    if not args.size_list or min(args.size_list) < 1:
        parser.error("--sizes wants positive integers")
    if args.users < 2 * max(args.size_list):
        parser.error("--users must be at least twice the largest batch size")
    return args


async def measure(settings: Settings, args: argparse.Namespace) -> None:
    names = [f"bc{secrets.token_hex(3)}_{i}" for i in range(args.users)]
    await preregister(dsn(settings), names, password_hash("x", 1024, 1, 1))
    pool = await create_pool(
        settings, size=1, purpose="-bench", plan_cache_mode="force_generic_plan"
    )
    try:
        async with pool.acquire() as conn:
            ids = [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM users WHERE username = ANY($1::text[]) ORDER BY id", names
                )
            ]
            print(f"{'batch':>6} {'median ms':>10} {'min ms':>8} {'µs/msg (median)':>16}")
            for size in args.size_list:
                took: list[float] = []
                for _ in range(args.repeat):
                    batch = [
                        NewMessage(
                            ids[2 * k], "phone", secrets.token_hex(8), ids[2 * k + 1], None, "hi"
                        )
                        for k in range(size)
                    ]
                    tx = conn.transaction()
                    await tx.start()
                    t0 = time.perf_counter()
                    stored, _ = await store_batch(conn, batch)
                    took.append(time.perf_counter() - t0)
                    await tx.rollback()
                    if any(s is None for s in stored):
                        raise SystemExit("a message of the batch was not stored")
                median = statistics.median(took)
                print(
                    f"{size:6d} {median * 1e3:10.2f} {min(took) * 1e3:8.2f} "
                    f"{median * 1e6 / size:16.0f}",
                    flush=True,
                )
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> None:
    from tests.cluster_fixture import make_settings

    args = parse_args(argv)
    with own_cluster(make_settings(workers=1)) as cluster:
        asyncio.run(measure(cluster.settings, args))


if __name__ == "__main__":
    main()
