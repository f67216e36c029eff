"""The socket worker process: TCP server, health and agent endpoints, lease, drain, stop.

A worker holds connections and nothing else that matters: every session,
message and delivery position is in PostgreSQL, so any worker can take over.

Worker states (transitions only here):

    STARTING --> SERVING <--> DRAINING --> STOPPING
                    ^  \\________ FENCED (declared dead by others) __/
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import Enum
from typing import TypeVar

import asyncpg
from aiohttp import web

from app.logs import get_logger
from app.protocol import ErrorCode, Limits, Request, encode, error_frame
from app.secrets import read_secrets
from app.settings import Settings
from app.store import messages as message_store
from app.store import sessions as session_store
from app.store import social
from app.store.db import create_pool
from app.store.errors import DB_ERRORS
from app.store.eventlog import EventLog
from app.store.messages import AckRequest, ReadRequest
from app.store.passwords import Passwords
from app.store.sessions import ResumedSession, ResumeRequest
from app.worker import metrics
from app.worker.connection import ClientConnection
from app.worker.delivery import Delivery
from app.worker.session import RequestError, SessionLogic
from app.worker.writer import Batcher, MessageWriter

log = get_logger("worker")

T = TypeVar("T")
R = TypeVar("R")

# A resume waiting for the database longer than this fails with `internal`;
# the client backs off and tries again (unlike a send, nothing is lost).
RESUME_RETRY_BUDGET_S = 10.0
# The window of the worst event-loop lag that /health reports.
LAG_WINDOW_S = 10.0


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
        self.delivery = Delivery(self)
        self.events = EventLog(settings, settings.worker_id)
        metrics.attach(self)
        self._pool: asyncpg.Pool | None = None
        self._writer: MessageWriter | None = None
        self._resumer: Batcher[ResumeRequest, ResumedSession | None] | None = None
        self._acker: Batcher[AckRequest, int] | None = None
        self._reader: Batcher[ReadRequest, tuple[int, int] | bool | None] | None = None
        # Usernames never change owner: a bounded cache spares a query per send.
        self._user_ids: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._names: dict[int, str] = {}
        self._writer_pool: asyncpg.Pool | None = None
        # Leases get their own connections: a busy main pool must not make a live
        # worker miss its renewal and be declared dead.
        self._lease_pool: asyncpg.Pool | None = None
        # Signs and checks sb_push payloads: only cluster members may push frames.
        self.push_key = social.push_key(read_secrets(settings)["admin"])
        self._auth_slots = asyncio.Semaphore(settings.max_concurrent_auth)
        self._resume_slots = asyncio.Semaphore(settings.max_concurrent_resumes)
        self._auth_waiting = 0
        self._stop = asyncio.Event()
        self._lease_ok_at = 0.0
        # Since when the DB answered without a break: reaping waits one full lease.
        self._db_ok_since: float | None = None
        self.slow_readers = 0
        self.resumes = 0
        self.overloaded = 0
        # The worst event-loop lag of the current and the previous LAG_WINDOW_S.
        self._lag_now = 0.0
        self._lag_before = 0.0
        self._lag_window_at = 0.0

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the pool exists once the worker started"
        return self._pool

    @property
    def lease_pool(self) -> asyncpg.Pool:
        return self._lease_pool or self.pool

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
        self.remember_name(user_id, username)
        return user_id

    def cached_user_id(self, username: str) -> int | None:
        return self._user_ids.get(username)

    def remember_name(self, user_id: int, username: str) -> None:
        if len(self._user_ids) >= 100_000:
            self._user_ids.clear()
        if len(self._names) >= 100_000:
            self._names.clear()
        self._user_ids[username] = user_id
        self._names[user_id] = username

    @property
    def cached_names(self) -> dict[int, str]:
        """Names already known (for the hot path; `usernames` fetches the rest)."""
        return self._names

    async def usernames(self, ids: set[int]) -> dict[int, str]:
        """Names for user ids, from a bounded cache (names never change owner)."""
        names = self._names
        missing = [i for i in ids if i not in names]
        if missing:
            if len(names) + len(missing) > 100_000:
                names.clear()
            names.update(await message_store.usernames(self.pool, missing))
        return names

    # ---- connection bookkeeping --------------------------------------------
    def connection_opened(self, conn: ClientConnection) -> None:
        if self.state is WorkerState.DRAINING:
            # HAProxy has not heard of the drain yet: send the client elsewhere, soon.
            conn.write(encode({"op": "reconnect", "after_ms": random.randint(0, 200)}))
            conn.close()
            return
        if self.state is not WorkerState.SERVING:
            conn.write(error_frame(ErrorCode.SHUTTING_DOWN, "this worker is not accepting clients"))
            conn.close()
            return
        self.connections.add(conn)

    def connection_lost(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if conn.session is not None and self.state is not WorkerState.STOPPING:
            task = asyncio.get_running_loop().create_task(
                self.logic.end_session(conn, "disconnected", resumable=True)
            )
            task.add_done_callback(_log_task_error)

    def keep(self, task: asyncio.Task[None]) -> None:
        """Hold a fire-and-forget task until it ends, and log it if it fails."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_task_error)

    def session_attached(self, conn: ClientConnection) -> None:
        session = conn.session
        assert session is not None
        self.by_user.setdefault(session.user_id, set()).add(conn)
        if session.user_id not in self._names:
            self.remember_name(session.user_id, session.username)

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
    async def auth_slot(self, resume: bool = False) -> AsyncIterator[None]:
        """Admission control: bounded concurrent logins and resumes, a bounded queue.

        A reconnect storm queues instead of melting the CPU; past the queue,
        clients are told to come back later, with jitter so they spread out.
        Resumes hash no password and are committed in batches, so they have
        slots of their own (``max_concurrent_resumes``), many more than logins.
        """
        s = self.settings
        if self._auth_waiting >= s.max_auth_queue:
            self.overloaded += 1
            raise RequestError(
                ErrorCode.OVERLOADED,
                "too many logins in progress; retry later",
                retry_after=round(random.uniform(0.5, 2.0), 2),
            )
        slots = self._resume_slots if resume else self._auth_slots
        self._auth_waiting += 1
        try:
            await slots.acquire()
        finally:
            self._auth_waiting -= 1
        try:
            yield
        finally:
            slots.release()

    async def take_over(self, request: ResumeRequest) -> ResumedSession | None:
        """Resume a session here; concurrent resumes share one statement (a batch)."""
        assert self._resumer is not None, "the resumer exists once the worker started"
        return await self._resumer.submit(request)

    async def ack(self, request: AckRequest) -> int:
        """Move a device's acked position; concurrent acks share one statement."""
        assert self._acker is not None, "the acker exists once the worker started"
        return await self._acker.submit(request)

    async def read(self, request: ReadRequest) -> tuple[int, int] | bool | None:
        """Record a read receipt; concurrent reads share one statement."""
        assert self._reader is not None, "the reader exists once the worker started"
        return await self._reader.submit(request)

    def _group_commit(
        self,
        name: str,
        store: Callable[[asyncpg.Connection, list[T]], Awaitable[list[R]]],
        *,
        uncertain: Callable[[], None] | None = None,
    ) -> Batcher[T, R]:
        """A started batcher on the main pool for a set-based ``store`` statement (one
        result per item), spaced and sized like the message writer."""

        async def run(conn: asyncpg.Connection, items: list[T]) -> tuple[list[R], None]:
            return await store(conn, items), None

        s = self.settings
        batcher: Batcher[T, R] = Batcher(
            self.pool,
            run,
            name=name,
            batch_max=s.batch_max,
            interval_s=s.batch_interval_s,
            retry_budget_s=s.send_retry_budget_s,
            uncertain=uncertain,
        )
        batcher.start()
        return batcher

    async def _resume_batch(
        self, conn: asyncpg.Connection, requests: list[ResumeRequest]
    ) -> tuple[list[ResumedSession | None], None]:
        resumed = await session_store.resume_sessions(
            conn, requests, self.worker_id, self.settings.resume_grace_s
        )
        return resumed, None

    # ---- lifecycle ---------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        s = self.settings
        self._pool = await self._connect_db()
        self.events.start(self.pool)
        await self._register()
        self._lease_pool = await create_pool(s, size=2, purpose="-lease")
        self._writer_pool = await create_pool(
            s,
            size=s.batch_writers,
            purpose="-writer",
            # The batch statement's plan does not depend on the batch size (its
            # CTEs are materialized and its lookups are = ANY(ARRAY(...)) index
            # scans); planning it afresh cost ~1 ms per batch.
            plan_cache_mode="force_generic_plan",
        )
        self._writer = MessageWriter(
            self._writer_pool,
            batch_max=s.batch_max,
            writers=s.batch_writers,
            interval_s=s.batch_interval_s,
            retry_budget_s=s.send_retry_budget_s,
            on_commit=self.delivery.committed,
            uncertain=self.delivery.request_catch_up,
        )
        self._writer.start()
        self._resumer = Batcher(
            self.pool,
            self._resume_batch,
            name="resumes",
            batch_max=s.max_concurrent_resumes,
            retry_budget_s=RESUME_RETRY_BUDGET_S,
        )
        self._resumer.start()
        # Clients may ack (and mark read) every message: one synchronously replicated
        # commit for each would cost as much as the messages themselves, so acks and
        # read receipts are group-committed too.
        self._acker = self._group_commit("acks", message_store.ack_batch)
        self._reader = self._group_commit(
            "reads", message_store.read_batch, uncertain=self.delivery.request_catch_up
        )
        self.delivery.start()
        # If this worker's previous run died between a commit and its NOTIFY, the
        # others must look at their users' inboxes again.
        with contextlib.suppress(*DB_ERRORS):
            await self.delivery.announce_catch_up(f"started: {self.worker_id}")
        server = await loop.create_server(
            lambda: ClientConnection(self),
            s.host,
            s.worker_port(self.worker_id),
            backlog=4096,
            reuse_address=True,
        )
        agent = await asyncio.start_server(
            self._agent, s.host, s.worker_agent_port(self.worker_id), reuse_address=True
        )
        health = await self._start_http()
        background = [
            loop.create_task(self._lease_loop()),
            loop.create_task(self._reaper_loop()),
            loop.create_task(self._loop_lag_probe()),
        ]
        # What start-up made (modules, pools, the app) lives as long as the process:
        # move it out of the cyclic GC's reach. A full collection over it paused the
        # event loop for 30-60 ms under load, which clients saw as latency.
        gc.collect()
        gc.freeze()
        if not any(isinstance(cb, metrics.GcTimer) for cb in gc.callbacks):
            gc.callbacks.append(metrics.GcTimer())
        self.state = WorkerState.SERVING
        log.info(
            "worker_serving",
            port=s.worker_port(self.worker_id),
            health_port=s.worker_health_port(self.worker_id),
            agent_port=s.worker_agent_port(self.worker_id),
        )
        await self._stop.wait()
        # SIGTERM: drain first (clients move with a jittered reconnect), then stop.
        await self.drain()
        await self._shutdown(server, agent, health, background)

    async def _loop_lag_probe(self) -> None:
        """Measure how late the event loop runs a periodic timer (see metrics.LOOP_LAG)."""
        loop = asyncio.get_running_loop()
        interval = metrics.LOOP_PROBE_S
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            now = loop.time()
            lag = max(0.0, now - due)
            metrics.LOOP_LAG.observe(lag)
            if now - self._lag_window_at >= LAG_WINDOW_S:
                self._lag_before, self._lag_now, self._lag_window_at = self._lag_now, 0.0, now
            self._lag_now = max(self._lag_now, lag)
            if lag > 0.25:
                log.warning("event_loop_stalled", lag_ms=round(lag * 1000))

    async def _connect_db(self) -> asyncpg.Pool:
        deadline = time.monotonic() + 60
        while True:
            try:
                return await create_pool(self.settings)
            except DB_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("db_connect_retry", error=type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _register(self) -> None:
        s = self.settings
        left = await session_store.register_worker(
            self.pool,
            self.worker_id,
            os.getpid(),
            f"{s.host}:{s.worker_port(self.worker_id)}",
            s.worker_lease_s,
        )
        now = time.monotonic()
        self._lease_ok_at = now
        self._db_ok_since = now
        log.info("worker_registered", detached_sessions=left)
        self.events.worker_started(left)

    # ---- liveness ----------------------------------------------------------
    async def _lease_loop(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.lease_renew_interval_s)
            try:
                renewed = await session_store.renew_lease(
                    self.lease_pool, self.worker_id, s.worker_lease_s
                )
            except DB_ERRORS as exc:
                self._db_ok_since = None
                log.warning("lease_renew_failed", error=type(exc).__name__)
                continue
            if self._db_ok_since is None:
                self._db_ok_since = time.monotonic()
            if renewed:
                self._lease_ok_at = time.monotonic()
                continue
            # Others declared us dead and detached our sessions: our copies are stale.
            await self._fence()

    async def _fence(self) -> None:
        log.warning("worker_fenced", connections=len(self.connections))
        for conn in list(self.connections):
            self.session_detached(conn)
            conn.session = None  # its row now belongs to whoever resumes it
            conn.write(encode({"op": "reconnect", "after_ms": random.randint(0, 1000)}))
            conn.close()
        try:
            await self._register()
        except DB_ERRORS as exc:
            log.warning("reregister_failed", error=type(exc).__name__)

    async def _reaper_loop(self) -> None:
        """Any live worker detaches the sessions of workers whose lease ran out."""
        s = self.settings
        while True:
            await asyncio.sleep(s.reaper_interval_s)
            ok_since = self._db_ok_since
            # After an outage everyone's lease looks expired: wait until the others
            # have had a full lease period to renew before judging them.
            if ok_since is None or time.monotonic() - ok_since < s.worker_lease_s:
                continue
            try:
                reaped = await session_store.reap(
                    self.lease_pool, s.resume_grace_s, s.worker_lease_s
                )
            except DB_ERRORS as exc:
                log.warning("reap_failed", error=type(exc).__name__)
                continue
            if reaped.dead_workers:
                log.warning(
                    "workers_declared_dead",
                    workers=reaped.dead_workers,
                    detached_users=len(reaped.detached_users),
                )
                with contextlib.suppress(*DB_ERRORS):
                    await self.delivery.announce_catch_up("dead: " + ",".join(reaped.dead_workers))
                for user_id in reaped.detached_users:
                    with contextlib.suppress(*DB_ERRORS):
                        await self.logic.broadcast_presence(user_id)
            if reaped.expired_sessions:
                log.info("sessions_expired", count=reaped.expired_sessions)

    def healthy(self) -> bool:
        lease_fresh = time.monotonic() - self._lease_ok_at < self.settings.worker_lease_s
        return self.state in (WorkerState.SERVING, WorkerState.DRAINING) and lease_fresh

    # ---- drain -------------------------------------------------------------
    async def drain(self) -> None:
        """Stop taking clients and move the connected ones, spread out over time."""
        if self.state is not WorkerState.SERVING:
            return
        self.state = WorkerState.DRAINING
        await self._drain_clients()

    async def _drain_clients(self) -> None:
        s = self.settings
        with contextlib.suppress(*DB_ERRORS):
            await session_store.set_worker_state(self.pool, self.worker_id, "draining")
        log.info("worker_draining", connections=len(self.connections))
        self.events.worker_draining(len(self.connections))
        drain_started = time.monotonic()
        # Let HAProxy's agent check see "drain" before clients start coming back.
        low = int(s.agent_interval_s * 1000) + 200
        high = max(low, int(s.drain_spread_s * 1000))
        for conn in list(self.connections):
            if conn.session is None:
                conn.close()
            else:
                conn.write(encode({"op": "reconnect", "after_ms": random.randint(low, high)}))
        deadline = time.monotonic() + s.drain_spread_s + s.drain_timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if self.state is not WorkerState.DRAINING:
                return  # undrained meanwhile
        left = list(self.connections)
        for conn in left:
            conn.fail(ErrorCode.SHUTTING_DOWN, "worker draining; reconnect")
        log.info("worker_drained", forced=len(left))
        self.events.worker_drained(len(left), time.monotonic() - drain_started)

    def undrain(self) -> None:
        if self.state is WorkerState.DRAINING:
            self.state = WorkerState.SERVING
            log.info("worker_undrained")

    async def _agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HAProxy's agent check: one word, "ready" or "drain" (weight 0, no new clients)."""
        word = "drain" if self.state is WorkerState.DRAINING else "ready"
        writer.write(f"{word}\n".encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    # ---- HTTP: health for HAProxy and humans, admin for the CLI ------------
    async def _start_http(self) -> web.AppRunner:
        async def health(_: web.Request) -> web.Response:
            body = self.health_report()
            return web.json_response(body, status=200 if body["healthy"] else 503)

        async def admin(request: web.Request) -> web.Response:
            token = read_secrets(self.settings).get("admin")
            if not token or request.headers.get("X-Switchboard-Admin") != token:
                return web.json_response({"error": "forbidden"}, status=403)
            action = request.match_info["action"]
            if action == "drain":
                if self.state is WorkerState.SERVING:
                    self.state = WorkerState.DRAINING
                    task = asyncio.get_running_loop().create_task(self._drain_clients())
                    task.add_done_callback(_log_task_error)
            elif action == "undrain":
                self.undrain()
            else:
                return web.json_response({"error": "unknown action"}, status=404)
            return web.json_response({"worker": self.worker_id, "state": self.state.value})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_post("/admin/{action}", admin)
        app.router.add_get("/metrics", _metrics)
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

    def health_report(self) -> dict[str, object]:
        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "state": self.state.value,
            "healthy": self.healthy(),
            "connections": len(self.connections),
            "sessions": sum(len(c) for c in self.by_user.values()),
            "users": len(self.by_user),
            "lease_age_s": round(time.monotonic() - self._lease_ok_at, 3),
            "listening": self.delivery.listening,
            "messages_stored": self.writer.messages if self._writer else 0,
            "batches": self.writer.batches if self._writer else 0,
            "delivered": self.delivery.delivered,
            "resumes": self.resumes,
            "slow_readers": self.slow_readers,
            "overloaded": self.overloaded,
            # The worst of the last 10-20 s: what the dashboard's Workers page shows.
            "loop_lag_ms": round(max(self._lag_now, self._lag_before) * 1000, 1),
        }

    async def _shutdown(
        self,
        server: asyncio.Server,
        agent: asyncio.Server,
        health: web.AppRunner,
        background: list[asyncio.Task[None]],
    ) -> None:
        log.info("worker_stopping", connections=len(self.connections))
        self.state = WorkerState.STOPPING
        server.close()
        for conn in list(self.connections):
            conn.fail(ErrorCode.SHUTTING_DOWN, "worker stopping; reconnect")
        with contextlib.suppress(Exception):
            # Whatever is still attached stays resumable on another worker.
            await asyncio.wait_for(
                session_store.detach_worker_sessions(self.pool, self.worker_id, "worker_stopped"),
                self.settings.shutdown_grace_s,
            )
            await session_store.set_worker_state(self.pool, self.worker_id, "stopped")
        for task in background:
            task.cancel()
        agent.close()
        await self.delivery.stop()
        await self.writer.stop()
        for batcher in (self._resumer, self._acker, self._reader):
            if batcher is not None:
                await batcher.stop()
        await health.cleanup()
        self.events.worker_stopped()
        await self.events.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pool.close(), 5)
        for extra in (self._writer_pool, self._lease_pool):
            if extra is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(extra.close(), 5)
        self.passwords.close()
        log.info("worker_stopped")


async def _metrics(_: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background_task_failed", error=type(task.exception()).__name__)
