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
from typing import Any

import asyncpg

from app.settings import Settings
from app.store.db import create_pool, dsn
from app.store.messages import NewMessage, explain_store_batch, store_batch
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
    parser.add_argument(
        "--preload",
        type=int,
        default=20000,
        help="messages committed (in batches of 100) and the tables analyzed before measuring:"
        " the planner plans from statistics, and a live cluster has some",
    )
    parser.add_argument(
        "--explain",
        type=int,
        metavar="SIZE",
        help="also print EXPLAIN ANALYZE of one batch of SIZE messages (its generic plan)",
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
            await _preload(conn, ids, args.preload)
            if args.explain:
                await _explain(conn, ids, args.explain)
            print(f"{'batch':>6} {'median ms':>10} {'min ms':>8} {'µs/msg (median)':>16}")
            for size in args.size_list:
                took: list[float] = []
                for _ in range(args.repeat):
                    batch = _batch(ids, size)
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


def _batch(ids: list[int], size: int) -> list[NewMessage]:
    """``size`` 1:1 messages, each between a pair of users of its own."""
    return [
        NewMessage(ids[2 * k], "phone", secrets.token_hex(8), ids[2 * k + 1], None, "hi")
        for k in range(size)
    ]


async def _preload(conn: asyncpg.Connection, ids: list[int], messages: int) -> None:
    t0 = time.monotonic()
    for done in range(0, messages, 100):
        await store_batch(conn, _batch(ids, min(100, messages - done)))
    await conn.execute("ANALYZE messages, inbox, inbox_counters")
    print(f"{messages:,} messages stored and the tables analyzed in {time.monotonic() - t0:.1f} s")


async def _explain(conn: asyncpg.Connection, ids: list[int], size: int) -> None:
    """The plan the writer pool runs (generic), node by node: time, rows and loops."""
    plan = await explain_store_batch(conn, _batch(ids, size))

    def show(node: dict[str, Any], depth: int) -> None:
        extra = "".join(
            f", {key.lower()} {node[key]:,}"
            for key in ("Rows Removed by Filter", "Rows Removed by Join Filter")
            if node.get(key)
        )
        print(
            f"{'  ' * depth}"
            + (f"[{node['Subplan Name']}] " if "Subplan Name" in node else "")
            + f"{node['Node Type']}"
            + (f" on {node['Relation Name']}" if "Relation Name" in node else "")
            + (f" ({node['CTE Name']})" if "CTE Name" in node else "")
            + f": {node['Actual Total Time']:.2f} ms, rows {node['Actual Rows']:,}"
            f" x {node['Actual Loops']:,} loops{extra}"
        )
        for child in node.get("Plans", ()):
            show(child, depth + 1)

    print(f"EXPLAIN ANALYZE of one batch of {size} (generic plan):")
    show(plan, 1)


def main(argv: list[str] | None = None) -> None:
    from tests.cluster_fixture import make_settings

    args = parse_args(argv)
    with own_cluster(make_settings(workers=1)) as cluster:
        asyncio.run(measure(cluster.settings, args))


if __name__ == "__main__":
    main()
