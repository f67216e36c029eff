"""Background processes with pid files that survive the launcher.

A pid file holds ``pid starttime`` (field 22 of /proc/PID/stat), so a pid
reused by an unrelated process after a crash is recognised as stale.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.cluster.errors import ClusterError, ComponentFailed


@dataclass(frozen=True, slots=True)
class RunAs:
    """The unprivileged account the DB tier runs as (None fields: ourselves)."""

    user: str | None
    uid: int
    gid: int
    home: str

    @classmethod
    def for_current_process(cls, wanted_user: str) -> RunAs:
        if os.geteuid() != 0:
            return cls(None, os.getuid(), os.getgid(), os.environ.get("HOME", "/tmp"))
        try:
            entry = pwd.getpwnam(wanted_user)
        except KeyError:
            raise ClusterError(
                f"running as root, the DB tier needs the unprivileged user {wanted_user!r}, "
                "which does not exist (install postgresql-15 or set SWITCHBOARD_RUN_AS)"
            ) from None
        return cls(wanted_user, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        if self.user is None:
            return list(argv)
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *argv]

    def chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.uid, self.gid)

    def can_access(self, path: Path, mode: str = "r") -> bool:
        """Whether this user can read (``r``) or traverse/execute (``x``) ``path``."""
        if self.user is None:
            return os.access(path, os.R_OK if mode == "r" else os.X_OK)
        flag = "-r" if mode == "r" else "-x"
        result = subprocess.run(
            self.wrap(["/usr/bin/test", flag, str(path)]), check=False, capture_output=True
        )
        return result.returncode == 0


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None once
    the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()


def proc_start_time(pid: int) -> int | None:
    rest = proc_stat(pid)
    if rest is None or rest[0] == "Z":  # a zombie is as good as gone
        return None
    return int(rest[19])


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    current = proc_start_time(pid)
    if current is None:
        return False
    return start_time is None or current == start_time


@dataclass(frozen=True, slots=True)
class PidRecord:
    pid: int
    start_time: int | None

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start_time)


def write_pidfile(path: Path, pid: int) -> PidRecord:
    record = PidRecord(pid, proc_start_time(pid))
    path.write_text(f"{pid} {record.start_time or 0}\n")
    return record


def read_pidfile(path: Path) -> PidRecord | None:
    try:
        parts = path.read_text().split()
        pid = int(parts[0])
        start = int(parts[1]) if len(parts) > 1 and parts[1] != "0" else None
    except (OSError, ValueError, IndexError):
        return None
    return PidRecord(pid, start)


def spawn(argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> int:
    """Start ``argv`` in its own session, detached from our terminal, logging to a file.

    posix_spawn, not Popen: the component outlives this process by design, and
    a Popen object would warn about a child still running when collected.
    """
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawnp(
            argv[0],
            list(argv),
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
                (os.POSIX_SPAWN_CLOSE, fd),
            ],
            setsid=True,
        )
    except OSError as exc:
        raise ComponentFailed(f"cannot start {argv[0]}: {exc.strerror}") from None
    finally:
        os.close(fd)


def signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def wait_gone(records: Iterable[PidRecord], timeout: float) -> list[PidRecord]:
    """Wait until every process has exited; returns the ones still alive."""
    pending = list(records)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for rec in pending:
            # Reap our own children so they do not linger as zombies.
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(rec.pid, os.WNOHANG)
        pending = [r for r in pending if r.alive()]
        if pending:
            time.sleep(0.05)
    return pending


def stop_all(
    records: Iterable[PidRecord], sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0
) -> None:
    """Signal every process at once, wait, then SIGKILL whatever is left."""
    alive = [r for r in records if r.alive()]
    for rec in alive:
        signal_pid(rec.pid, sig)
    left = wait_gone(alive, timeout)
    for rec in left:
        signal_pid(rec.pid, signal.SIGKILL)
    wait_gone(left, 5.0)
