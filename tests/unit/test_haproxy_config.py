"""The edge as HAProxy's rendered configs say it, local (`switchboard up`) and compose
(compose/images/haproxy_render.py, which no Docker engine here runs): both from the
same template, with the same directives, and both accepted by ``haproxy -c``."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from app.cluster import haproxy, tls
from app.cluster.layout import Layout
from app.settings import Settings, SettingsError
from tests.compose_images import compose_image_module


def compose_renderer() -> ModuleType:
    return compose_image_module("haproxy_render")


def local_config(tmp_path: Path, **settings: object) -> str:
    s = Settings(state_dir=tmp_path, **settings)  # type: ignore[arg-type]
    return haproxy.render(s, Layout.for_settings(s))


def compose_config() -> str:
    text: str = compose_renderer().render(haproxy.TEMPLATE.read_text())
    return text


def server_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"\s*server(-template)?\s", line)]


def section(config: str, header: str) -> str:
    start = config.index("\n" + header + "\n") + 1
    end = config.find("\n\n", start)
    return config[start : end if end > 0 else None]


@pytest.mark.parametrize("which", ["local", "compose"])
def test_only_client_connections_carry_a_proxy_header(tmp_path: Path, which: str) -> None:
    config = local_config(tmp_path) if which == "local" else compose_config()
    servers = [line for line in config.splitlines() if re.match(r"\s*server(-template)?\s", line)]
    workers = server_lines(section(config, "backend workers"))
    assert workers and all("send-proxy-v2" in line for line in workers)
    # Health checks go to the health port: HAProxy sends them no header.
    assert all(" check port " in line and "check-send-proxy" not in line for line in workers)
    assert all("send-proxy" not in line for line in servers if line not in workers)


@pytest.mark.parametrize("which", ["local", "compose"])
def test_websockets_reach_the_same_workers_with_the_client_address(
    tmp_path: Path, which: str
) -> None:
    """The ws_workers backend: the workers' WebSocket ports with the checks, agent and
    weights of `workers`; the client's address in headers HAProxy sets itself."""
    config = local_config(tmp_path) if which == "local" else compose_config()
    tcp, ws = section(config, "backend workers"), section(config, "backend ws_workers")
    tcp_servers, ws_servers = server_lines(tcp), server_lines(ws)
    assert ws_servers and len(ws_servers) == len(tcp_servers)
    for tcp_line, ws_line in zip(tcp_servers, ws_servers, strict=True):
        assert "send-proxy" not in ws_line and ":73" in ws_line
        # The same health port, agent and interval as the TCP server of that worker.
        assert tcp_line.split(" check port ")[1] == ws_line.split(" check port ")[1]
    assert "default-server weight 100 " in ws and "timeout tunnel 120000ms" in ws
    front = section(config, "frontend websockets")
    assert "http-request set-header X-Forwarded-For %[src]" in front
    assert "http-request set-header X-Forwarded-Source-Port %[src_port]" in front
    assert "track-sc0 src,ipmask(32,64) table clients unless conn_cap_exempt" in front
    assert re.search(r"bind \S*:5281 .*ssl crt ", front)
    assert re.search(r"bind 127\.0\.0\.1:5280 ", front)


@pytest.mark.parametrize("which", ["local", "compose"])
def test_workers_have_room_for_the_agents_weights(tmp_path: Path, which: str) -> None:
    """A lagging worker's agent answers e.g. `ready 10%`: of the default weight 1 that
    is 0, no new clients at all. With weight 100 it is 10."""
    config = local_config(tmp_path) if which == "local" else compose_config()
    workers = section(config, "backend workers")
    assert "default-server weight 100 " in workers
    assert "timeout check 2s" in workers  # a busy worker answers its check late


@pytest.mark.parametrize("which", ["local", "compose"])
def test_timeouts_keepalive_and_caps_on_the_client_port(tmp_path: Path, which: str) -> None:
    config = local_config(tmp_path) if which == "local" else compose_config()
    clients = section(config, "frontend clients")
    for directive in (
        "tcp-ut 90s",
        "timeout client 120000ms",
        "option clitcpka",
        "clitcpka-idle 60s",
        "clitcpka-intvl 10s",
        "clitcpka-cnt 3",
        "stick-table type ipv6 size 1m expire 60s store conn_cur,conn_rate(10s)",
        "acl conn_cap_exempt src -- 127.0.0.1/32 ::1/128",
        "tcp-request connection track-sc0 src,ipmask(32,64) unless conn_cap_exempt",
        "tcp-request connection reject if { sc0_conn_cur gt 50 } || { sc0_conn_rate gt 100 }",
    ):
        assert directive in clients, directive
    assert "timeout server 120000ms" in section(config, "backend workers")
    # The database ports keep the long defaults: idle LISTEN connections must survive.
    assert "timeout client 30m" in section(config, "defaults")


KEEPALIVE = ("option srvtcpka", "srvtcpka-idle 5s", "srvtcpka-intvl 1s", "srvtcpka-cnt 3")


