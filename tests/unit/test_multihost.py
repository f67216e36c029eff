"""Many hosts (hosts_net): where each component goes, and the configs that follow.

The namespaces themselves, keepalived and the faults are exercised on the real thing
by tests/multihost (``make multihost-test``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cluster import etcd, haproxy, keepalived, patroni
from app.cluster.layout import Layout
from app.settings import Settings, SettingsError

NET = "10.77.0.0/24"


def multihost(tmp_path: Path, **overrides: object) -> tuple[Settings, Layout]:
    settings = Settings(state_dir=tmp_path / "state", hosts_net=NET, **overrides)  # type: ignore[arg-type]
    return settings, Layout.for_settings(settings)


def test_each_component_has_a_host_and_its_address(tmp_path: Path) -> None:
    s, _ = multihost(tmp_path, workers=4)
    assert s.hosts() == {
        "lb1": "10.77.0.11",
        "lb2": "10.77.0.12",
        "app1": "10.77.0.21",
        "app2": "10.77.0.22",
        "app3": "10.77.0.23",
        "db1": "10.77.0.31",
        "db2": "10.77.0.32",
        "db3": "10.77.0.33",
        "client": "10.77.0.100",
    }
    assert s.vip() == "10.77.0.10" and s.bridge_address() == "10.77.0.1"
    placed = {name: s.host_of(name) for name in ("haproxy", "haproxy2", "keepalived2", "dashboard")}
    assert placed == {"haproxy": "lb1", "haproxy2": "lb2", "keepalived2": "lb2", "dashboard": "lb1"}
    # Workers spread over the worker hosts; the fourth shares the first one's host.
    assert [s.host_of(w) for w in s.worker_ids()] == ["app1", "app2", "app3", "app1"]
    assert [s.host_of(n) for n in s.node_names()] == ["db1", "db2", "db3"]
    assert s.etcd_names() == ["etcd1", "etcd2", "etcd3"]
    assert [s.address_of(e) for e in s.etcd_names()] == ["10.77.0.31", "10.77.0.32", "10.77.0.33"]
    assert s.host_of("supervisor") is None and s.address_of("supervisor") == s.host
    assert s.netns_of("w2") == "sb-app2"
    # Workers and tools reach the database and the client ports through the virtual IP.
    assert s.db_address() == s.client_address() == s.public_bind_host() == "10.77.0.10"


def test_one_host_is_unchanged(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path)
    assert s.hosts() == {} and s.etcd_names() == ["etcd"]
    assert s.host_of("w1") is None and s.address_of("n2") == s.db_address() == s.host


@pytest.mark.parametrize(
    "overrides",
    [
        {"hosts_net": "10.77.0.0/25"},  # too small for the plan's addresses
        {"hosts_net": "8.8.8.0/24"},  # not private
        {"hosts_net": "nonsense"},
        {"hosts_net": NET, "haproxy_processes": 3},
        {"hosts_net": NET, "worker_hosts": 0},
    ],
)
def test_unusable_host_settings_are_refused(tmp_path: Path, overrides: dict[str, object]) -> None:
    with pytest.raises(SettingsError):
        Settings(state_dir=tmp_path, **overrides)  # type: ignore[arg-type]


def test_balancers_route_to_each_hosts_address_and_bind_the_virtual_ip(tmp_path: Path) -> None:
    s, layout = multihost(tmp_path, allow_plaintext_public=True)
    for name, own in (("haproxy", "10.77.0.11"), ("haproxy2", "10.77.0.12")):
        text = haproxy.render(s, layout, name)
        # Both balancers carry the whole config: client, database, dashboard, stats.
        for bind in ("10.77.0.10:5222", "10.77.0.10:5223", "10.77.0.10:5000"):
            assert f"bind {bind}" in text, (name, bind)
        assert f"bind {own}:{s.haproxy_stats_port}" in text
        assert "server w2 10.77.0.22:7002 send-proxy-v2" in text
        assert "server n3 10.77.0.33:15434 check port 8010" in text
        assert "server dashboard 10.77.0.11:8081" in text
    # Workers take PROXY headers from either balancer.
    nets = {str(n) for n in s.replace(host="10.77.0.21").proxy_networks()}
    assert {"10.77.0.11/32", "10.77.0.12/32"} <= nets


def test_database_hosts_admit_the_hosts_network_and_know_every_etcd_member(
    tmp_path: Path,
) -> None:
    s, layout = multihost(tmp_path)
    secrets = {name: "x" for name in ("superuser", "replication", "rewind", "patroni")}
    config = json.loads(patroni.node_config(s, layout, "n2", secrets))
    assert config["postgresql"]["listen"] == "10.77.0.32:15433"
    assert config["restapi"]["connect_address"] == "10.77.0.32:8009"
    assert all(NET in line for line in config["postgresql"]["pg_hba"][1:])
    assert config["etcd3"]["hosts"] == "10.77.0.31:2379,10.77.0.32:2379,10.77.0.33:2379"
    args = etcd.argv(s, layout, "etcd2")
    assert "--listen-client-urls=http://10.77.0.32:2379" in args
    assert (
        "--initial-cluster=etcd1=http://10.77.0.31:2380,etcd2=http://10.77.0.32:2380,"
        "etcd3=http://10.77.0.33:2380"
    ) in args
    assert f"--data-dir={layout.etcd_data / 'etcd2'}" in args


def test_keepalived_pair_shares_the_virtual_ip_without_preempting(tmp_path: Path) -> None:
    s, layout = multihost(tmp_path)
    first, second = (keepalived.config(s, layout, n) for n in keepalived.names())
    for text in (first, second):
        assert "state BACKUP" in text and "nopreempt" in text
        assert "10.77.0.10/24 dev eth0" in text and "track_script" in text
    assert "priority 150" in first and "priority 100" in second
    assert "/dev/tcp/10.77.0.12/8404" in keepalived.check_script_text(s, "keepalived2")


def test_a_balancer_taking_the_virtual_ip_over_forgets_its_closed_connections(
    tmp_path: Path,
) -> None:
    s, layout = multihost(tmp_path)
    for name in keepalived.names():
        script = keepalived.master_script(layout, name)
        assert f'notify_master "{script}"' in keepalived.config(s, layout, name)
    text = keepalived.master_script_text(s)
    assert "ss -K -t -n state fin-wait-1 " in text and "state time-wait src 10.77.0.10" in text
    assert "established" not in text
