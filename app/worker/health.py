"""The worker's HTTP side, on its health port: ``/health`` for HAProxy and humans,
``/metrics`` for Prometheus, ``/admin/{drain,undrain}`` for the CLI and the dashboard
(with a token derived from the cluster's admin secret, ``worker_admin_token``).
"""

from __future__ import annotations

import hmac
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from app.secrets import read_secrets, worker_admin_token
from app.settings import Settings
from app.worker import metrics
from app.worker.drain import Drain
from app.worker.registry import Registry
from app.worker.states import WorkerStatus


@dataclass(frozen=True, slots=True)
class Sources:
    """Where each figure of the health report comes from (read at request time)."""

    status: WorkerStatus
    registry: Registry
    healthy: Callable[[], bool]
    lease_age_s: Callable[[], float]
    loop_lag_s: Callable[[], float]
    # Why the worker sheds load ("" when it does not), and its weight for HAProxy.
    shedding: Callable[[], str]
    agent_weight: Callable[[], int]
    listening: Callable[[], bool]
    messages_stored: Callable[[], int]
    batches: Callable[[], int]
    delivered: Callable[[], int]
    resumes: Callable[[], int]
    token_logins: Callable[[], int]
    token_login_batches: Callable[[], int]
    password_logins: Callable[[], int]
    password_login_batches: Callable[[], int]
    overloaded: Callable[[], int]
    queues: Callable[[], dict[str, int]]
    shed: Callable[[], dict[str, int]]
    events_dropped: Callable[[], int]
    # worker_max_sessions (0: no limit): the headroom is what is left of it.
    max_sessions: int = 0


def health_report(src: Sources) -> dict[str, object]:
    registry = src.registry
    return {
        "worker": src.status.worker_id,
        "pid": os.getpid(),
        "state": src.status.state.value,
        "healthy": src.healthy(),
        "connections": len(registry.connections),
        "sessions": registry.sessions,
        "max_sessions": src.max_sessions,
        "headroom": src.max_sessions - registry.sessions if src.max_sessions else None,
        "users": len(registry.by_user),
        "lease_age_s": round(src.lease_age_s(), 3),
        "listening": src.listening(),
        "messages_stored": src.messages_stored(),
        "batches": src.batches(),
        "delivered": src.delivered(),
        "resumes": src.resumes(),
        # Device-token logins, and the transactions that opened them (device_tokens.py).
        "token_logins": src.token_logins(),
        "token_login_batches": src.token_login_batches(),
        # Password logins past argon2, and the transactions that opened them (logins.py).
        "password_logins": src.password_logins(),
        "password_login_batches": src.password_login_batches(),
        # When this report was made (the machine's CLOCK_MONOTONIC, in seconds): a rate
        # between two reports is exact however late each was answered.
        "at": round(time.monotonic(), 4),
        "slow_readers": metrics.SLOW_READERS.value,
        "overloaded": src.overloaded(),
        # Admission control by kind of work: requests waiting for a slot now, and
        # requests answered `overloaded` since the start.
        "queues": src.queues(),
        "shed": src.shed(),
        # Events the events log could not keep (database away too long, or refused).
        "events_dropped": src.events_dropped(),
        # The worst of the last 10-20 s: what the dashboard's Workers page shows.
        "loop_lag_ms": round(src.loop_lag_s() * 1000, 1),
        "shedding": src.shedding(),
        "agent_weight": src.agent_weight(),
    }


SETTINGS = web.AppKey("settings", Settings)
SOURCES = web.AppKey("sources", Sources)
DRAIN = web.AppKey("drain", Drain)


async def _health(request: web.Request) -> web.Response:
    body = health_report(request.app[SOURCES])
    return web.json_response(body, status=200 if body["healthy"] else 503)


def _admin_allowed(settings: Settings, offered: str) -> bool:
    """Whether ``offered`` is the worker admin token, compared in constant time."""
    secret = read_secrets(settings).get("admin")
    if not secret:
        return False
    expected = worker_admin_token(secret).encode()
    return hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), expected)


async def _admin(request: web.Request) -> web.Response:
    if not _admin_allowed(request.app[SETTINGS], request.headers.get("X-Switchboard-Admin", "")):
        return web.json_response({"error": "forbidden"}, status=403)
    drain = request.app[DRAIN]
    action = request.match_info["action"]
    if action == "drain":
        # Answer now; the clients move over up to drain_spread_s + drain_timeout_s.
        if drain.begin("drain asked by the admin endpoint"):
            request.app[SOURCES].registry.spawn(drain.move_clients())
    elif action == "undrain":
        drain.undrain("undrain asked by the admin endpoint")
    else:
        return web.json_response({"error": "unknown action"}, status=404)
    status = request.app[SOURCES].status
    return web.json_response({"worker": status.worker_id, "state": status.state.value})


async def _metrics(_: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def start_http(
    settings: Settings, sources: Sources, drain: Drain, sock: socket.socket
) -> web.AppRunner:
    """Serve /health, /admin and /metrics on ``sock`` (the health port, bound early:
    edge.bind_early)."""
    app = web.Application()
    app[SETTINGS] = settings
    app[SOURCES] = sources
    app[DRAIN] = drain
    app.router.add_get("/health", _health)
    app.router.add_post("/admin/{action}", _admin)
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # Every HAProxy process checks this port (each at fastinter, 4 a second, after a
    # failed connection): aiohttp's default backlog of 128 overflowed while the loop
    # was busy with a reconnect storm, and the checks' dropped SYNs marked a live
    # worker DOWN.
    await web.SockSite(runner, sock, backlog=4096).start()
    return runner
