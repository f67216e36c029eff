"""A load generator of logged-in sessions: several processes, many source addresses.

One process holds ~8,000 connections (the open-files limit is 20,000 per process)
and binds its connections to source addresses of its own, 127.0.0.2, 127.0.0.3, ...
with ``IP_BIND_ADDRESS_NO_PORT`` (the port is chosen at connect, per 4-tuple), so
that 200,000 connections fit in the ~28,000 ephemeral ports each address has
towards HAProxy's one client port.

Each connection logs in once (``register`` first with ``register=True``; ``hello``
with the password, or ``login_token`` with a device token made in the database by
``preregister``), honours ``overloaded`` / ``rate_limited`` ``retry_after``, then holds
the session: a ``ping`` every ``ping_interval_s`` after its login (the protocol's
idle rule). A dropped session reconnects after 0-100 ms (full jitter, doubling
to 2 s, as the SDK's ``ReconnectPolicy``) and resumes with its resume token; only a
``bad_token`` makes it log in again (with the password or device token), counted as
a fallback login. At most ``inflight`` first logins per process are in progress at
once; resumes are not held back (the storm is what is measured).

HAProxy caps connections per source address (``max_conns_per_addr``, per process):
the cluster must exempt the generator's addresses, and they need the per-address
login and register budgets lifted too: ``conn_cap_exempt_addrs`` and
``shared_client_addrs`` = ``127.0.0.0/8`` (``cluster_overrides()``).

Each process reports to the parent over a pipe: every second a ``tick`` (counters
since the last one, and the sessions online now), ``ready`` once its first logins
are done, and ``report`` (resume times, sessions per worker) when asked to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import math
import multiprocessing as mp
import os
import random
import resource
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from bench._wire import PASSWORD, Frame, SetupError, Wire

DEVICE = "bench"
PING = b'{"op":"ping"}\n'
IP_BIND_ADDRESS_NO_PORT = 24  # <linux/in.h>; not in Python's socket module
PR_SET_PDEATHSIG = 1
SESSIONS_PER_PROCESS = 8_000
PING_INTERVAL_S = 30.0  # a third of the server's idle_timeout_s (90 s)
CONNECTIONS_PER_ADDRESS = 20_000  # of ~28,000 ephemeral ports, with room for reconnects

COUNTERS = (
    "connects",  # TCP connections made (first logins and resumes)
    "logins",  # first logins done (welcome to hello / login_token)
    "resumes",  # welcome to resume
    "overloaded",  # `overloaded` answers, any request
    "rate_limited",
    "drops",  # sessions whose connection closed while logged in
    "fallback_logins",  # logins after a drop: the resume token was refused
    "connect_errors",
    "login_errors",  # connections lost before their welcome (retried)
    # Closed by the server as silent (`idle_timeout`), and of those, how many had a
    # ping (or its login) written less than two ping intervals before: it did not get through
    # in time (the server or the path was behind), not the generator.
    "idle_timeouts",
    "idle_after_ping",
    "lag_ms",  # this process's event loop: ms late on its 1 s ticks
    "ping_errors",
)


def cluster_overrides() -> dict[str, str]:
    """Settings the cluster needs for a generator on 127.0.0.2, 127.0.0.3, ..."""
    return {"conn_cap_exempt_addrs": "127.0.0.0/8,::1", "shared_client_addrs": "127.0.0.0/8,::1"}


def source_addresses(sessions: int, procs: int) -> list[str]:
    count = max(procs, math.ceil(sessions / CONNECTIONS_PER_ADDRESS))
    if count > 250:
        raise SystemExit("more source addresses than 127.0.0.2-251")
    return [f"127.0.0.{2 + i}" for i in range(count)]


def default_procs(sessions: int) -> int:
    return max(2, math.ceil(sessions / SESSIONS_PER_PROCESS))


@dataclass(frozen=True)
class GeneratorConfig:
    host: str
    port: int
    users: tuple[str, ...]
    source_addrs: tuple[str, ...]
    device_tokens: tuple[str, ...] = ()  # login_token instead of hello when given
    register: bool = False
    password: str = PASSWORD
    inflight: int = 100
    ping_interval_s: float = PING_INTERVAL_S
    request_timeout_s: float = 120.0
    nice: int = 0  # the process's nice value (negative: ahead of the cluster for the CPU)


# ---- the child process ----------------------------------------------------------------


class Session:
    __slots__ = (
        "addr",
        "device_token",
        "dropped_at",
        "last_seq",
        "pinged_at",
        "token",
        "user",
        "wire",
        "worker",
    )

    def __init__(self, user: str, addr: str, device_token: str) -> None:
        self.user = user
        self.addr = addr
        self.device_token = device_token
        self.wire: Wire | None = None
        self.token = ""
        self.worker = ""
        self.last_seq = 0
        self.dropped_at = 0.0
        self.pinged_at = 0.0


class Generator:
    def __init__(self, config: GeneratorConfig, pipe: Connection) -> None:
        self.c = config
        self.pipe = pipe
        tokens = config.device_tokens or ("",) * len(config.users)
        addrs = config.source_addrs
        self.sessions = [
            Session(u, addrs[i % len(addrs)], t)
            for i, (u, t) in enumerate(zip(config.users, tokens, strict=True))
        ]
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.online = 0
        # (dropped at, connecting at, connected at, welcome at) of each resume, wall
        # clock; connecting: the start of the attempt that resumed
        self.resumed: list[tuple[float, float, float, float]] = []
        self.stopping = False
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    # ---- wire --------------------------------------------------------------------
    async def connect(self, session: Session) -> Wire:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((session.addr, 0))
            await _connect(loop, sock, (self.c.host, self.c.port))
            _, wire = await loop.create_connection(
                lambda: Wire(lambda f: self.on_frame(session, f)), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        self.counts["connects"] += 1
        return wire

    def on_frame(self, session: Session, frame: Frame) -> None:
        op = frame.get("op")
        if op == "msg":
            session.last_seq = max(session.last_seq, int(frame.get("seq") or 0))
        elif op == "reconnect" and session.wire is not None:
            session.wire.close()
        elif op == "error" and frame.get("code") == "idle_timeout":
            self.counts["idle_timeouts"] += 1
            if time.monotonic() - session.pinged_at < 2 * self.c.ping_interval_s:
                self.counts["idle_after_ping"] += 1

    async def call(self, wire: Wire, frame: Frame, want: str, tolerate: str = "") -> Frame:
        while True:
            reply = await wire.request(frame, timeout=self.c.request_timeout_s)
            code = reply.get("code")
            if reply["op"] == want or (tolerate and code == tolerate):
                return reply
            if code in ("overloaded", "rate_limited"):
                self.counts[code] += 1
                await asyncio.sleep(float(reply.get("retry_after") or 1.0))
                continue
            raise SetupError(f"{frame['op']} {frame.get('user', '')}: {reply}")

    def login_frame(self, session: Session) -> Frame:
        if session.device_token:
            return {
                "op": "login_token",
                "user": session.user,
                "device": DEVICE,
                "device_token": session.device_token,
            }
        return {
            "op": "hello",
            "user": session.user,
            "password": self.c.password,
            "device": DEVICE,
            "v": 1,
        }

    def welcomed(self, session: Session, wire: Wire, welcome: Frame) -> None:
        session.wire = wire
        session.token = welcome["resume_token"]
        session.worker = welcome["worker"]
        session.device_token = welcome.get("device_token") or session.device_token
        session.last_seq = max(session.last_seq, int(welcome.get("seq") or 0))
        session.pinged_at = time.monotonic()  # the login was its last word: pings from here
        self.online += 1
        wire.on_close = lambda _exc: self.lost(session, wire)
        if wire.closed:  # lost before we watched it
            self.lost(session, wire)

    def lost(self, session: Session, wire: Wire) -> None:
        if self.stopping or session.wire is not wire:
            return
        session.wire = None
        session.dropped_at = time.time()
        self.online -= 1
        self.counts["drops"] += 1
        self.spawn(self.resume(session))

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- first login and resume ----------------------------------------------------
    async def first_login(self, session: Session, gate: asyncio.Semaphore) -> None:
        attempt = 0
        async with gate:
            while not self.stopping:
                try:
                    wire = await self.connect(session)
                except OSError:
                    self.counts["connect_errors"] += 1
                    await asyncio.sleep(_backoff(attempt))
                    attempt += 1
                    continue
                try:
                    if self.c.register:
                        frame = {
                            "op": "register",
                            "user": session.user,
                            "password": self.c.password,
                        }
                        await self.call(wire, frame, "registered", tolerate="user_exists")
                    welcome = await self.call(wire, self.login_frame(session), "welcome")
                except (ConnectionError, TimeoutError):
                    self.counts["login_errors"] += 1
                    wire.close()
                    await asyncio.sleep(_backoff(attempt))
                    attempt += 1
                    continue
                self.counts["logins"] += 1
                self.welcomed(session, wire, welcome)
                return

    async def resume(self, session: Session) -> None:
        attempt = 0
        while not self.stopping:
            await asyncio.sleep(_backoff(attempt))
            attempt += 1
            connecting_at = time.time()
            try:
                wire = await self.connect(session)
            except OSError:
                self.counts["connect_errors"] += 1
                continue
            connected_at = time.time()
            frame = {
                "op": "resume",
                "user": session.user,
                "device": DEVICE,
                "token": session.token,
                "last_seq": session.last_seq,
            }
            try:
                reply = await self.call(wire, frame, "welcome", tolerate="bad_token")
                if reply["op"] != "welcome":
                    self.counts["fallback_logins"] += 1
                    frame = self.login_frame(session)
                    reply = await self.call(wire, frame, "welcome", tolerate="auth_failed")
                    if reply["op"] != "welcome":  # the device token went with the session
                        session.device_token = ""
                        frame = self.login_frame(session)
                        reply = await self.call(wire, frame, "welcome")
                else:
                    self.counts["resumes"] += 1
                    self.resumed.append(
                        (session.dropped_at, connecting_at, connected_at, time.time())
                    )
            except (ConnectionError, TimeoutError):
                self.counts["login_errors"] += 1
                wire.close()
                continue
            self.welcomed(session, wire, reply)
            return

    # ---- the process ---------------------------------------------------------------------
    async def ticks(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 1.0
            await asyncio.sleep(1.0)
            self.counts["lag_ms"] += max(0, round(1000 * (loop.time() - due)))
            self.tick()

    def tick(self) -> None:
        self.send("tick", time.time(), self.counts, self.online)
        self.counts = dict.fromkeys(COUNTERS, 0)

    async def pings(self) -> None:
        """A ping per session every ping_interval_s of the clock, counted from what it
        last wrote (its login, or its last ping). By the clock, not by the loop's turns:
        a loop that lags (a starved process) still pings each session on time, where
        slicing the sessions by turn made a loop three times slower ping each one every
        90 s, the server's idle_timeout_s."""
        interval = self.c.ping_interval_s
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session in self.sessions:
                if session.wire is None or now - session.pinged_at < interval:
                    continue
                try:
                    session.wire.write(PING)
                except RuntimeError:  # uvloop: the handle closed, its loss not yet told
                    self.counts["ping_errors"] += 1
                    continue
                session.pinged_at = now

    def send(self, *message: Any) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(message)

    def on_command(self) -> None:
        try:
            command = self.pipe.recv()
        except (EOFError, OSError):
            command = "stop"  # the parent is gone
        if command == "stop":
            self.stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self.on_command)
        background = [loop.create_task(self.ticks()), loop.create_task(self.pings())]
        for task in background:  # these never end: one that fails stops the run, loudly
            task.add_done_callback(self.background_ended)
        gate = asyncio.Semaphore(self.c.inflight)
        logins = loop.create_task(
            asyncio.wait([loop.create_task(self.first_login(s, gate)) for s in self.sessions])
        )
        stopped = loop.create_task(self.stop.wait())
        await asyncio.wait([logins, stopped], return_when=asyncio.FIRST_COMPLETED)
        if logins.done():
            self.tick()  # the counts up to now, before the parent reads `ready`
            self.send("ready", self.per_worker())
        await stopped
        self.stopping = True
        report = {
            "resumed": self.resumed,
            "per_worker": self.per_worker(),
            "online": self.online,
            "counts": self.counts,
        }
        for session in self.sessions:
            if session.wire is not None:
                session.wire.close()
        for task in [*background, *self.tasks, logins]:
            task.cancel()
        self.send("report", report)

    def background_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stopping:
            return
        exc = task.exception()
        self.send("failed", f"{task.get_coro()!r} ended: {exc!r}")

    def per_worker(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for session in self.sessions:
            if session.wire is not None:
                out[session.worker] = out.get(session.worker, 0) + 1
        return out


async def _connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple[str, int]
) -> None:
    """A non-blocking connect to a numeric address.

    Not ``loop.sock_connect``: uvloop's resolves every address with getaddrinfo in
    libuv's thread pool (4 threads), numeric or not, and in a reconnect storm of
    thousands at once on a busy box that queue held connects back by up to 11 s
    (strace: bind, then connect of the same socket 11 s later).
    """
    err = sock.connect_ex(address)
    if err == errno.EINPROGRESS:
        writable = loop.create_future()
        loop.add_writer(sock.fileno(), lambda: writable.done() or writable.set_result(None))
        try:
            await writable
        finally:
            loop.remove_writer(sock.fileno())
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _backoff(attempt: int) -> float:
    """The SDK's full jitter: uniform in [0, min(2 s, 0.1 s * 2**attempt)]."""
    return random.uniform(0.0, min(2.0, 0.1 * 2 ** min(attempt, 16)))


