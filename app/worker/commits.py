"""The worker's group commits: sends, resumes, password and token logins, acks and
read receipts, each a `Batcher`.

Clients may ack (and mark read) every message: one synchronously replicated
commit for each would cost as much as the messages themselves, so acks and
read receipts are group-committed like sends. Every statement is idempotent
(see writer.py): a batch whose outcome is unknown is simply run again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg

from app.logs import get_logger
from app.settings import Settings
from app.store import device_tokens, logins, throttle
from app.store import messages as message_store
from app.store import sessions as session_store
from app.store.device_tokens import TokenLogin, TokenRefused
from app.store.errors import DB_ERRORS
from app.store.logins import LoggedIn, LoginRefused, PasswordLogin
from app.store.messages import AckRequest, NewMessage, ReadRequest, Stored
from app.store.sessions import ResumedSession, ResumeRequest
from app.worker.writer import Batcher, MessageWriter

log = get_logger("commits")

T = TypeVar("T")
R = TypeVar("R")

# A resume waiting for the database longer than this fails with `internal`;
# the client backs off and tries again (unlike a send, nothing is lost).
RESUME_RETRY_BUDGET_S = 10.0


class Commits:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        writer_pool: asyncpg.Pool,
        *,
        on_commit: Callable[[Sequence[NewMessage], Sequence[Stored | None], dict[int, int]], None],
        on_receipt: Callable[[dict[int, int]], None],
        uncertain: Callable[[], None],
    ) -> None:
        s = self._settings = settings
        self._pool = pool
        self._on_receipt = on_receipt
        self.writer = MessageWriter(
            writer_pool,
            batch_max=s.batch_max,
            writers=s.batch_writers,
            interval_s=s.batch_interval_s,
            retry_budget_s=s.send_retry_budget_s,
            on_commit=on_commit,
            uncertain=uncertain,
        )
        self._resumer: Batcher[ResumeRequest, ResumedSession | None] = self._logins(
            "resumes", self._resume_batch
        )
        # A login storm after an outage: one transaction per batch of devices.
        self.token_logins: Batcher[TokenLogin, LoggedIn | TokenRefused] = self._logins(
            "token_logins", self._token_batch
        )
        # A password login storm: argon2 per login, then one transaction per batch.
        self.password_logins: Batcher[PasswordLogin, LoggedIn | LoginRefused] = self._logins(
            "password_logins", self._password_batch
        )
        self._acker = self._group_commit("acks", message_store.ack_batch)
        self._receipts = self._group_commit("reads", message_store.read_batch, uncertain=uncertain)
        self._all: tuple[Batcher[object, object], ...] = (
            self.writer,
            self._resumer,
            self.token_logins,
            self.password_logins,
            self._acker,
            self._receipts,  # type: ignore[assignment]
        )

    def start(self) -> None:
        for batcher in self._all:
            batcher.start()

    async def stop(self) -> None:
        for batcher in self._all:
            await batcher.stop()

    def send(self, message: NewMessage, done: Callable[[Stored | Exception | None], None]) -> None:
        """Store ``message`` in the next group commit; see `MessageWriter.send`."""
        self.writer.send(message, done)

    async def take_over(self, request: ResumeRequest) -> ResumedSession | None:
        """Resume a session here; concurrent resumes share one statement."""
        return await self._resumer.submit(request)

    async def log_in_by_token(self, request: TokenLogin) -> LoggedIn | TokenRefused:
        """Check and rotate a device token and open its session; concurrent token
        logins share one transaction (device_tokens.login_batch)."""
        return await self.token_logins.submit(request)

    async def log_in_by_password(self, request: PasswordLogin) -> LoggedIn | LoginRefused:
        """Open the session of a login whose password argon2 found right; concurrent
        logins share one transaction (logins.open_batch)."""
        return await self.password_logins.submit(request)

    async def ack(self, request: AckRequest) -> int:
        """Move a device's acked position; concurrent acks share one statement."""
        return await self._acker.submit(request)

    async def record_receipt(self, request: ReadRequest) -> bool:
        """Record a read receipt; concurrent reads share one statement. False if the
        message is not visible to the reader (NotFound for the client)."""
        result = await self._receipts.submit(request)
        if result is None:
            return False
        if isinstance(result, tuple):
            author, seq = result
            self._on_receipt({author: seq})
        return True

    def _logins(
        self,
        name: str,
        run: Callable[[asyncpg.Connection, list[T]], Awaitable[tuple[list[R], None]]],
    ) -> Batcher[T, R]:
        """A batcher of logins (resumes, tokens, passwords) on the main pool: as many
        per batch as resumes may run at once, failing after RESUME_RETRY_BUDGET_S."""
        return Batcher(
            self._pool,
            run,
            name=name,
            batch_max=self._settings.max_concurrent_resumes,
            retry_budget_s=RESUME_RETRY_BUDGET_S,
        )

    def _group_commit(
        self,
        name: str,
        store: Callable[[asyncpg.Connection, list[T]], Awaitable[list[R]]],
        *,
        uncertain: Callable[[], None] | None = None,
    ) -> Batcher[T, R]:
        """A batcher on the main pool for a set-based ``store`` statement (one result
        per item), spaced and sized like the message writer."""

        async def run(conn: asyncpg.Connection, items: list[T]) -> tuple[list[R], None]:
            return await store(conn, items), None

        s = self._settings
        return Batcher(
            self._pool,
            run,
            name=name,
            batch_max=s.batch_max,
            interval_s=s.batch_interval_s,
            retry_budget_s=s.send_retry_budget_s,
            uncertain=uncertain,
        )

    async def _resume_batch(
        self, conn: asyncpg.Connection, requests: list[ResumeRequest]
    ) -> tuple[list[ResumedSession | None], None]:
        resumed = await session_store.resume_sessions(
            conn,
            requests,
            self._settings.worker_id,
            self._settings.resume_grace_s,
            self._settings.resume_grace_max_s,
        )
        return resumed, None

    async def _token_batch(
        self, conn: asyncpg.Connection, requests: list[TokenLogin]
    ) -> tuple[list[LoggedIn | TokenRefused], None]:
        s = self._settings
        opened = await device_tokens.login_batch(
            conn,
            requests,
            worker_id=s.worker_id,
            ttl_days=s.device_token_ttl_days,
            overlap_s=s.device_token_overlap_s,
            max_devices=s.max_devices_per_user,
            addr_failure_limit=s.max_login_failures_per_addr,
        )
        return opened, None

    async def _password_batch(
        self, conn: asyncpg.Connection, requests: list[PasswordLogin]
    ) -> tuple[list[LoggedIn | LoginRefused], None]:
        s = self._settings
        opened = await logins.open_batch(
            conn, requests, worker_id=s.worker_id, max_devices=s.max_devices_per_user
        )
        # Committed: from here on nothing may fail the batch (a retry would open the
        # sessions again). The passwords were right, refused or not: settle them.
        try:
            await throttle.settle_rights(
                conn,
                [r.pair_key for r in requests],
                [r.addr_key for r in requests if r.addr_key is not None],
            )
        except DB_ERRORS as exc:  # the logins stand; only their counters stay
            log.warning("login_success_not_counted", logins=len(requests), error=type(exc).__name__)
        return opened, None
