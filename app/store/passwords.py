"""argon2id password hashing, off the event loop (it costs tens of milliseconds by design).

The hashes run in a pool of ``min(cores, argon2_threads)`` threads of their own,
each at nice ``argon2_nice`` (Linux sets niceness per thread): a login storm then
queues hashes in the pool instead of taking the CPU from the event loop, which
serves the logged-in sessions and renews the worker's lease. How many logins may
wait for the pool is admission control's business (app/worker/admission.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from app.settings import Settings


class Passwords:
    def __init__(self, settings: Settings) -> None:
        self._hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            type=Type.ID,
        )
        # argon2-cffi releases the GIL: each thread can use a core of its own.
        self.threads = hash_threads(settings.argon2_threads)
        self._pool = ThreadPoolExecutor(
            max_workers=self.threads,
            thread_name_prefix="argon2",
            initializer=lower_priority,
            initargs=(settings.argon2_nice,),
        )
        # Verifying against this makes a login for an unknown user cost the same.
        self._dummy = self._hasher.hash("switchboard-dummy-password")
        # A test hook (settings.test_verify_delay_s), 0 outside tests.
        self._test_delay_s = settings.test_verify_delay_s

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._hasher.hash, password
        )

    async def verify(self, password_hash: str | None, password: str) -> bool:
        if self._test_delay_s > 0:
            await asyncio.sleep(self._test_delay_s)

        def check() -> bool:
            try:
                return self._hasher.verify(password_hash or self._dummy, password) and (
                    password_hash is not None
                )
            except (VerificationError, InvalidHashError):
                return False

        return await asyncio.get_running_loop().run_in_executor(self._pool, check)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def hash_threads(wanted: int) -> int:
    """Hashing threads per worker: ``wanted``, but never more than the cores."""
    return max(1, min(os.cpu_count() or 1, wanted))


def lower_priority(nice: int) -> None:
    """Run the calling thread at ``nice`` or lower priority (Linux: niceness is per thread)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, max(nice, os.getpriority(os.PRIO_PROCESS, thread)))
