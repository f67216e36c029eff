"""The storm gate: while the workers shed password logins, HAProxy accepts new client
connections at about the rate the workers log clients in, and the rest wait in the
kernel's listen queue, where waiting costs the cluster nothing.

Every arriving connection costs HAProxy and a worker something before the worker can
answer `overloaded`: at three times the login capacity those arrivals took a fifth
to a third of a 2-core box, and login goodput fell to 72-96 % of the capacity. A
fixed limit (``client_accept_rate``) kept it at 83-93 % but held a worker's reconnect
storm to the same rate (99 % resumed in 4.2 s instead of 0.6 s; docs/benchmarks.md,
Queue at the door). The gate limits only while password logins or registrations are
being refused, which a reconnect storm alone does not cause (resumes and token
logins have queues of their own):

- **engage** when the workers' ``login``/``register`` refusals (their ``/health``
  ``shed``) grew since the last look: HAProxy's global session rate (``set
  rate-limit sessions global``, every process) becomes ``HEADROOM`` times the
  logins, token logins and resumes the workers committed per second lately (each
  process its share, at least ``FLOOR`` a second);
- **follow** the committed rate while refusals go on;
- **lift** the limit (0) ``CALM_S`` after the last refusal.

It runs in the supervisor's process (a thread of its own, ``storm_gate`` on), once
a second, and logs each change as ``storm_gate``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app import logs
from app.cluster.haproxy import runtime_command_all
from app.cluster.health import http_json
from app.cluster.launcher import LocalCluster

log = logs.get_logger("storm_gate")

# Admitted connections per committed login while engaged: each one past the rate the
# workers commit is a refusal, a retry and an arrival again (1.25 refused 0.55-0.59
# per login, 1.1 0.26-0.54; docs/benchmarks.md, Queue at the door).
HEADROOM = 1.1
FLOOR = 20  # new connections a second each HAProxy process admits at least
CALM_S = 5.0  # the limit is lifted this long after the last refused login
_WEIGHT = 0.5  # of each new second in the committed rate's moving average
SHED_KINDS = ("login", "register")
SERVED = ("password_logins", "token_logins", "resumes")


@dataclass(frozen=True, slots=True)
class Reading:
    """What the workers said at one look: password logins and registrations refused
    so far, sessions opened so far (logins, token logins, resumes), when."""

    shed: int
    served: int
    at: float


def reading(healths: list[Any], at: float) -> Reading | None:
    """The sum over the workers' ``/health`` bodies; None unless every one answered."""
    shed = served = 0
    for body in healths:
        if not isinstance(body, dict) or not isinstance(body.get("shed"), dict):
            return None
        shed += sum(int(body["shed"].get(kind, 0)) for kind in SHED_KINDS)
        served += sum(int(body.get(key, 0)) for key in SERVED)
    return Reading(shed, served, at)


class StormGate:
    """The decisions, without I/O: feed it readings, apply what it returns."""

    def __init__(self, processes: int) -> None:
        self.processes = max(1, processes)
        self.limit = 0  # per HAProxy process; 0: no limit
        self._last: Reading | None = None
        self._rate = 0.0  # sessions opened per second, moving average
        self._shed_at = -math.inf

    def _share(self) -> int:
        """Each HAProxy process's share of ``HEADROOM`` x the committed rate (rounded
        to the millionth first, so 1.1 x 600 / 2 is 330, not 331)."""
        return math.ceil(round(HEADROOM * self._rate / self.processes, 6))

    def observe(self, now: Reading | None) -> int | None:
        """The per-process limit to set now, or None to leave it as it is."""
        if now is None:
            return None
        last, self._last = self._last, now
        if last is None or now.at <= last.at or now.shed < last.shed or now.served < last.served:
            return None  # the first look, or a worker restarted: counts start again
        served = (now.served - last.served) / (now.at - last.at)
        self._rate = served if self._rate == 0 else _WEIGHT * served + (1 - _WEIGHT) * self._rate
        if now.shed > last.shed:
            self._shed_at = now.at
            limit = max(FLOOR, self._share())
        elif self.limit and now.at - self._shed_at >= CALM_S:
            limit = 0
        elif self.limit:
            # Engaged and calm so far: follow the committed rate up, never down (a
            # quieter second is not a reason to admit fewer).
            limit = max(self.limit, self._share())
        else:
            return None
        changed = limit != self.limit
        self.limit = limit
        # While engaged the limit is set again every look: a restarted HAProxy
        # process starts without one.
        return limit if changed or limit else None


class StormGateThread(threading.Thread):
    """Looks at the workers once a second and sets HAProxy's limit (supervisor)."""

    def __init__(
        self,
        cluster: LocalCluster,
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="storm-gate", daemon=True)
        self._cluster, self._stop, self._clock = cluster, stop, clock
        self.gate = StormGate(len(cluster.haproxy_names()))

    def run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.look()
            except Exception as exc:  # never the supervisor's end
                log.warning("storm_gate_failed", error=f"{type(exc).__name__}: {exc}")

    def look(self) -> None:
        healths = [
            body for _, body in (http_json(url, 0.5) for url in self._cluster.worker_health_urls())
        ]
        before = self.gate.limit
        limit = self.gate.observe(reading(healths, self._clock()))
        if limit is None:
            return
        runtime_command_all(self._cluster.layout, f"set rate-limit sessions global {limit}")
        if (limit == 0) != (before == 0):  # engaged or lifted (not every change)
            log.info(
                "storm_gate",
                limit_per_process=limit,
                processes=self.gate.processes,
                why="password logins refused" if limit else f"no refusal for {CALM_S:g} s",
            )
