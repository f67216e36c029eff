"""Entry point of the Switchboard application and database images in docker compose.

    entrypoint.py node        one Patroni + PostgreSQL 15 node (SWITCHBOARD_NODE=n1|n2|n3)
    entrypoint.py migrate     roles, database and Alembic migrations, then exit 0
    entrypoint.py worker      one socket worker (any number of replicas)
    entrypoint.py dashboard   the dashboard (`switchboard dashboard`)
    entrypoint.py certs       make or check HAProxy's TLS certificate (volume `tls`), exit 0
    entrypoint.py CMD ...     anything else runs as is (e.g. `switchboard --help`)

The application is used unchanged. What containers need differently from the local
cluster is arranged here:

- Secrets come from SWITCHBOARD_SECRET_<NAME> environment variables (set from the
  compose env file) and are written to ``$SWITCHBOARD_STATE_DIR/secrets.json``
  (mode 0600), where the application reads them.
- Patroni's config is ``app.cluster.patroni.node_config`` (synchronous mode, pg_rewind,
  data checksums, scram-sha-256, the same timings, REST credentials for unsafe methods,
  the reporting gate), with the addresses changed from 127.0.0.1 to the container's
  service name and pg_hba opened to the DB network (the only one the nodes join).
- A worker's id must be unique while its ports stay fixed (HAProxy finds every replica
  at worker:7001/7101/7201). The id is ``w<N>`` with N the compose replica number,
  read from the container's name (Docker's DNS answers a reverse lookup of the
  container's address with ``<project>-worker-<N>.<network>``), and the base ports are
  shifted so that ``worker_port("w<N>")`` is 7001 again. A restarted replica keeps its
  id, like a restarted local worker.
- Workers and the dashboard bind 0.0.0.0 (``host``) and reach HAProxy's DB ports at
  its service name (``db_host``: ``haproxy``, or SWITCHBOARD_DB_PROXY).
- The dashboard expects the local cluster's 127.0.0.1 port layout for Patroni's REST
  APIs, the workers' health ports and HAProxy's runtime socket: relays provide it.
- A worker accepts client connections (each with HAProxy's PROXY header) from the
  compose network it is attached to, not from loopback only, since HAProxy is another
  container (SWITCHBOARD_PROXY_TRUSTED_ADDRS, unless set).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SECRET_NAMES = ("superuser", "replication", "rewind", "app", "reporting", "admin", "patroni")
WORKER_PORT, WORKER_HEALTH_PORT, WORKER_AGENT_PORT = 7001, 7101, 7201
WORKER_WS_PORT = 7301
PG_PORT, PATRONI_REST_PORT = 5432, 8008
NODE_ROOT = Path("/var/lib/switchboard")


def say(message: str) -> None:
    print(f"entrypoint: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    say(message)
    raise SystemExit(2)


def write_secrets(required: tuple[str, ...]) -> dict[str, str]:
    """secrets.json from SWITCHBOARD_SECRET_<NAME>; the names in ``required`` must be set."""
    values = {}
    for name in SECRET_NAMES:
        value = os.environ.get(f"SWITCHBOARD_SECRET_{name.upper()}", "")
        if value:
            values[name] = value
    missing = [n for n in required if n not in values]
    if missing:
        names = ", ".join(f"SWITCHBOARD_SECRET_{n.upper()}" for n in missing)
        fail(f"missing secrets: {names} (set them in compose/.env)")
    state_dir = Path(os.environ.get("SWITCHBOARD_STATE_DIR", "/run/switchboard"))
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "secrets.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(values, fh)
    return values


def relay(listen: str, target: str) -> None:
    """A socat relay from ``listen`` (a local port or a unix socket path) to host:port."""
    if listen.isdigit():
        source = f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork"
    else:
        Path(listen).parent.mkdir(parents=True, exist_ok=True)
        source = f"UNIX-LISTEN:{listen},fork,unlink-early,mode=600"
    subprocess.Popen(["socat", source, f"TCP:{target}"])


def bind_all_reach_haproxy(env: dict[str, str]) -> dict[str, str]:
    """Bind every address of the container; reach the DB ports at HAProxy's name."""
    env["SWITCHBOARD_HOST"] = "0.0.0.0"
    env.setdefault("SWITCHBOARD_DB_HOST", os.environ.get("SWITCHBOARD_DB_PROXY", "haproxy"))
    return env


