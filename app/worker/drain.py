"""Drain: stop taking clients and move the connected ones elsewhere, spread over time;
and HAProxy's agent check, which learns of a drain here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

import asyncpg

from app.logs import get_logger
from app.protocol import ErrorCode, frames
from app.settings import Settings
from app.store import sessions as session_store
from app.store.errors import DB_ERRORS
from app.store.eventlog import EventLog
from app.worker.registry import Registry
from app.worker.states import SessionState, WorkerState, WorkerStatus

log = get_logger("worker")


class Drain:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        status: WorkerStatus,
        registry: Registry,
        events: EventLog,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._status = status
        self._registry = registry
        self._events = events
        # This worker's weight for HAProxy in percent (liveness.agent_weight: lower
        # while the event loop lags, so a busy worker gets fewer new clients).
        self.weight: Callable[[], int] = lambda: 100

    async def drain(self, why: str) -> None:
        """Stop taking clients and move the connected ones, spread out over time."""
        if self.begin(why):
            await self.move_clients()

    def begin(self, why: str) -> bool:
        """Take no more clients (False: not serving, so nothing to drain)."""
        return self._status.set(
            WorkerState.DRAINING, why, connections=len(self._registry.connections)
        )

    async def move_clients(self) -> None:
        """Send every client elsewhere with a jittered reconnect, then close the rest."""
        s = self._settings
        connections = self._registry.connections
        with contextlib.suppress(*DB_ERRORS):
            await session_store.set_worker_state(self._pool, s.worker_id, "draining")
        self._events.worker_draining(len(connections))
        drain_started = time.monotonic()
        # Let HAProxy's agent check see "drain" before clients start coming back.
        low = int(s.effective_agent_interval_s() * 1000) + 200
        high = max(low, int(s.drain_spread_s * 1000))
        for peer in list(connections):
            if peer.state is not SessionState.ACTIVE:
                peer.close()
            else:
                peer.write(frames.Reconnect(random.randint(low, high)).encode())
        deadline = time.monotonic() + s.drain_spread_s + s.drain_timeout_s
        while connections and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if self._status.state is not WorkerState.DRAINING:
                return  # undrained meanwhile
        left = list(connections)
        for peer in left:
            peer.fail(ErrorCode.SHUTTING_DOWN, "worker draining; reconnect")
        log.info("worker_drained", forced=len(left))
        self._events.worker_drained(len(left), time.monotonic() - drain_started)

    def undrain(self, why: str) -> None:
        if self._status.state is WorkerState.DRAINING:
            self._status.set(WorkerState.SERVING, why)
            # The workers table said draining since move_clients: say active again.
            self._registry.spawn(self._mark_active())

    async def _mark_active(self) -> None:
        with contextlib.suppress(*DB_ERRORS):
            await session_store.set_worker_state(self._pool, self._settings.worker_id, "active")

    async def agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HAProxy's agent check: "drain" (weight 0, no new clients), or "ready" and a
        weight in percent of the configured one (less while the event loop lags)."""
        if self._status.state is WorkerState.DRAINING:
            answer = "drain"
        else:
            answer = f"ready {self.weight()}%"
        writer.write(f"{answer}\n".encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
