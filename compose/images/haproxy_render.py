"""Render HAProxy's config for compose from the local cluster's template.

The same ``haproxy/haproxy.cfg.tmpl`` as ``switchboard up`` uses, so timeouts, checks
and listeners stay identical; only the server lines differ. Instead of fixed
127.0.0.1 ports:

- workers are discovered through Docker's DNS (``server-template`` over the
  ``worker`` service name: every replica of ``docker compose up --scale worker=N``
  gets a slot, up to WORKER_SLOTS);
- the three Patroni nodes are addressed by service name (n1, n2, n3), resolved at
  run time, so HAProxy starts before them and follows a node that comes back with
  a new address.

Every container listens on the fixed container-side ports below.
Usage: python3 haproxy_render.py TEMPLATE > haproxy.cfg
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from string import Template

WORKER_SLOTS = 32
NODES = ("n1", "n2", "n3")
WORKER_PORT, WORKER_HEALTH_PORT, WORKER_AGENT_PORT = 7001, 7101, 7201
WORKER_WS_PORT = 7301
PG_PORT, PATRONI_REST_PORT = 5432, 8008
DNS = "resolvers docker resolve-prefer ipv4"
CLIENT_TLS_PORT = 5223
CLIENT_WSS_PORT = 5281
TLS_PEM = "/etc/switchboard/tls/haproxy.pem"

RESOLVERS = """
# Docker's embedded DNS: service names resolve to the current containers' addresses.
resolvers docker
    nameserver docker 127.0.0.11:53
    accepted_payload_size 8192
    resolve_retries 3
    timeout resolve 1s
    timeout retry 1s
    hold valid 1s
    hold other 1s
    hold refused 1s
    hold nx 1s
    hold timeout 1s
    hold obsolete 1s
"""


# Every ${placeholder} of the template, as compose needs it. A placeholder missing here
# fails the image build with its name: map it when the template grows one.
VALUES = {
    "generated_note": "rendered for docker compose by compose/images/haproxy_render.py",
    "maxconn": 9000,  # two descriptors per proxied connection, 20k open files per process
    "stats_socket": "/run/haproxy/admin.sock",
    "host": "",  # bind every address of the container; see fix_servers for server lines
    "db_host": "",  # the database ports too (workers reach them over the compose network)
    "dashboard_app_host": "",  # the server line names the service (fix_servers)
    "client_port": 5222,
    # Compose publishes the plaintext port as before; its TLS is the rest of issue #15.
    # Clients only over TLS (issue #15): the plaintext port listens on the container's
    # loopback, which no published port reaches; the TLS port on every address. The PEM
    # is the `certs` service's (volume `tls`, mounted read-only where TLS_PEM is).
    "client_plain_host": "127.0.0.1",
    "client_tls_bind": (
        f"    bind :{CLIENT_TLS_PORT} tcp-ut 90s ssl crt {TLS_PEM} ssl-min-ver TLSv1.2"
    ),
    # WebSockets as the client ports: ws:// on the container's loopback, wss:// on every
    # address with the same PEM.
    "client_ws_host": "127.0.0.1",
    "client_ws_port": 5280,
    "client_wss_bind": (
        f"    bind :{CLIENT_WSS_PORT} tcp-ut 90s ssl crt {TLS_PEM} ssl-min-ver TLSv1.2 "
        "alpn http/1.1"
    ),
    "db_primary_port": 5000,
    "db_replica_port": 5001,
    "haproxy_stats_port": 8404,
    "dashboard_port": 8080,
    "dashboard_app_port": 8081,
    "dashboard_tls": f" ssl crt {TLS_PEM}",
    # The edge, as app/settings.py's defaults: edge_timeout_s() (idle_timeout_s 90 s + 30),
    # tcp_user_timeout_s() (60 + 10 x 3) and the tcp_keepalive_* settings.
    "edge_timeout": "120000ms",
    # health_check_interval_s(): one HAProxy process here, so never stretched.
    "worker_check_inter": "1000ms",
    "tcp_user_timeout": "90s",
    "keepalive_idle": "60s",
    "keepalive_interval": "10s",
    "keepalive_count": 3,
    # backend_keepalive off, its default on one host: a dead worker container's kernel
    # closes its connections; no probes (app/cluster/haproxy.py, backend_keepalive).
    "backend_keepalive": "    # no srvtcpka: the workers share this host (backend_keepalive off)",
    # Connection caps per client address (max_conns_per_addr, max_conn_rate_per_addr per
    # conn_rate_period_s; the table expiry as app/cluster/haproxy.py derives it). Exempt:
    # the container's own loopback only. Clients on other machines keep their address
    # through the published port (iptables DNAT); clients on the Docker host itself come
    # through docker-proxy from the network's gateway and share its caps.
    "max_conns_per_addr": 50,
    "max_conn_rate_per_addr": 100,
    "conn_rate_period": "10s",
    "conn_table_expire": "60s",
    "conn_cap_exempt": "127.0.0.1/32 ::1/128",
    # client_accept_rate 0, its default: no rate-limit sessions.
    "client_accept_rate": "    # no rate-limit sessions: client_accept_rate is 0",
}

# The dashboard reads "show stat" through HAProxy's runtime API; in compose it reaches it
# over the compose network (read-only level), relayed to a unix socket in its container.
RUNTIME_API = "    stats socket ipv4@0.0.0.0:9999 level user\n"

SERVER_WITHOUT_HOST = re.compile(r"^(\s*server\s+(\S+)\s+):(\d+)(.*)$", re.MULTILINE)


def fix_servers(text: str) -> str:
    """`server NAME :PORT ...` (the template's ${host} left empty): NAME is the service."""
    return SERVER_WITHOUT_HOST.sub(
        lambda m: f"{m.group(1)}{m.group(2)}:{m.group(3)}{m.group(4)} {DNS} init-addr none",
        text,
    )


def render(template: str) -> str:
    workers = (
        f"    server-template w 1-{WORKER_SLOTS} worker:{WORKER_PORT} send-proxy-v2 check port "
        f"{WORKER_HEALTH_PORT} agent-check agent-port {WORKER_AGENT_PORT} agent-inter 1000ms "
        f"{DNS} init-addr none"
    )
    ws_workers = (
        f"    server-template w 1-{WORKER_SLOTS} worker:{WORKER_WS_PORT} check port "
        f"{WORKER_HEALTH_PORT} agent-check agent-port {WORKER_AGENT_PORT} agent-inter 1000ms "
        f"{DNS} init-addr none"
    )
    db = "\n".join(
        f"    server {node} {node}:{PG_PORT} check port {PATRONI_REST_PORT} {DNS} init-addr none"
        for node in NODES
    )
    values = dict(
        VALUES,
        worker_servers=workers,
        ws_worker_servers=ws_workers,
        primary_servers=db,
        replica_servers=db,
    )
    try:
        text = Template(template).substitute(values)
    except KeyError as exc:
        raise SystemExit(
            f"haproxy_render: the template has a new placeholder {exc}; "
            "map it in compose/images/haproxy_render.py"
        ) from None
    text = fix_servers(text)
    text = text.replace(
        "# Switchboard local cluster: rendered by `switchboard up`",
        "# Switchboard in docker compose: rendered at image build",
        1,
    )
    # The runtime API on TCP, right after the unix-socket one.
    text = re.sub(
        r"(^\s*stats socket .*\n)",
        lambda m: m.group(1) + RUNTIME_API,
        text,
        count=1,
        flags=re.MULTILINE,
    )
    return text + RESOLVERS


if __name__ == "__main__":
    sys.stdout.write(render(Path(sys.argv[1]).read_text()))
