"""What a running local cluster keeps in run/ besides pid files.

- ``cluster.json``: the shape ``up`` started (workers, HAProxy processes, DB
  nodes, client port, supervision on or off). Every later command reads it, so
  ``status`` after ``up --workers 2`` knows there is no w3.
- ``restarts.json``: per component, how often the supervisor restarted it,
  when last and why. The supervisor is its only writer.
- ``<component>.hold``: ``pid starttime`` of a process that stops the component
  on purpose (a rolling restart, a test); the supervisor leaves a held
  component alone while its holder lives.
- ``supervisor.lock``: flock'ed by the supervisor for each tick and by a command
  while it places or removes hold marks, so a mark never lands halfway through
  a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.cluster.errors import ClusterError
from app.cluster.layout import Layout
from app.cluster.process import PidRecord, read_pidfile, write_pidfile
from app.settings import Settings

# The settings a command-line flag of `up` (or a config it no longer sees) may have
# changed, which every later command must take from the running cluster instead.
SHAPE_FIELDS = (
    "workers",
    "haproxy_processes",
    "db_nodes",
    "client_port",
    "supervise",
    "hosts_net",
    "worker_hosts",
    "hosts_prefix",
)


def _write_json(path: Path, data: object) -> None:
    """Whole or not at all: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- the shape -----------------------------------------------------------------


def write_shape(layout: Layout, settings: Settings) -> None:
    _write_json(layout.cluster_file, {f: getattr(settings, f) for f in SHAPE_FIELDS})


def read_shape(layout: Layout) -> dict[str, Any]:
    """The running cluster's shape ({} when none was recorded)."""
    return {k: v for k, v in _read_json(layout.cluster_file).items() if k in SHAPE_FIELDS}


# ---- restarts --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Restart:
    component: str
    count: int
    last_at: float  # unix time
    last_reason: str


def read_restarts(layout: Layout) -> dict[str, Restart]:
    out = {}
    for name, entry in _read_json(layout.restarts_file).items():
        with contextlib.suppress(KeyError, TypeError, ValueError):
            out[name] = Restart(
                name, int(entry["count"]), float(entry["last_at"]), str(entry["last_reason"])
            )
    return out


def record_restart(layout: Layout, component: str, reason: str, at: float) -> Restart:
    restarts = read_restarts(layout)
    before = restarts.get(component)
    restarts[component] = Restart(component, (before.count if before else 0) + 1, at, reason)
    _write_json(
        layout.restarts_file,
        {
            r.component: {"count": r.count, "last_at": r.last_at, "last_reason": r.last_reason}
            for r in restarts.values()
        },
    )
    return restarts[component]


def clear_restarts(layout: Layout) -> None:
    layout.restarts_file.unlink(missing_ok=True)


# ---- the lock and hold marks -------------------------------------------------------


@contextlib.contextmanager
def locked(layout: Layout, wait: bool = True) -> Iterator[bool]:
    """Hold run/supervisor.lock for the block; yields False when ``wait`` is off and
    someone else has it."""
    fd = os.open(layout.supervisor_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holder(layout: Layout, component: str) -> PidRecord | None:
    """The live process holding ``component`` (None: not held, or its holder is gone)."""
    rec = read_pidfile(layout.hold_file(component))
    return rec if rec is not None and rec.alive() else None


@contextlib.contextmanager
def hold(layout: Layout, *components: str) -> Iterator[None]:
    """Keep the supervisor's hands off ``components`` for the block: they are being
    stopped and started on purpose. Nests within one process; another live holder
    of the same component is an error (two commands restarting it at once)."""
    if not layout.run.is_dir():
        yield  # no cluster here: nothing supervises it
        return
    placed: list[str] = []
    with locked(layout):
        for name in components:
            current = holder(layout, name)
            if current is not None and current.pid == os.getpid():
                continue  # an outer block of ours holds it already
            if current is not None:
                raise ClusterError(f"{name} is held by pid {current.pid} (another command?)")
            write_pidfile(layout.hold_file(name), os.getpid())
            placed.append(name)
    try:
        yield
    finally:
        with locked(layout):
            for name in placed:
                layout.hold_file(name).unlink(missing_ok=True)


def clear_holds(layout: Layout) -> None:
    if layout.run.is_dir():
        for mark in layout.run.glob("*.hold"):
            mark.unlink(missing_ok=True)