def ptr_lookup(address: str, server: str = "127.0.0.11", timeout: float = 1.0) -> str:
    """The PTR name of an IPv4 address, asked of Docker's DNS directly.

    Not ``socket.gethostbyaddr``: that reads /etc/hosts first, where Docker maps the
    address to the container id, not to its name.
    """
    qid = secrets.randbits(16)
    qname = (
        b"".join(
            bytes([len(label)]) + label.encode()
            for label in [*reversed(address.split(".")), "in-addr", "arpa"]
        )
        + b"\0"
    )
    query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 12, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(query, (server, 53))
        data = sock.recv(4096)
    rid, flags, qdcount, ancount = struct.unpack("!HHHH", data[:8])
    if rid != qid or flags & 0x000F or ancount == 0:
        raise OSError(f"no PTR record for {address} (rcode {flags & 0x000F})")

    def name_at(pos: int) -> tuple[str, int]:
        labels, end = [], None
        while True:
            length = data[pos]
            if length & 0xC0 == 0xC0:  # compression pointer
                end = pos + 2 if end is None else end
                pos = ((length & 0x3F) << 8) | data[pos + 1]
                continue
            if length == 0:
                return ".".join(labels), (pos + 1 if end is None else end)
            labels.append(data[pos + 1 : pos + 1 + length].decode())
            pos += 1 + length

    pos = 12
    for _ in range(qdcount):
        pos = name_at(pos)[1] + 4
    for _ in range(ancount):
        pos = name_at(pos)[1]
        rtype, _cls, _ttl, rdlength = struct.unpack("!HHIH", data[pos : pos + 10])
        pos += 10
        if rtype == 12:
            return name_at(pos)[0]
        pos += rdlength
    raise OSError(f"no PTR record for {address}")


def own_container_name() -> str | None:
    """This container's name, from a reverse lookup of its address in Docker's DNS."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        say(f"cannot resolve own address: {exc}")
        return None
    for attempt in range(20):
        try:
            return ptr_lookup(address).split(".", 1)[0]
        except OSError as exc:
            if attempt == 19:
                say(f"reverse lookup of {address} in Docker's DNS failed: {exc}")
                return None
            time.sleep(0.25)
    return None


def replica_number() -> int | None:
    """This container's compose replica number: <project>-worker-<N> (v1: _worker_<N>)."""
    container = own_container_name()
    if container is None:
        return None
    match = re.search(r"[-_](\d+)$", container)
    if match is None:
        say(f"container name {container!r} has no replica number")
        return None
    say(f"container {container}")
    return int(match.group(1))


def worker_env(env: dict[str, str]) -> None:
    wid = env.get("SWITCHBOARD_WORKER_ID", "")
    if not wid:
        number = replica_number()
        if number is None:
            fail("set SWITCHBOARD_WORKER_ID (w1, w2, ...) for this container")
        wid = f"w{number}"
    match = re.fullmatch(r"w(\d+)", wid)
    if not match or not 1 <= int(match.group(1)) <= WORKER_PORT:
        fail(f"worker id {wid!r} must be w1 .. w{WORKER_PORT}")
    n = int(match.group(1))
    env["SWITCHBOARD_WORKER_ID"] = wid
    # worker_port(wN) = base + N - 1: shift the bases so every replica uses the same ports.
    env["SWITCHBOARD_WORKER_BASE_PORT"] = str(WORKER_PORT - n + 1)
    env["SWITCHBOARD_WORKER_HEALTH_BASE_PORT"] = str(WORKER_HEALTH_PORT - n + 1)
    env["SWITCHBOARD_WORKER_AGENT_BASE_PORT"] = str(WORKER_AGENT_PORT - n + 1)
    env["SWITCHBOARD_WORKER_WS_BASE_PORT"] = str(WORKER_WS_PORT - n + 1)
    say(
        f"worker id {wid}, ports {WORKER_PORT}/{WORKER_HEALTH_PORT}/{WORKER_AGENT_PORT}"
        f"/{WORKER_WS_PORT}"
    )


