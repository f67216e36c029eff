"""argon2id password hashing, off the event loop (it costs tens of milliseconds by design)."""

from __future__ import annotations

import asyncio
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
        # argon2-cffi releases the GIL: two threads use both cores.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="argon2")
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
