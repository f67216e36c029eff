"""The socket worker process: TCP server, health endpoint, lease, graceful stop.

A worker holds connections and nothing else that matters: every session,
message and delivery position is in PostgreSQL, so any worker can take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from enum import Enum

import asyncpg
from aiohttp import web

from app.logs import get_logger
from app.protocol import ErrorCode, Limits, Request, error_frame
from app.settings import Settings
from app.store import sessions as session_store
from app.store import social
from app.store.db import create_pool
from app.worker.connection import ClientConnection
from app.worker.delivery import Delivery
from app.worker.passwords import Passwords
from app.worker.session import SessionLogic
from app.worker.writer import MessageWriter

log = get_logger("worker")


class WorkerState(Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"


class Worker:
    def __init__(self, settings: Settings) -> None:
        if not settings.worker_id:
            raise ValueError("a worker needs SWITCHBOARD_WORKER_ID")
        self.settings = settings
        self.worker_id = settings.worker_id
        self.limits = Limits(
            max_frame_bytes=settings.max_frame_bytes,
            max_errors_per_connection=settings.max_errors_per_connection,
            max_body_chars=settings.max_body_chars,
        )
        self.state = WorkerState.STARTING
        self.connections: set[ClientConnection] = set()
        self.by_user: dict[int, set[ClientConnection]] = {}
        self.passwords = Passwords(settings)
        self.logic = SessionLogic(self)
        self._pool: asyncpg.Pool | None = None
        self._writer: MessageWriter | None = None
        self.delivery = Delivery(self)
        # Usernames never change owner: a bounded cache spares a query per send.
        self._user_ids: dict[str, int] = {}
        self._auth_slots = asyncio.Semaphore(settings.max_concurrent_auth)
        self._auth_waiting = 0
        self._stop = asyncio.Event()
        self._lease_ok_at = 0.0
        self.slow_readers = 0

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the pool exists once the worker started"
        return self._pool

    @property
    def writer(self) -> MessageWriter:
        assert self._writer is not None, "the writer exists once the worker started"
        return self._writer

    async def user_id(self, username: str) -> int:
        """The id of a user (NotFound if there is none)."""
        cached = self._user_ids.get(username)
        if cached is not None:
            return cached
        user_id = await social.require_user(self.pool, username)
        if len(self._user_ids) >= 100_000:
            self._user_ids.clear()
        self._user_ids[username] = user_id
        return user_id

    # ---- connection bookkeeping --------------------------------------------
    def connection_opened(self, conn: ClientConnection) -> None:
        if self.state is not WorkerState.SERVING:
            conn.write(error_frame(ErrorCode.SHUTTING_DOWN, "this worker is not accepting clients"))
            conn.close()
            return
        self.connections.add(conn)

    def connection_lost(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if conn.session is not None and self.state is not WorkerState.STOPPING:
            task = asyncio.get_running_loop().create_task(
                self.logic.end_session(conn, "disconnected")
            )
            task.add_done_callback(_log_task_error)

    def session_attached(self, conn: ClientConnection) -> None:
        assert conn.session is not None
        self.by_user.setdefault(conn.session.user_id, set()).add(conn)

    def session_detached(self, conn: ClientConnection) -> None:
        if conn.session is None:
            return
        peers = self.by_user.get(conn.session.user_id)
        if peers is not None:
            peers.discard(conn)
            if not peers:
                del self.by_user[conn.session.user_id]

    def metrics_slow_reader(self) -> None:
        self.slow_readers += 1

    async def handle(self, conn: ClientConnection, req: Request) -> None:
        await self.logic.handle(conn, req)

    @contextlib.asynccontextmanager
    async def auth_slot(self) -> AsyncIterator[None]:
        """Bounded concurrent logins: a reconnect storm queues instead of melting the CPU."""
        async with self._auth_slots:
            yield

    # ---- lifecycle ---------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        s = self.settings
        self._pool = await self._connect_db()
        left = await session_store.register_worker(
            self.pool,
            self.worker_id,
            os.getpid(),
            f"{s.host}:{s.worker_port(self.worker_id)}",
            s.worker_lease_s,
        )
        self._lease_ok_at = time.monotonic()
        log.info("worker_registered", detached_sessions=left)
        self._writer = MessageWriter(
            self.pool,
            batch_max=s.batch_max,
            writers=s.batch_writers,
            retry_budget_s=s.send_retry_budget_s,
        )
        self._writer.start()
        self.delivery.start()
        server = await loop.create_server(
            lambda: ClientConnection(self),
            s.host,
            s.worker_port(self.worker_id),
            backlog=4096,
            reuse_address=True,
        )
        health = await self._start_health()
        lease = loop.create_task(self._lease_loop())
        self.state = WorkerState.SERVING
        log.info(
            "worker_serving",
            port=s.worker_port(self.worker_id),
            health_port=s.worker_health_port(self.worker_id),
        )
        await self._stop.wait()
        await self._shutdown(server, health, lease)

    async def _connect_db(self) -> asyncpg.Pool:
        deadline = time.monotonic() + 60
        while True:
            try:
                return await create_pool(self.settings)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("db_connect_retry", error=type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _lease_loop(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.lease_renew_interval_s)
            try:
                await session_store.renew_lease(self.pool, self.worker_id, s.worker_lease_s)
                self._lease_ok_at = time.monotonic()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("lease_renew_failed", error=type(exc).__name__)

    def healthy(self) -> bool:
        lease_fresh = time.monotonic() - self._lease_ok_at < self.settings.worker_lease_s
        return self.state is WorkerState.SERVING and lease_fresh

    async def _start_health(self) -> web.AppRunner:
        async def health(_: web.Request) -> web.Response:
            body = {
                "worker": self.worker_id,
                "state": self.state.value,
                "healthy": self.healthy(),
                "connections": len(self.connections),
                "sessions": sum(len(c) for c in self.by_user.values()),
                "users": len(self.by_user),
                "lease_age_s": round(time.monotonic() - self._lease_ok_at, 3),
                "listening": self.delivery.listening,
                "messages_stored": self.writer.messages,
                "batches": self.writer.batches,
                "delivered": self.delivery.delivered,
                "slow_readers": self.slow_readers,
            }
            return web.json_response(body, status=200 if body["healthy"] else 503)

        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(
            runner,
            self.settings.host,
            self.settings.worker_health_port(self.worker_id),
            reuse_address=True,
        )
        await site.start()
        return runner

    async def _shutdown(
        self, server: asyncio.Server, health: web.AppRunner, lease: asyncio.Task[None]
    ) -> None:
        log.info("worker_stopping", connections=len(self.connections))
        self.state = WorkerState.STOPPING
        server.close()
        for conn in list(self.connections):
            conn.write(error_frame(ErrorCode.SHUTTING_DOWN, "worker stopping; reconnect"))
            conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                session_store.close_worker_sessions(self.pool, self.worker_id, "worker_stopped"),
                self.settings.shutdown_grace_s,
            )
            await session_store.set_worker_state(self.pool, self.worker_id, "stopped")
        lease.cancel()
        await self.delivery.stop()
        await self.writer.stop()
        await health.cleanup()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pool.close(), 5)
        self.passwords.close()
        log.info("worker_stopped")


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background_task_failed", error=type(task.exception()).__name__)
