"""The throttle's statements against the real PostgreSQL: atomic counting, the backoff
schedule, budgets, forgetting and pruning (app/store/throttle.py).

Policies here use fractions of a second so the waits pass within the test;
every test uses keys of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from app.cluster.launcher import LocalCluster
from app.store import throttle
from app.store.db import create_pool
from app.store.throttle import Backoff, Budget

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(loop_scope="session")
async def pool(cluster: LocalCluster) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(cluster.settings, size=8)
    try:
        yield pool
    finally:
        await pool.close()


def key(kind: str = "test") -> str:
    return f"{kind}|{uuid.uuid4().hex}"


async def test_parallel_attempts_get_exactly_the_free_ones(pool: asyncpg.Pool) -> None:
    """No check-then-act: 40 attempts at once, on 8 connections, admit exactly `free`."""
    k = key()
    policy = Backoff(free=5, base_s=30.0, max_s=60.0, forget_s=600.0)
    waits = await asyncio.gather(*(throttle.count_backoff(pool, k, policy) for _ in range(40)))
    assert waits.count(None) == 5
    refused = [w for w in waits if w is not None]
    assert len(refused) == 35 and all(29.0 < w <= 30.0 for w in refused)
    attempts = await pool.fetchval("SELECT attempts FROM auth_throttle WHERE key = $1", k)
    assert attempts == 5  # refused attempts are not counted


async def test_parallel_attempts_never_exceed_a_budget(pool: asyncpg.Pool) -> None:
    k = key("test-addr")
    waits = await asyncio.gather(
        *(throttle.count_budget(pool, k, Budget(limit=12, window_s=60.0)) for _ in range(40))
    )
    assert waits.count(None) == 12
    assert all(w is not None and 59.0 < w <= 60.0 for w in waits if w is not None)


async def test_the_statement_waits_as_backoff_delay_s_says(pool: asyncpg.Pool) -> None:
    k = key()
    policy = Backoff(free=2, base_s=0.3, max_s=1.2, forget_s=600.0)
    for _ in range(2):
        assert await throttle.count_backoff(pool, k, policy) is None
    waits = []
    for attempts in range(2, 6):
        wait = await throttle.count_backoff(pool, k, policy)
        assert wait is not None
        waits.append(wait)
        # What was just refused must wait what delay_s says for the count so far.
        assert 0.6 * policy.delay_s(attempts) < wait <= policy.delay_s(attempts)
        await asyncio.sleep(wait + 0.02)
        assert await throttle.count_backoff(pool, k, policy) is None
    assert waits[0] < waits[1] < waits[2]  # 0.3, 0.6, 1.2, then the cap


async def test_a_right_password_forgets_and_a_quiet_pair_starts_afresh(
    pool: asyncpg.Pool,
) -> None:
    policy = Backoff(free=1, base_s=0.1, max_s=0.1, forget_s=0.3)
    k = key()
    assert await throttle.count_backoff(pool, k, policy) is None
    assert await throttle.count_backoff(pool, k, policy) is not None
    await throttle.forget(pool, k)
    assert await throttle.count_backoff(pool, k, policy) is None
    await asyncio.sleep(0.1 + 0.3 + 0.1)  # the wait, then forget_s without an attempt
    assert await throttle.count_backoff(pool, k, policy) is None
    row = await pool.fetchrow("SELECT attempts FROM auth_throttle WHERE key = $1", k)
    assert row is not None and row["attempts"] == 1


async def test_a_budget_gives_back_right_attempts_and_renews_each_window(
    pool: asyncpg.Pool,
) -> None:
    k = key("test-addr")
    policy = Budget(limit=2, window_s=0.5)
    assert await throttle.count_budget(pool, k, policy) is None
    assert await throttle.count_budget(pool, k, policy) is None
    assert await throttle.count_budget(pool, k, policy) is not None
    await throttle.give_back(pool, k)
    assert await throttle.count_budget(pool, k, policy) is None
    assert await throttle.count_budget(pool, k, policy) is not None
    await asyncio.sleep(0.55)
    assert await throttle.count_budget(pool, k, policy) is None


async def test_prune_deletes_only_counters_long_over(pool: asyncpg.Pool) -> None:
    old, fresh = key(), key()
    await pool.execute(
        "INSERT INTO auth_throttle (key, attempts, first_attempt_at, next_attempt_at) VALUES "
        "($1, 3, now() - interval '2 hours', now() - interval '1 hour'), "
        "($2, 3, now(), now() + interval '1 minute')",
        old,
        fresh,
    )
    assert await throttle.prune(pool, 1800.0) >= 1
    left = await pool.fetch("SELECT key FROM auth_throttle WHERE key = ANY($1)", [old, fresh])
    assert [r["key"] for r in left] == [fresh]


async def test_an_attempt_taken_back_frees_its_count_and_shortens_the_wait(
    pool: asyncpg.Pool,
) -> None:
    """uncount_backoff (an attempt that failed on the server's side): one attempt
    fewer, and a wait no longer than delay_s(attempts - 1) from now."""
    k = key()
    policy = Backoff(free=2, base_s=30.0, max_s=60.0, forget_s=600.0)
    for _ in range(3):
        await throttle.uncount_backoff(pool, k, policy)  # nothing to take back: no row
        assert await throttle.count_backoff(pool, k, policy) is None
        await throttle.uncount_backoff(pool, k, policy)
    # Three attempts, each taken back: still the free ones, no wait.
    assert await pool.fetchval("SELECT attempts FROM auth_throttle WHERE key = $1", k) == 0
    assert await throttle.count_backoff(pool, k, policy) is None
    assert await throttle.count_backoff(pool, k, policy) is None
    # The second free attempt set a 30 s wait; taking it back removes it.
    assert await throttle.count_backoff(pool, k, policy) is not None
    await throttle.uncount_backoff(pool, k, policy)
    assert await throttle.count_backoff(pool, k, policy) is None
