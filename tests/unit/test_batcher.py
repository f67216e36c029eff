"""The group-commit batcher's retry bookkeeping, with a stand-in for the pool.

What a lost connection means for the database itself is tested through the real
cluster (tests/integration/test_resume.py); here only the batcher's side: which
batches report that an attempt's outcome was unknown, and how a statement that
fails on one item (a poisoned item, review H1) is split so only that item fails
(against the real database: tests/hostile/test_poison.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from app.store.errors import StoreRejected, StoreUnavailable
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
    with pytest.raises(StoreRejected):
        await batcher.submit(5)
    assert await batcher.submit(6) == 12  # the lane goes on
    await batcher.stop()
    assert uncertain == []


# --- a statement that fails on some items: split, commit the rest ----------------------------


class _Poisonable:
    """A statement over int items that fails with ``error`` whenever its batch holds a
    negative item, as PostgreSQL fails a whole statement on one NUL; else it commits
    the batch and records it. ``hiccups`` transient errors come first."""

    def __init__(self, error: Exception, hiccups: list[BaseException] | None = None) -> None:
        self.error = error
        self.hiccups = hiccups or []
        self.statements: list[list[int]] = []  # every batch run, failed or not
        self.committed: list[int] = []  # in commit order

    async def run(self, conn: Any, items: list[int]) -> tuple[list[int], list[int]]:
        self.statements.append(list(items))
        if self.hiccups:
            raise self.hiccups.pop(0)
        if any(i < 0 for i in items):
            raise self.error
        self.committed += items
        return [2 * i for i in items], list(items)


def _poisonable(
    store: _Poisonable, budget_s: float = 5.0, batch_max: int = 64
) -> tuple[Batcher[int, int], list[list[int]], list[int]]:
    """A started batcher over ``store``: also what ``after`` saw per statement, and the
    ``uncertain`` calls."""
    after: list[list[int]] = []
    uncertain: list[int] = []
    batcher: Batcher[int, int] = Batcher(
        _Pool(),  # type: ignore[arg-type]
        store.run,
        name="test",
        batch_max=batch_max,
        retry_budget_s=budget_s,
        after=lambda items, results, extra: after.append(list(items)),
        uncertain=lambda: uncertain.append(1),
        describe=lambda item: {"item": item},
    )
    batcher.start()
    return batcher, after, uncertain


async def _enqueue_all(batcher: Batcher[int, int], items: list[int]) -> list[tuple[int, object]]:
    """Enqueue every item at once (one lane, so one batch) and collect the answers
    in the order the callbacks ran."""
    answers: list[tuple[int, object]] = []
    finished = asyncio.Event()

    def done_for(item: int) -> Any:
        def done(result: object) -> None:
            answers.append((item, result))
            if len(answers) == len(items):
                finished.set()

        return done

    for item in items:
        batcher.enqueue(item, done_for(item))
    await asyncio.wait_for(finished.wait(), 5)
    return answers


def _rejected_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "batch_item_rejected"]


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.CharacterNotInRepertoireError(
            'invalid byte sequence for encoding "UTF8": 0x00'
        ),
        asyncpg.exceptions.DataError("invalid input for query argument $6"),
        asyncpg.exceptions.CheckViolationError("violates check constraint"),
    ],
)
@pytest.mark.parametrize("bad", [[0], [17], [63], [5, 6], [0, 31, 32, 63]])
async def test_only_the_poisoned_items_fail_and_the_rest_commit_in_order(
    error: Exception, bad: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    store = _Poisonable(error)
    batcher, after, uncertain = _poisonable(store)
    items = [-i - 1 if i in bad else i for i in range(64)]
    with caplog.at_level(logging.WARNING, logger="switchboard.writer"):
        answers = await _enqueue_all(batcher, items)
    await batcher.stop()

    good = [i for i in items if i >= 0]
    # Every item answered once, in the order it was enqueued.
    assert [item for item, _ in answers] == items
    for item, result in answers:
        if item >= 0:
            assert result == 2 * item
        else:
            assert isinstance(result, StoreRejected)
            assert str(result) == type(error).__name__  # never the database's text
    assert store.committed == good  # committed once each, in arrival order
    assert [i for batch in after for i in batch] == good  # announced once each
    assert batcher.rejected == len(bad) and batcher.items == len(good)
    assert uncertain == []  # a failed statement changed nothing
    # Bisection: a few statements per bad item, far fewer than one per item.
    assert len(store.statements) <= 1 + 2 * len(bad) * 6
    # One warning per bad item, naming it, without a traceback.
    logs = _rejected_logs(caplog)
    assert sorted(r.fields["item"] for r in logs) == sorted(i for i in items if i < 0)  # type: ignore[attr-defined]
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in logs)
    assert {r.fields["batch_size"] for r in logs} == {64}  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_senders_later_batches_wait_for_the_split_and_stay_in_order() -> None:
    store = _Poisonable(asyncpg.exceptions.CharacterNotInRepertoireError("0x00"))
    batcher, _, _ = _poisonable(store, batch_max=8)
    items = [0, 1, -3, 3, 4, 5, 6, 7, *range(8, 40)]
    answers = await _enqueue_all(batcher, items)
    await batcher.stop()
    assert [item for item, _ in answers] == items
    assert store.committed == [i for i in items if i >= 0]


async def test_a_statement_failing_for_every_item_is_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(_Poisonable):
        async def run(self, conn: Any, items: list[int]) -> tuple[list[int], list[int]]:
            self.statements.append(list(items))
            raise TypeError("a bug in the statement's code")

    store = Broken(TypeError())
    batcher, after, _ = _poisonable(store)
    with caplog.at_level(logging.WARNING, logger="switchboard.writer"):
        answers = await _enqueue_all(batcher, list(range(8)))
        assert isinstance(await _submit_error(batcher, 100), StoreRejected)  # the lane goes on
    await batcher.stop()
    assert all(isinstance(result, StoreRejected) for _, result in answers)
    assert after == []
    assert len(store.statements) == 2 * 8 - 1 + 1
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert [r.getMessage() for r in tracebacks] == ["batch_error", "batch_error"]


async def _submit_error(batcher: Batcher[int, int], item: int) -> BaseException | int:
    try:
        return await batcher.submit(item)
    except Exception as exc:
        return exc


async def test_a_half_that_loses_its_connection_is_retried_and_reported_uncertain() -> None:
    # The whole batch fails on the bad item; the first half then hits a cut connection.
    store = _Poisonable(asyncpg.exceptions.DataError("0x00"))
    batcher, _, uncertain = _poisonable(store)
    items = [0, 1, 2, 3, 4, 5, 6, -8]
    original_run = store.run
    cut = [False]

    async def run(conn: Any, batch: list[int]) -> tuple[list[int], list[int]]:
        if batch == [0, 1, 2, 3] and not cut[0]:
            cut[0] = True
            store.statements.append(list(batch))
            raise ConnectionResetError()
        return await original_run(conn, batch)

    batcher._run_batch = run  # type: ignore[method-assign]
    answers = await _enqueue_all(batcher, items)
    await batcher.stop()
    assert [r for _, r in answers[:7]] == [0, 2, 4, 6, 8, 10, 12]
    assert isinstance(answers[7][1], StoreRejected)
    assert store.committed == [0, 1, 2, 3, 4, 5, 6]
    assert uncertain == [1]


async def test_halves_share_the_batchs_retry_budget() -> None:
    # The whole batch takes most of the budget to fail on its bad item; the halves then
    # lose their connections and have no time left for a retry.
    store = _Poisonable(asyncpg.exceptions.DataError("0x00"))
    store.hiccups = [ConnectionResetError()] * 100
    slow_failure = [True]

    async def run(conn: Any, batch: list[int]) -> tuple[list[int], list[int]]:
        if slow_failure[0]:
            slow_failure[0] = False
            store.statements.append(list(batch))
            await asyncio.sleep(0.2)
            raise store.error
        return await store.run(conn, batch)

    batcher, _, uncertain = _poisonable(store, budget_s=0.25)
    batcher._run_batch = run  # type: ignore[method-assign]
    answers = await _enqueue_all(batcher, [1, 2, 3, -4])
    await batcher.stop()
    assert all(isinstance(r, StoreUnavailable) for _, r in answers)
    assert store.statements == [[1, 2, 3, -4], [1, 2], [3, -4]]  # no time for retries
    assert uncertain == [1]
