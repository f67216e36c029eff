"""Prometheus metrics of a worker process, served at ``/metrics`` on its health port.

What the worker already counts for ``/health`` (connections, sessions, messages
stored, frames delivered, resumes, slow readers, the DB pool) is read at scrape
time by `WorkerCollector`, so the hot path pays nothing for it. Only what has
no counter elsewhere is counted here, with module-level metrics the hooks in
``session.py``, ``connection.py``, ``delivery.py``, ``revoke.py`` and ``writer.py``
update: logins by result, revoked sessions, error frames by code, refused
connections, admission's refusals by kind and reason, delivery latency,
group-commit time, items a group commit refused.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

import asyncpg
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from app.worker.states import WorkerState

# One registry per process: a worker process runs one worker.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

LOGINS = Counter(
    "switchboard_logins",
    "Logins by result: ok or failed (hello), token_ok or token_failed (login_token).",
    ["result"],
    registry=REGISTRY,
)
REVOKED = Counter(
    "switchboard_sessions_revoked",
    "Connections ended because their session was revoked elsewhere, by how the worker"
    " found out (push, attach, recheck: the rows, after a missed push) and how it ended"
    " (kicked, replaced, fenced).",
    ["found", "end"],
    registry=REGISTRY,
)
RECHECKS = Counter(
    "switchboard_session_rechecks",
    "Rechecks of this worker's session rows, by what started them: the timer, or the"
    " listener's (re)connect.",
    ["trigger"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "switchboard_errors",
    "Error frames sent to clients, by protocol error code.",
    ["code"],
    registry=REGISTRY,
)
BATCH_ITEMS_REJECTED = Counter(
    "switchboard_batch_items_rejected",
    "Group-commit items the database refused for good (the rest of their batch committed).",
    ["batcher"],
    registry=REGISTRY,
)
ADMISSION_SHED = Counter(
    "switchboard_admission_shed",
    "Requests admission control answered `overloaded`, by kind of work (resume, token,"
    " login, register) and reason (queue_full, deadline, lagging).",
    ["work", "reason"],
    registry=REGISTRY,
)
PROXY_REFUSED = Counter(
    "switchboard_proxy_refused",
    "Connections refused before the protocol: not from HAProxy (untrusted_source) "
    "or without a valid PROXY v2 header (the other reasons).",
    ["reason"],
    registry=REGISTRY,
)


class LeanHistogram(Collector):
    """A histogram for the per-message hot path: a bisect and two additions.

    prometheus_client's Histogram takes a lock and walks every bucket on each
    observation, which showed up in worker profiles at thousands of deliveries
    per second. A worker is one thread on one event loop, so plain counters
    suffice; cumulative buckets are built only at scrape time.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, value: float, count: int) -> None:
        """``count`` observations of the same value: a batch's messages share a commit."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.total += value * count

    def collect(self) -> Iterator[HistogramMetricFamily]:
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), float(running)))  # type: ignore[no-untyped-call]
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, sum_value=self.total)
        yield family


DELIVERY_LATENCY = LeanHistogram(
    "switchboard_delivery_latency_seconds",
    "From a message's commit to its write on a recipient's connection "
    "(replays to a device that was offline count their whole wait).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0),
)
REGISTRY.register(DELIVERY_LATENCY)
# How late the worker's event loop ran a timer due every LOOP_PROBE_S: whatever
# blocks the loop (a GC pass, a long callback, the process waiting for a CPU)
# delays every client of the worker by as much.
LOOP_PROBE_S = 0.05
LOOP_LAG = LeanHistogram(
    "switchboard_event_loop_lag_seconds",
    f"How late the event loop ran a timer due every {LOOP_PROBE_S} s.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
REGISTRY.register(LOOP_LAG)
GC_PAUSE = LeanHistogram(
    "switchboard_gc_pause_seconds",
    "Cyclic garbage-collector passes (they stop the event loop), by duration.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
REGISTRY.register(GC_PAUSE)
BATCH_SECONDS = Histogram(
    "switchboard_store_batch_seconds",
    "Time to commit one group-commit batch, retries included.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0),
    registry=REGISTRY,
)


class Tally:
    """A plain counter for what /health reports too (read at scrape time)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


SLOW_READERS = Tally()


