"""The live view: one sampler per dashboard process, an immutable snapshot per tick.

Every ``dashboard_refresh_s`` the sampler reads the aggregates from PostgreSQL,
each worker's ``/health``, Patroni's cluster view and HAProxy's server states,
and publishes a `Snapshot`. Pages render the latest one; the ``/live`` event
stream sends each new one to every open page; the charts keep the last
``dashboard_history_points`` of them as `Point`s. However many sessions exist,
a snapshot is a few dozen numbers: the browser never loads a table.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

from app.cluster import haproxy, patroni, runstate
from app.cluster.layout import Layout
from app.dashboard.control import Control
from app.logs import get_logger
from app.settings import Settings
from app.store import dashboard as store
from app.store.errors import DB_ERRORS

log = get_logger("dashboard")


@dataclass(frozen=True, slots=True)
class WorkerView:
    id: str
    http_status: int  # of /health; 0 when it did not answer
    state: str  # the worker's own word (serving, draining, ...) or the workers table's
    healthy: bool
    sessions: int | None  # logged-in connections the worker holds now
    connections: int | None
    db_active: int  # session rows that name this worker
    db_detached: int
    lease_age_s: float | None
    haproxy: str  # UP, DOWN, DRAIN, MAINT, ? (HAProxy's word)
    pid: int | None
    messages_per_s: float  # stored plus delivered through this worker
    loop_lag_ms: float | None = None  # the worst event-loop lag of the last 10-20 s
    # Load shedding: why it sheds ("" when not), its HAProxy weight in percent,
    # requests waiting for admission and refused overloaded (all kinds).
    shedding: str = ""
    weight: int | None = None
    queued: int | None = None
    shed: int | None = None


@dataclass(frozen=True, slots=True)
class MemberView:
    name: str
    role: str
    state: str
    timeline: int | None
    lag: int | None


@dataclass(frozen=True, slots=True)
class BackendView:
    backend: str
    server: str
    status: str
    sessions: int


@dataclass(frozen=True, slots=True)
class Point:
    t: float
    sessions: int
    users: int
    msg_in: float
    msg_out: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    db_ok: bool
    sessions_active: int
    sessions_detached: int
    users_online: int
    messages_in_per_s: float
    messages_out_per_s: float
    workers: tuple[WorkerView, ...]
    members: tuple[MemberView, ...]
    backends: tuple[BackendView, ...]
    problems: tuple[str, ...] = field(default=())
    # What the supervisor restarted since `up` (run/restarts.json).
    restarts: tuple[runstate.Restart, ...] = field(default=())

    @property
    def leader(self) -> str | None:
        return next((m.name for m in self.members if m.role == "leader"), None)

    @property
    def workers_serving(self) -> int:
        return sum(1 for w in self.workers if w.state == "serving" and w.healthy)

    def worker(self, worker_id: str) -> WorkerView | None:
        return next((w for w in self.workers if w.id == worker_id), None)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["leader"] = self.leader
        data["workers_serving"] = self.workers_serving
        data["workers_total"] = len(self.workers)
        return data


EMPTY = Snapshot(0.0, False, 0, 0, 0, 0.0, 0.0, (), (), (), ("not sampled yet",))
# Session counts are taken again after this many times what the last count took
# (Sampler._totals): at most 1/50 of a database core on them.
COUNT_COST_FACTOR = 50.0


@dataclass(slots=True)
class _Counters:
    """Last raw counters, to turn them into rates (a restarted worker starts from 0)."""

    at: float = 0.0
    last_message_id: int | None = None
    delivered: int | None = None
    per_worker: dict[str, int] = field(default_factory=dict)


def _rate(new: int, old: int | None, seconds: float) -> float:
    if old is None or seconds <= 0:
        return 0.0
    delta = new - old if new >= old else new  # a counter that went down was reset
    return round(delta / seconds, 2)


class Sampler:
    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, control: Control, layout: Layout
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.control = control
        self.layout = layout
        self.latest: Snapshot = EMPTY
        self.history: deque[Point] = deque(maxlen=settings.dashboard_history_points)
        self._tick = asyncio.Event()
        self._counters = _Counters()
        self.samples = 0
        # The last session counts, and when to count again (see _totals).
        self._counted: store.LiveTotals | None = None
        self._recount_at = 0.0

    async def next_snapshot(self, timeout: float) -> Snapshot | None:
        """Wait for the next snapshot; None after ``timeout`` seconds without one."""
        tick = self._tick
        try:
            await asyncio.wait_for(tick.wait(), timeout)
        except TimeoutError:
            return None
        return self.latest

    def wake_all(self) -> None:
        """Wake every waiting live stream (at shutdown), without a new snapshot."""
        self._tick.set()

    def publish(self, snapshot: Snapshot) -> None:
        self.latest = snapshot
        self.samples += 1
        self.history.append(
            Point(
                snapshot.at,
                snapshot.sessions_active,
                snapshot.users_online,
                snapshot.messages_in_per_s,
                snapshot.messages_out_per_s,
            )
        )
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    async def sample(self) -> Snapshot:
        s = self.settings
        worker_ids = s.worker_ids()
        health_calls = [self.control.worker_health(w) for w in worker_ids]
        totals_task = asyncio.ensure_future(self._totals())
        view_task = asyncio.ensure_future(asyncio.to_thread(patroni.cluster_view, s, 0.5))
        states_task = asyncio.ensure_future(asyncio.to_thread(self._server_states))
        restarts_task = asyncio.ensure_future(
            asyncio.to_thread(runstate.read_restarts, self.layout)
        )
        healths = await asyncio.gather(*health_calls)
        totals = await totals_task
        view = await view_task
        states = await states_task
        restarts = await restarts_task
        now = time.time()
        problems: list[str] = []
        if totals is None:
            problems.append("the database does not answer")
        if view is None:
            problems.append("no Patroni REST API answers")
        if states is None:
            problems.append("HAProxy's runtime API does not answer")

        counters = self._counters
        elapsed = now - counters.at if counters.at else 0.0
        by_haproxy = {(b.backend, b.server): b for b in (states or []) if b.backend == "workers"}
        records = {w.id: w for w in totals.workers} if totals else {}
        workers = []
        delivered_total = 0
        new_per_worker: dict[str, int] = {}
        for wid, (status, body) in zip(worker_ids, healths, strict=True):
            through = int(body.get("messages_stored", 0)) + int(body.get("delivered", 0))
            delivered_total += int(body.get("delivered", 0))
            new_per_worker[wid] = through
            db = totals.by_worker.get(wid) if totals else None
            record = records.get(wid)
            backend = by_haproxy.get(("workers", wid))
            lease_age = body.get("lease_age_s")
            lag = body.get("loop_lag_ms")
            workers.append(
                WorkerView(
                    id=wid,
                    http_status=status,
                    state=str(body.get("state") or (record.state if record else "down")),
                    healthy=status == 200,
                    sessions=_int_or_none(body.get("sessions")),
                    connections=_int_or_none(body.get("connections")),
                    db_active=db.active if db else 0,
                    db_detached=db.detached if db else 0,
                    lease_age_s=float(lease_age) if isinstance(lease_age, int | float) else None,
                    haproxy=backend.status if backend else "?",
                    pid=_int_or_none(body.get("pid")) or (record.pid if record else None),
                    messages_per_s=(
                        _rate(through, counters.per_worker.get(wid), elapsed) if status else 0.0
                    ),
                    loop_lag_ms=float(lag) if isinstance(lag, int | float) else None,
                    shedding=str(body.get("shedding") or ""),
                    weight=_int_or_none(body.get("agent_weight")),
                    queued=_sum_or_none(body.get("queues")),
                    shed=_sum_or_none(body.get("shed", body.get("overloaded"))),
                )
            )
        msg_in = _rate(totals.last_message_id, counters.last_message_id, elapsed) if totals else 0.0
        msg_out = _rate(delivered_total, counters.delivered, elapsed)
        self._counters = _Counters(
            at=now,
            last_message_id=totals.last_message_id if totals else None,
            delivered=delivered_total,
            per_worker=new_per_worker,
        )
        return Snapshot(
            at=now,
            db_ok=totals is not None,
            sessions_active=totals.active if totals else 0,
            sessions_detached=totals.detached if totals else 0,
            users_online=totals.users_online if totals else 0,
            messages_in_per_s=msg_in,
            messages_out_per_s=msg_out,
            workers=tuple(workers),
            members=tuple(
                MemberView(m.name, m.role, m.state, m.timeline, m.lag)
                for m in (view.members if view else ())
            ),
            backends=tuple(
                BackendView(b.backend, b.server, b.status, b.sessions) for b in (states or [])
            ),
            problems=tuple(problems),
            restarts=tuple(restarts.values()),
        )

    async def _totals(self) -> store.LiveTotals | None:
        """The database's figures. Counting the sessions scans every live one, so it is
        repeated only after ``COUNT_COST_FACTOR`` times what it last took: each tick on
        a small cluster, every ~4 s at 200,000 sessions, never more than ~2 % of a
        database core whether anyone watches or not."""
        started = time.monotonic()
        recount = self._counted is None or started >= self._recount_at
        try:
            totals = await asyncio.wait_for(
                store.live_totals(self.pool, None if recount else self._counted), 2.0
            )
        except DB_ERRORS as exc:
            log.warning("sample_db_failed", error=type(exc).__name__)
            return None
        if recount:
            self._counted = totals
            self._recount_at = started + COUNT_COST_FACTOR * (time.monotonic() - started)
        return totals

    def _server_states(self) -> list[haproxy.ServerState] | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return haproxy.server_states(self.layout)
        return None


def _sum_or_none(value: object) -> int | None:
    """A count, or the sum of a {kind: count} mapping (per-kind queues and refusals)."""
    if isinstance(value, dict):
        return sum(int(v) for v in value.values() if isinstance(v, int))
    return _int_or_none(value)


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
