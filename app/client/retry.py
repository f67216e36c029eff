"""How the SDK waits before repeating a request or a reconnect: capped exponential
backoff with full jitter, never sooner than the server's ``retry_after``, and a
retry budget per client.

The budget is a token bucket for the retries the server asked to delay (an
error with ``retry_after``: ``overloaded``, ``rate_limited``): each takes a
token; ``per_minute`` tokens come back each minute, up to ``burst``. With the
bucket empty, such a retry waits the cap instead. So under sustained overload a
client retries a few times quickly, then about ``per_minute`` times a minute at
most: its retries cannot multiply the load that refused it (AWS Builders'
Library, "Timeouts, retries, and backoff with jitter"). Retries after a lost
connection or an ``internal`` (a failover) are not budgeted: their backoff's cap
already bounds them, and a budget there would slow recovery from a failover.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


def full_jitter(attempt: int, base_s: float, cap_s: float) -> float:
    """Uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0.0, min(cap_s, base_s * 2 ** min(attempt, 32)))


class RetryBudget:
    """A token bucket of retries: `take` is True while a retry may go at its backoff."""

    def __init__(
        self,
        per_minute: float = 10.0,
        burst: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self.exhausted = 0  # retries that found the bucket empty (and waited the cap)

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def take(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.exhausted += 1
        return False

    def _refill(self) -> None:
        now = self._clock()
        earned = (now - self._at) * self.per_minute / 60
        self._tokens = min(float(self.burst), self._tokens + earned)
        self._at = now


def retry_delay(
    attempt: int,
    retry_after: float | None,
    budget: RetryBudget,
    *,
    base_s: float,
    cap_s: float,
) -> float:
    """The wait before retry number ``attempt`` (0 for the first retry): the jittered
    backoff, but at least the server's ``retry_after``, at most ``cap_s``; the cap
    itself when the server gave a ``retry_after`` and the budget is spent."""
    if retry_after is not None and not budget.take():
        return cap_s
    delay = full_jitter(attempt, base_s, cap_s)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(max(delay, 0.0), cap_s)