def _renice(nice: int) -> None:
    """Give this process ``nice`` where the scheduler will honour it.

    With the kernel's autogroup on (``kernel.sched_autogroup_enabled``, the default
    where it is built in), the CPU is shared first between sessions, each at equal
    weight, and a process's nice counts only within its session. Every cluster
    process runs in a session of its own (app/cluster/process.py), so the generators,
    sharing the benchmark's session, got one ~30th of the box in a resume storm,
    whatever their nice: measured from /proc/PID/schedstat, all 13 runnable for the
    storm's first 5 s with 0.3 of the 2 cores between them. So each generator takes
    a session of its own, and the session's group gets the nice too.
    """
    os.setsid()
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError):  # no autogroup in this kernel
        Path("/proc/self/autogroup").write_text(f"{nice}\n")


def _child(pipe: Connection) -> None:
    """A generator process: takes its config from the pipe, says it is up, and starts
    on the parent's go (see Fleet.__enter__)."""
    import uvloop

    # Die with the parent, whatever kills it (a test's timeout, kill -9).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config: GeneratorConfig = pipe.recv()
    if config.nice:
        _renice(config.nice)
    pipe.send(("up",))
    if pipe.recv() != "go":
        return
    uvloop.run(Generator(config, pipe).run())


# ---- the parent ------------------------------------------------------------------------

