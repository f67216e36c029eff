"""`switchboard up` / `down` on their own cluster: refusals, failures, and no leftovers."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from app.cluster.errors import AlreadyRunning, ComponentFailed
from app.cluster.launcher import LocalCluster
from tests.cluster_fixture import cluster_processes, make_settings


def test_up_twice_status_logs_and_down_leaves_nothing() -> None:
    settings = make_settings(workers=1)
    cluster = LocalCluster(settings)
    try:
        cluster.up()
        assert cluster_processes(settings)
        with pytest.raises(AlreadyRunning, match="already running"):
            LocalCluster(settings).up()
        assert any("worker_serving" in line for line in cluster.log_tail("w1", 50))
        assert all(row.healthy for row in cluster.status())
    finally:
        cluster.down(purge=True)
    assert cluster_processes(settings) == []


def test_a_taken_port_fails_with_one_line_and_starts_nothing() -> None:
    settings = make_settings(workers=1)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind((settings.host, settings.db_primary_port))
        blocker.listen()
        with pytest.raises(ComponentFailed) as info:
            LocalCluster(settings).up()
    message = str(info.value)
    assert "\n" not in message
    assert f"db_primary_port {settings.db_primary_port}" in message
    assert cluster_processes(settings) == []
    LocalCluster(settings).down(purge=True)


def test_a_component_that_dies_stops_those_already_started() -> None:
    # HAProxy "starts" but exits at once: etcd and the Patroni nodes are already running.
    settings = make_settings(workers=1, haproxy_bin="false")
    with pytest.raises(ComponentFailed) as info:
        LocalCluster(settings).up()
    assert "haproxy exited" in str(info.value)
    assert cluster_processes(settings) == []
    LocalCluster(settings).down(purge=True)


def test_cli_reports_errors_in_one_line() -> None:
    settings = make_settings(workers=1, etcd_bin="no-such-etcd")
    env_args = ["--state-dir", str(settings.state_dir)]
    result = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "up", *env_args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"SWITCHBOARD_ETCD_BIN": "no-such-etcd", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "no-such-etcd not found" in result.stderr
    assert "Traceback" not in result.stderr
    LocalCluster(settings).down(purge=True)