def attached_networks(route_table: str = "/proc/net/route") -> list[str]:
    """The IPv4 networks this container is directly attached to (its compose networks)."""
    networks = []
    with open(route_table) as fh:
        next(fh)  # the header line
        for line in fh:
            fields = line.split()
            destination, gateway, mask = (int(fields[i], 16) for i in (1, 2, 7))
            if gateway == 0 and mask != 0:  # a directly connected network
                # /proc/net/route prints addresses as little-endian hex.
                net = socket.inet_ntoa(struct.pack("<I", destination))
                networks.append(f"{net}/{bin(mask).count('1')}")
    return networks


def run_worker() -> None:
    env = bind_all_reach_haproxy(dict(os.environ))
    write_secrets(("app",))
    worker_env(env)
    # A worker takes connections only from HAProxy, each with a PROXY header. HAProxy's
    # address may change when its container is recreated: trust the compose network.
    if "SWITCHBOARD_PROXY_TRUSTED_ADDRS" not in env:
        trusted = ["127.0.0.0/8", *attached_networks()]
        env["SWITCHBOARD_PROXY_TRUSTED_ADDRS"] = ",".join(trusted)
        say(f"PROXY headers accepted from {', '.join(trusted)}")
    os.execve(sys.executable, [sys.executable, "-m", "app.worker"], env)


def run_dashboard() -> None:
    """The dashboard expects the local cluster's 127.0.0.1 port layout; relay it.

    Patroni REST of n1..n3 on 8008..8010, worker wN's health port on 7101 + N - 1 (for
    N up to SWITCHBOARD_WORKERS), and HAProxy's runtime API on the unix socket where
    `switchboard` looks for it. The DB ports it reaches at HAProxy's name (db_host).
    """
    from app.cluster.layout import Layout
    from app.settings import Settings

    env = bind_all_reach_haproxy(dict(os.environ))
    write_secrets(("app", "admin", "patroni"))  # patroni: for POST /switchover
    settings = Settings.load(env=env)
    for node in settings.node_names():
        relay(str(settings.patroni_rest_port(node)), f"{node}:{PATRONI_REST_PORT}")
    me = own_container_name() or ""
    match = re.fullmatch(r"(.+?)([-_])dashboard[-_]\d+", me)
    project, sep = (match.group(1), match.group(2)) if match else ("switchboard", "-")
    for wid in settings.worker_ids():
        relay(
            str(settings.worker_health_port(wid)),
            f"{project}{sep}worker{sep}{wid[1:]}:{WORKER_HEALTH_PORT}",
        )
    relay(str(Layout.for_settings(settings).haproxy_socket), "haproxy:9999")
    os.execve(sys.executable, [sys.executable, "-m", "app.dashboard", *sys.argv[2:]], env)


def run_certs() -> None:
    """The certificate HAProxy serves on the client TLS port and the dashboard.

    `app.cluster.tls.ensure_certificates`, as `switchboard up` runs it, in the volume
    mounted at ``$SWITCHBOARD_STATE_DIR/tls``: the stack's own CA and a server
    certificate for ``localhost``, ``127.0.0.1``, ``::1`` and SWITCHBOARD_TLS_NAMES (the
    names clients use), made once and reused; or, with SWITCHBOARD_TLS_CERT and
    SWITCHBOARD_TLS_KEY (files mounted into this container), the operator's.
    """
    from app.cluster.tls import ensure_certificates
    from app.settings import Settings

    files = ensure_certificates(Settings.load())
    say(
        f"TLS: {files.decision}; serial {files.serial:x}, valid until "
        f"{files.not_after:%Y-%m-%d}, names {', '.join(files.names)}"
    )


