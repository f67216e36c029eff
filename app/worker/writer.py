"""Group commit: requests from every connection of a worker share batched statements.

`Batcher` is the machinery: items queue per lane, and each lane has one batch
in flight at a time. There is no timer at idle: a batch leaves as soon as its
lane is free, so an idle system commits each item alone (lowest latency) and a
busy one accumulates up to ``batch_max`` items per statement while the lane's
previous batch is in flight (highest throughput). A batch whose outcome is
unknown (connection cut during commit, failover) is retried as a whole, so
the statements must be idempotent.

A batch whose statement fails for good (any error not in TRANSIENT_DB_ERRORS:
a value PostgreSQL refuses, a violated constraint, a bug) is split in halves,
each run again, until the item(s) it fails on stand alone: those get
`StoreRejected` and one warning each, every other item commits. A failed
statement changed nothing, so the halves are ordinary batches (idempotent as
ever), and they run one after the other, first half first, so the items that
commit still commit in arrival order. One poisoned item among ``n`` costs
about ``2 log2 n`` extra statements; a statement that fails for every item
(a bug) costs ``2n - 1``, and is logged with its traceback once.

Four batchers run in a worker (commits.py): `MessageWriter` stores sends
(idempotent on (sender, cmid)), and batchers on the main pool take over
sessions (a retried takeover fails its token check harmlessly; the client logs
in), move acked positions and record read receipts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import asyncpg

from app.logs import get_logger
from app.store.errors import TRANSIENT_DB_ERRORS, StoreRejected, StoreUnavailable
from app.store.messages import NewMessage, Stored, store_batch
from app.worker import metrics

log = get_logger("writer")

T = TypeVar("T")
R = TypeVar("R")
# A batch: each item with the callback that gets its result.
_Batch = list[tuple[T, Callable[[R | Exception], None]]]


class Batcher(Generic[T, R]):
    """Run queued items in batches, ``lanes`` batches in flight at most.

    ``run(conn, items)`` executes one batch on a pool connection and returns
    one result per item plus anything for ``after``. Items enqueued with the
    same key take the same lane, and a lane runs its batches one after the
    other in arrival order. Each item's ``done`` callback is called exactly
    once, synchronously after its batch, with its result, `StoreUnavailable`
    (out of retry budget) or `StoreRejected` (the statement fails on this item
    alone); ``after(items, results, extra)`` is called after all of them, once
    per statement that committed. ``describe(item)`` names a rejected item in
    the log (ids, never contents).

    ``uncertain()`` is called once for a batch that had an attempt with an
    unknown outcome (a connection lost mid-statement), after the batch ended
    either way: an earlier attempt may have committed, and what it moved was
    never announced; the retry finds those rows already there and moves nothing.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        run: Callable[[asyncpg.Connection, list[T]], Awaitable[tuple[list[R], Any]]],
        *,
        name: str,
        batch_max: int,
        lanes: int = 1,
        interval_s: float = 0.0,
        retry_budget_s: float,
        after: Callable[[list[T], list[R], Any], None] | None = None,
        observe: Callable[[float], None] | None = None,
        uncertain: Callable[[], None] | None = None,
        describe: Callable[[T], dict[str, object]] | None = None,
    ) -> None:
        self._pool = pool
        self._run_batch = run
        self._name = name
        self._batch_max = batch_max
        self._interval = interval_s
        self._retry_budget_s = retry_budget_s
        self._after = after
        self._observe = observe
        self._uncertain = uncertain
        self._describe = describe
        self._lanes = [_Lane[T, R]() for _ in range(max(1, lanes))]
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.items = 0
        self.rejected = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(lane)) for lane in self._lanes]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for lane in self._lanes:
            for _, done in lane.queue:
                _call(done, StoreUnavailable("worker stopping"))
            lane.queue.clear()

    def enqueue(self, item: T, done: Callable[[R | Exception], None], key: int = 0) -> None:
        lane = self._lanes[key % len(self._lanes)]
        lane.queue.append((item, done))
        if not lane.wake.is_set():
            lane.wake.set()

    async def submit(self, item: T, key: int = 0) -> R:
        """Resolve with the item's result once its batch is committed."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()

        def done(result: R | Exception) -> None:
            if fut.done():
                return
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        self.enqueue(item, done, key)
        return await fut

    async def _run(self, lane: _Lane[T, R]) -> None:
        queue = lane.queue
        loop = asyncio.get_running_loop()
        started = -1e9
        while True:
            await lane.wake.wait()
            lane.wake.clear()
            while queue:
                # Under load, space batches at least interval_s apart: each statement
                # has a fixed cost, so a few larger batches beat many small ones.
                # An idle lane starts at once.
                wait = started + self._interval - loop.time()
                if wait > 0 and len(queue) < self._batch_max:
                    await asyncio.sleep(wait)
                started = loop.time()
                n = min(self._batch_max, len(queue))
                await self._write([queue.popleft() for _ in range(n)])

    async def _write(self, batch: _Batch[T, R]) -> None:
        deadline = time.monotonic() + self._retry_budget_s
        if await self._attempts(batch, deadline) and self._uncertain is not None:
            self._uncertain()

    async def _attempts(
        self, batch: _Batch[T, R], deadline: float, origin: int | None = None
    ) -> bool:
        """Run the batch until it commits, fails for good or runs out of budget, and
        answer each item. True if an attempt failed in a way that is retried: a
        connection lost mid-statement is one, and its outcome is unknown (it may
        have committed). ``origin``: for a part of a split batch, the size of the
        batch the lane formed."""
        items = [item for item, _ in batch]
        started = time.monotonic()
        delay = 0.05
        attempt = 0
        failure: Exception | None = None
        while True:
            attempt += 1
            try:
                async with self._pool.acquire() as conn:
                    results, extra = await self._run_batch(conn, items)
                break
            # Its outcome is unknown or the node is not (yet) the primary: retry the
            # same batch on a fresh connection.
            except TRANSIENT_DB_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    log.error(
                        "batch_failed",
                        batcher=self._name,
                        size=len(batch),
                        attempts=attempt,
                        error=type(exc).__name__,
                    )
                    failure = StoreUnavailable(type(exc).__name__)
                    for _, done in batch:
                        _call(done, failure)
                    return True
                log.warning(
                    "batch_retry",
                    batcher=self._name,
                    size=len(batch),
                    attempt=attempt,
                    error=type(exc).__name__,
                )
                await asyncio.sleep(delay)
                # Short: the retry is one connection attempt through HAProxy, and a
                # long pause would add up to its length to every failover's stall.
                delay = min(delay * 2, 0.25)
            except Exception as exc:
                if origin is None and not isinstance(exc, asyncpg.PostgresError):
                    # Not the database's verdict on some data: a bug. Its traceback once.
                    log.exception("batch_error", batcher=self._name, size=len(batch))
                failure = exc
                break
        if failure is not None:
            # No retry of this statement can succeed, but it changed nothing: find the
            # item(s) it fails on, and commit the others.
            isolated = await self._isolate(batch, deadline, failure, origin or len(batch))
            return isolated or attempt > 1
        if self._observe is not None:
            self._observe(time.monotonic() - started)
        self.batches += 1
        self.items += len(batch)
        for (_, done), result in zip(batch, results, strict=True):
            _call(done, result)
        if self._after is not None:
            self._after(items, results, extra)
        return attempt > 1

    async def _isolate(
        self, batch: _Batch[T, R], deadline: float, exc: Exception, origin: int
    ) -> bool:
        """Answer a batch whose statement failed for good: a lone item is rejected;
        a larger batch is halved and each half run as a batch of its own, in order.
        True if an attempt of a half had an unknown outcome."""
        if len(batch) == 1:
            ((item, done),) = batch
            self.rejected += 1
            metrics.BATCH_ITEMS_REJECTED.labels(self._name).inc()
            detail = self._describe(item) if self._describe is not None else {}
            # A warning without traceback: a client's bad data is not a server fault.
            log.warning(
                "batch_item_rejected",
                batcher=self._name,
                batch_size=origin,
                error=type(exc).__name__,
                sqlstate=getattr(exc, "sqlstate", None),
                **detail,
            )
            _call(done, StoreRejected(type(exc).__name__))
            return False
        middle = len(batch) // 2
        first = await self._attempts(batch[:middle], deadline, origin)
        second = await self._attempts(batch[middle:], deadline, origin)
        return first or second


class _Lane(Generic[T, R]):
    __slots__ = ("queue", "wake")

    def __init__(self) -> None:
        self.queue: deque[tuple[T, Callable[[R | Exception], None]]] = deque()
        self.wake = asyncio.Event()


def _call(done: Callable[[Any], None], result: object) -> None:
    try:
        done(result)
    except Exception:
        # A reply that cannot be written must not cost the rest of the batch.
        log.exception("batch_callback_failed")


def _describe_message(message: NewMessage) -> dict[str, object]:
    return {"sender": message.sender_id, "cmid": message.cmid}


async def _store(
    conn: asyncpg.Connection, messages: list[NewMessage]
) -> tuple[list[Stored | None], dict[int, int]]:
    return await store_batch(conn, messages)


class MessageWriter(Batcher[NewMessage, "Stored | None"]):
    """Sends, stored in group commits (``app.store.messages.store_batch``).

    A sender's messages always take the same lane (by user id), so messages a
    client pipelines on one connection are stored, acknowledged and numbered
    in the order it sent them. Lanes run concurrently; their batches lock inbox
    counters in user-id order, so they cannot deadlock. ``on_commit`` gets
    each batch's messages, results and moved inboxes after the `sent` replies
    are written, so a reply precedes every frame its batch causes.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        batch_max: int,
        writers: int,
        retry_budget_s: float,
        interval_s: float = 0.0,
        on_commit: Callable[[list[NewMessage], list[Stored | None], dict[int, int]], None],
        uncertain: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            pool,
            _store,
            name="messages",
            batch_max=batch_max,
            lanes=writers,
            interval_s=interval_s,
            retry_budget_s=retry_budget_s,
            after=on_commit,
            observe=metrics.BATCH_SECONDS.observe,
            uncertain=uncertain,
            describe=_describe_message,
        )

    @property
    def messages(self) -> int:
        return self.items

    def send(self, message: NewMessage, done: Callable[[Stored | Exception | None], None]) -> None:
        """Store ``message``; ``done`` gets its `Stored` (None: the sender may not
        post there), a `StoreUnavailable` or a `StoreRejected`."""
        self.enqueue(message, done, message.sender_id)
