"""The dashboard's aiohttp application and process: routes, resources, graceful stop.

Resources live in one ``cleanup_ctx`` (pool, HTTP client, sampler task, password
hasher), so tests can build the app against any cluster and shut it down cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
from aiohttp import web

from app.cluster.layout import Layout
from app.dashboard import auth, keys, views
from app.dashboard.control import Control
from app.dashboard.metrics import DashboardMetrics
from app.dashboard.sampler import Sampler
from app.dashboard.templating import STATIC_DIR, make_environment
from app.logs import get_logger
from app.settings import Settings
from app.store.db import create_pool
from app.store.errors import DB_ERRORS
from app.store.passwords import Passwords
from app.store.throttle import Throttle

log = get_logger("dashboard")

# Forms are small; nothing the dashboard accepts is larger.
MAX_REQUEST_BYTES = 64 * 1024


def build_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[auth.security_middleware], client_max_size=MAX_REQUEST_BYTES)
    app[keys.SETTINGS] = settings
    app[keys.TEMPLATES] = make_environment()
    app[keys.METRICS] = DashboardMetrics()
    app[keys.STOPPING] = asyncio.Event()
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_end_live_streams)
    app.on_response_prepare.append(auth.harden)

    r = app.router
    r.add_get("/login", auth.login_page)
    r.add_post("/login", auth.login)
    r.add_post("/logout", auth.logout)
    r.add_get("/", views.overview)
    r.add_get("/workers", views.workers)
    r.add_post("/workers/{worker}/{action:drain|undrain}", views.worker_action)
    r.add_get("/sessions", views.sessions)
    r.add_post("/sessions/{session}/kick", views.kick)
    r.add_get("/database", views.database)
    r.add_post("/database/switchover", views.switchover)
    r.add_get("/users", views.users)
    r.add_post("/users/{user}/{action:disable|enable}", views.user_action)
    r.add_get("/users/{user}", views.user_detail)
    r.add_post("/users/{user}/devices/{device}/revoke", views.revoke_device)
    r.add_get("/events", views.events)
    r.add_get("/live", views.live)
    r.add_get("/healthz", views.healthz)
    r.add_get("/metrics", views.metrics_page)
    r.add_static("/static/", STATIC_DIR)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    pool = await connect_db(settings)
    http = aiohttp.ClientSession()
    control = Control(settings, http)
    sampler = Sampler(settings, pool, control, Layout.for_settings(settings))
    app[keys.POOL] = pool
    app[keys.HTTP] = http
    app[keys.CONTROL] = control
    app[keys.SAMPLER] = sampler
    app[keys.PASSWORDS] = Passwords(settings)
    app[keys.THROTTLE] = Throttle(pool, settings, scope="admin")
    app[keys.METRICS].watch(sampler, pool)
    stopping = asyncio.Event()
    task = asyncio.get_running_loop().create_task(_sample_forever(app, sampler, stopping))
    try:
        yield
    finally:
        # Python 3.11's wait_for can swallow a cancellation that races its timeout,
        # so the loop also watches a flag, and shutdown waits for it only so long.
        stopping.set()
        task.cancel()
        await asyncio.wait({task}, timeout=10)
        await http.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), 5)
        app[keys.PASSWORDS].close()


async def _sample_forever(app: web.Application, sampler: Sampler, stopping: asyncio.Event) -> None:
    histogram = app[keys.METRICS].sample_seconds
    interval = sampler.settings.dashboard_refresh_s
    while not stopping.is_set():
        started = time.monotonic()
        try:
            snapshot = await sampler.sample()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bad tick must not stop the live view; the next one tries again.
            log.exception("sample_failed")
        else:
            sampler.publish(snapshot)
        took = time.monotonic() - started
        histogram.observe(took)
        await asyncio.sleep(max(0.05, interval - took))


async def _end_live_streams(app: web.Application) -> None:
    app[keys.STOPPING].set()
    if keys.SAMPLER in app:
        app[keys.SAMPLER].wake_all()


async def connect_db(settings: Settings, patience_s: float = 60.0) -> asyncpg.Pool:
    """A small pool through HAProxy's primary port; waits for the database to come up."""
    pool_settings = settings.replace(
        worker_id="dashboard", db_pool_min=1, db_pool_max=settings.dashboard_db_pool_max
    )
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return await create_pool(pool_settings)
        except DB_ERRORS as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("db_connect_retry", error=type(exc).__name__)
            await asyncio.sleep(0.5)


async def serve(settings: Settings) -> None:
    """Run the dashboard until SIGTERM or SIGINT, then stop within a few seconds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        build_app(settings), access_log=None, handle_signals=False, shutdown_timeout=5.0
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.dashboard_app_port(), reuse_address=True)
    await site.start()
    log.info(
        "dashboard_serving",
        app_port=settings.dashboard_app_port(),
        public_port=settings.dashboard_port,
    )
    await stop.wait()
    log.info("dashboard_stopping")
    await runner.cleanup()
    log.info("dashboard_stopped")