@pytest.mark.parametrize("how", [{"backend_keepalive": True}, {"hosts_net": "10.77.0.0/24"}])
def test_keepalive_towards_the_workers_cuts_a_dead_hosts_clients(
    tmp_path: Path, how: dict[str, object]
) -> None:
    """A worker host that died sends no FIN: HAProxy's probes end its connections (8 s),
    where workers run on other hosts (hosts_net) or backend_keepalive says so."""
    config = local_config(tmp_path, **how)
    for backend in ("backend workers", "backend ws_workers"):
        text = section(config, backend)
        for directive in KEEPALIVE:
            assert directive in text, (backend, directive)
        servers = server_lines(text)
        assert servers and all(
            line.endswith(" tcp-ut 8s") or " tcp-ut 8s " in line for line in servers
        )
    tuned = local_config(tmp_path, backend_keepalive_idle_s=9, backend_keepalive_count=2, **how)
    assert "srvtcpka-idle 9s" in section(tuned, "backend workers")
    assert "srvtcpka-cnt 2" in section(tuned, "backend ws_workers")
    assert "tcp-ut 11s" in section(tuned, "backend ws_workers")


@pytest.mark.parametrize("which", ["local", "compose"])
def test_no_probes_towards_workers_on_the_same_host(tmp_path: Path, which: str) -> None:
    """On one host a dead worker's kernel closes its connections; probes would only add
    a packet and its answer per idle connection every 5 s (and, past tcp-ut, drop live
    workers' clients when the box is too busy to answer in time)."""
    config = local_config(tmp_path) if which == "local" else compose_config()
    for backend in ("backend workers", "backend ws_workers"):
        text = section(config, backend)
        assert "srvtcpka" not in text.replace("no srvtcpka", ""), backend
        assert not any("tcp-ut" in line for line in server_lines(text)), backend


def test_settings_reach_the_local_config(tmp_path: Path) -> None:
    config = local_config(
        tmp_path,
        idle_timeout_s=4.5,
        tcp_keepalive_idle_s=30,
        tcp_keepalive_interval_s=5,
        tcp_keepalive_count=2,
        max_conns_per_addr=7,
        max_conn_rate_per_addr=9,
        conn_rate_period_s=45,
        conn_cap_exempt_addrs="",
    )
    clients = section(config, "frontend clients")
    assert "timeout client 34500ms" in clients
    assert "tcp-ut 40s" in clients and "clitcpka-cnt 2" in clients
    assert "expire 90s store conn_cur,conn_rate(45s)" in clients
    assert "acl conn_cap_exempt src -- \n" in clients + "\n"  # nobody exempt
    assert "sc0_conn_cur gt 7 } || { sc0_conn_rate gt 9 }" in clients


@pytest.mark.parametrize("which", ["local", "compose"])
def test_haproxy_accepts_the_config(tmp_path: Path, which: str) -> None:
    # The PEM the TLS binds load (compose's comes from the certs service's volume).
    pem = tls.ensure_certificates(Settings(state_dir=tmp_path)).haproxy_pem
    config = local_config(tmp_path) if which == "local" else compose_config()
    config = config.replace("/etc/switchboard/tls/haproxy.pem", str(pem))
    # The runtime API socket must be somewhere writable for the check.
    config = re.sub(r"stats socket \S+", f"stats socket {tmp_path}/admin.sock", config)
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    check = subprocess.run(
        [Settings().haproxy_bin, "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "[WARNING]" not in check.stdout + check.stderr, check.stdout + check.stderr


def test_client_accept_rate_is_split_over_the_haproxy_processes(tmp_path: Path) -> None:
    """client_accept_rate limits new client connections on every client port, each
    process taking its share; 0 (the default) sets no limit."""
    assert "rate-limit sessions" not in local_config(tmp_path / "off").replace(
        "# no rate-limit sessions", ""
    )
    s = Settings(state_dir=tmp_path, client_accept_rate=1000, haproxy_processes=3)
    config = haproxy.render(s, Layout.for_settings(s), s.haproxy_names()[1])
    for frontend in ("frontend clients", "frontend websockets"):
        assert "    rate-limit sessions 334\n" in section(config, frontend) + "\n"
    assert config.count("rate-limit sessions") == 2  # not the database's ports
    with pytest.raises(SettingsError):
        Settings(client_accept_rate=-1)


def test_check_intervals_stretch_past_four_haproxy_processes(tmp_path: Path) -> None:
    """Every HAProxy process checks every worker: up to 4 processes at 1 s, past that
    the health and agent intervals grow with the count, so a worker answers about the
    same number of checks however many processes share the client port."""
    for processes, inter in ((2, "1000ms"), (4, "1000ms"), (25, "6250ms")):
        s = Settings(state_dir=tmp_path / str(processes), haproxy_processes=processes)
        for name in s.haproxy_names()[:2]:
            config = haproxy.render(s, Layout.for_settings(s), name)
            assert f"inter {inter} fastinter 250ms" in config
            servers = [line for line in config.splitlines() if line.startswith("    server w")]
            assert servers
            assert all(f"agent-inter {inter}" in line for line in servers)
    assert Settings(haproxy_processes=25).effective_agent_interval_s() == 6.25


@pytest.mark.parametrize("which", ["local", "compose"])
def test_a_failed_connection_makes_the_next_check_decide(tmp_path: Path, which: str) -> None:
    """observe layer4 with on-error sudden-death: a killed worker's refused connection
    takes it out within one fastinter check; a connect that times out on a busy box no
    longer marks a live worker DOWN by itself (mark-down did, for every worker of some
    processes, in a 100,000-session storm)."""
    config = local_config(tmp_path) if which == "local" else compose_config()
    for backend in ("backend workers", "backend ws_workers"):
        text = section(config, backend)
        assert "observe layer4 error-limit 1 on-error sudden-death" in text, backend
        assert "fastinter 250ms" in text, backend
        assert "on-error mark-down" not in text, backend
