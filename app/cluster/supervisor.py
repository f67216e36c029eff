"""The supervisor: starts a crashed component of the local cluster again, with backoff.

``switchboard up`` starts it last, detached like the others (run/supervisor.pid,
logs/supervisor.log); ``down`` stops it first. Every ``supervise_interval_s`` it
looks at the pid of each component `up` started (etcd, the Patroni nodes, the
HAProxy processes, the workers, the dashboard) and starts a dead one again
through ``LocalCluster.start_component``, the launcher's own code. A Patroni
node comes back as Patroni only: the postmaster it detached may still run, and
the new Patroni takes it over (or starts PostgreSQL, which rejoins as a replica).

Backoff, per component: the first restart at once; each further one at least
``supervise_backoff_base_s`` after the one before, doubling up to
``supervise_backoff_max_s``; a component that then stays up
``supervise_healthy_s`` starts again from no backoff.

What is stopped on purpose stays stopped: a component with a live hold mark
(run/<name>.hold) is left alone, and so is everything while a command holds
run/supervisor.lock (app/cluster/runstate.py). Each tick returns a readable
decision for every component whose situation changed; restarts are logged as
``component_restarted`` events and counted in run/restarts.json.

With ``storm_gate`` on, the supervisor's process also runs the storm gate
(app/cluster/storm_gate.py) in a thread of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app import logs
from app.cluster import runstate
from app.cluster.errors import ClusterError
from app.cluster.launcher import LocalCluster
from app.cluster.layout import Layout
from app.cluster.process import PidRecord, read_pidfile
from app.cluster.storm_gate import StormGateThread
from app.settings import Settings

log = logs.get_logger("supervisor")


class Tier(Protocol):
    """What the supervisor needs of the launcher (a fake one in the unit tests)."""

    @property
    def layout(self) -> Layout: ...

    def supervised_names(self) -> list[str]: ...

    def pid_of(self, name: str) -> int | None: ...

    def start_component(self, name: str) -> PidRecord: ...


@dataclass(frozen=True, slots=True)
class Decision:
    component: str
    decision: str


@dataclass(slots=True)
class Backoff:
    base_s: float
    max_s: float
    healthy_s: float
    attempts: int = 0  # restarts since the component was last healthy long enough
    last_start: float = float("-inf")

    def wait_s(self) -> float:
        """How long after the last restart the next one may come."""
        if self.attempts == 0:
            return 0.0
        return float(min(self.base_s * 2 ** (self.attempts - 1), self.max_s))

    def due_at(self) -> float:
        return self.last_start + self.wait_s()

    def started(self, now: float) -> None:
        self.attempts += 1
        self.last_start = now

    def settle(self, now: float) -> bool:
        """The component is up: forget the backoff once it has stayed up long enough."""
        if self.attempts and now - self.last_start >= self.healthy_s:
            self.attempts = 0
            return True
        return False


def _exit_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


class Supervisor:
    def __init__(
        self,
        tier: Tier,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.tier = tier
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.backoffs: dict[str, Backoff] = {}
        self._said: dict[str, str] = {}
        self._exits: dict[int, str] = {}  # pid -> how it ended (our own children only)
        self._next_due: float | None = None

    def tick(self) -> list[Decision]:
        """Look at every component once; the decisions that changed since the last tick."""
        self._reap()
        self._next_due = None
        with runstate.locked(self.tier.layout, wait=False) as got:
            if not got:
                return self._say("*", "paused: a command holds run/supervisor.lock")
            decisions = self._say("*", "watching")
            for name in self.tier.supervised_names():
                decisions += self._check(name)
            return decisions

    def sleep_s(self) -> float:
        """Until the next tick: the interval, or sooner when a restart comes due."""
        interval = self.settings.supervise_interval_s
        if self._next_due is None:
            return interval
        return min(interval, max(0.05, self._next_due - self.clock()))

    def _check(self, name: str) -> list[Decision]:
        now = self.clock()
        s = self.settings
        backoff = self.backoffs.setdefault(
            name,
            Backoff(s.supervise_backoff_base_s, s.supervise_backoff_max_s, s.supervise_healthy_s),
        )
        holder = runstate.holder(self.tier.layout, name)
        if holder is not None:
            return self._say(name, f"held by pid {holder.pid}: stopped on purpose, left alone")
        if self.tier.pid_of(name) is not None:
            if backoff.settle(now):
                return self._say(name, f"up {s.supervise_healthy_s:g} s: backoff reset")
            return self._say(name, "running")
        due = backoff.due_at()
        if now < due:
            self._next_due = due if self._next_due is None else min(self._next_due, due)
            return self._say(
                name,
                f"down: restart {backoff.attempts + 1} waits for backoff until +{due - now:.1f} s",
            )
        return self._restart(name, backoff, now)

    def _restart(self, name: str, backoff: Backoff, now: float) -> list[Decision]:
        old = read_pidfile(self.tier.layout.pidfile(name))
        reason = "never started"
        if old is not None:
            reason = self._exits.pop(old.pid, f"pid {old.pid} gone")
        waited = backoff.wait_s()
        backoff.started(now)
        try:
            started = self.tier.start_component(name)
        except ClusterError as exc:
            log.error(
                "component_restart_failed", component=name, attempt=backoff.attempts, error=str(exc)
            )
            return self._say(name, f"restart {backoff.attempts} failed: {exc}")
        restart = runstate.record_restart(self.tier.layout, name, reason, self.wall())
        log.warning(
            "component_restarted",
            component=name,
            pid=started.pid,
            attempt=backoff.attempts,
            backoff=waited,
            reason=reason,
            restarts=restart.count,
        )
        return self._say(
            name,
            f"{reason}: restarted as pid {started.pid} (attempt {backoff.attempts}, "
            f"after {waited:g} s of backoff)",
        )

    def _reap(self) -> None:
        """Collect the exit status of the components we started, so none stays a zombie."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exits[pid] = _exit_reason(status)

    def _say(self, component: str, decision: str) -> list[Decision]:
        """A decision, if it differs from the last one for this component."""
        if self._said.get(component) == decision:
            return []
        self._said[component] = decision
        return [Decision(component, decision)]


def main() -> None:
    settings = Settings.load()
    logs.configure(settings.log_level, sys.stdout, process="supervisor")
    cluster = LocalCluster(settings)
    supervisor = Supervisor(cluster, settings)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if settings.storm_gate:
        StormGateThread(cluster, stop).start()
    log.info(
        "supervisor_started",
        components=cluster.supervised_names(),
        interval_s=settings.supervise_interval_s,
    )
    while not stop.is_set():
        try:
            decisions = supervisor.tick()
        except OSError as exc:  # the state dir went away under us (`down --purge`)
            log.error("supervisor_tick_failed", error=str(exc))
            decisions = []
        for d in decisions:
            log.info("supervisor_decision", component=d.component, decision=d.decision)
        stop.wait(supervisor.sleep_s())
    log.info("supervisor_stopped")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
