"""Prometheus /metrics on the workers and the dashboard, read with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import functools
import ssl
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.cluster.health import http_json
from app.cluster.launcher import LocalCluster
from app.worker.metrics import LOOP_PROBE_S
from tests.integration.helpers import login, new_user

Metrics = dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]


def _scrape(url: str) -> Metrics:
    """{family: {(sample name, labels): value}} of one /metrics page."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(url: str) -> Metrics:
    return await asyncio.to_thread(_scrape, url)


def value(metrics: Metrics, family: str, sample: str | None = None, **labels: str) -> float:
    key = (sample or family, tuple(sorted(labels.items())))
    return metrics.get(family, {}).get(key, 0.0)


async def test_worker_metrics_parse_and_count(cluster: LocalCluster) -> None:
    s = cluster.settings
    urls = [f"http://{s.host}:{s.worker_health_port(w)}/metrics" for w in s.worker_ids()]
    before = await asyncio.gather(*(scrape(url) for url in urls))
    for family in (
        "switchboard_connections",
        "switchboard_sessions",
        "switchboard_logins",
        "switchboard_messages_in",
        "switchboard_messages_out",
        "switchboard_delivery_latency_seconds",
        "switchboard_store_batch_seconds",
        "switchboard_db_pool_connections",
        "switchboard_db_pool_max",
        "switchboard_errors",
        "switchboard_worker_state",
        "switchboard_lease_age_seconds",
        "switchboard_event_loop_lag_seconds",
        "switchboard_gc_pause_seconds",
        "switchboard_events_dropped",
        "process_resident_memory_bytes",
    ):
        assert all(family in m for m in before), family
    dropped = "switchboard_events_dropped"
    assert all(value(m, dropped, dropped + "_total") == 0.0 for m in before)
    assert all(value(m, "switchboard_worker_state", state="serving") == 1.0 for m in before)
    for worker in s.worker_ids():
        code, health = await asyncio.to_thread(
            http_json, f"http://{s.host}:{s.worker_health_port(worker)}/health"
        )
        assert code == 200 and isinstance(health["loop_lag_ms"], int | float), health
        assert 0 <= health["loop_lag_ms"] < 60_000
    assert all(value(m, "switchboard_db_pool_max") == s.db_pool_max for m in before)

    alice, bob = new_user("ma"), new_user("mb")
    a, _ = await login(cluster, alice)
    b, _ = await login(cluster, bob)
    try:
        sent = await a.request({"op": "send", "to": bob, "body": "hi", "cmid": "m1"})
        assert sent["op"] == "sent"
        await b.recv_until("msg")
        bad = await a.request({"op": "history", "with": "nobody-" + alice})
        assert bad["code"] == "not_found"
        await asyncio.sleep(2 * LOOP_PROBE_S)  # every worker's loop probe fires meanwhile
        after = await asyncio.gather(*(scrape(url) for url in urls))
    finally:
        await a.close()
        await b.close()

    def total(scrapes: list[Metrics], family: str, sample: str, **labels: str) -> float:
        return sum(value(m, family, sample, **labels) for m in scrapes)

    def grew(family: str, sample: str, by: float = 1, **labels: str) -> None:
        old, new = total(before, family, sample, **labels), total(after, family, sample, **labels)
        assert new >= old + by, (family, labels, old, new)

    # Summed over the workers: HAProxy decides where each client lands.
    grew("switchboard_logins", "switchboard_logins_total", by=2, result="ok")
    grew("switchboard_messages_in", "switchboard_messages_in_total")
    grew("switchboard_messages_out", "switchboard_messages_out_total")
    grew("switchboard_errors", "switchboard_errors_total", code="not_found")
    grew("switchboard_delivery_latency_seconds", "switchboard_delivery_latency_seconds_count")
    grew("switchboard_store_batch_seconds", "switchboard_store_batch_seconds_count")
    grew(
        "switchboard_event_loop_lag_seconds",
        "switchboard_event_loop_lag_seconds_count",
        by=len(urls),
    )
    assert total(after, "switchboard_sessions", "switchboard_sessions") >= 2
    assert total(after, "switchboard_connections", "switchboard_connections") >= 2


async def test_dashboard_metrics_parse(cluster: LocalCluster) -> None:
    s = cluster.settings
    metrics = await scrape(f"http://{s.host}:{s.dashboard_app_port()}/metrics")
    for family in (
        "switchboard_dashboard_requests",
        "switchboard_dashboard_logins",
        "switchboard_dashboard_live_streams",
        "switchboard_dashboard_sample_seconds",
        "switchboard_db_pool_connections",
        "switchboard_cluster_sessions_active",
        "switchboard_cluster_workers_serving",
        "switchboard_cluster_db_up",
    ):
        assert family in metrics, family
    assert value(metrics, "switchboard_cluster_db_up") == 1.0
    assert value(metrics, "switchboard_cluster_workers_serving") == s.workers
    # The public port (HAProxy) serves the pages, not the metrics, however spelled (L3).
    # It serves them over TLS, with the cluster's own CA.
    context = ssl.create_default_context(cafile=s.tls_ca_file())
    for path in ("/metrics", "/%6Detrics", "/metrics/", "/%6detrics?x=1"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(
                functools.partial(urllib.request.urlopen, context=context),
                f"https://{s.host}:{s.dashboard_port}{path}",
                None,
                5,
            )
        assert refused.value.code == 403, path
        refused.value.close()
