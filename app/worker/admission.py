"""Admission control for logins, registrations, resumes and token logins: bounded
concurrency, bounded queues.

A reconnect storm queues instead of melting the CPU; past the queue, clients
are told to come back later, with jitter so they spread out. Each kind of work
has its own slots and its own queue, so a flood of one never makes another
answer ``overloaded``: a register flood fills the register queue only, and a
resume or a token login never waits behind a password hash. Resumes hash no password and are
committed in batches, so they have many more slots than logins.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
from collections.abc import AsyncIterator

from app.protocol import ErrorCode
from app.settings import Settings
from app.worker.errors import RequestError


class Work(enum.Enum):
    LOGIN = "login"  # hello and password changes: argon2id
    REGISTER = "register"  # argon2id and a new account
    RESUME = "resume"  # a SHA-256 and a share of a batched statement
    TOKEN = "token"  # login_token: as cheap as a resume, in batches of its own


_OVERLOADED = {
    Work.LOGIN: "too many logins in progress; retry later",
    Work.REGISTER: "too many registrations in progress; retry later",
    Work.RESUME: "too many resumes in progress; retry later",
    Work.TOKEN: "too many token logins in progress; retry later",
}


class _Queue:
    def __init__(self, slots: int, max_waiting: int) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.max_waiting = max_waiting
        self.waiting = 0


class Admission:
    def __init__(self, settings: Settings) -> None:
        s = settings
        self._queues = {
            Work.LOGIN: _Queue(s.max_concurrent_auth, s.max_auth_queue),
            Work.REGISTER: _Queue(s.max_concurrent_registers, s.max_register_queue),
            Work.RESUME: _Queue(s.max_concurrent_resumes, s.max_resume_queue),
            # Sized like resumes (the same cost), but a queue of their own.
            Work.TOKEN: _Queue(s.max_concurrent_resumes, s.max_resume_queue),
        }
        self.overloaded = 0  # refusals of every kind (the /metrics counter)
        self.overloaded_by_work = dict.fromkeys(Work, 0)

    def waiting(self, work: Work) -> int:
        return self._queues[work].waiting

    @contextlib.asynccontextmanager
    async def slot(self, work: Work) -> AsyncIterator[None]:
        """Hold a slot for ``work``; `RequestError` overloaded when its queue is full."""
        queue = self._queues[work]
        if queue.waiting >= queue.max_waiting:
            self.overloaded += 1
            self.overloaded_by_work[work] += 1
            raise RequestError(
                ErrorCode.OVERLOADED,
                _OVERLOADED[work],
                retry_after=round(random.uniform(0.5, 2.0), 2),
            )
        queue.waiting += 1
        try:
            await queue.slots.acquire()
        finally:
            queue.waiting -= 1
        try:
            yield
        finally:
            queue.slots.release()
