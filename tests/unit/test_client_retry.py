"""The SDK's retry rules (app/client/retry.py): full-jitter backoff, never sooner than
the server's retry_after, capped; and the token bucket that budgets retries."""

from __future__ import annotations

from app.client.retry import RetryBudget, full_jitter, retry_delay


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_full_jitter_doubles_up_to_the_cap_and_spreads() -> None:
    for attempt, ceiling in ((0, 0.25), (1, 0.5), (2, 1.0), (10, 4.0), (100, 4.0)):
        delays = [full_jitter(attempt, 0.25, 4.0) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8 and min(delays) < ceiling * 0.2


def test_the_budget_allows_a_burst_then_refills_per_minute() -> None:
    clock = Clock()
    budget = RetryBudget(per_minute=6.0, burst=3, clock=clock)
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    assert budget.exhausted == 1
    clock.now += 10.0  # one token per 10 s
    assert [budget.take(), budget.take()] == [True, False]
    clock.now += 3600.0  # never more than the burst
    assert budget.tokens == 3.0


def test_a_retry_waits_at_least_retry_after_and_the_cap_once_the_budget_is_spent() -> None:
    clock = Clock()
    budget = RetryBudget(per_minute=1.0, burst=50, clock=clock)
    waits = [retry_delay(0, 0.7, budget, base_s=0.25, cap_s=30.0) for _ in range(20)]
    assert all(w == 0.7 for w in waits)  # the backoff (at most 0.25) is shorter
    assert retry_delay(3, 99.0, budget, base_s=0.25, cap_s=30.0) == 30.0  # capped
    spread = {retry_delay(3, None, budget, base_s=0.25, cap_s=30.0) for _ in range(20)}
    assert len(spread) > 10 and all(0.0 <= w <= 2.0 for w in spread)
    spent = RetryBudget(per_minute=1.0, burst=0, clock=clock)
    assert retry_delay(0, 0.1, spent, base_s=0.25, cap_s=30.0) == 30.0
    # A retry the server did not ask to delay (internal, no reply) is not budgeted.
    assert retry_delay(0, None, spent, base_s=0.25, cap_s=30.0) <= 0.25
    assert spent.exhausted == 1
