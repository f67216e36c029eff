"""The socket worker process: wiring. It builds the parts, starts them, serves, stops.

A worker holds connections and nothing else that matters: every session,
message and delivery position is in PostgreSQL, so any worker can take over.
What each part does, and the order of the layers (each imports only those
below it)::

    server        this file: pools, parts, start and stop
    websocket     the WebSocket adapter (and the web chat page): messages -> connection
    connection    the asyncio adapter: bytes -> codec -> dispatcher, flood and write limits
    edge  timeouts  who may connect (HAProxy), the client's address; auth and idle deadlines
    health        /health, /metrics, /admin (aiohttp, typed AppKeys)
    dispatch      the session table's gate, then one handler per request type
    login  messaging  contacts      the request handlers
    liveness      lease, reaper, fencing: one logged decision per tick
    drain         drain/undrain, HAProxy's agent check
    session       the lifecycle: opened, attach (login), end (bye, disconnect)
    listener      LISTEN: inbox pointers and signed pushes from the other workers
    revoke        kicks and replacements: from pushes, at attach, and rechecked in the rows
    delivery      inbox entries to local connections, in seq order
    presence      a user's presence, pushed to the contacts
    commits  announce  admission  ratelimit  capacity    group commits; NOTIFY/push out;
                  login/register/resume slots; per-user op budgets; worker_max_sessions
    writer  errors                  the batcher; the exception tree -> error frames
    registry  metrics               who is connected; Prometheus
    states  decisions             the state tables and their logged setters; loop decisions

pyproject.toml's ``worker-parts`` contract checks this order (``make lint``).

The worker's state and every session's state change only through the setters
in states.py, which log each change.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time

import asyncpg

from app.logs import get_logger
from app.protocol import ErrorCode, Limits
from app.secrets import read_secrets
from app.settings import Settings
from app.store import messages as message_store
from app.store import sessions as session_store
from app.store import social
from app.store.db import create_pool
from app.store.errors import DB_ERRORS
from app.store.eventlog import EventLog
from app.store.passwords import Passwords
from app.worker import metrics
from app.worker.admission import Admission
from app.worker.announce import Announcer
from app.worker.capacity import SessionCap
from app.worker.commits import Commits
from app.worker.connection import ClientConnection, ConnectionParts
from app.worker.contacts import Contacts
from app.worker.delivery import Delivery
from app.worker.dispatch import Dispatcher
from app.worker.drain import Drain
from app.worker.edge import Edge, bind_early, tune_listener
from app.worker.health import Sources, health_report, start_http
from app.worker.listener import Listener
from app.worker.liveness import LeaseThread, Liveness, PgLeases
from app.worker.login import Login
from app.worker.messaging import Messaging
from app.worker.presence import Presence
from app.worker.ratelimit import OpBudgets
from app.worker.registry import Registry
from app.worker.revoke import PgSessionRows, Revoker
from app.worker.session import Sessions
from app.worker.states import WorkerState, WorkerStatus
from app.worker.timeouts import Deadlines
from app.worker.websocket import start_websockets

log = get_logger("worker")


class Worker:
    def __init__(self, settings: Settings) -> None:
        if not settings.worker_id:
            raise ValueError("a worker needs SWITCHBOARD_WORKER_ID")
        self.settings = settings
        self.status = WorkerStatus(settings.worker_id)
        self.events = EventLog(settings, settings.worker_id)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        s = self.settings
        wid = s.worker_id
        # On the highest descriptors, so the kernel closes them first when this process
        # is killed (edge.bind_early); they listen once the worker serves.
        client_sock = bind_early(s.host, s.worker_port(wid))
        ws_sock = bind_early(s.host, s.worker_ws_port(wid))
        health_sock = bind_early(s.host, s.worker_health_port(wid))
        agent_sock = bind_early(s.host, s.worker_agent_port(wid))
        pool = await _connect_db(s)
        self.events.start(pool)
        lease_pool = await create_pool(s, size=2, purpose="-lease")
        writer_pool = await create_pool(
            s,
            size=s.batch_writers,
            purpose="-writer",
            # The batch statement's plan does not depend on the batch size (its
            # CTEs are materialized and its lookups are = ANY(ARRAY(...)) index
            # scans); planning it afresh cost ~1 ms per batch.
            plan_cache_mode="force_generic_plan",
        )
        pools = (pool, writer_pool, lease_pool)

        # ---- the parts, bottom up ----------------------------------------------
        # Signs and checks sb_push payloads: only cluster members may push frames.
        push_key = social.push_key(read_secrets(s)["admin"])
        registry = Registry(
            lambda name: social.require_user(pool, name),
            lambda ids: message_store.usernames(pool, ids),
        )
        announcer = Announcer(pool, push_key, wid)
        presence = Presence(pool, announcer)
        delivery = Delivery(pool, registry, announcer, self.events, s.delivery_interval_s)
        commits = Commits(
            s,
            pool,
            writer_pool,
            on_commit=delivery.committed,
            on_receipt=delivery.inbox_moved,
            uncertain=announcer.request_catch_up,
        )
        revoker = Revoker(s, PgSessionRows(pool), registry, presence, self.events)
        listener = Listener(s, push_key, registry, delivery, revoker, self.events)
        sessions = Sessions(
            pool, self.status, registry, delivery, announcer, presence, self.events, revoker
        )
        drain = Drain(s, pool, self.status, registry, self.events)
        leases = PgLeases(s, pool, lease_pool)
        liveness = Liveness(
            s,
            self.status,
            leases,
            registry,
            announcer,
            presence,
            self.events,
            refusals=lambda: admission.overloaded,
        )
        drain.weight = liveness.agent_weight
        lease_thread = LeaseThread(liveness, s, leases.close_renewals)
        passwords = Passwords(s)
        # Password work is shed first when the event loop lags.
        admission = Admission(s, loop_lag_s=lambda: liveness.loop_lag_s)
        login = Login(
            pool, s, passwords, admission, commits, sessions, announcer, self.events, push_key
        )
        cap = SessionCap(s, registry)
        dispatcher = Dispatcher(
            sessions,
            login,
            Messaging(pool, s, registry, commits, announcer, self.events),
            Contacts(pool, registry, announcer, presence),
            OpBudgets(s),
            cap,
        )
        limits = Limits(
            max_frame_bytes=s.max_frame_bytes,
            max_errors_per_connection=s.max_errors_per_connection,
            max_body_chars=s.max_body_chars,
        )
        deadlines = Deadlines(s)
        parts = ConnectionParts(s, limits, dispatcher, sessions, delivery, Edge(s), deadlines)
        sources = Sources(
            status=self.status,
            registry=registry,
            healthy=liveness.healthy,
            lease_age_s=lambda: liveness.lease_age_s,
            loop_lag_s=lambda: liveness.loop_lag_s,
            shedding=liveness.shed_reason,
            agent_weight=liveness.agent_weight,
            listening=lambda: listener.listening,
            messages_stored=lambda: commits.writer.messages,
            batches=lambda: commits.writer.batches,
            delivered=lambda: delivery.delivered,
            resumes=lambda: login.resumes,
            token_logins=lambda: login.token_logins,
            token_login_batches=lambda: commits.token_logins.batches,
            password_logins=lambda: commits.password_logins.items,
            password_login_batches=lambda: commits.password_logins.batches,
            overloaded=lambda: admission.overloaded + cap.refused,
            queues=admission.queues,
            shed=admission.shed_counts,
            events_dropped=lambda: self.events.dropped,
            max_sessions=s.worker_max_sessions,
        )
        metrics.attach(lambda: health_report(sources), pool)

        # ---- start ---------------------------------------------------------------
        liveness.say("lease", await liveness.register())
        lease_thread.start(loop)
        commits.start()
        announcer.start()
        delivery.start()
        listener.start()
        # If this worker's previous run died between a commit and its NOTIFY, the
        # others must look at their users' inboxes again.
        with contextlib.suppress(*DB_ERRORS):
            await announcer.announce_catch_up(f"started: {wid}")
        server = await loop.create_server(
            lambda: ClientConnection(parts), sock=client_sock, backlog=4096
        )
        for listening in server.sockets:  # accepted sockets inherit keepalive
            tune_listener(listening, s)
        agent = await asyncio.start_server(  # backlog: as the health port's (health.py)
            drain.agent, sock=agent_sock, backlog=4096
        )
        health = await start_http(s, sources, drain, health_sock)
        websockets = await start_websockets(parts, ws_sock)
        background = [
            loop.create_task(liveness.run_reaper()),
            loop.create_task(liveness.run_lag_probe()),
            loop.create_task(deadlines.run()),
            loop.create_task(revoker.run()),
        ]
        # What start-up made (modules, pools, the app) lives as long as the process:
        # move it out of the cyclic GC's reach. A full collection over it paused the
        # event loop for 30-60 ms under load, which clients saw as latency.
        gc.collect()
        gc.freeze()
        if not any(isinstance(cb, metrics.GcTimer) for cb in gc.callbacks):
            gc.callbacks.append(metrics.GcTimer())
        self.status.set(
            WorkerState.SERVING,
            "started",
            port=s.worker_port(wid),
            health_port=s.worker_health_port(wid),
            agent_port=s.worker_agent_port(wid),
            ws_port=s.worker_ws_port(wid),
        )
        await self._stop.wait()

        # ---- stop: drain first (clients move with a jittered reconnect) ---------
        await drain.drain("SIGTERM")
        log.info("worker_stopping", connections=len(registry.connections))
        self.status.set(WorkerState.STOPPING, "SIGTERM")
        server.close()
        for peer in list(registry.connections):
            peer.fail(ErrorCode.SHUTTING_DOWN, "worker stopping; reconnect")
        # WebSockets: their shutting_down frames go out, then the handlers end.
        await websockets.cleanup()
        with contextlib.suppress(Exception):
            # Whatever is still attached stays resumable on another worker.
            await asyncio.wait_for(
                session_store.detach_worker_sessions(pool, wid, "worker_stopped"),
                s.shutdown_grace_s,
            )
            await session_store.set_worker_state(pool, wid, "stopped")
        for task in background:
            task.cancel()
        await asyncio.to_thread(lease_thread.stop)
        agent.close()
        for part in (listener, delivery, announcer, commits):
            await part.stop()
        await health.cleanup()
        self.events.worker_stopped()
        await self.events.close()
        for each in pools:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(each.close(), 5)
        passwords.close()
        log.info("worker_stopped")


async def _connect_db(settings: Settings) -> asyncpg.Pool:
    deadline = time.monotonic() + 60
    while True:
        try:
            return await create_pool(settings)
        except DB_ERRORS as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("db_connect_retry", error=type(exc).__name__)
            await asyncio.sleep(0.5)
