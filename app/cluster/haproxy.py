"""Render HAProxy's config from ``haproxy/haproxy.cfg.tmpl`` and query its state."""

from __future__ import annotations

import csv
import io
import socket
from dataclasses import dataclass
from pathlib import Path
from string import Template

from app.cluster.errors import ComponentFailed
from app.cluster.layout import Layout
from app.settings import Settings

TEMPLATE = Path(__file__).resolve().parents[2] / "haproxy" / "haproxy.cfg.tmpl"
# Where the config of the processes after the first ends (see the template).
FIRST_PROCESS_ONLY = "# ---- first process only"
# Per process: two descriptors per proxied connection, 20k open files per process.
MAXCONN = 9000


def render(settings: Settings, layout: Layout, name: str = "haproxy") -> str:
    """The config of HAProxy process ``name``: ``haproxy`` serves everything; the
    others (haproxy2, ...) only the client port, which they bind together with it
    (SO_REUSEPORT, HAProxy's default), each with a runtime API socket of its own.
    On many hosts (``hosts_net``) ``haproxy`` runs on the first balancer host and
    ``haproxy2`` on the second, each with the full config on its own address: the
    client and database ports on the virtual IP, which only the active one holds.
    """
    if settings.multihost():
        return _render(settings.replace(host=settings.address_of(name)), layout, name)
    text = _render(settings, layout, name)
    if name != "haproxy":
        text = text[: text.index(FIRST_PROCESS_ONLY)]
    return text


def _render(settings: Settings, layout: Layout, name: str) -> str:
    host = settings.host
    at = settings.address_of
    # send-proxy-v2: each client connection opens with a PROXY header naming the
    # client (a worker refuses it without one). The health and agent checks go to
    # other ports and get none (HAProxy adds it to checks only without `port`).
    agent_inter = _ms(settings.effective_agent_interval_s())
    # tcp-ut: data a worker's host leaves unacknowledged this long ends the connection
    # (the template's srvtcpka does it for idle ones); with workers on other hosts only.
    checks = f"agent-inter {agent_inter}"
    if settings.backend_keepalive_on():
        checks += f" tcp-ut {settings.backend_user_timeout_s()}s"
    workers = "\n".join(
        f"    server {wid} {at(wid)}:{settings.worker_port(wid)} send-proxy-v2 check port "
        f"{settings.worker_health_port(wid)} agent-check agent-port "
        f"{settings.worker_agent_port(wid)} {checks}"
        for wid in settings.worker_ids()
    )
    # The same servers for WebSockets, on their worker_ws ports, without a PROXY
    # header: the client's address travels in X-Forwarded-For (the template).
    ws_workers = "\n".join(
        f"    server {wid} {at(wid)}:{settings.worker_ws_port(wid)} check port "
        f"{settings.worker_health_port(wid)} agent-check agent-port "
        f"{settings.worker_agent_port(wid)} {checks}"
        for wid in settings.worker_ids()
    )
    db = "\n".join(
        f"    server {node} {at(node)}:{settings.pg_port(node)} check port "
        f"{settings.patroni_rest_port(node)}"
        for node in settings.node_names()
    )
    return Template(TEMPLATE.read_text()).substitute(
        generated_note=f"state dir {layout.root}",
        maxconn=MAXCONN,
        stats_socket=layout.haproxy_socket_of(name),
        host=host,
        db_host=settings.db_address(),
        dashboard_app_host=at("dashboard"),
        client_plain_host=settings.plaintext_bind_host(),
        client_port=settings.client_port,
        # Every process binds the TLS port too (SO_REUSEPORT) and loads the PEM itself;
        # `switchboard tls reload` hands each one the new certificate.
        client_tls_bind=(
            f"    bind {settings.public_bind_host()}:{settings.client_tls_port} "
            f"tcp-ut {settings.tcp_user_timeout_s()}s ssl crt {layout.haproxy_pem} "
            "ssl-min-ver TLSv1.2"
        ),
        client_ws_host=settings.plaintext_bind_host(),
        client_ws_port=settings.client_ws_port,
        client_wss_bind=(
            f"    bind {settings.public_bind_host()}:{settings.client_wss_port} "
            f"tcp-ut {settings.tcp_user_timeout_s()}s ssl crt {layout.haproxy_pem} "
            "ssl-min-ver TLSv1.2 alpn http/1.1"
        ),
        ws_worker_servers=ws_workers,
        db_primary_port=settings.db_primary_port,
        db_replica_port=settings.db_replica_port,
        haproxy_stats_port=settings.haproxy_stats_port,
        dashboard_port=settings.dashboard_port,
        dashboard_app_port=settings.dashboard_app_port(),
        dashboard_tls=_dashboard_tls(settings, layout),
        worker_servers=workers,
        primary_servers=db,
        replica_servers=db,
        edge_timeout=_ms(settings.edge_timeout_s()),
        worker_check_inter=_ms(settings.health_check_interval_s()),
        tcp_user_timeout=f"{settings.tcp_user_timeout_s()}s",
        keepalive_idle=f"{settings.tcp_keepalive_idle_s}s",
        keepalive_interval=f"{settings.tcp_keepalive_interval_s}s",
        keepalive_count=settings.tcp_keepalive_count,
        backend_keepalive=backend_keepalive(settings),
        max_conns_per_addr=settings.max_conns_per_addr,
        max_conn_rate_per_addr=settings.max_conn_rate_per_addr,
        conn_rate_period=f"{settings.conn_rate_period_s}s",
        # Entries outlive the rate's period (an entry with open connections never expires).
        conn_table_expire=f"{max(60, 2 * settings.conn_rate_period_s)}s",
        conn_cap_exempt=" ".join(str(net) for net in settings.conn_cap_exempt_networks()),
        client_accept_rate=_accept_rate(settings),
    )


