"""Start, inspect and stop the whole local tier: etcd, Patroni nodes, HAProxy, workers.

``up`` is the single code path behind ``switchboard up`` and the test fixtures.
Each step prints what it is doing and how long it took; any failure stops
what was already started and surfaces as one ``ClusterError`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from app.cluster import etcd, haproxy, hostnet, keepalived, patroni, runstate, tls
from app.cluster.errors import AlreadyRunning, ClusterError, ComponentFailed
from app.cluster.health import http_json, port_free, wait_for
from app.cluster.layout import Layout, load_or_create_secrets
from app.cluster.process import (
    PidRecord,
    RunAs,
    read_pidfile,
    spawn,
    stop_all,
    write_pidfile,
)
from app.secrets import read_secrets, worker_admin_token
from app.settings import Settings
from app.store.db import dsn
from app.store.errors import DB_ERRORS

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    name: str
    pid: int | None
    running: bool
    endpoint: str
    detail: str
    healthy: bool
    restarts: int = 0  # by the supervisor since `up`
    host: str = ""  # the host it runs on (many hosts), "" for the machine itself


def _socket_ready(path: Path) -> tuple[bool, str]:
    return path.exists(), "no stats socket yet"


class LocalCluster:
    def __init__(self, settings: Settings, say: Say = _quiet) -> None:
        self.settings = settings
        self.layout = Layout.for_settings(settings)
        self.say = say
        self.venv_bin = Path(sys.executable).parent

    @classmethod
    def running(cls, settings: Settings, say: Say = _quiet) -> LocalCluster:
        """The cluster in settings' state dir, shaped as `up` started it (run/cluster.json):
        every command but `up` uses this, so `--workers 2` is remembered."""
        shape = runstate.read_shape(Layout.for_settings(settings))
        return cls(settings.replace(**shape) if shape else settings, say)

    # ---- names -------------------------------------------------------------
    def component_names(self) -> list[str]:
        supervisor = ["supervisor"] if self.settings.supervise or self.pid_of("supervisor") else []
        return [
            *self.settings.etcd_names(),
            *self.settings.node_names(),
            *self.haproxy_names(),
            *self.keepalived_names(),
            *self.worker_names(),
            "dashboard",
            *supervisor,
        ]

    def supervised_names(self) -> list[str]:
        """What the supervisor watches: the configured components, no stray pid files."""
        s = self.settings
        return [
            *s.etcd_names(),
            *s.node_names(),
            *s.haproxy_names(),
            *self.keepalived_names(),
            *s.worker_ids(),
            "dashboard",
        ]

    def keepalived_names(self) -> list[str]:
        """The balancer pair's VRRP daemons (many hosts only)."""
        return keepalived.names() if self.settings.multihost() else []

    def worker_names(self) -> list[str]:
        """The configured workers, and any more that a pid file names: a cluster
        started with ``--workers 5`` is stopped whole by a plain ``down``."""
        return self._with_pidfiles(self.settings.worker_ids(), r"w(\d+)")

    def worker_health_urls(self) -> list[str]:
        """The running workers' ``/health`` URLs (`worker_names`)."""
        return [self.settings.worker_health_url(w) for w in self.worker_names()]

    def haproxy_names(self) -> list[str]:
        """The configured HAProxy processes, and any more that a pid file names."""
        return self._with_pidfiles(self.settings.haproxy_names(), r"haproxy(\d*)")

    def _with_pidfiles(self, configured: list[str], pattern: str) -> list[str]:
        found = set(configured)
        if self.layout.run.is_dir():
            for pidfile in self.layout.run.glob("*.pid"):
                if re.fullmatch(pattern, pidfile.stem):
                    found.add(pidfile.stem)

        def number(name: str) -> int:
            digits = re.sub(r"\D", "", name)
            return int(digits) if digits else 0

        return sorted(found, key=lambda name: (number(name), name))

    def _record(self, name: str) -> PidRecord | None:
        return read_pidfile(self.layout.pidfile(name))

    def _postmaster(self, node: str) -> PidRecord | None:
        try:
            pid = int((self.layout.node_data(node) / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return None
        return PidRecord(pid, None) if Path(exe).name in ("postgres", "postmaster") else None

    def pid_of(self, name: str) -> int | None:
        """The live pid of a component (None if it is not running)."""
        rec = self._record(name)
        return rec.pid if rec is not None and rec.alive() else None

    def postmaster_pid(self, node: str) -> int | None:
        rec = self._postmaster(node)
        return rec.pid if rec is not None and rec.alive() else None

    def wait_db_healthy(self, timeout: float | None = None) -> None:
        """Wait until every node streams again (e.g. after a node rejoined)."""
        nodes = self.settings.node_names()

        def ready() -> tuple[bool, str]:
            view = patroni.cluster_view(self.settings)
            return (
                (False, "no Patroni REST API answers") if view is None else view.healthy(len(nodes))
            )

        wait_for(
            "patroni cluster", ready, timeout or self.settings.startup_timeout_s, interval=0.25
        )
        wait_for("db primary port", self._primary_writable, 30, interval=0.2)

    def running_components(self) -> list[str]:
        names = []
        for name in self.component_names():
            rec = self._record(name)
            if rec is not None and rec.alive():
                names.append(name)
        return names

    # ---- up ----------------------------------------------------------------
    def up(self) -> None:
        started = time.monotonic()
        running = self.running_components()
        if running:
            raise AlreadyRunning(
                f"a cluster is already running in {self.layout.root} "
                f"({', '.join(running)}); see `switchboard status` or `switchboard down`"
            )
        self._clear_stale_pidfiles()
        run_as = RunAs.for_current_process(self.settings.run_as)
        self._preflight(run_as)
        try:
            self._prepare(run_as)
            if self.settings.multihost():
                self._step(
                    f"{len(self.settings.hosts())} hosts on {self.settings.hosts_cidr()}",
                    self._create_hosts,
                )
            self._step("etcd", lambda: self._start_etcd(run_as))
            self._step("patroni nodes", lambda: self._start_patroni(run_as))
            self._step("haproxy", self._start_haproxy)
            if self.settings.multihost():
                self._step(f"keepalived (virtual IP {self.settings.vip()})", self._start_keepalived)
            self._step("postgres cluster healthy", self._wait_db)
            self._step("database roles and migrations", self._migrate)
            self._step(f"{self.settings.workers} workers", self._start_workers)
            self._step("dashboard", self._start_dashboard)
            if self.settings.supervise:
                self._step("supervisor", self._start_supervisor)
        except BaseException:
            self.say("start-up failed: stopping what was started")
            self.down(purge=False)
            raise
        self.say(f"cluster up in {time.monotonic() - started:.1f} s")

    def _step(self, what: str, action: Callable[[], None]) -> None:
        t0 = time.monotonic()
        self.say(f"==> {what} ...")
        action()
        self.say(f"    {what}: ok ({time.monotonic() - t0:.1f} s)")

    def _preflight(self, run_as: RunAs) -> None:
        s = self.settings
        for binary, package in ((s.etcd_bin, "etcd-server"), (s.haproxy_bin, "haproxy")):
            if shutil.which(binary) is None:
                raise ComponentFailed(
                    f"{binary} not found: install the Debian package {package} (`make up` does)"
                )
        if not (s.pg_bin_dir / "postgres").exists():
            raise ComponentFailed(
                f"PostgreSQL not found in {s.pg_bin_dir}: install postgresql-15 (`make up` does)"
            )
        if not (self.venv_bin / "patroni").exists():
            raise ComponentFailed(f"patroni not found in {self.venv_bin}: run `make bootstrap`")
        if run_as.user is not None and shutil.which("setpriv") is None:
            raise ComponentFailed("setpriv not found: install util-linux")
        if s.multihost():
            hostnet.preflight(s)  # fresh namespaces: no port can be taken in them
        taken = [
            f"{name} {port}"
            for name, port in s.all_ports().items()
            if not s.multihost() and not port_free(s.host, port)
        ]
        if taken:
            raise ComponentFailed(f"port already in use: {', '.join(taken)}")
        if run_as.user is not None and not run_as.can_access(Path(sys.executable), "x"):
            raise ComponentFailed(
                f"user {run_as.user} cannot run {sys.executable}: the venv must be made from "
                "/usr/bin/python3 in a directory that user can read"
            )

    def _prepare(self, run_as: RunAs) -> None:
        self.layout.ensure()
        runstate.write_shape(self.layout, self.settings)
        runstate.clear_restarts(self.layout)
        runstate.clear_holds(self.layout)
        # The supervisor's first tick makes it again: `up` waits for that.
        self.layout.supervisor_lock.unlink(missing_ok=True)
        secrets = load_or_create_secrets(self.layout)
        if run_as.user is not None and not run_as.can_access(self.layout.root, "x"):
            raise ComponentFailed(
                f"user {run_as.user} cannot enter the state dir {self.layout.root}: "
                "choose one whose parent directories are world-searchable"
            )
        if (
            self.layout.etcd_data.exists()
            and all(self.pid_of(m) is None for m in self.settings.etcd_names())
            and not any(
                (self.layout.node_data(n) / "PG_VERSION").exists()
                for n in self.settings.node_names()
            )
        ):
            # etcd's data outlives a state dir removed by hand (it is on tmpfs, apart):
            # its cluster's initialize key, with no database behind it any more, would
            # leave every Patroni node "waiting for leader to bootstrap" for ever.
            shutil.rmtree(self.layout.etcd_data)
        for member in self.settings.etcd_names():
            data = self.layout.etcd_data_of(member)
            data.mkdir(parents=True, exist_ok=True)
            data.chmod(0o700)
            run_as.chown(data)
        run_as.chown(self.layout.etcd_data)
        for node in self.settings.node_names():
            node_dir = self.layout.node_dir(node)
            node_dir.mkdir(exist_ok=True)
            node_dir.chmod(0o700)
            run_as.chown(node_dir)
            run_as.chown(patroni.close_gate(node_dir))
            cfg = self.layout.patroni_cfg(node)
            cfg.write_text(patroni.node_config(self.settings, self.layout, node, secrets))
            cfg.chmod(0o600)
            run_as.chown(cfg)
        for stale in self.layout.haproxy_sockets():
            stale.unlink(missing_ok=True)  # a crashed run's: a new one must not look ready
        certs = tls.ensure_certificates(self.settings)
        self.say(f"    tls: {certs.decision}")
        for name in self.settings.haproxy_names():
            self.layout.haproxy_cfg_of(name).write_text(
                haproxy.render(self.settings, self.layout, name)
            )
        if self.settings.multihost():
            keepalived.write_files(self.settings, self.layout)

    def _launch(self, name: str, argv: list[str], env: dict[str, str]) -> PidRecord:
        ns = self.settings.netns_of(name)
        if ns is not None:  # on its host: `ip netns exec` enters the namespace and execs
            argv = ["ip", "netns", "exec", ns, *argv]
            env = {**env, "PATH": env.get("PATH", "") + ":/usr/sbin:/sbin"}
        pid = spawn(argv, self.layout.logfile(name), env)
        # ip netns exec, setpriv and env -C exec, so this pid is the component's own.
        return write_pidfile(self.layout.pidfile(name), pid)

    def _create_hosts(self) -> None:
        hostnet.create(self.settings)
        for host, address in self.settings.hosts().items():
            self.say(f"    {hostnet.netns(self.settings, host)}: {address}")

    def start_keepalived(self, name: str) -> PidRecord:
        # keepalived forks its VRRP process, which outlives a parent killed with -9 and
        # keeps the address and the pid files: a new one would exit at once.
        keepalived.kill_strays(self.layout, name)
        return self._launch(
            name, keepalived.argv(self.layout, name), {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        )

    def _start_keepalived(self) -> None:
        """Both VRRP daemons; the virtual IP lands on the first balancer to win."""
        for name in keepalived.names():
            self.start_keepalived(name)
        wait_for(
            "virtual IP on a balancer",
            lambda: (hostnet.vip_holder(self.settings) is not None, "no balancer holds it"),
            timeout=20,
            alive=self._alive_check(*keepalived.names()),
        )
        self.say(f"    virtual IP {self.settings.vip()} on {hostnet.vip_holder(self.settings)}")

    def _alive_check(self, *names: str) -> Callable[[], str | None]:
        def check() -> str | None:
            for name in names:
                rec = self._record(name)
                if rec is None or not rec.alive():
                    tail = self.log_tail(name, 1)
                    last = tail[-1].strip() if tail else "no output"
                    return f"{name} exited (see `switchboard logs {name}`): {last[:200]}"
            return None

        return check

    def _spawn_etcd(self, run_as: RunAs, name: str = "etcd") -> PidRecord:
        home = str(self.layout.etcd_data_of(name))
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"}
        return self._launch(name, run_as.wrap(etcd.argv(self.settings, self.layout, name)), env)

    def _start_etcd(self, run_as: RunAs) -> None:
        members = self.settings.etcd_names()
        for name in members:
            self._spawn_etcd(run_as, name)
        wait_for(
            "etcd",
            lambda: (all(etcd.healthy(self.settings, name=n) for n in members), "no quorum yet"),
            timeout=20,
            alive=self._alive_check(*members),
        )

    def _start_patroni(self, run_as: RunAs) -> None:
        for node in self.settings.node_names():
            self.start_node(node, run_as)

    def start_node(self, node: str, run_as: RunAs | None = None) -> PidRecord:
        """Start one Patroni node (after a crash it rejoins, with pg_rewind if needed)."""
        if run_as is None:
            run_as = RunAs.for_current_process(self.settings.run_as)
        node_dir = self.layout.node_dir(node)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(node_dir), "LANG": "C.UTF-8"}
        # env -C: start in the node dir, which the DB user can always enter.
        argv = [
            "env",
            "-C",
            str(node_dir),
            str(self.venv_bin / "patroni"),
            str(self.layout.patroni_cfg(node)),
        ]
        return self._launch(node, run_as.wrap(argv), env)

    def start_haproxy(self, name: str) -> PidRecord:
        # A dead process's socket must not make the new one look ready.
        self.layout.haproxy_socket_of(name).unlink(missing_ok=True)
        argv = [self.settings.haproxy_bin, "-db", "-f", str(self.layout.haproxy_cfg_of(name))]
        return self._launch(name, argv, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

    def _start_haproxy(self) -> None:
        """The first process serves every port; the others share the client port with it."""
        for name in self.settings.haproxy_names():
            self.start_haproxy(name)
        for name in self.settings.haproxy_names():
            wait_for(
                name,
                functools.partial(_socket_ready, self.layout.haproxy_socket_of(name)),
                timeout=10,
                alive=self._alive_check(name),
            )

    def reload_tls(self, renew: bool = False) -> tls.TlsFiles:
        """Read the certificate files again (or make a new server certificate, when
        due or asked) and hand them to every running HAProxy process, without a
        restart: open TLS connections stay, new ones get the new certificate."""
        if not self.layout.haproxy_sockets():
            raise ComponentFailed("no HAProxy is running here (`switchboard up`)")
        certs = tls.ensure_certificates(self.settings, renew=renew)
        self.say(f"tls: {certs.decision}")
        taken = haproxy.push_certificate(self.layout, certs.haproxy_pem)
        self.say(f"tls: {taken} HAProxy process(es) serve certificate serial {certs.serial:x}")
        return certs

    def _wait_db(self) -> None:
        nodes = self.settings.node_names()

        def cluster_ready() -> tuple[bool, str]:
            view = patroni.cluster_view(self.settings)
            if view is None:
                return False, "no Patroni REST API answers yet"
            return view.healthy(len(nodes))

        s = self.settings
        alive = self._alive_check(*s.etcd_names(), *s.haproxy_names(), *nodes)
        wait_for("patroni cluster", cluster_ready, self.settings.startup_timeout_s, alive, 0.25)
        wait_for("db primary port", self._primary_writable, 20, alive, 0.2)

    def _primary_writable(self) -> tuple[bool, str]:
        async def probe() -> bool:
            conn = await asyncpg.connect(dsn(self.settings, role="superuser"), timeout=2)
            try:
                return not await conn.fetchval("SELECT pg_is_in_recovery()")
            finally:
                await conn.close()

        try:
            ok = asyncio.run(probe())
        except DB_ERRORS as exc:
            return False, type(exc).__name__
        return ok, "primary port reaches a node in recovery"

    def _migrate(self) -> None:
        # Here, not at the top: Alembic takes a good part of a second to import, and
        # only `up` needs it (not `status`, `down` or `logs`).
        from app.store import migrate

        migrate.bootstrap(self.settings)

    def _start_workers(self) -> None:
        base_env = self._python_env()
        for wid in self.settings.worker_ids():
            self.start_worker(wid, base_env)
        for wid in self.settings.worker_ids():
            self.wait_worker(wid)
        wait_for(
            "haproxy sees the workers",
            self._workers_up_in_haproxy,
            timeout=15,
            alive=self._alive_check(*self.settings.worker_ids()),
        )

    def start_worker(self, wid: str, env: dict[str, str] | None = None) -> PidRecord:
        env = {**(env or self._python_env()), "SWITCHBOARD_WORKER_ID": wid}
        env["SWITCHBOARD_HOST"] = self.settings.address_of(wid)
        return self._launch(wid, [sys.executable, "-m", "app.worker"], env)

    def wait_worker(self, wid: str, timeout: float = 20) -> None:
        url = self.settings.worker_health_url(wid)
        wait_for(
            f"worker {wid}",
            lambda: (http_json(url)[0] == 200, "health check not passing"),
            timeout=timeout,
            alive=self._alive_check(wid),
        )

    def _python_env(self) -> dict[str, str]:
        """The environment of our own Python processes: these settings, this state dir."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            **self.settings.to_env(),
            "SWITCHBOARD_STATE_DIR": str(self.layout.root),
        }

    def start_dashboard(self) -> PidRecord:
        env = {**self._python_env(), "SWITCHBOARD_HOST": self.settings.address_of("dashboard")}
        return self._launch("dashboard", [sys.executable, "-m", "app.dashboard"], env)

    def _start_dashboard(self) -> None:
        """The admin dashboard: one process on its app port, behind HAProxy's dashboard_port."""
        self.start_dashboard()
        alive = self._alive_check("dashboard")
        wait_for("dashboard", self._dashboard_answers, 20, alive)
        wait_for("haproxy sees the dashboard", self._dashboard_up_in_haproxy, 15, alive)

    def _dashboard_answers(self) -> tuple[bool, str]:
        s = self.settings
        url = f"http://{s.address_of('dashboard')}:{s.dashboard_app_port()}/healthz"
        return http_json(url)[0] == 200, "not answering"

    def _start_supervisor(self) -> None:
        """Last, once everything is up: from now on a crashed component comes back."""
        argv = [sys.executable, "-m", "app.cluster.supervisor"]
        self._launch("supervisor", argv, self._python_env())
        # It takes the lock for its first tick: once it has, it is running.
        wait_for(
            "supervisor",
            lambda: (self.layout.supervisor_lock.exists(), "not started yet"),
            timeout=20,
            alive=self._alive_check("supervisor"),
        )

    def start_component(self, name: str) -> PidRecord:
        """Start one component again the way `up` started it, without waiting for it to
        be ready (the supervisor's restart). A Patroni node starts as Patroni only: the
        postmaster it detached may still run, and the new Patroni takes it over."""
        if name in self.settings.etcd_names():
            return self._spawn_etcd(RunAs.for_current_process(self.settings.run_as), name)
        if name in self.keepalived_names():
            return self.start_keepalived(name)
        if name in self.settings.node_names():
            return self.start_node(name)
        if name in self.haproxy_names():
            return self.start_haproxy(name)
        if name in self.worker_names():
            return self.start_worker(name)
        if name == "dashboard":
            return self.start_dashboard()
        raise ClusterError(f"no component {name!r} to start")

    def wait_ready(self, name: str, timeout: float = 60) -> None:
        """Wait until a (re)started component serves: what `up` waits for after each step."""
        alive = self._alive_check(name)
        if name in self.settings.etcd_names():
            wait_for(
                name,
                lambda: (etcd.healthy(self.settings, name=name), "not healthy"),
                timeout,
                alive,
            )
        elif name in self.keepalived_names():
            wait_for(
                "virtual IP on a balancer",
                lambda: (hostnet.vip_holder(self.settings) is not None, "no balancer holds it"),
                timeout,
                alive,
            )
        elif name in self.settings.node_names():
            self.wait_db_healthy(timeout)
        elif name in self.haproxy_names():
            socket = self.layout.haproxy_socket_of(name)
            wait_for(name, functools.partial(_socket_ready, socket), timeout, alive)
        elif name == "dashboard":
            wait_for("dashboard", self._dashboard_answers, timeout, alive)
            wait_for("haproxy sees the dashboard", self._dashboard_up_in_haproxy, timeout, alive)
        else:
            self.wait_worker(name, timeout)
            wait_for(f"haproxy sees {name}", lambda: self._worker_up_in_haproxy(name), 15, alive)

    def _dashboard_up_in_haproxy(self) -> tuple[bool, str]:
        try:
            states = haproxy.server_states(self.layout)
        except OSError as exc:
            return False, f"stats socket: {exc}"
        status = next((x.status for x in states if x.backend == "dashboard"), "?")
        return status == "UP", f"dashboard is {status}"

    def drain_worker(self, wid: str, undo: bool = False) -> dict[str, object]:
        """Ask a worker (over its admin endpoint) to drain, or to take clients again."""
        s = self.settings
        action = "undrain" if undo else "drain"
        url = f"http://{s.address_of(wid)}:{s.worker_health_port(wid)}/admin/{action}"
        request = urllib.request.Request(
            url,
            method="POST",
            headers={"X-Switchboard-Admin": worker_admin_token(read_secrets(s)["admin"])},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                result: dict[str, object] = json.load(response)
                return result
        except OSError as exc:
            raise ClusterError(f"worker {wid} did not take the request: {exc}") from None

    def restart_worker(self, wid: str) -> None:
        """SIGTERM (the worker drains its clients to the others and exits), then start it
        again; held meanwhile, so the supervisor does not start it a second time."""
        s = self.settings
        with self.held(wid):
            rec = self._record(wid)
            if rec is not None and rec.alive():
                stop_all([rec], signal.SIGTERM, timeout=s.drain_spread_s + s.drain_timeout_s + 10)
            self.start_worker(wid)
            self.wait_ready(wid)

    def held(self, *names: str) -> contextlib.AbstractContextManager[None]:
        """Components stopped on purpose for the block: the supervisor leaves them alone."""
        return runstate.hold(self.layout, *names)

    def restart_workers(self) -> None:
        """A rolling restart: one worker at a time, each drained before it stops."""
        for wid in self.worker_names():
            self._step(f"restart {wid}", lambda wid=wid: self.restart_worker(wid))  # type: ignore[misc]

    def _worker_up_in_haproxy(self, wid: str) -> tuple[bool, str]:
        try:
            states = haproxy.server_states(self.layout)
        except OSError as exc:
            return False, f"stats socket: {exc}"
        # Routable for TCP and WebSocket clients alike.
        found = {x.backend: x.status for x in states if x.server == wid}
        status = found.get("workers", "?")
        ws_status = found.get("ws_workers", "?")
        return status == ws_status == "UP", f"{wid} is {status} (websockets {ws_status})"

    def _workers_up_in_haproxy(self) -> tuple[bool, str]:
        try:
            states = haproxy.server_states(self.layout)
        except OSError as exc:
            return False, f"stats socket: {exc}"
        down = [
            f"{s.backend}/{s.server}"
            for s in states
            if s.backend in ("workers", "ws_workers") and s.status != "UP"
        ]
        return not down, f"not UP yet: {', '.join(down)}"

    def _clear_stale_pidfiles(self) -> None:
        for name in self.component_names():
            path = self.layout.pidfile(name)
            rec = read_pidfile(path)
            if rec is not None and not rec.alive():
                path.unlink(missing_ok=True)

    # ---- down --------------------------------------------------------------
    def down(self, purge: bool = False) -> None:
        """Stop everything: workers, then all Patroni nodes together, then HAProxy and etcd."""

        def records(names: list[str]) -> list[PidRecord]:
            return [r for r in (self._record(n) for n in names) if r is not None]

        s = self.settings
        # First: nothing may start again what the next lines stop.
        stop_all(records(["supervisor"]), signal.SIGTERM, timeout=10)
        stop_all(
            records([*self.worker_names(), "dashboard"]),
            signal.SIGTERM,
            timeout=s.shutdown_grace_s + 2,
        )
        # Together: one by one, each synchronous standby waits to be released (~20 s).
        postmasters = [p for p in (self._postmaster(n) for n in s.node_names()) if p]
        stop_all(records(s.node_names()), signal.SIGTERM, timeout=40)
        # Patroni detaches the postmaster; after a kill -9 of Patroni it is still running.
        stop_all(postmasters, signal.SIGINT, timeout=30)
        stop_all(
            records([*self.keepalived_names(), *self.haproxy_names(), *s.etcd_names()]),
            signal.SIGTERM,
            timeout=10,
        )
        for name in self.keepalived_names():
            keepalived.kill_strays(self.layout, name)  # a VRRP child whose parent was killed
        if s.multihost():
            hostnet.destroy(s)
        for name in self.component_names():
            self.layout.pidfile(name).unlink(missing_ok=True)
        if self.layout.run.exists():
            for stale in self.layout.haproxy_sockets():
                stale.unlink(missing_ok=True)
            runstate.clear_holds(self.layout)
            self.layout.cluster_file.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.layout.etcd_data, ignore_errors=True)
            shutil.rmtree(self.layout.root, ignore_errors=True)

    # ---- status ------------------------------------------------------------
    def status(self) -> list[ComponentStatus]:
        s = self.settings
        view = patroni.cluster_view(s)
        members = {m.name: m for m in view.members} if view else {}
        restarts = runstate.read_restarts(self.layout)
        out = []
        for name in self.component_names():
            rec = self._record(name)
            running = rec is not None and rec.alive()
            pid = rec.pid if rec else None
            if name == "supervisor":
                endpoint = f"every {s.supervise_interval_s:g} s (logs/supervisor.log)"
                ok = running
                detail = f"watching {len(self.supervised_names())} components" if ok else "down"
            elif name in s.etcd_names():
                ok = running and etcd.healthy(s, name=name)
                endpoint = f"http://{etcd.client_address(s, name)}"
                detail = "healthy" if ok else "not answering"
            elif name in self.keepalived_names():
                holder = hostnet.vip_holder(s)
                ok = running
                endpoint = f"VRRP for {s.vip()}"
                detail = "holds the virtual IP" if holder == s.host_of(name) else "backup"
            elif name in members or name in s.node_names():
                m = members.get(name)
                endpoint = (
                    f"{s.address_of(name)}:{s.pg_port(name)} (REST {s.patroni_rest_port(name)})"
                )
                detail = f"{m.role} {m.state} tl={m.timeline} lag={m.lag}" if m else "unknown"
                ok = running and m is not None and m.state in ("running", "streaming")
            elif name == "haproxy" or (name.startswith("haproxy") and s.multihost()):
                endpoint = (
                    f"{_client_ports(s)}, db primary :{s.db_primary_port}, "
                    f"replicas :{s.db_replica_port}, "
                    f"stats http://{s.address_of(name)}:{s.haproxy_stats_port}/"
                )
                ok = running and self.layout.haproxy_socket_of(name).exists()
                detail = "serving" if ok else "down"
            elif name.startswith("haproxy"):
                endpoint = f"{_client_ports(s)} (shared with haproxy)"
                ok = running and self.layout.haproxy_socket_of(name).exists()
                detail = "serving" if ok else "down"
            elif name == "dashboard":
                scheme = "https" if s.dashboard_tls or s.dashboard_tls_pem else "http"
                endpoint = (
                    f"{scheme}://{s.address_of('haproxy')}:{s.dashboard_port}/ "
                    f"(app :{s.dashboard_app_port()})"
                )
                code, body = http_json(
                    f"http://{s.address_of(name)}:{s.dashboard_app_port()}/healthz"
                )
                ok = running and code == 200
                detail = (
                    f"serving sessions={body.get('sessions', '?')}"
                    if isinstance(body, dict)
                    else "not answering"
                )
            else:
                at = s.address_of(name)
                endpoint = f"{at}:{s.worker_port(name)} (health :{s.worker_health_port(name)})"
                code, body = http_json(s.worker_health_url(name))
                ok = running and code == 200
                detail = worker_detail(body) if isinstance(body, dict) else "not answering"
            count = restarts[name].count if name in restarts else 0
            where = s.host_of(name) or ""
            out.append(ComponentStatus(name, pid, running, endpoint, detail, ok, count, where))
        return out

    def log_tail(self, name: str, lines: int) -> list[str]:
        path = self.layout.logfile(name)
        try:
            with path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 64 * 1024 * max(1, lines // 100)))
                data = fh.read().decode(errors="replace")
        except OSError:
            return []
        return data.splitlines()[-lines:]


def worker_detail(health: dict[str, object]) -> str:
    """A worker's status line from its /health: state, sessions, and how loaded it is
    (event-loop lag, lease age, requests waiting for admission, refused overloaded)."""

    def total(key: str) -> object:
        value = health.get(key)
        return sum(value.values()) if isinstance(value, dict) else value

    parts = [
        str(health.get("state", "?")),
        f"sessions={health.get('sessions', '?')}",
        f"lag={health.get('loop_lag_ms', '?')}ms",
        f"lease={health.get('lease_age_s', '?')}s",
        f"queued={total('queues') if 'queues' in health else '?'}",
        f"shed={total('shed') if 'shed' in health else health.get('overloaded', '?')}",
    ]
    if health.get("headroom") is not None:  # worker_max_sessions is set
        parts.insert(2, f"headroom={health['headroom']}")
    if health.get("shedding"):
        parts.append(f"SHEDDING ({health['shedding']})")
    return " ".join(parts)


def _client_ports(s: Settings) -> str:
    """Both client ports, and whether the plaintext one is reachable from other hosts."""
    reach = "PUBLIC" if s.plaintext_is_public() else "loopback only"
    return (
        f"clients TLS {s.public_bind_host()}:{s.client_tls_port}, "
        f"plaintext {s.plaintext_bind_host()}:{s.client_port} ({reach}), "
        f"wss {s.public_bind_host()}:{s.client_wss_port} (web chat /chat/), "
        f"ws {s.plaintext_bind_host()}:{s.client_ws_port}"
    )


def format_status(rows: list[ComponentStatus]) -> str:
    if any(r.host for r in rows):  # many hosts: which host each component is on
        rows = [dataclasses.replace(r, name=f"{r.name}@{r.host or 'machine'}") for r in rows]
    header = ("COMPONENT", "PID", "HEALTH", "RESTARTS", "ENDPOINT", "DETAIL")
    table = [header] + [
        (
            r.name,
            str(r.pid) if r.running and r.pid else "-",
            "ok" if r.healthy else ("DOWN" if not r.running else "UNHEALTHY"),
            str(r.restarts),
            r.endpoint,
            r.detail,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1]
        for row in table
    )


__all__ = ["ClusterError", "ComponentStatus", "LocalCluster", "format_status"]
