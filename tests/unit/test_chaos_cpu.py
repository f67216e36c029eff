"""CPU by role between two marks (app/chaos/cpu.py), as the overload scenario reports it."""

import os
import time

from app.chaos.cpu import CpuMark, cpu_s, per_unit_ms, used


def test_cpu_of_a_live_process_grows_and_of_a_gone_one_is_none() -> None:
    first = cpu_s(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    second = cpu_s(os.getpid())
    assert first is not None and second is not None and second > first
    assert cpu_s(2**22 + 1) is None  # above pid_max's default ceiling: never a process


def test_used_sums_by_role_and_counts_a_new_process_whole() -> None:
    before = CpuMark(100.0, {1: ("workers", 5.0), 2: ("workers", 1.0), 3: ("postgres", 2.0)})
    after = CpuMark(
        104.0,
        {1: ("workers", 6.0), 2: ("workers", 1.5), 3: ("postgres", 3.0), 4: ("postgres", 0.5)},
    )
    assert used(before, after) == {"workers": 1.5, "postgres": 1.5, "machine": 4.0}


def test_per_unit_is_milliseconds_per_unit_biggest_first() -> None:
    line = per_unit_ms({"workers": 1.0, "postgres": 2.0, "machine": 4.0}, 1000)
    assert line == "machine 4.00 ms (postgres 2.00, workers 1.00)"
    assert per_unit_ms({"machine": 1.0}, 0) == "no work done"
