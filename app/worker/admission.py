"""Admission control for resumes, token logins, password logins and registrations:
bounded concurrency, bounded queues with a deadline, shedding by priority.

Live traffic of logged-in sessions never passes here: it comes first. The four
kinds of login work, in the order they are shed last to first::

    RESUME    a SHA-256 and a share of a batched statement   (kept longest)
    TOKEN     login_token: as cheap as a resume, batches of its own
    LOGIN     hello and password changes: an argon2id hash
    REGISTER  an argon2id hash and a new account               (shed first)

Each kind has its own slots and its own queue, so a flood of one never makes
another answer ``overloaded``. A request that finds every slot of its kind busy
**waits its turn** (queue, don't bounce): it is refused only when its kind's
queue is full or when it has waited ``admission_wait_s``.

When the event loop lags (``loop_lag_s`` at or above ``admission_shed_lag_s``),
the argon2 kinds are shed first: each runs one request at a time instead of its
slots, and a new one whose expected wait (the queue ahead times the measured
time a slot is held) is past ``admission_wait_s`` is refused at once instead
of queueing in vain, while resumes and token logins are admitted as before.

A refusal's ``retry_after`` says when a slot would be free: the queue ahead
times the measured time a slot is held, divided by the slots (at least
``admission_retry_min_s``, and at least the lag when shed for lag). The value
sent is drawn uniformly between the minimum and a ceiling of twice that
estimate, so refused clients spread out instead of returning together; while
refusals of a kind go on, the ceiling doubles every `STEP_S` (at most
`MAX_LEVEL` times, and never past ``admission_retry_max_s``), and `CALM_S`
without a refusal resets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from app.protocol import ErrorCode
from app.settings import Settings
from app.worker import metrics
from app.worker.errors import RequestError


class Work(enum.Enum):
    RESUME = "resume"  # a SHA-256 and a share of a batched statement
    TOKEN = "token"  # login_token: as cheap as a resume, in batches of its own
    LOGIN = "login"  # hello and password changes: argon2id
    REGISTER = "register"  # argon2id and a new account


# The kinds that hash a password: shed first when the event loop lags.
ARGON2_WORK = frozenset({Work.LOGIN, Work.REGISTER})


class Shed(enum.Enum):
    """Why a request was refused (the reason label of the shed counter)."""

    QUEUE_FULL = "queue_full"  # its kind's queue was full
    DEADLINE = "deadline"  # it waited admission_wait_s without a slot
    LAGGING = "lagging"  # argon2 work, refused while the event loop lags


# While refusals of a kind go on, its retry_after ceiling doubles this often; this
# long without a refusal resets it.
STEP_S = 1.0
CALM_S = 5.0
# The ceiling grows at most 2**MAX_LEVEL times past twice the estimate: refused
# clients come back later while refusals go on, but not so much later that the
# queue runs dry and the slots idle (measured: with no bound the ceiling reached
# 30 s and login goodput after a storm fell to half the capacity).
MAX_LEVEL = 2
# The first guess of how long a slot is held, until requests have measured it.
FIRST_HOLD_S = 0.05
_HOLD_WEIGHT = 0.2  # of each new measurement in the moving average

_OVERLOADED = {
    Work.LOGIN: "too many logins in progress; retry later",
    Work.REGISTER: "too many registrations in progress; retry later",
    Work.RESUME: "too many resumes in progress; retry later",
    Work.TOKEN: "too many token logins in progress; retry later",
}


class _Queue:
    """One kind's slots and waiters (FIFO), and what its refusals have been like."""

    def __init__(self, work: Work, slots: int, max_waiting: int) -> None:
        self.work = work
        self.slots = max(1, slots)
        self.max_waiting = max_waiting
        self.running = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.hold_s = FIRST_HOLD_S  # moving average of how long a slot is held
        self.level = 0  # retry_after's ceiling is doubled this many times
        self.level_at = float("-inf")
        self.refused_at = float("-inf")

    def limit(self, lagging: bool) -> int:
        return 1 if lagging and self.work in ARGON2_WORK else self.slots

    def grant(self, lagging: bool) -> None:
        """Hand free slots to the longest waiters."""
        while self.waiters and self.running < self.limit(lagging):
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.running += 1


