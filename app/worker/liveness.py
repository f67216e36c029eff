"""Liveness: this worker's lease, the reaper that declares others dead, and fencing.

A slow worker is not a dead worker (issue #21). The lease is renewed from a
thread of its own (`LeaseThread`), with its own connection and event loop, so
seconds of event-loop lag or CPU starvation never leave it unrenewed; and the
lease is long (``worker_lease_s``, 15 s). A worker is declared dead when

- its lease connection is gone and it has not renewed for ``worker_dead_after_s``
  (3 s): the process died, and the kernel closed its sockets, so PostgreSQL no
  longer lists the connection (``pg_stat_activity``); or
- its lease ran out while it still holds that connection: the process is hung,
  stopped, or cut off from the database for a whole lease.

The thread renews only while the event loop shows life (it ran its lag probe
within a lease): a loop hung for good lets the lease run out, and the worker is
declared dead. A busy worker is not: it sheds load instead (`shedding`): HAProxy's
agent check gets a lower weight (drain.py), and its renewals say it is overloaded,
which holds back the expiry of detached sessions cluster-wide (their clients may
be waiting for a busy server; sessions.reap).

Each tick of the lease loop and of the reaper returns a `Decision`, a sentence
saying what it saw and did (as Patroni's ``ha.py`` does for every HA loop); the
loops log a decision when it differs from the previous one, so a steady state
costs no log lines and every change is explained::

    lease:  "renewed the lease"
            "renewed the lease; shedding load (event loop 1.2 s behind)"
            "lease renewal failed (OSError); reaping paused"
            "not renewing: the event loop has not run for 16.0 s"
            "fenced: the others declared this worker dead; dropped 120 connections, ..."
    reaper: "waiting: the database has answered for less than a lease (15.0 s), ..."
            "no worker is dead"
            "declared w2 dead (lease connection gone); detached 4000 users' sessions"

The decisions depend on the `LeaseStore` and a clock alone, so they are
tested with fakes (tests/unit/test_liveness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import asyncpg

from app.logs import get_logger
from app.protocol import frames
from app.settings import Settings
from app.store import sessions as session_store
from app.store.db import Connection, dsn
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

# A database probe that fails or takes longer than a connect timeout.
PROBE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *DB_ERRORS)

# The window of the worst event-loop lag that /health reports.
LAG_WINDOW_S = 10.0


class LeaseStore(Protocol):
    async def register(self, worker_id: str, pid: int, address: str, lease_s: float) -> int: ...

    async def renew(self, worker_id: str, lease_s: float, overloaded_s: float) -> bool: ...

    async def reap(
        self, resume_grace_s: float, dead_after_s: float, max_grace_s: float
    ) -> Reaped: ...

    async def database_reachable(self) -> bool: ...


class PgLeases:
    """The `LeaseStore` in PostgreSQL. Registering uses the main pool, reaping a pool
    of its own (a busy main pool must not hold up the reaper); renewals go over one
    connection owned by the lease thread, named so the reaper can see it is there
    (session_store.lease_application_name), and made in that thread's event loop.
    """

    def __init__(self, settings: Settings, pool: asyncpg.Pool, lease_pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self.lease_pool = lease_pool
        self._conn: asyncpg.Connection | None = None

    async def register(self, worker_id: str, pid: int, address: str, lease_s: float) -> int:
        return await session_store.register_worker(self._pool, worker_id, pid, address, lease_s)

    async def renew(self, worker_id: str, lease_s: float, overloaded_s: float) -> bool:
        s = self._settings
        timeout = max(s.lease_renew_interval_s, s.db_connect_timeout_s)
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                dsn(s),
                timeout=s.db_connect_timeout_s,
                connection_class=Connection,
                server_settings={
                    "application_name": session_store.lease_application_name(worker_id)
                },
            )
        try:
            return await asyncio.wait_for(
                session_store.renew_lease(self._conn, worker_id, lease_s, overloaded_s), timeout
            )
        except BaseException:
            conn, self._conn = self._conn, None
            conn.terminate()  # a fresh connection next time: this one may be half-open
            raise

    async def close_renewals(self) -> None:
        """Close the lease thread's connection (in the lease thread)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)
            self._conn = None

    async def reap(self, resume_grace_s: float, dead_after_s: float, max_grace_s: float) -> Reaped:
        return await session_store.reap(self.lease_pool, resume_grace_s, dead_after_s, max_grace_s)

    async def database_reachable(self) -> bool:
        """Whether any database node answers from here: a query on the replica port,
        which answers through a primary failover (the standbys are up) but not from
        a worker cut off from the database hosts."""
        s = self._settings
        try:
            conn = await asyncpg.connect(dsn(s, replica=True), timeout=s.db_connect_timeout_s)
        except PROBE_ERRORS:
            return False
        try:
            return bool(await asyncio.wait_for(conn.fetchval("SELECT 1"), s.db_connect_timeout_s))
        except PROBE_ERRORS:
            return False
        finally:
            conn.terminate()