START_TIMEOUT_S = 120.0


@dataclass
class Fleet:
    """The generator processes, from the parent's side (a context manager: on exit every
    process is stopped, killed if it does not stop)."""

    configs: list[GeneratorConfig]
    started_at: float = field(default_factory=time.time)
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    # Every process's ticks: (when, counters of the second before it).
    ticks: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    online: dict[int, int] = field(default_factory=dict)  # by process: sessions online
    ready: dict[int, dict[str, int]] = field(default_factory=dict)  # by process: per worker
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    _procs: list[Any] = field(default_factory=list)
    _pipes: list[Connection] = field(default_factory=list)

    @property
    def sessions(self) -> int:
        return sum(len(c.users) for c in self.configs)

    def __enter__(self) -> Fleet:
        """Start every process, and only when all are up (interpreter started, modules
        imported, config read) let them begin together. A process started while the
        earlier ones log in would take minutes to start on a saturated box (the 200,000
        run once stalled there), and spawn's start() waits for the child to read what it
        is sent: the config goes through the pipe after start(), never as an argument."""
        ctx = mp.get_context("spawn")
        for _ in self.configs:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._pipes.append(mine)
        for pipe, config in zip(self._pipes, self.configs, strict=True):
            pipe.send(config)
        deadline = time.monotonic() + START_TIMEOUT_S
        for index, pipe in enumerate(self._pipes):
            left = deadline - time.monotonic()
            if not pipe.poll(max(left, 0.0)) or pipe.recv() != ("up",):
                raise RuntimeError(f"generator {index + 1} not up after {START_TIMEOUT_S:.0f} s")
        self.started_at = time.time()
        for pipe in self._pipes:
            pipe.send("go")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(timeout=10.0)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)

    def poll(self, timeout: float = 0.2) -> None:
        """Take in what the processes reported (waits at most ``timeout``)."""
        pipes = [p for p in self._pipes if not isinstance(p, _Closed)]
        if not pipes:
            time.sleep(timeout)
        for pipe in wait(pipes, timeout) if pipes else []:
            index = self._pipes.index(pipe)  # type: ignore[arg-type]
            try:
                while pipe.poll():  # type: ignore[union-attr]
                    self._take(index, pipe.recv())  # type: ignore[union-attr]
            except (EOFError, OSError):
                self._pipes[index] = _Closed()  # type: ignore[assignment]
        for index, proc in enumerate(self._procs):
            if proc.exitcode not in (None, 0) and index not in self.reports:
                raise RuntimeError(f"generator {index + 1} died with exit code {proc.exitcode}")

    def _take(self, index: int, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "tick":
            _, at, counts, online = message
            self.ticks.append((at, counts))
            for name, n in counts.items():
                self.totals[name] += n
            self.online[index] = online
        elif kind == "ready":
            self.ready[index] = message[1]
        elif kind == "failed":
            raise RuntimeError(f"generator {index + 1}: {message[1]}")
        elif kind == "report":
            report = message[1]
            self.reports[index] = report
            for name, n in report["counts"].items():
                self.totals[name] += n

    def per_second(self, origin: float) -> dict[int, dict[str, int]]:
        """Counters summed over the processes by second from ``origin`` (wall clock):
        second s holds the ticks of (s - 1, s], so second 1 is the first after it."""
        out: dict[int, dict[str, int]] = {}
        for at, counts in self.ticks:
            second = out.setdefault(math.ceil(at - origin), {})
            for name, n in counts.items():
                second[name] = second.get(name, 0) + n
        return out

    def all_ready(self) -> bool:
        return len(self.ready) == len(self.configs)

    def sessions_online(self) -> int:
        return sum(self.online.values())

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every process for its report and to close its sessions."""
        for pipe in self._pipes:
            with contextlib.suppress(OSError, AttributeError):
                pipe.send("stop")
        deadline = time.monotonic() + timeout
        live = [i for i, p in enumerate(self._procs) if p.is_alive()]
        while time.monotonic() < deadline and not all(
            i in self.reports or not self._procs[i].is_alive() for i in live
        ):
            with contextlib.suppress(RuntimeError):
                self.poll(0.2)


class _Closed:
    """Stands in for a pipe whose process has gone (`Fleet.poll` waits on the others:
    ``wait`` refuses a closed descriptor)."""

    def fileno(self) -> int:
        return -1

    def poll(self) -> bool:
        return False


def split(
    host: str,
    port: int,
    users: list[str],
    procs: int,
    device_tokens: list[str] | None = None,
    **options: Any,
) -> list[GeneratorConfig]:
    """``users`` over ``procs`` processes, each with source addresses of its own."""
    addrs = source_addresses(len(users), procs)
    configs = []
    for p in range(procs):
        share = users[p::procs]
        if not share:
            continue
        configs.append(
            GeneratorConfig(
                host=host,
                port=port,
                users=tuple(share),
                source_addrs=tuple(addrs[p::procs]),
                device_tokens=tuple(device_tokens[p::procs]) if device_tokens else (),
                **options,
            )
        )
    return configs


# ---- set-up in the database --------------------------------------------------------------


async def preregister(dsn: str, users: list[str], password_hash: str) -> list[str]:
    """Users with the given password hash and one device token each (for ``login_token``),
    written in one statement: N registrations over the wire cost N argon2 hashes."""
    import asyncpg

    tokens = [secrets.token_urlsafe(32) for _ in users]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            WITH u AS (
                INSERT INTO users (username, password_hash)
                SELECT name, $2 FROM unnest($1::text[]) AS name RETURNING id, username
            ), c AS (INSERT INTO inbox_counters (user_id) SELECT id FROM u)
            INSERT INTO device_credentials (user_id, device, token_hash, last_addr)
            SELECT u.id, $4, t.hash, '127.0.0.1'
            FROM u JOIN unnest($1::text[], $3::bytea[]) AS t(name, hash) ON t.name = u.username
            """,
            users,
            password_hash,
            [hashlib.sha256(t.encode()).digest() for t in tokens],
            DEVICE,
        )
    finally:
        await conn.close()
    return tokens


def password_hash(password: str, memory_kib: int, time_cost: int, parallelism: int) -> str:
    from argon2 import PasswordHasher, Type

    hasher = PasswordHasher(
        time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
    )
    return hasher.hash(password)
