"""The worker's in-process metric helpers, without a worker."""

from __future__ import annotations

import gc

from app.worker.metrics import GC_PAUSE, GcTimer, LeanHistogram


def test_lean_histogram_buckets_are_cumulative_at_collection() -> None:
    hist = LeanHistogram("t_seconds", "test", buckets=(0.01, 0.1, 1.0))
    for value in (0.005, 0.01, 0.05, 0.5, 5.0):
        hist.observe(value)
    (family,) = hist.collect()
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "t_seconds_bucket"}
    # le is inclusive: 0.01 counts in the 0.01 bucket.
    assert buckets == {"0.01": 2.0, "0.1": 3.0, "1.0": 4.0, "+Inf": 5.0}
    (count,) = [s.value for s in family.samples if s.name == "t_seconds_count"]
    (total,) = [s.value for s in family.samples if s.name == "t_seconds_sum"]
    assert count == 5.0
    assert abs(total - 5.565) < 1e-9


def test_observe_many_counts_a_batch_of_one_value_once_each() -> None:
    one_by_one = LeanHistogram("a_seconds", "test", buckets=(0.01, 0.1))
    batched = LeanHistogram("b_seconds", "test", buckets=(0.01, 0.1))
    for _ in range(7):
        one_by_one.observe(0.05)
    batched.observe_many(0.05, 7)
    assert batched.counts == one_by_one.counts == [0, 7, 0]
    assert abs(batched.total - one_by_one.total) < 1e-12


def test_gc_timer_times_each_collection() -> None:
    timer = GcTimer()
    before = sum(GC_PAUSE.counts)
    gc.callbacks.append(timer)
    try:
        gc.collect()
        gc.collect(0)
    finally:
        gc.callbacks.remove(timer)
    assert sum(GC_PAUSE.counts) == before + 2
    # A stop without a start (the hook added mid-collection) records nothing.
    timer("stop", {"generation": 0})
    assert sum(GC_PAUSE.counts) == before + 2
