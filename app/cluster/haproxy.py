"""Render HAProxy's config from ``haproxy/haproxy.cfg.tmpl`` and query its state."""

from __future__ import annotations

import csv
import io
import socket
from dataclasses import dataclass
from pathlib import Path
from string import Template

from app.cluster.layout import Layout
from app.settings import Settings

TEMPLATE = Path(__file__).resolve().parents[2] / "haproxy" / "haproxy.cfg.tmpl"


def render(settings: Settings, layout: Layout) -> str:
    host = settings.host
    workers = "\n".join(
        f"    server {wid} {host}:{settings.worker_port(wid)} check port "
        f"{settings.worker_health_port(wid)} agent-check agent-port "
        f"{settings.worker_agent_port(wid)} agent-inter {int(settings.agent_interval_s * 1000)}ms"
        for wid in settings.worker_ids()
    )
    db = "\n".join(
        f"    server {node} {host}:{settings.pg_port(node)} check port "
        f"{settings.patroni_rest_port(node)}"
        for node in settings.node_names()
    )
    return Template(TEMPLATE.read_text()).substitute(
        generated_note=f"state dir {layout.root}",
        maxconn=9000,  # two descriptors per proxied connection, 20k open files per process
        stats_socket=layout.haproxy_socket,
        host=host,
        client_port=settings.client_port,
        db_primary_port=settings.db_primary_port,
        db_replica_port=settings.db_replica_port,
        haproxy_stats_port=settings.haproxy_stats_port,
        dashboard_port=settings.dashboard_port,
        dashboard_app_port=settings.dashboard_app_port(),
        # With a PEM (certificate + key), HAProxy serves the dashboard over TLS.
        dashboard_tls=(
            f" ssl crt {settings.dashboard_tls_pem}" if settings.dashboard_tls_pem else ""
        ),
        worker_servers=workers,
        primary_servers=db,
        replica_servers=db,
    )


@dataclass(frozen=True, slots=True)
class ServerState:
    backend: str
    server: str
    status: str  # UP, DOWN, MAINT, DRAIN, ...
    sessions: int


def runtime_command(layout: Layout, command: str, timeout: float = 2.0) -> str:
    """Send one command to HAProxy's runtime API over the stats socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(layout.haproxy_socket))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def server_states(layout: Layout) -> list[ServerState]:
    text = runtime_command(layout, "show stat").lstrip("# ")
    states = []
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("svname") in ("FRONTEND", "BACKEND", None):
            continue
        states.append(
            ServerState(row["pxname"], row["svname"], row["status"], int(row["scur"] or 0))
        )
    return states