def run_migrate() -> None:
    import asyncio

    import asyncpg

    from app.settings import Settings
    from app.store import migrate

    os.environ.setdefault("SWITCHBOARD_HOST", "haproxy")
    write_secrets(("superuser", "app", "reporting"))
    settings = Settings.load()
    timeout = float(os.environ.get("SWITCHBOARD_MIGRATE_WAIT_S", "180"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            asyncio.run(migrate.ensure_roles_and_database(settings))
            break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                fail(f"the primary did not accept the bootstrap within {timeout:g} s: {exc}")
            say(
                f"waiting for the primary through {settings.host}:{settings.db_primary_port}: "
                f"{type(exc).__name__}: {exc}"
            )
            time.sleep(1)
    say("roles and database ready; running migrations")
    migrate.upgrade(settings)
    say("migrations applied")


def node_config(node: str) -> dict[str, Any]:
    from app.cluster.layout import Layout
    from app.cluster.patroni import gate_callbacks, gate_file
    from app.cluster.patroni import node_config as local_node_config
    from app.settings import Settings

    passwords = write_secrets(("superuser", "replication", "rewind", "patroni"))
    settings = Settings.load()
    layout = Layout(root=NODE_ROOT, etcd_data=Path("/nonexistent"))
    config: dict[str, Any] = json.loads(local_node_config(settings, layout, node, passwords))
    etcd = os.environ.get("SWITCHBOARD_ETCD_HOSTS", "etcd:2379")
    config["etcd3"]["hosts"] = etcd
    config["restapi"]["listen"] = f"0.0.0.0:{PATRONI_REST_PORT}"
    config["restapi"]["connect_address"] = f"{node}:{PATRONI_REST_PORT}"
    pg = config["postgresql"]
    pg["listen"] = f"0.0.0.0:{PG_PORT}"
    pg["connect_address"] = f"{node}:{PG_PORT}"
    # Peers, HAProxy and the migration job connect from the compose network ("samenet":
    # any subnet this container is on); every network login needs a scram-sha-256 password.
    # The reporting role only on a replica (app/cluster/reporting_gate.py), as locally.
    node_dir = layout.node_dir(node)
    pg["pg_hba"] = [
        "local all all trust",
        "host replication replicator samenet scram-sha-256",
        f"host all @{gate_file(node_dir)} samenet reject",
        "host all all samenet scram-sha-256",
    ]
    pg["callbacks"] = gate_callbacks(node_dir, PG_PORT)
    return config


def run_node() -> None:
    node = os.environ.get("SWITCHBOARD_NODE", "")
    if not re.fullmatch(r"n\d+", node):
        fail(f"SWITCHBOARD_NODE must be n1, n2, ... (got {node!r})")
    config = node_config(node)
    node_dir = NODE_ROOT / "db" / node
    node_dir.mkdir(parents=True, exist_ok=True)
    for path in (NODE_ROOT, NODE_ROOT / "db", node_dir):
        shutil.chown(path, "postgres", "postgres")
    NODE_ROOT.chmod(0o755)
    (NODE_ROOT / "db").chmod(0o755)
    node_dir.chmod(0o700)
    from app.cluster.patroni import close_gate

    # Refuse the reporting role until Patroni's callback says this node is a replica.
    shutil.chown(close_gate(node_dir), "postgres", "postgres")
    cfg = node_dir / "patroni.yml"
    fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh, indent=2)
    shutil.chown(cfg, "postgres", "postgres")
    env = {
        "PATH": "/opt/venv/bin:/usr/bin:/bin",
        "HOME": str(node_dir),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    address, dcs = config["postgresql"]["connect_address"], config["etcd3"]["hosts"]
    say(f"starting Patroni {node} ({address}, DCS {dcs})")
    os.execve(
        "/usr/bin/setpriv",
        [
            "setpriv",
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "/opt/venv/bin/patroni",
            str(cfg),
        ],
        env,
    )


def main() -> None:
    role = sys.argv[1] if len(sys.argv) > 1 else "worker"
    if role == "worker":
        run_worker()
    elif role == "node":
        run_node()
    elif role == "migrate":
        run_migrate()
    elif role == "dashboard":
        run_dashboard()
    elif role == "certs":
        run_certs()
    else:
        os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
