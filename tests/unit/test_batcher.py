"""The group-commit batcher's retry bookkeeping, with a stand-in for the pool.

What a lost connection means for the database itself is tested through the real
cluster (tests/integration/test_resume.py); here only the batcher's side: which
batches report that an attempt's outcome was unknown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.store.errors import StoreUnavailable
from app.worker.writer import Batcher


class _Pool:
    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[object]:
        yield object()


def _batcher(
    failures: list[BaseException], budget_s: float = 5.0
) -> tuple[Batcher[int, int], list[int]]:
    """A started batcher whose statement raises ``failures`` in turn, then doubles
    each item; and the list that counts its ``uncertain`` calls."""
    uncertain: list[int] = []

    async def run(conn: Any, items: list[int]) -> tuple[list[int], None]:
        if failures:
            raise failures.pop(0)
        return [2 * i for i in items], None

    batcher: Batcher[int, int] = Batcher(
        _Pool(),  # type: ignore[arg-type]
        run,
        name="test",
        batch_max=10,
        retry_budget_s=budget_s,
        uncertain=lambda: uncertain.append(1),
    )
    batcher.start()
    return batcher, uncertain


async def test_a_batch_committed_at_the_first_attempt_is_certain() -> None:
    batcher, uncertain = _batcher([])
    assert await batcher.submit(21) == 42
    await batcher.stop()
    assert uncertain == []


async def test_a_batch_retried_after_a_lost_connection_reports_it_once() -> None:
    batcher, uncertain = _batcher([ConnectionResetError(), ConnectionResetError()])
    assert await batcher.submit(5) == 10
    await batcher.stop()
    assert uncertain == [1]


async def test_a_batch_that_runs_out_of_budget_reports_it_too() -> None:
    batcher, uncertain = _batcher([ConnectionResetError()] * 10, budget_s=0.0)
    with pytest.raises(StoreUnavailable):
        await batcher.submit(5)
    await batcher.stop()
    assert uncertain == [1]


async def test_a_statement_error_is_not_an_unknown_outcome() -> None:
    batcher, uncertain = _batcher([ValueError("a bug")])
    with pytest.raises(StoreUnavailable):
        await batcher.submit(5)
    assert await batcher.submit(6) == 12  # the lane goes on
    await batcher.stop()
    assert uncertain == []
