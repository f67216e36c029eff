"""Admission control for logins and resumes: bounded concurrency, a bounded queue.

A reconnect storm queues instead of melting the CPU; past the queue, clients
are told to come back later, with jitter so they spread out. Resumes hash no
password and are committed in batches, so they have slots of their own
(``max_concurrent_resumes``), many more than logins.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

from app.protocol import ErrorCode
from app.settings import Settings
from app.worker.errors import RequestError


class Admission:
    def __init__(self, settings: Settings) -> None:
        self._max_queue = settings.max_auth_queue
        self._auth_slots = asyncio.Semaphore(settings.max_concurrent_auth)
        self._resume_slots = asyncio.Semaphore(settings.max_concurrent_resumes)
        self._waiting = 0
        self.overloaded = 0

    @contextlib.asynccontextmanager
    async def slot(self, resume: bool = False) -> AsyncIterator[None]:
        """Hold a login (or, ``resume``, a resume) slot; `RequestError` overloaded
        when the queue is full."""
        if self._waiting >= self._max_queue:
            self.overloaded += 1
            raise RequestError(
                ErrorCode.OVERLOADED,
                "too many logins in progress; retry later",
                retry_after=round(random.uniform(0.5, 2.0), 2),
            )
        slots = self._resume_slots if resume else self._auth_slots
        self._waiting += 1
        try:
            await slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            slots.release()