def backend_keepalive(settings: Settings) -> str:
    """The workers' backends' keepalive lines (``srvtcpka``), or a comment saying why
    there are none."""
    if not settings.backend_keepalive_on():
        return "    # no srvtcpka: the workers share this host (backend_keepalive off)"
    return (
        "    option srvtcpka\n"
        f"    srvtcpka-idle {settings.backend_keepalive_idle_s}s\n"
        f"    srvtcpka-intvl {settings.backend_keepalive_interval_s}s\n"
        f"    srvtcpka-cnt {settings.backend_keepalive_count}"
    )


def _accept_rate(settings: Settings) -> str:
    """The client frontends' ``rate-limit sessions`` line (client_accept_rate, this
    process's share of it), or nothing."""
    if not settings.client_accept_rate:
        return "    # no rate-limit sessions: client_accept_rate is 0"
    share = -(-settings.client_accept_rate // settings.haproxy_processes)
    return f"    rate-limit sessions {share}"


def _dashboard_tls(settings: Settings, layout: Layout) -> str:
    """The dashboard bind's TLS options: its own PEM, the client ports' one, or none."""
    if settings.dashboard_tls_pem:
        return f" ssl crt {settings.dashboard_tls_pem}"
    if settings.dashboard_tls:
        return f" ssl crt {layout.haproxy_pem}"
    return ""


def _ms(seconds: float) -> str:
    """A duration for HAProxy, in whole milliseconds."""
    return f"{round(seconds * 1000)}ms"


@dataclass(frozen=True, slots=True)
class ServerState:
    backend: str
    server: str
    status: str  # UP, DOWN, MAINT, DRAIN, ...
    sessions: int


def runtime_command(
    layout: Layout, command: str, timeout: float = 2.0, stats_socket: Path | None = None
) -> str:
    """Send one command to an HAProxy process's runtime API (the first one's by default)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(stats_socket or layout.haproxy_socket))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def runtime_command_all(layout: Layout, command: str, timeout: float = 2.0) -> list[str]:
    """Send one command to every running HAProxy process (e.g. ``set server ...``),
    so that they all route alike. An extra process that is gone is skipped; any
    other failure (and the first process gone) raises OSError."""
    return [
        reply
        for path in layout.haproxy_sockets()
        if (reply := _command_or_gone(layout, command, timeout, path)) is not None
    ]


def _command_or_gone(layout: Layout, command: str, timeout: float, path: Path) -> str | None:
    """The reply; None when an extra process is gone (its socket file refuses)."""
    try:
        return runtime_command(layout, command, timeout, stats_socket=path)
    except ConnectionRefusedError:
        if path == layout.haproxy_socket:
            raise
        return None


def push_certificate(layout: Layout, pem: Path, timeout: float = 5.0) -> int:
    """Hand every running HAProxy process the current content of ``pem`` (the path its
    config names after ``crt``) through the runtime API, without a restart: open
    connections keep their sessions, new handshakes get the new certificate. Returns
    how many processes took it; one that refuses raises ComponentFailed."""
    # The payload ends at the first empty line: the PEM has none inside.
    payload = "\n".join(line for line in pem.read_text().splitlines() if line.strip())
    taken = 0
    for path in layout.haproxy_sockets():
        reply = _command_or_gone(layout, f"set ssl cert {pem} <<\n{payload}\n", timeout, path)
        if reply is None:
            continue
        if "Transaction" not in reply:
            raise ComponentFailed(f"{path.stem}: set ssl cert: {reply.strip()}")
        reply = runtime_command(layout, f"commit ssl cert {pem}", timeout, stats_socket=path)
        if "Success!" not in reply:
            runtime_command(layout, f"abort ssl cert {pem}", timeout, stats_socket=path)
            raise ComponentFailed(f"{path.stem}: commit ssl cert: {reply.strip()}")
        taken += 1
    return taken


def server_states(layout: Layout) -> list[ServerState]:
    """Every server of every running HAProxy process, merged: sessions are summed over
    the processes; the status is the first process's unless another one disagrees, in
    which case the disagreeing (not UP) status wins, so "UP" means UP everywhere. A
    process that is gone is skipped; none answering raises ConnectionRefusedError."""
    merged: dict[tuple[str, str], ServerState] = {}
    paths = layout.haproxy_sockets() or [layout.haproxy_socket]
    answered = 0
    for path in paths:
        try:
            reply = runtime_command(layout, "show stat", 2.0, stats_socket=path)
        except ConnectionRefusedError:
            # A process that is gone (its socket file stays): the others still route.
            if answered == 0 and path == paths[-1]:
                raise
            continue
        answered += 1
        text = reply.lstrip("# ")
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("svname") in ("FRONTEND", "BACKEND", None):
                continue
            state = ServerState(row["pxname"], row["svname"], row["status"], int(row["scur"] or 0))
            key = (state.backend, state.server)
            seen = merged.get(key)
            if seen is None:
                merged[key] = state
                continue
            status = (
                seen.status if state.status == seen.status or seen.status != "UP" else state.status
            )
            merged[key] = ServerState(
                state.backend, state.server, status, seen.sessions + state.sessions
            )
    return list(merged.values())
