"""The live view counts sessions (a scan of every live one) only as often as its cost
allows: each tick when it is cheap, rarely when it is not (docs/benchmarks.md, At
200,000 sessions). The database is stood in for by a clock: what is tested is when the
sampler counts, not what PostgreSQL answers (tests/browser covers the live view)."""

from __future__ import annotations

from typing import Any

import pytest

from app.dashboard import sampler as sampler_module
from app.dashboard.sampler import COUNT_COST_FACTOR, Sampler
from app.settings import Settings
from app.store.dashboard import LiveTotals


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def totals(users_online: int) -> LiveTotals:
    return LiveTotals(0, 0, users_online, 0, {}, ())


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> tuple[Clock, list[bool], dict[str, float]]:
    clock = Clock()
    counts: list[bool] = []
    cost = {"s": 0.002}

    async def live_totals(pool: Any, counted: LiveTotals | None = None) -> LiveTotals:
        counts.append(counted is None)
        if counted is not None:
            return counted
        clock.now += cost["s"]
        return totals(len(counts))

    monkeypatch.setattr(sampler_module.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(sampler_module.store, "live_totals", live_totals)
    return clock, counts, cost


async def test_a_cheap_count_is_taken_every_tick_an_expensive_one_rarely(
    counting: tuple[Clock, list[bool], dict[str, float]],
) -> None:
    clock, counts, cost = counting
    sampler = Sampler(Settings.load(env={}), None, None, None)  # type: ignore[arg-type]
    for _ in range(5):  # 2 ms a count: every 1 s tick counts
        await sampler._totals()
        clock.now += 1.0
    assert counts == [True] * 5

    cost["s"] = 0.08  # 80 ms, as at 200,000 sessions: again only after 50 x 80 ms = 4 s
    counts.clear()
    for _ in range(9):
        await sampler._totals()
        clock.now += 1.0
    assert COUNT_COST_FACTOR == 50.0
    assert counts == [True, False, False, False, True, False, False, False, True]

    # Between counts the last one stands, and is not lost.
    shown = await sampler._totals()
    assert shown is not None and shown.users_online > 0
