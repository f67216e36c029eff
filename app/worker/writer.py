"""Group commit: sends from every connection of a worker share batched statements.

There is no timer: a batch leaves as soon as its lane is free, so an idle
system commits each message alone (lowest latency) and a busy one accumulates
up to ``batch_max`` messages per statement while the lane's previous batch is in
flight (highest throughput). A batch whose outcome is unknown (connection cut during
commit, failover) is retried as a whole: the store is idempotent on
(sender, cmid), so a retry can neither duplicate nor lose a message.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import asyncpg

from app.logs import get_logger
from app.store.messages import NewMessage, Stored, store_batch
from app.worker import metrics

log = get_logger("writer")

# Errors after which the batch's outcome is unknown or the node is not (yet)
# the primary: retry the same batch on a fresh connection.
RETRYABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.OperatorInterventionError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


class StoreUnavailable(Exception):
    """The database did not take the batch within the retry budget."""


Done = Callable[[Stored | Exception | None], None]


class MessageWriter:
    """Group commit in ``lanes`` independent lanes, one batch in flight per lane.

    A sender's messages always take the same lane (by user id), and a lane
    commits its batches one after the other in arrival order, so messages a
    client pipelines on one connection are stored, acknowledged and numbered
    in the order it sent them. Lanes run concurrently; their batches lock inbox
    counters in user-id order, so they cannot deadlock.
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
    ) -> None:
        self._pool = pool
        self._on_commit = on_commit
        self._batch_max = batch_max
        self._interval = interval_s
        self._retry_budget_s = retry_budget_s
        self._lanes = [_Lane() for _ in range(max(1, writers))]
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.messages = 0

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

    def enqueue(self, message: NewMessage, done: Done) -> None:
        """Store ``message``; ``done`` is called once with its `Stored` (None: the
        sender may not post there) or a `StoreUnavailable`.

        ``done`` runs synchronously right after the commit and before the commit
        hook delivers anything, so a reply it writes precedes every frame the
        batch causes.
        """
        lane = self._lanes[message.sender_id % len(self._lanes)]
        lane.queue.append((message, done))
        if not lane.wake.is_set():
            lane.wake.set()

    async def submit(self, message: NewMessage) -> Stored | None:
        """Resolve once the message is durably committed (or refused: None)."""
        fut: asyncio.Future[Stored | None] = asyncio.get_running_loop().create_future()

        def done(result: Stored | Exception | None) -> None:
            if fut.done():
                return
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        self.enqueue(message, done)
        return await fut

    async def _run(self, lane: _Lane) -> None:
        queue = lane.queue
        loop = asyncio.get_running_loop()
        started = -1e9
        while True:
            await lane.wake.wait()
            lane.wake.clear()
            while queue:
                # Under load, space batches at least batch_interval_s apart: each
                # statement has a fixed cost (~1 ms of database CPU across the three
                # nodes, plus a NOTIFY and the others' fetches), so a few larger
                # batches beat many small ones. An idle lane starts at once.
                wait = started + self._interval - loop.time()
                if wait > 0 and len(queue) < self._batch_max:
                    await asyncio.sleep(wait)
                started = loop.time()
                n = min(self._batch_max, len(queue))
                await self._write([queue.popleft() for _ in range(n)])

    async def _write(self, batch: list[tuple[NewMessage, Done]]) -> None:
        messages = [m for m, _ in batch]
        started = time.monotonic()
        deadline = started + self._retry_budget_s
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._pool.acquire() as conn:
                    results, moved = await store_batch(conn, messages)
                break
            except RETRYABLE as exc:
                if time.monotonic() + delay > deadline:
                    log.error(
                        "batch_failed", size=len(batch), attempts=attempt, error=type(exc).__name__
                    )
                    failure = StoreUnavailable(type(exc).__name__)
                    for _, done in batch:
                        _call(done, failure)
                    return
                log.warning(
                    "batch_retry", size=len(batch), attempt=attempt, error=type(exc).__name__
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        metrics.BATCH_SECONDS.observe(time.monotonic() - started)
        self.batches += 1
        self.messages += len(batch)
        for (_, done), result in zip(batch, results, strict=True):
            _call(done, result)
        self._on_commit(messages, results, moved)


class _Lane:
    __slots__ = ("queue", "wake")

    def __init__(self) -> None:
        self.queue: deque[tuple[NewMessage, Done]] = deque()
        self.wake = asyncio.Event()


def _call(done: Done, result: Stored | Exception | None) -> None:
    try:
        done(result)
    except Exception:
        # A reply that cannot be written must not cost the rest of the batch.
        log.exception("send_callback_failed")
