"""Prometheus metrics of the dashboard process (``/metrics`` on its app port).

Besides its own requests, logins and live streams, the dashboard exports the
cluster-wide numbers its sampler already aggregates (sessions, users online,
message rates, workers serving), so one scrape gives the whole picture.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    import asyncpg

    from app.dashboard.sampler import Sampler


class DashboardMetrics:
    """One registry per dashboard app (tests build several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "switchboard_dashboard_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "switchboard_dashboard_request_seconds",
            "Time to answer a request (live streams excluded).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.logins = Counter(
            "switchboard_dashboard_logins",
            "Admin logins by result: ok, failed, rate_limited.",
            ["result"],
            registry=self.registry,
        )
        self.actions = Counter(
            "switchboard_dashboard_actions",
            "Admin actions: drain, undrain, kick, disable, enable, switchover.",
            ["action", "result"],
            registry=self.registry,
        )
        self.live_streams = Gauge(
            "switchboard_dashboard_live_streams",
            "Open /live event streams.",
            registry=self.registry,
        )
        self.sample_seconds = Histogram(
            "switchboard_dashboard_sample_seconds",
            "Time to sample the cluster for the live view.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self._collector = _LiveCollector()
        self.registry.register(self._collector)

    def watch(self, sampler: Sampler, pool: asyncpg.Pool) -> None:
        self._collector.sampler = sampler
        self._collector.pool = pool

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LiveCollector(Collector):
    def __init__(self) -> None:
        self.sampler: Sampler | None = None
        self.pool: asyncpg.Pool | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.pool is not None:
            pool = self.pool
            conns = GaugeMetricFamily(
                "switchboard_db_pool_connections",
                "Connections of the dashboard's asyncpg pool, by state.",
                labels=["state"],
            )
            conns.add_metric(["busy"], float(pool.get_size() - pool.get_idle_size()))
            conns.add_metric(["idle"], float(pool.get_idle_size()))
            yield conns
        if self.sampler is None or not self.sampler.samples:
            return
        snap = self.sampler.latest
        cluster = {
            "switchboard_cluster_sessions_active": ("Active sessions, all workers.", "active"),
            "switchboard_cluster_sessions_detached": ("Detached (resumable) sessions.", "det"),
            "switchboard_cluster_users_online": ("Users with an active session.", "users"),
            "switchboard_cluster_messages_in_per_second": ("Messages stored per second.", "in"),
            "switchboard_cluster_messages_out_per_second": ("Inbox entries delivered/s.", "out"),
            "switchboard_cluster_workers_serving": ("Workers serving and healthy.", "serving"),
            "switchboard_cluster_db_up": ("1 while the dashboard reaches the primary.", "db"),
        }
        values = {
            "active": snap.sessions_active,
            "det": snap.sessions_detached,
            "users": snap.users_online,
            "in": snap.messages_in_per_s,
            "out": snap.messages_out_per_s,
            "serving": snap.workers_serving,
            "db": 1.0 if snap.db_ok else 0.0,
        }
        for name, (help_text, key) in cluster.items():
            yield GaugeMetricFamily(name, help_text, value=float(values[key]))
