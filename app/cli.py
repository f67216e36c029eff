"""The ``switchboard`` command."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.settings import Settings, SettingsError

if TYPE_CHECKING:
    from app.cluster.launcher import LocalCluster

# The one place with imports inside functions: each command imports what it uses,
# so `switchboard status` does not load the worker, the store or the client SDK.


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "state_dir": getattr(args, "state_dir", None),
        "workers": getattr(args, "workers", None),
        "client_port": getattr(args, "client_port", None),
        "haproxy_processes": getattr(args, "haproxy_processes", None),
        "hosts_net": getattr(args, "hosts", None),
    }
    return Settings.load(config_file=args.config, **overrides)


def _say(line: str) -> None:
    print(line, flush=True)


def _sized(args: argparse.Namespace) -> Settings:
    """The settings of ``up``: with --capacity N, sized for N sessions (capacity.py)."""
    settings = _settings(args)
    if args.capacity is None:
        return settings
    from app.cluster.capacity import Machine, plan

    if args.workers is not None or args.haproxy_processes is not None:
        raise SettingsError(
            "--capacity chooses --workers and --haproxy-processes: pass one or the other"
        )
    chosen = plan(args.capacity, Machine.this(), settings)
    print(chosen.explain(), flush=True)
    return settings.replace(**chosen.overrides())


def _running(args: argparse.Namespace, say: Callable[[str], None] | None = None) -> LocalCluster:
    """The cluster in the state dir as `up` shaped it (run/cluster.json), not the defaults."""
    from app.cluster.launcher import LocalCluster

    return LocalCluster.running(_settings(args), say or (lambda _: None))


def cmd_up(args: argparse.Namespace) -> int:
    from app.cluster.launcher import LocalCluster, format_status

    cluster = LocalCluster(_sized(args), say=_say)
    cluster.up()
    print()
    print(format_status(cluster.status()))
    if not args.foreground:
        print("\nrunning in the background: `switchboard status`, `switchboard down`")
        return 0
    print("\nattached: Ctrl-C stops the cluster")
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop:
        time.sleep(0.5)
    print("stopping ...", flush=True)
    cluster.down()
    print("stopped")
    return 0


def cmd_down(args: argparse.Namespace) -> int:

    cluster = _running(args, _say)
    running = cluster.running_components()
    cluster.down(purge=args.purge)
    print(f"stopped {', '.join(running)}" if running else "nothing was running")
    if args.purge:
        print(f"removed {cluster.layout.root}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from app.cluster.launcher import format_status

    rows = _running(args).status()
    print(format_status(rows))
    return 0 if all(r.healthy for r in rows) else 1


def cmd_logs(args: argparse.Namespace) -> int:

    cluster = _running(args)
    if args.component not in cluster.component_names():
        print(
            f"switchboard: no component {args.component!r}; one of: "
            + ", ".join(cluster.component_names()),
            file=sys.stderr,
        )
        return 2
    for line in cluster.log_tail(args.component, args.lines):
        print(line)
    if args.follow:
        path = cluster.layout.logfile(args.component)
        with path.open() as fh:
            fh.seek(0, 2)
            try:
                while True:
                    line = fh.readline()
                    if line:
                        print(line, end="", flush=True)
                    else:
                        time.sleep(0.3)
            except KeyboardInterrupt:
                pass
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from app.worker.main import main as worker_main

    worker_main()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.store import migrate

    settings = _settings(args)
    if args.revision.startswith("-") or args.down:
        migrate.downgrade(settings, args.revision)
    else:
        migrate.upgrade(settings, args.revision)
    print(f"database at {args.revision}")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:

    cluster = _running(args)
    result = cluster.drain_worker(args.worker, undo=args.undo)
    print(f"{args.worker}: {result.get('state')}")
    return 0


def cmd_restart_workers(args: argparse.Namespace) -> int:

    _running(args, _say).restart_workers()
    print("every worker restarted")
    return 0


def cmd_tls(args: argparse.Namespace) -> int:

    certs = _running(args, _say).reload_tls(renew=args.renew)
    names = ", ".join(certs.names)
    print(f"serving serial {certs.serial:x} for {names}, valid until {certs.not_after:%Y-%m-%d}")
    if certs.ca_file is not None:
        print(f"clients trust the cluster CA {certs.ca_file}")
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    import asyncio

    from app.chaos.runner import ChaosConfig, run_scenario

    cluster = _running(args, _say)
    if not cluster.running_components():
        print("switchboard: error: no cluster is running here (`switchboard up`)", file=sys.stderr)
        return 1
    config = ChaosConfig(
        clients=args.clients,
        rate=args.rate,
        after_s=args.duration,
        seed=args.seed,
        transport=args.transport,
    )
    if args.scenario in HOST_FAULT_NAMES and not cluster.settings.multihost():
        print(f"switchboard: error: {args.scenario} needs `up --hosts`", file=sys.stderr)
        return 1
    every = [*FAULT_NAMES, "overload"]
    if cluster.settings.multihost():
        every += HOST_FAULT_NAMES  # and the hosts' own faults
    scenarios = every if args.scenario == "all" else [args.scenario]
    ok = True
    for scenario in scenarios:
        if scenario == "overload":
            from app.chaos.overload import OverloadConfig, run_overload

            overload = OverloadConfig(
                established=min(args.clients, 300),
                rate=args.rate,
                overload_s=max(args.duration, 12.0),
                seed=args.seed,
            )
            ok = asyncio.run(run_overload(cluster, overload, _say)).ok and ok
            continue
        verdict = asyncio.run(run_scenario(cluster, scenario, config, _say))
        ok = ok and verdict.ok
    return 0 if ok else 1


# Faults of whole hosts and partitions (app/chaos/hostfaults.py): many hosts only.
HOST_FAULT_NAMES = (
    "kill-balancer",
    "kill-balancer-host",
    "kill-worker-host",
    "cut-worker-host",
    "isolate-db-leader",
)
FAULT_NAMES = (
    "kill-worker",
    "kill-leader",
    "kill-replica",
    "kill-haproxy",
    "kill-etcd",
    "rolling-restart",
    "drain",
    "stall",
    "stall-long",
)


def cmd_user(args: argparse.Namespace) -> int:
    import asyncio

    from app.secrets import read_secrets
    from app.store import dashboard as dash_store
    from app.store.db import dsn
    from app.store.social import push_key

    settings = _settings(args)

    async def run() -> int | None:
        import asyncpg

        key = push_key(read_secrets(settings)["admin"])
        pool = await asyncpg.create_pool(dsn(settings), min_size=1, max_size=1)
        try:
            # The dashboard's own action: disabling also kicks the live sessions.
            return await dash_store.set_user_disabled(
                pool, args.name, args.action == "disable", key
            )
        finally:
            await pool.close()

    kicked = asyncio.run(run())
    if kicked is None:
        print(f"switchboard: error: no user {args.name!r}", file=sys.stderr)
        return 1
    print(f"{args.name}: {args.action}d" + (f"; {kicked} live session(s) kicked" if kicked else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard",
        description="Switchboard: an instant-messaging server cluster "
        "(HAProxy, stateless socket workers, Patroni PostgreSQL).",
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (or SWITCHBOARD_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--state-dir", type=Path, help="cluster state directory (default ./.switchboard)"
        )
        p.set_defaults(func=func)
        return p

    p = add("up", cmd_up, "start etcd, 3 Patroni PostgreSQL nodes, HAProxy and the workers")
    p.add_argument("--workers", type=int, help="number of socket workers (default 3)")
    p.add_argument("--client-port", type=int, help="the client TCP port (default 5222)")
    p.add_argument(
        "--haproxy-processes",
        type=int,
        help="HAProxy processes sharing the client port, ~9,000 clients each (default 2)",
    )
    p.add_argument(
        "--capacity",
        type=int,
        metavar="N",
        help="size workers, their session limit and HAProxy processes for N sessions on "
        "this machine, and print why",
    )
    p.add_argument(
        "--hosts",
        metavar="NET",
        help="many hosts: each one a network namespace with an address on the private "
        "IPv4 network NET (e.g. 10.77.0.0/24): 2 balancers sharing a virtual IP, 3 worker "
        "hosts, a database host per node, a client host (docs/operations.md)",
    )
    p.add_argument(
        "--foreground", action="store_true", help="stay attached; Ctrl-C stops everything"
    )

    p = add("down", cmd_down, "stop every component of the local cluster")
    p.add_argument("--purge", action="store_true", help="also delete the state dir and all data")
    p.add_argument(
        "--hosts",
        metavar="NET",
        help="also remove the namespaces of `up --hosts NET` when the state dir no longer "
        "records them (a start-up that was killed)",
    )

    add("status", cmd_status, "show each component: pid, endpoint, role, health")

    p = add("logs", cmd_logs, "show a component's log (etcd, n1.., haproxy, w1..)")
    p.add_argument("component")
    p.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")

    add("worker", cmd_worker, "run one socket worker in the foreground (SWITCHBOARD_WORKER_ID)")

    p = add("drain", cmd_drain, "drain a worker: no new clients, connected ones move away")
    p.add_argument("worker", help="worker id, e.g. w2")
    p.add_argument("--undo", action="store_true", help="take clients again")

    add(
        "restart-workers",
        cmd_restart_workers,
        "rolling restart: each worker in turn drains, stops and starts again",
    )

    p = add(
        "tls",
        cmd_tls,
        "reload the TLS certificate (tls_cert/tls_key, or the cluster's own) into every "
        "HAProxy process without dropping connections",
    )
    p.add_argument("action", choices=["reload"])
    p.add_argument(
        "--renew", action="store_true", help="make a new server certificate (generated ones only)"
    )

    p = add(
        "chaos",
        cmd_chaos,
        "inject a real fault under client load and check nothing was lost or duplicated",
    )
    p.add_argument(
        "scenario",
        choices=[*FAULT_NAMES, "overload", "all", *HOST_FAULT_NAMES],
        help="stall/stall-long: SIGSTOP a worker for less/more than its lease; overload: "
        "password logins at 3x the measured capacity while sessions keep messaging; "
        f"{', '.join(HOST_FAULT_NAMES)}: whole hosts and partitions, on a cluster started "
        "with `up --hosts` (run it from the client host: ip netns exec sb-client ...)",
    )
    p.add_argument("--clients", type=int, default=1000, help="users online (default 1000)")
    p.add_argument("--rate", type=float, default=0.5, help="messages/s per user (default 0.5)")
    p.add_argument(
        "--duration", type=float, default=6.0, help="seconds of traffic after the fault (6)"
    )
    p.add_argument("--seed", type=int, help="random seed for the traffic")
    p.add_argument(
        "--transport",
        choices=["tcp", "ws"],
        default="tcp",
        help="clients over the TCP client port or WebSockets (client_ws_port); default tcp",
    )

    p = add("user", cmd_user, "disable or re-enable a user account")
    p.add_argument("action", choices=["disable", "enable"])
    p.add_argument("name")

    from app.client.commands import add_commands

    def state_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir", type=Path, help="cluster state directory (default ./.switchboard)"
        )

    add_commands(sub, state_dir_option)

    from app.dashboard.cli import add_commands as add_dashboard_commands

    add_dashboard_commands(sub, state_dir_option)

    from app.reporting.cli import add_commands as add_report_commands

    add_report_commands(sub, state_dir_option)

    p = add("migrate", cmd_migrate, "apply (or revert) database migrations")
    p.add_argument("revision", nargs="?", default="head")
    p.add_argument("--down", action="store_true", help="downgrade to REVISION")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from app.cluster.errors import ClusterError

    try:
        code = args.func(args)
    except (ClusterError, SettingsError) as exc:
        print(f"switchboard: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)