class Admission:
    def __init__(
        self,
        settings: Settings,
        loop_lag_s: Callable[[], float] = lambda: 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        s = settings
        self._queues = {
            Work.LOGIN: _Queue(Work.LOGIN, s.max_concurrent_auth, s.max_auth_queue),
            Work.REGISTER: _Queue(Work.REGISTER, s.max_concurrent_registers, s.max_register_queue),
            Work.RESUME: _Queue(Work.RESUME, s.max_concurrent_resumes, s.max_resume_queue),
            # Sized like resumes (the same cost), but a queue of their own.
            Work.TOKEN: _Queue(Work.TOKEN, s.max_concurrent_resumes, s.max_resume_queue),
        }
        self._wait_s = s.admission_wait_s
        self._shed_lag_s = s.admission_shed_lag_s
        self._retry_min_s = s.admission_retry_min_s
        self._retry_max_s = s.admission_retry_max_s
        self._loop_lag_s = loop_lag_s
        self._clock = clock
        self.overloaded = 0  # refusals of every kind (the /metrics counter)
        self.shed = {(work, why): 0 for work in Work for why in Shed}

    def waiting(self, work: Work) -> int:
        return len(self._queues[work].waiters)

    def running(self, work: Work) -> int:
        return self._queues[work].running

    def shed_of(self, work: Work) -> int:
        """Refusals of ``work``, whatever the reason."""
        return sum(self.shed[work, why] for why in Shed)

    def queues(self) -> dict[str, int]:
        """Requests waiting per kind of work (for /health)."""
        return {work.value: len(queue.waiters) for work, queue in self._queues.items()}

    def shed_counts(self) -> dict[str, int]:
        """Refusals per kind of work since the start (for /health)."""
        return {work.value: self.shed_of(work) for work in Work}

    def lagging(self) -> bool:
        return self._loop_lag_s() >= self._shed_lag_s

    @contextlib.asynccontextmanager
    async def slot(self, work: Work) -> AsyncIterator[None]:
        """Hold a slot for ``work``, waiting up to ``admission_wait_s`` for one;
        `RequestError` overloaded (with retry_after) when it is shed."""
        queue = self._queues[work]
        lagging = work in ARGON2_WORK and self.lagging()
        queue.grant(lagging)
        if queue.running < queue.limit(lagging) and not queue.waiters:
            queue.running += 1
        elif lagging and self._expected_wait_s(queue, lagging) > self._wait_s:
            raise self._refuse(queue, Shed.LAGGING, lagging)
        elif len(queue.waiters) >= queue.max_waiting:
            raise self._refuse(queue, Shed.QUEUE_FULL, lagging)
        elif not await self._wait(queue):
            raise self._refuse(queue, Shed.DEADLINE, lagging)
        started = self._clock()
        try:
            yield
        finally:
            queue.hold_s += _HOLD_WEIGHT * (self._clock() - started - queue.hold_s)
            queue.running -= 1
            queue.grant(work in ARGON2_WORK and self.lagging())

    async def _wait(self, queue: _Queue) -> bool:
        """Wait in line; True once a slot is ours, False at the deadline."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.waiters.append(waiter)
        try:
            await asyncio.wait([waiter], timeout=self._wait_s)
        except asyncio.CancelledError:  # the connection went away while waiting
            self._leave(queue, waiter)
            raise
        if waiter.done():
            return True
        self._leave(queue, waiter)
        return False

    def _leave(self, queue: _Queue, waiter: asyncio.Future[None]) -> None:
        if waiter.done():  # granted meanwhile: give the slot to the next in line
            queue.running -= 1
            queue.grant(queue.work in ARGON2_WORK and self.lagging())
        else:
            waiter.cancel()
            queue.waiters.remove(waiter)

    def _refuse(self, queue: _Queue, why: Shed, lagging: bool) -> RequestError:
        self.overloaded += 1
        self.shed[queue.work, why] += 1
        metrics.ADMISSION_SHED.labels(queue.work.value, why.value).inc()
        return RequestError(
            ErrorCode.OVERLOADED,
            _OVERLOADED[queue.work],
            retry_after=self.retry_after(queue.work, lagging),
        )

    @staticmethod
    def _expected_wait_s(queue: _Queue, lagging: bool) -> float:
        """When a slot would be free for one more request at the back of the queue."""
        return (len(queue.waiters) + 1) * queue.hold_s / queue.limit(lagging)

    def retry_after(self, work: Work, lagging: bool = False) -> float:
        """The jittered wait to tell a refused request of ``work`` (and count the refusal
        towards the doubling of its ceiling)."""
        queue = self._queues[work]
        now = self._clock()
        if now - queue.refused_at >= CALM_S:
            queue.level, queue.level_at = 0, now
        elif now - queue.level_at >= STEP_S:
            queue.level, queue.level_at = min(queue.level + 1, MAX_LEVEL), now
        queue.refused_at = now
        free_in_s = self._expected_wait_s(queue, lagging)
        base = max(self._retry_min_s, free_in_s, self._loop_lag_s() if lagging else 0.0)
        # Drawn up to twice the estimate, so the waits average about the estimate.
        ceiling = min(self._retry_max_s, 2 * base * 2**queue.level)
        return round(random.uniform(self._retry_min_s, max(ceiling, self._retry_min_s)), 2)