# Why a worker fences (drops every connection, then registers again).
DECLARED_DEAD = "the others declared this worker dead"
CUT_OFF = "cut off from the database for a whole lease"

# How long a worker reports overload after it last shed load (its renewals carry it).
OVERLOAD_REPORT_S = 10.0


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
        refusals: Callable[[], int] = lambda: 0,
    ) -> None:
        self._settings = settings
        self._status = status
        self._leases = leases
        self._registry = registry
        self._announcer = announcer
        self._presence = presence
        self._events = events
        self._clock = clock
        # Requests admission answered `overloaded` so far (a rising count is shedding).
        self._refusals = refusals
        self._refusals_seen = 0
        self._shed_until = 0.0
        self._shed_why = ""
        # Written by the lease thread, read by the event loop (and the other way
        # round for loop_alive_at); plain floats and bools, one writer each.
        self._lease_ok_at = 0.0
        # Since when the DB answered without a break: reaping waits one full lease.
        self._db_ok_since: float | None = None
        # The others declared this worker dead: no renewals until it registered again.
        self._fencing = False
        # When the event loop last ran its lag probe.
        self.loop_alive_at = clock()
        # How the lease thread hands fencing to the event loop (LeaseThread sets it).
        self.hand_over: Callable[[Callable[[], Awaitable[None]]], None] = _run_later
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
        self._fencing = False
        self._events.worker_started(left)
        return Decision(f"registered; {left} sessions left from an earlier run detached")

    def shedding(self) -> str:
        """Why this worker sheds load now ("" when it does not): its event loop runs
        late, or admission refused requests since the last look (kept for
        OVERLOAD_REPORT_S). Read by the lease thread and the agent check."""
        s = self._settings
        now = self._clock()
        silent = now - self.loop_alive_at
        refusals = self._refusals()
        why = ""
        if silent > s.shed_lag_s + metrics.LOOP_PROBE_S:
            why = f"event loop silent for {silent:.1f} s"
        elif self._lag_now > s.shed_lag_s:
            why = f"event loop {self._lag_now:.1f} s behind"
        elif refusals > self._refusals_seen:
            why = f"{refusals - self._refusals_seen} requests refused overloaded"
        self._refusals_seen = refusals
        if why:
            self._shed_until, self._shed_why = now + OVERLOAD_REPORT_S, why
        return self._shed_why if now < self._shed_until else ""

    def shed_reason(self) -> str:
        """Why this worker sheds load, as last judged by the lease thread ("" if not)."""
        return self._shed_why if self._clock() < self._shed_until else ""

    async def lease_tick(self) -> Decision:
        """One renewal, on the lease thread."""
        s = self._settings
        if self._fencing:
            return Decision("fenced: waiting to register again", "warning")
        asked = self._clock()
        silent = asked - self.loop_alive_at
        if silent > s.worker_lease_s:
            # A loop hung for good serves nobody: let the lease run out.
            return Decision(
                f"not renewing: the event loop has not run for {silent:.1f} s", "warning"
            )
        shedding = self.shedding()
        try:
            renewed = await self._leases.renew(
                s.worker_id, s.worker_lease_s, OVERLOAD_REPORT_S if shedding else 0.0
            )
        except DB_ERRORS as exc:
            self._db_ok_since = None
            if self.lease_age_s > s.worker_lease_s and not await self._leases.database_reachable():
                # No node answers from here while others may (a partition): the others
                # declare this worker dead and its clients can resume with them; sends
                # held here could not commit. Fence, and register again once reachable.
                # (Through a primary failover the standbys answer: no fencing then.)
                self._fencing = True
                self.hand_over(functools.partial(self._fence_and_register, CUT_OFF))
                return Decision(f"{CUT_OFF} ({type(exc).__name__}): fencing", "warning")
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
            if shedding:
                return Decision(f"renewed the lease; shedding load ({shedding})")
            return Decision("renewed the lease")
        # Others declared us dead and detached our sessions: our copies are stale.
        self._fencing = True
        self.hand_over(self._fence_and_register)
        return Decision(f"{DECLARED_DEAD}: fencing", "warning")

    async def _fence_and_register(self, why: str = DECLARED_DEAD) -> None:
        """On the event loop: drop every connection, then register again (retrying
        each lease_renew_interval_s while the database is away)."""
        dropped = self.fence(why)
        try:
            await self.register()
        except DB_ERRORS as exc:
            self.say(
                "fence",
                Decision(
                    f"fenced: {why}; dropped {dropped}"
                    f" connections; registering again failed ({type(exc).__name__})",
                    "warning",
                ),
            )
            await asyncio.sleep(self._settings.lease_renew_interval_s)
            self.hand_over(functools.partial(self._fence_and_register, why))
            return
        self.say(
            "fence",
            Decision(f"fenced: {why}; dropped {dropped} connections, registered again", "warning"),
        )

    def fence(self, why: str = DECLARED_DEAD) -> int:
        """Drop every connection: their session rows now belong to whoever resumes them."""
        peers = list(self._registry.connections)
        for peer in peers:
            self._registry.detach(peer)
            set_session_state(peer, SessionEvent.FENCED, why)
            peer.write(frames.Reconnect(random.randint(0, 1000)).encode())
            peer.close()
        return len(peers)

    async def reap_tick(self) -> Decision:
        """Any live worker detaches the sessions of workers that are dead."""
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
            reaped = await self._leases.reap(
                s.resume_grace_s, s.worker_dead_after_s, s.resume_grace_max_s
            )
        except DB_ERRORS as exc:
            self._db_ok_since = None  # wait a full lease once it answers again
            return Decision(f"reaping failed ({type(exc).__name__})", "warning")
        expired = f"; {reaped.expired_sessions} detached sessions expired"
        if reaped.expiry_paused:
            expired += " (a worker reports overload: expiry after resume_grace_max_s)"
        if not reaped.dead:
            if reaped.expired_sessions:
                return Decision("no worker is dead" + expired)
            return Decision("no worker is dead")
        dead = ", ".join(f"{each.worker_id} ({each.reason})" for each in reaped.dead)
        failed = []
        try:
            await self._announcer.announce_catch_up("dead: " + ",".join(reaped.dead_workers))
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

    def agent_weight(self) -> int:
        """HAProxy's weight for this worker in percent: 100, less while the event loop
        lags past shed_lag_s (never below 10: if every worker lags, they share alike)."""
        lag = max(self._lag_now, self._clock() - self.loop_alive_at)
        shed_lag = self._settings.shed_lag_s
        if lag <= shed_lag:
            return 100
        return max(10, round(100 * shed_lag / lag))

    # ---- the loops ---------------------------------------------------------------
    def say(self, loop: str, decision: Decision) -> None:
        """Log a decision when it differs from the loop's previous one."""
        self._decisions.say(loop, decision)

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
            self.loop_alive_at = self._clock()
            lag = max(0.0, now - due)
            metrics.LOOP_LAG.observe(lag)
            if now - self._lag_window_at >= LAG_WINDOW_S:
                self._lag_before, self._lag_now, self._lag_window_at = self._lag_now, 0.0, now
            self._lag_now = max(self._lag_now, lag)
            if lag > 0.25:
                log.warning("event_loop_stalled", lag_ms=round(lag * 1000))


