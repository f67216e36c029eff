"""argon2 runs in a bounded pool of low-priority threads (app/store/passwords.py)."""

from __future__ import annotations

import os
import threading

from app.settings import Settings
from app.store.passwords import Passwords, hash_threads, lower_priority


def test_hash_threads_are_at_most_the_cores() -> None:
    cores = os.cpu_count() or 1
    assert hash_threads(1) == 1
    assert hash_threads(10_000) == cores
    assert hash_threads(0) == 1


def test_a_hashing_thread_runs_at_the_nice_value_and_the_caller_keeps_its_own() -> None:
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []

    def run() -> None:
        lower_priority(own + 5)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [min(own + 5, 19)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own


async def test_passwords_hash_and_verify_in_their_pool() -> None:
    passwords = Passwords(Settings(argon2_memory_kib=1024, argon2_time_cost=1))
    try:
        assert passwords.threads == 1
        stored = await passwords.hash("correct horse battery")
        assert await passwords.verify(stored, "correct horse battery")
        assert not await passwords.verify(stored, "wrong")
    finally:
        passwords.close()
