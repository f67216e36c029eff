"""The benchmark's stall timeline (bench/_stalls.py) reads what it needs from the
cluster's own files: the workers' health ports from haproxy.cfg, and checkpoints and
autovacuum runs from the PostgreSQL nodes' logs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from bench._common import metrics_ports
from bench._stalls import Second, db_events


def test_worker_metrics_ports_come_from_the_running_haproxy_config(tmp_path: Path) -> None:
    (tmp_path / "haproxy.cfg").write_text(
        "backend workers\n"
        "    server w1 127.0.0.1:7201 send-proxy-v2 check port 7211 agent-check agent-port"
        " 7221 agent-inter 1000\n"
        "    server w2 127.0.0.1:7202 send-proxy-v2 check port 7212 agent-check agent-port"
        " 7222 agent-inter 1000\n"
        "backend ws_workers\n"
        "    server w1 127.0.0.1:7301 check port 7211 agent-check agent-port 7221\n"
    )
    assert metrics_ports(tmp_path) == {"w1": 7211, "w2": 7212}


def test_checkpoints_and_autovacuum_runs_are_read_from_the_node_logs(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "n1.log").write_text(
        "2026-12-06 23:20:01.100 UTC [41] LOG:  checkpoint starting: time\n"
        "2026-12-06 23:20:09.900 UTC [41] LOG:  checkpoint complete: wrote 1200 buffers\n"
        '2026-12-06 23:20:05.250 UTC [77] LOG:  automatic vacuum of table "sb.public.inbox":'
        " index scans: 1\n"
        '2026-12-06 23:30:00.000 UTC [78] LOG:  automatic analyze of table "sb.public.late"\n'
        "2026-12-06 23:20:02 patroni: INFO: no action. I am (n1), the leader with the lock\n"
    )
    (logs / "n2.log").write_text(
        '2026-12-06 23:20:05.300 UTC [90] LOG:  automatic analyze of table "sb.public.messages"\n'
    )
    (logs / "w1.log").write_text("2026-12-06 23:20:03.000 UTC checkpoint starting: not a node\n")
    since = datetime(2026, 12, 6, 23, 20, tzinfo=UTC).timestamp()
    events = db_events(tmp_path, since, since + 60)
    assert [(round(at - since, 2), what) for at, what in sorted(events)] == [
        (1.1, "n1 checkpoint starting"),
        (5.25, "n1 autovacuum of table inbox"),
        (5.3, "n2 autoanalyze of table messages"),
        (9.9, "n1 checkpoint complete"),
    ]


def test_a_second_prints_its_suspects() -> None:
    second = Second(disk_mb=52.4, burst_mb=50.1, gc_ms=15.0, late_probes=2)
    second.busy_pct, second.busiest_pct = 131.0, 198.0
    second.cpu.update({"workers": 48.0, "postgres": 51.0})
    second.db_events["n1 checkpoint starting"] += 1
    second.db_events["n2 autovacuum of table inbox"] += 2
    assert second.format(["workers", "postgres"]) == (
        "  52.4   50.1   15.0     2 |  131  198  48  51"
        "  n1 checkpoint starting, n2 autovacuum of table inbox x2"
    )
