"""Group commit: sends from every connection of a worker share batched statements.

There is no timer: a batch leaves as soon as a writer slot is free, so an idle
system commits each message alone (lowest latency) and a busy one accumulates
up to ``batch_max`` messages per statement while earlier batches are in flight
(highest throughput). A batch whose outcome is unknown (connection cut during
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


class MessageWriter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        batch_max: int,
        writers: int,
        retry_budget_s: float,
        on_commit: Callable[[dict[int, int]], None],
    ) -> None:
        self._pool = pool
        self._on_commit = on_commit
        self._batch_max = batch_max
        self._retry_budget_s = retry_budget_s
        self._queue: deque[tuple[NewMessage, asyncio.Future[Stored | None]]] = deque()
        self._slots = asyncio.Semaphore(writers)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.messages = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(StoreUnavailable("worker stopping"))
        self._queue.clear()

    async def submit(self, message: NewMessage) -> Stored | None:
        """Resolve once the message is durably committed (or refused: None)."""
        fut: asyncio.Future[Stored | None] = asyncio.get_running_loop().create_future()
        self._queue.append((message, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._slots.acquire()
                batch = [
                    self._queue.popleft() for _ in range(min(self._batch_max, len(self._queue)))
                ]
                if not batch:
                    self._slots.release()
                    break
                task = asyncio.get_running_loop().create_task(self._write(batch))
                task.add_done_callback(lambda _: self._slots.release())

    async def _write(self, batch: list[tuple[NewMessage, asyncio.Future[Stored | None]]]) -> None:
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
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(StoreUnavailable(type(exc).__name__))
                    return
                log.warning(
                    "batch_retry", size=len(batch), attempt=attempt, error=type(exc).__name__
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        metrics.BATCH_SECONDS.observe(time.monotonic() - started)
        self.batches += 1
        self.messages += len(batch)
        self._on_commit(moved)
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)