def _run_later(_: Callable[[], Awaitable[None]]) -> None:
    raise RuntimeError("Liveness.hand_over is set by LeaseThread.start")


class LeaseThread:
    """Runs `Liveness.lease_tick` every lease_renew_interval_s on a thread of its own,
    with its own event loop, so a busy event loop never delays a renewal.

    What a tick decides on the event loop's state (fencing) it hands over with
    ``call_soon_threadsafe``.
    """

    def __init__(
        self, liveness: Liveness, settings: Settings, close: Callable[[], Awaitable[None]]
    ) -> None:
        self._liveness = liveness
        self._settings = settings
        self._close = close
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        def spawn(job: Callable[[], Awaitable[None]]) -> None:
            async def run() -> None:
                await job()

            def create() -> None:
                task = loop.create_task(run())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

            loop.call_soon_threadsafe(create)

        self._liveness.hand_over = spawn
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        interval = self._settings.lease_renew_interval_s
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                next_at += interval
                try:
                    decision = await self._liveness.lease_tick()
                except Exception as exc:  # never let the thread die: the lease would lapse
                    decision = Decision(
                        f"lease tick failed ({type(exc).__name__}: {exc})", "warning"
                    )
                self._liveness.say("lease", decision)
                now = time.monotonic()
                if next_at < now:  # a renewal that took longer than the interval
                    next_at = now
                await asyncio.sleep(next_at - now)
        finally:
            await self._close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._settings.lease_renew_interval_s + 3)