class WorkerCollector(Collector):
    """Reads the worker's health report and DB pool at scrape time."""

    def __init__(self) -> None:
        self.report: Callable[[], dict[str, object]] | None = None
        self.pool: asyncpg.Pool | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self.report is None:
            return
        report = self.report()
        report = {
            **report,
            "loop_lag_s": _number(report.get("loop_lag_ms")) / 1000,
            "shedding_now": bool(report.get("shedding")),
        }
        state = GaugeMetricFamily(
            "switchboard_worker_state", "1 for the worker's current state.", labels=["state"]
        )
        for each in WorkerState:
            state.add_metric([each.value], 1.0 if report["state"] == each.value else 0.0)
        yield state
        gauges = {
            "switchboard_worker_healthy": ("1 while /health answers 200.", "healthy"),
            "switchboard_connections": ("Open client TCP connections.", "connections"),
            "switchboard_sessions": ("Logged-in sessions on this worker.", "sessions"),
            "switchboard_users": ("Distinct users logged in on this worker.", "users"),
            "switchboard_lease_age_seconds": (
                "Time since the worker last renewed its lease in PostgreSQL.",
                "lease_age_s",
            ),
            "switchboard_event_loop_lag_worst_seconds": (
                "The worst event-loop lag of the last 10-20 s (what status shows).",
                "loop_lag_s",
            ),
            "switchboard_agent_weight_percent": (
                "The weight the worker gives HAProxy's agent check (below 100 while it sheds).",
                "agent_weight",
            ),
            "switchboard_shedding": (
                "1 while the worker sheds load (event loop late, or requests refused overloaded).",
                "shedding_now",
            ),
            "switchboard_listener_up": (
                "1 while the LISTEN connection for inbox and push notifications is up.",
                "listening",
            ),
        }
        for name, (help_text, key) in gauges.items():
            yield GaugeMetricFamily(name, help_text, value=_number(report.get(key)))
        counters = {
            "switchboard_messages_in": ("Messages committed by this worker.", "messages_stored"),
            "switchboard_messages_out": ("Inbox entries written to connections.", "delivered"),
            "switchboard_store_batches": ("Group-commit statements committed.", "batches"),
            "switchboard_resumes": ("Sessions taken over with a resume token.", "resumes"),
            "switchboard_token_logins": ("Sessions opened with a device token.", "token_logins"),
            "switchboard_token_login_batches": (
                "Transactions that checked, rotated and opened a batch of device-token logins.",
                "token_login_batches",
            ),
            "switchboard_password_login_batches": (
                "Transactions that opened a batch of password logins (after argon2).",
                "password_login_batches",
            ),
            "switchboard_slow_readers": ("Connections dropped as slow readers.", "slow_readers"),
            "switchboard_overloaded": (
                "Logins, registrations and resumes refused by admission control.",
                "overloaded",
            ),
            "switchboard_events_dropped": (
                "Events the events log dropped (its buffer full, or a batch refused).",
                "events_dropped",
            ),
        }
        for name, (help_text, key) in counters.items():
            yield CounterMetricFamily(name, help_text, value=_number(report.get(key)))
        queues = report.get("queues")
        if isinstance(queues, dict):
            waiting = GaugeMetricFamily(
                "switchboard_admission_waiting",
                "Requests waiting for an admission slot, by kind of work.",
                labels=["work"],
            )
            for work, depth in queues.items():
                waiting.add_metric([work], _number(depth))
            yield waiting
        pool = self.pool
        if pool is not None:
            size, idle = pool.get_size(), pool.get_idle_size()
            conns = GaugeMetricFamily(
                "switchboard_db_pool_connections",
                "Connections of the worker's asyncpg pool, by state.",
                labels=["state"],
            )
            conns.add_metric(["busy"], float(size - idle))
            conns.add_metric(["idle"], float(idle))
            yield conns
            yield GaugeMetricFamily(
                "switchboard_db_pool_max", "The pool's maximum size.", value=pool.get_max_size()
            )


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


COLLECTOR = WorkerCollector()
REGISTRY.register(COLLECTOR)


def attach(report: Callable[[], dict[str, object]], pool: asyncpg.Pool) -> None:
    """Make /metrics describe this worker (the last one attached, in tests)."""
    COLLECTOR.report = report
    COLLECTOR.pool = pool


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class GcTimer:
    """A ``gc.callbacks`` hook that times each collection into GC_PAUSE."""

    def __init__(self) -> None:
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            GC_PAUSE.observe(time.perf_counter() - self._started)
            self._started = 0.0


def observe_delivery(created_at_epoch_s: float, now: float | None = None, count: int = 1) -> None:
    """``count`` deliveries of messages committed at ``created_at_epoch_s``: one call per
    commit time in a round of writes, not one per message."""
    DELIVERY_LATENCY.observe_many(
        max(0.0, (time.time() if now is None else now) - created_at_epoch_s), count
    )
