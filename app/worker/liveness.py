"""Liveness: this worker's lease, the reaper that declares others dead, and fencing.

Each tick of the lease loop and of the reaper returns a `Decision`, a sentence
saying what it saw and did (as Patroni's ``ha.py`` does for every HA loop); the
loops log a decision when it differs from the previous one, so a steady state
costs no log lines and every change is explained::

    lease:  "renewed the lease"
            "lease renewal failed (OSError); reaping paused"
            "fenced: the others declared this worker dead; dropped 120 connections, ..."
    reaper: "waiting: the database has answered for less than a lease (3.0 s), ..."
            "no worker's lease ran out"
            "declared w2 dead; detached 4000 users' sessions"

The decisions depend on the `LeaseStore` and a clock alone, so they are
tested with fakes (tests/unit/test_liveness.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from typing import Protocol

import asyncpg

from app.logs import get_logger
from app.protocol import frames
from app.settings import Settings
from app.store import sessions as session_store
from app.store.errors import DB_ERRORS
from app.store.eventlog import EventLog
from app.store.sessions import Reaped
from app.worker import metrics
from app.worker.announce import Announcer
from app.worker.decisions import Decision, DecisionLog
from app.worker.presence import Presence
from app.worker.registry import Registry
from app.worker.states import SessionEvent, WorkerState, WorkerStatus, set_session_state

log = get_logger("liveness")

# The window of the worst event-loop lag that /health reports.
LAG_WINDOW_S = 10.0


class LeaseStore(Protocol):
    async def register(self, worker_id: str, pid: int, address: str, lease_s: float) -> int: ...

    async def renew(self, worker_id: str, lease_s: float) -> bool: ...

    async def reap(self, resume_grace_s: float, lease_s: float) -> Reaped: ...


class PgLeases:
    """The `LeaseStore` in PostgreSQL. Leases get their own pool: a busy main pool
    must not make a live worker miss its renewal and be declared dead."""

    def __init__(self, pool: asyncpg.Pool, lease_pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.lease_pool = lease_pool

    async def register(self, worker_id: str, pid: int, address: str, lease_s: float) -> int:
        return await session_store.register_worker(self._pool, worker_id, pid, address, lease_s)

    async def renew(self, worker_id: str, lease_s: float) -> bool:
        return await session_store.renew_lease(self.lease_pool, worker_id, lease_s)

    async def reap(self, resume_grace_s: float, lease_s: float) -> Reaped:
        return await session_store.reap(self.lease_pool, resume_grace_s, lease_s)


class Liveness:
    def __init__(
        self,
        settings: Settings,
        status: WorkerStatus,
        leases: LeaseStore,
        registry: Registry,
        announcer: Announcer,
        presence: Presence,
        events: EventLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._status = status
        self._leases = leases
        self._registry = registry
        self._announcer = announcer
        self._presence = presence
        self._events = events
        self._clock = clock
        self._lease_ok_at = 0.0
        # Since when the DB answered without a break: reaping waits one full lease.
        self._db_ok_since: float | None = None
        self._decisions = DecisionLog(log)
        # The worst event-loop lag of the current and the previous LAG_WINDOW_S.
        self._lag_now = 0.0
        self._lag_before = 0.0
        self._lag_window_at = 0.0

    # ---- the decisions -----------------------------------------------------------
    async def register(self) -> Decision:
        s = self._settings
        address = f"{s.host}:{s.worker_port(s.worker_id)}"
        left = await self._leases.register(s.worker_id, os.getpid(), address, s.worker_lease_s)
        now = self._clock()
        self._lease_ok_at = now
        self._db_ok_since = now
        self._events.worker_started(left)
        return Decision(f"registered; {left} sessions left from an earlier run detached")

    async def lease_tick(self) -> Decision:
        s = self._settings
        asked = self._clock()
        try:
            renewed = await self._leases.renew(s.worker_id, s.worker_lease_s)
        except DB_ERRORS as exc:
            self._db_ok_since = None
            return Decision(
                f"lease renewal failed ({type(exc).__name__}); reaping paused", "warning"
            )
        now = self._clock()
        if self._db_ok_since is None or now - asked > s.lease_renew_interval_s:
            # A renewal that hung (a failover) is an outage too: the others' leases
            # may have run out meanwhile, so reaping waits a full lease from here.
            self._db_ok_since = now
        if renewed:
            self._lease_ok_at = now
            return Decision("renewed the lease")
        # Others declared us dead and detached our sessions: our copies are stale.
        dropped = self.fence()
        try:
            await self.register()
        except DB_ERRORS as exc:
            return Decision(
                f"fenced: the others declared this worker dead; dropped {dropped}"
                f" connections; registering again failed ({type(exc).__name__})",
                "warning",
            )
        return Decision(
            f"fenced: the others declared this worker dead; dropped {dropped}"
            " connections, registered again",
            "warning",
        )

    def fence(self) -> int:
        """Drop every connection: their session rows now belong to whoever resumes them."""
        peers = list(self._registry.connections)
        for peer in peers:
            self._registry.detach(peer)
            set_session_state(peer, SessionEvent.FENCED, "this worker was declared dead")
            peer.write(frames.Reconnect(random.randint(0, 1000)).encode())
            peer.close()
        return len(peers)

    async def reap_tick(self) -> Decision:
        """Any live worker detaches the sessions of workers whose lease ran out."""
        s = self._settings
        ok_since = self._db_ok_since
        # After an outage everyone's lease looks expired: wait until the others have
        # had a full lease period to renew before judging them.
        if ok_since is None:
            return Decision("waiting: the database is not answering")
        if self._clock() - ok_since < s.worker_lease_s:
            return Decision(
                f"waiting: the database has answered for less than a lease ({s.worker_lease_s}"
                " s), so the others may not have renewed theirs yet",
            )
        try:
            reaped = await self._leases.reap(s.resume_grace_s, s.worker_lease_s)
        except DB_ERRORS as exc:
            self._db_ok_since = None  # wait a full lease once it answers again
            return Decision(f"reaping failed ({type(exc).__name__})", "warning")
        expired = f"; {reaped.expired_sessions} detached sessions expired"
        if not reaped.dead_workers:
            if reaped.expired_sessions:
                return Decision("no worker's lease ran out" + expired)
            return Decision("no worker's lease ran out")
        dead = ",".join(reaped.dead_workers)
        failed = []
        try:
            await self._announcer.announce_catch_up("dead: " + dead)
        except DB_ERRORS as exc:
            failed.append(f"the catch-up push ({type(exc).__name__})")
        presence_failed = 0
        for user_id in reaped.detached_users:
            try:
                await self._presence.broadcast(user_id)
            except DB_ERRORS:
                presence_failed += 1
        if presence_failed:
            failed.append(f"{presence_failed} presence pushes")
        return Decision(
            f"declared {dead} dead; detached {len(reaped.detached_users)} users' sessions"
            + (expired if reaped.expired_sessions else "")
            + ("; failed: " + ", ".join(failed) if failed else ""),
            "warning",
        )

    def healthy(self) -> bool:
        lease_fresh = self.lease_age_s < self._settings.worker_lease_s
        state = self._status.state
        return state in (WorkerState.SERVING, WorkerState.DRAINING) and lease_fresh

    @property
    def lease_age_s(self) -> float:
        return self._clock() - self._lease_ok_at

    @property
    def loop_lag_s(self) -> float:
        """The worst event-loop lag of the last 10-20 s."""
        return max(self._lag_now, self._lag_before)

    # ---- the loops ---------------------------------------------------------------
    def say(self, loop: str, decision: Decision) -> None:
        """Log a decision when it differs from the loop's previous one."""
        self._decisions.say(loop, decision)

    async def run_lease(self) -> None:
        while True:
            await asyncio.sleep(self._settings.lease_renew_interval_s)
            self.say("lease", await self.lease_tick())

    async def run_reaper(self) -> None:
        while True:
            await asyncio.sleep(self._settings.reaper_interval_s)
            self.say("reaper", await self.reap_tick())

    async def run_lag_probe(self) -> None:
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
