"""Fakes for testing the worker's session logic and liveness without a database.

In the style of h11's tests/helpers.py: `Harness` wires the real parts of a
worker (Dispatcher, Sessions, Login, Messaging, Contacts, Registry, Admission)
to small fakes, and gives a connected peer to drive requests in and read the
frames out::

    h = Harness(monkeypatch)
    peer = h.connect()
    frames = await h.request(peer, Hello(user="alice", password=..., device="phone"))
    assert frames[0]["op"] == "welcome"

The store functions the worker modules call directly (app.store.accounts,
app.store.sessions, and app.store.throttle's counters) are replaced by
`FakeStore` with pytest's monkeypatch, and `FakeCommits` hands password logins
to `FakeStore.password_batch`; every pool handed to the
parts is `NO_POOL`, which fails loudly if any real store code is reached. The
throttle counters run on the harness's `FakeClock` (``h.clock.advance(s)``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from app.protocol import ErrorCode, Hello, Request, error_frame
from app.settings import Settings
from app.store import accounts, throttle
from app.store import sessions as session_store
from app.store.accounts import Account
from app.store.errors import DB_ERRORS, NotFound, UserExists
from app.store.eventlog import EventLog
from app.store.logins import LoggedIn, LoginRefused, PasswordLogin, Refusal
from app.store.messages import AckRequest, NewMessage, ReadRequest, Stored
from app.store.sessions import (
    Reaped,
    ResumedSession,
    ResumeRequest,
    StaleSession,
)
from app.store.throttle import Backoff, Budget
from app.worker.admission import Admission
from app.worker.contacts import Contacts
from app.worker.dispatch import Dispatcher
from app.worker.login import Login
from app.worker.messaging import Messaging
from app.worker.ratelimit import OpBudgets
from app.worker.registry import Registry
from app.worker.revoke import Revoker
from app.worker.session import Sessions
from app.worker.states import Session, SessionState, WorkerState, WorkerStatus

WORKER_ID = "w1"
PUSH_KEY = b"test push key"
GOOD_PASSWORD = "correct horse battery"  # long enough for min_password_chars (12)


class _NoPool:
    """Stands in for every asyncpg pool: any use means a store call was not faked."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a real store function used the pool (pool.{name})")


NO_POOL: Any = _NoPool()


def frames_of(data: bytes) -> list[dict[str, Any]]:
    """The frames in a chunk of output: one JSON object per line."""
    return [orjson.loads(line) for line in data.splitlines() if line]


# ---- the connection ------------------------------------------------------------


class FakePeer:
    """A client connection as the parts see it (the `Peer` protocol of states.py).

    Frames written are decoded into ``frames``; like the real connection, writes
    after close are dropped (kept in ``written_after_close`` for assertions).
    """

    def __init__(self, peer: str = "198.51.100.7:40000", max_inflight: int = 32) -> None:
        self.state = SessionState.ANONYMOUS
        self.session: Session | None = None
        self.peer = peer
        self.closed = False
        self.frames: list[dict[str, Any]] = []
        self.written_after_close: list[dict[str, Any]] = []
        self.inflight_sends = 0
        self.login_wait_until = 0.0
        self._max_inflight = max_inflight

    @property
    def writable(self) -> bool:
        return not self.closed

    # Bytes the fake accepts before it would be a slow reader (write_room).
    room = 1 << 30

    @property
    def write_room(self) -> int:
        return self.room

    def write(self, data: bytes) -> None:
        (self.written_after_close if self.closed else self.frames).extend(frames_of(data))

    def fail(self, code: ErrorCode, message: str, rid: str | int | None = None) -> None:
        self.write(error_frame(code, message, rid))
        if code.fatal:
            self.close()

    def close(self) -> None:
        self.closed = True

    async def send_slot(self) -> None:
        assert self.inflight_sends < self._max_inflight, "the fake has no waiting send slot"

    def send_done(self) -> None:
        self.inflight_sends -= 1

    def __repr__(self) -> str:
        return f"FakePeer({self.peer}, {self.state.value})"


def active_peer(user_id: int = 1, username: str = "alice", **kw: Any) -> FakePeer:
    """A peer already holding an ACTIVE session (set up directly, without a login)."""
    peer = FakePeer(**kw)
    peer.state = SessionState.ACTIVE
    peer.session = Session(100 + user_id, user_id, username, "phone", 1)
    return peer


# ---- the collaborators ---------------------------------------------------------


class FakeAnnouncer:
    """Records what would be told to the other workers."""

    def __init__(self) -> None:
        self.replaced: list[tuple[int, int, int | None]] = []
        self.catch_ups: list[str] = []
        self.pushes: list[tuple[list[int], dict[str, Any]]] = []
        self.catch_up_requested = 0
        self.error: BaseException | None = None  # raised by announce_catch_up

    def replace_session(self, user_id: int, session_id: int, epoch: int | None) -> None:
        self.replaced.append((user_id, session_id, epoch))

    def request_catch_up(self) -> None:
        self.catch_up_requested += 1

    def inbox_moved(self, moved: dict[int, int]) -> None:
        pass

    async def announce_catch_up(self, reason: str) -> None:
        if self.error is not None:
            raise self.error
        self.catch_ups.append(reason)

    async def push(self, user_ids: list[int], frame: dict[str, Any]) -> None:
        self.pushes.append((list(user_ids), frame))


class FakePresence:
    def __init__(self) -> None:
        self.broadcasts: list[int] = []
        self.failing: dict[int, BaseException] = {}  # user id -> what broadcast raises

    async def broadcast(self, user_id: int) -> None:
        if user_id in self.failing:
            raise self.failing[user_id]
        self.broadcasts.append(user_id)


class FakeDelivery:
    def __init__(self) -> None:
        self.dirty: list[int] = []

    def mark_dirty(self, user_ids: Any) -> None:
        self.dirty.extend(user_ids)


class FakeEvents:
    """Records every EventLog call as (method, *args); only EventLog's methods exist."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_") or not callable(getattr(EventLog, name, None)):
            raise AttributeError(name)

        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, *args, *kwargs.values()))

        return record

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call[1:] for call in self.calls if call[0] == name]


class FakePasswords:
    """A "hash" anyone can read: ``hash:<password>``. ``verified`` counts the checks."""

    def __init__(self) -> None:
        self.verified = 0

    async def hash(self, password: str) -> str:
        return "hash:" + password

    async def verify(self, password_hash: str | None, password: str) -> bool:
        self.verified += 1
        return password_hash is not None and password_hash == "hash:" + password


class FakeCommits:
    """The group commits, answering at once with canned results; a password login
    goes to ``store`` (`FakeStore.password_batch`, a batch of one)."""

    def __init__(self, store: FakeStore | None = None, max_devices: int = 10) -> None:
        self.store = store
        self.max_devices = max_devices
        self.resumed: ResumedSession | None = None  # what take_over returns
        self.receipt_ok = True
        self.error: BaseException | None = None  # raised by ack and record_receipt
        self.take_overs: list[ResumeRequest] = []
        self.acks: list[AckRequest] = []
        self.receipts: list[ReadRequest] = []
        self.sent: list[tuple[NewMessage, Callable[[Stored | Exception | None], None]]] = []

    def send(self, message: NewMessage, done: Callable[[Stored | Exception | None], None]) -> None:
        self.sent.append((message, done))

    async def take_over(self, request: ResumeRequest) -> ResumedSession | None:
        self.take_overs.append(request)
        return self.resumed

    async def log_in_by_password(self, request: PasswordLogin) -> LoggedIn | LoginRefused:
        assert self.store is not None, "FakeCommits(store) for password logins"
        (result,) = await self.store.password_batch([request], self.max_devices)
        return result

    async def ack(self, request: AckRequest) -> int:
        if self.error is not None:
            raise self.error
        self.acks.append(request)
        return request.seq

    async def record_receipt(self, request: ReadRequest) -> bool:
        if self.error is not None:
            raise self.error
        self.receipts.append(request)
        return self.receipt_ok


# ---- the store -----------------------------------------------------------------


@dataclass
class SessionRow:
    user_id: int
    device: str
    epoch: int
    token_hash: bytes | None
    state: str = "active"
    reason: str | None = None
    worker_id: str = WORKER_ID


@dataclass
class ThrottleRow:
    """A row of auth_throttle, times on the FakeClock."""

    attempts: int
    first_attempt_at: float
    next_attempt_at: float


@dataclass
class FakeStore:
    """The rows Sessions and Login read and write, in dicts. ``error``, when set, is
    raised by every call (the database is away); ``failing[name]`` by every call of
    that function only. ``lost_commit`` makes `create_user` create the account and
    then raise it (the commit took effect, its answer was lost)."""

    clock: FakeClock = field(default_factory=lambda: FakeClock())
    users: dict[str, Account] = field(default_factory=dict)
    throttle: dict[str, ThrottleRow] = field(default_factory=dict)
    kicked: list[tuple[list[tuple[int, int]], str]] = field(default_factory=list)
    sessions: dict[int, SessionRow] = field(default_factory=dict)
    last_seq: dict[int, int] = field(default_factory=dict)
    acked: dict[tuple[int, str], int] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    device_tokens: dict[tuple[int, str], bytes] = field(default_factory=dict)
    error: BaseException | None = None
    failing: dict[str, BaseException] = field(default_factory=dict)
    lost_commit: BaseException | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Replace the store functions the worker modules call (same module objects)."""
        for module, names in (
            (
                accounts,
                ("create_user", "has_password_hash", "find_user", "change_password"),
            ),
            (
                throttle,
                (
                    "count_backoff",
                    "uncount_backoff",
                    "count_budget",
                    "forget",
                    "give_back",
                    "prune",
                ),
            ),
            (session_store, ("close_session", "detach_session")),
        ):
            for name in names:
                monkeypatch.setattr(module, name, getattr(self, name))

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        if call[0] in self.failing:
            raise self.failing[call[0]]

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [call[1:] for call in self.calls if call[0] == name]

    # ---- test setup ------------------------------------------------------------
    def add_user(
        self, name: str = "alice", password: str = GOOD_PASSWORD, disabled: bool = False
    ) -> Account:
        account = Account(next(self._ids), name, "hash:" + password, disabled)
        self.users[name] = account
        return account

    # ---- app.store.accounts ------------------------------------------------------
    async def create_user(self, pool: Any, username: str, password_hash: str) -> int:
        self._call("create_user", username)
        if username in self.users:
            raise UserExists(username)
        user_id = next(self._ids)
        self.users[username] = Account(user_id, username, password_hash, False)
        if self.lost_commit is not None:
            raise self.lost_commit
        return user_id

    async def has_password_hash(self, pool: Any, username: str, password_hash: str) -> bool:
        self._call("has_password_hash", username)
        account = self.users.get(username)
        return account is not None and account.password_hash == password_hash

    async def find_user(self, pool: Any, username: str) -> Account | None:
        self._call("find_user", username)
        return self.users.get(username)

    async def change_password(
        self, pool: Any, user_id: int, keep_session_id: int, password_hash: str, key: bytes
    ) -> int:
        self._call("change_password", user_id, keep_session_id)
        for name, account in self.users.items():
            if account.id == user_id:
                self.users[name] = Account(user_id, name, password_hash, account.disabled)
        ended = []
        for sid, row in self.sessions.items():
            if row.user_id == user_id and sid != keep_session_id and row.state != "closed":
                row.state, row.reason, row.token_hash = "closed", "password_changed", None
                ended.append((user_id, sid))
        self.kicked.append((ended, "password_changed"))
        return len(ended)

    # ---- app.store.throttle (the statements' rules, on the fake clock) ---------------
    async def count_backoff(self, pool: Any, key: str, policy: Backoff) -> float | None:
        self._call("count_backoff", key)
        now, row = self.clock(), self.throttle.get(key)
        if row is not None and row.next_attempt_at > now:
            return row.next_attempt_at - now
        if row is None or row.next_attempt_at < now - policy.forget_s:
            row = ThrottleRow(0, now, now)
        attempts = row.attempts + 1
        self.throttle[key] = ThrottleRow(
            attempts, row.first_attempt_at, now + policy.delay_s(attempts)
        )
        return None

    async def uncount_backoff(self, pool: Any, key: str, policy: Backoff) -> None:
        self._call("uncount_backoff", key)
        row = self.throttle.get(key)
        if row is not None and row.attempts > 0:
            row.attempts -= 1
            row.next_attempt_at = min(
                row.next_attempt_at, self.clock() + policy.delay_s(row.attempts)
            )

    async def count_budget(self, pool: Any, key: str, policy: Budget) -> float | None:
        self._call("count_budget", key)
        now, row = self.clock(), self.throttle.get(key)
        if row is None or row.next_attempt_at <= now:
            self.throttle[key] = ThrottleRow(1, now, now + policy.window_s)
        elif row.attempts < policy.limit:
            row.attempts += 1
        else:
            return row.next_attempt_at - now
        return None

    async def forget(self, pool: Any, key: str) -> None:
        self._call("forget", key)
        self.throttle.pop(key, None)

    async def give_back(self, pool: Any, key: str) -> None:
        self._call("give_back", key)
        row = self.throttle.get(key)
        if row is not None and row.attempts > 0 and row.next_attempt_at > self.clock():
            row.attempts -= 1

    async def prune(self, pool: Any, older_than_s: float) -> int:
        self._call("prune", older_than_s)
        old = [
            k for k, r in self.throttle.items() if r.next_attempt_at < self.clock() - older_than_s
        ]
        for key in old:
            del self.throttle[key]
        return len(old)

    # ---- app.store.sessions ------------------------------------------------------
    async def close_session(self, pool: Any, session_id: int, epoch: int, reason: str) -> bool:
        self._call("close_session", session_id, epoch, reason)
        row = self.sessions.get(session_id)
        if row is None or row.epoch != epoch or row.state == "closed":
            return False
        row.state, row.reason = "closed", reason
        return True

    async def detach_session(self, pool: Any, session_id: int, epoch: int, reason: str) -> bool:
        self._call("detach_session", session_id, epoch, reason)
        row = self.sessions.get(session_id)
        if row is None or row.epoch != epoch or row.state != "active":
            return False
        row.state, row.reason = "detached", reason
        return True

    # ---- app.store.logins, then throttle.settle_rights (Commits._password_batch) ------
    async def password_batch(
        self, requests: list[PasswordLogin], max_devices: int
    ) -> list[LoggedIn | LoginRefused]:
        """A batch of password logins as one transaction (all of it, or when ``error``
        or ``failing["password_batch"]`` is set, none of it), then the settlement."""
        self._call("password_batch", [(r.user_id, r.device) for r in requests])
        results = [self._open(r, max_devices) for r in requests]
        try:  # as Commits._password_batch: committed, so a failure here is only logged
            for r in requests:
                await self.forget(None, r.pair_key)
                if r.addr_key is not None:
                    await self.give_back(None, r.addr_key)
        except DB_ERRORS:
            pass
        return results

    def _open(self, r: PasswordLogin, max_devices: int) -> LoggedIn | LoginRefused:
        """One login, by logins.open_batch's rules."""
        account = next((a for a in self.users.values() if a.id == r.user_id), None)
        if account is None or account.disabled:
            return LoginRefused(Refusal.DISABLED)
        if account.password_hash != r.password_hash:
            return LoginRefused(Refusal.PASSWORD_CHANGED)
        live = [(sid, row) for sid, row in self.sessions.items() if row.state != "closed"]
        others = sum(1 for _, row in live if row.user_id == r.user_id and row.device != r.device)
        if others >= max_devices:
            return LoginRefused(Refusal.TOO_MANY_DEVICES)
        self.device_tokens[(r.user_id, r.device)] = r.device_token_hash
        old_id, epoch = None, 1
        for sid, row in live:
            if row.user_id == r.user_id and row.device == r.device:
                row.state, row.reason = "closed", "replaced"
                old_id, epoch = sid, row.epoch + 1
        session_id = 1000 + len(self.sessions)
        self.sessions[session_id] = SessionRow(r.user_id, r.device, epoch, r.resume_token_hash)
        return LoggedIn(
            session_id,
            r.user_id,
            epoch,
            old_id,
            WORKER_ID if old_id else None,
            self.last_seq.get(r.user_id, 0),
            self.acked.get((r.user_id, r.device), 0),
            has_contacts=True,
        )

    # ---- the Registry's lookups --------------------------------------------------
    async def require_user_id(self, username: str) -> int:
        account = self.users.get(username)
        if account is None:
            raise NotFound(f"no such user: {username}")
        return account.id

    async def usernames(self, ids: list[int]) -> dict[int, str]:
        wanted = set(ids)
        return {a.id: a.username for a in self.users.values() if a.id in wanted}


# ---- liveness --------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeLeases:
    """The `LeaseStore` of liveness.py. Each result may be an exception to raise."""

    def __init__(self) -> None:
        self.left: int | BaseException = 0  # register: sessions left from an earlier run
        self.renewed: bool | BaseException = True
        self.reaped: Reaped | BaseException = Reaped([], [], 0)
        self.reachable = True  # database_reachable: a node answers on the replica port
        self.calls: list[tuple[Any, ...]] = []

    @staticmethod
    def _answer(result: Any) -> Any:
        if isinstance(result, BaseException):
            raise result
        return result

    async def register(self, worker_id: str, pid: int, address: str, lease_s: float) -> int:
        self.calls.append(("register", worker_id, address, lease_s))
        return int(self._answer(self.left))

    async def renew(self, worker_id: str, lease_s: float, overloaded_s: float) -> bool:
        self.calls.append(("renew", worker_id, lease_s, overloaded_s))
        return bool(self._answer(self.renewed))

    async def reap(self, resume_grace_s: float, dead_after_s: float, max_grace_s: float) -> Reaped:
        self.calls.append(("reap", resume_grace_s, dead_after_s, max_grace_s))
        reaped: Reaped = self._answer(self.reaped)
        return reaped

    async def database_reachable(self) -> bool:
        self.calls.append(("database_reachable",))
        return self.reachable

    def called(self, name: str) -> int:
        return sum(1 for call in self.calls if call[0] == name)


# ---- revocation -------------------------------------------------------------------


class FakeSessionRows:
    """The `SessionRows` of revoke.py over a FakeStore's session rows (and its users'
    disabled flags), answering as the real query does: only the stale ones.
    ``error``, when set, is raised by `stale` (the database is away)."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.error: BaseException | None = None
        # Called while the query "runs": what happens to the connections meanwhile.
        self.during: Callable[[], None] | None = None
        self.asked: list[tuple[str, list[tuple[int, int]]]] = []
        self.closed: list[tuple[int, int, str]] = []

    async def stale(
        self, worker_id: str, session_ids: list[int], epochs: list[int]
    ) -> list[StaleSession]:
        self.asked.append((worker_id, list(zip(session_ids, epochs, strict=True))))
        if self.during is not None:
            self.during()
        if self.error is not None:
            raise self.error
        disabled = {a.id for a in self.store.users.values() if a.disabled}
        out = []
        for index, (session_id, epoch) in enumerate(zip(session_ids, epochs, strict=True)):
            row = self.store.sessions.get(session_id)
            if row is None:
                out.append(StaleSession(index, session_id, epoch, None, None, None, None, False))
                continue
            stale = StaleSession(
                index,
                session_id,
                epoch,
                row.state,
                row.epoch,
                row.worker_id,
                row.reason,
                row.user_id in disabled,
            )
            if (
                row.state != "active"
                or row.epoch != epoch
                or row.worker_id != worker_id
                or stale.disabled
            ):
                out.append(stale)
        return out

    async def close(self, session_id: int, epoch: int, reason: str) -> bool:
        self.closed.append((session_id, epoch, reason))
        return await self.store.close_session(None, session_id, epoch, reason)


# ---- the worker's session parts, wired -------------------------------------------


def status_in(state: WorkerState, worker_id: str = WORKER_ID) -> WorkerStatus:
    """A WorkerStatus brought to ``state`` through its own setter."""
    status = WorkerStatus(worker_id)
    path = {
        WorkerState.STARTING: [],
        WorkerState.SERVING: [WorkerState.SERVING],
        WorkerState.DRAINING: [WorkerState.SERVING, WorkerState.DRAINING],
        WorkerState.STOPPING: [WorkerState.STOPPING],
    }[state]
    for step in path:
        assert status.set(step, "test setup")
    return status


class Harness:
    """The real request path of one worker (gate, handlers, lifecycle) over fakes."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        state: WorkerState = WorkerState.SERVING,
        **settings: Any,
    ) -> None:
        self.settings = Settings(worker_id=WORKER_ID, **settings)
        self.status = status_in(state)
        self.store = FakeStore()
        self.clock = self.store.clock
        self.store.install(monkeypatch)
        self.registry = Registry(self.store.require_user_id, self.store.usernames)
        self.announcer = FakeAnnouncer()
        self.presence = FakePresence()
        self.delivery = FakeDelivery()
        self.events = FakeEvents()
        self.commits = FakeCommits(self.store, self.settings.max_devices_per_user)
        self.passwords = FakePasswords()
        self.admission = Admission(self.settings)
        self.rows = FakeSessionRows(self.store)
        self.revoker = Revoker(
            self.settings, self.rows, self.registry, self.presence, self.events, self.clock
        )
        self.sessions = Sessions(
            NO_POOL,
            self.status,
            self.registry,
            self.delivery,
            self.announcer,
            self.presence,
            self.events,
            self.revoker,
        )
        self.login = Login(
            NO_POOL,
            self.settings,
            self.passwords,
            self.admission,
            self.commits,
            self.sessions,
            self.announcer,
            self.events,
            PUSH_KEY,
        )
        self.messaging = Messaging(
            NO_POOL, self.settings, self.registry, self.commits, self.announcer, self.events
        )
        self.contacts = Contacts(NO_POOL, self.registry, self.announcer, self.presence)
        self.budgets = OpBudgets(self.settings)
        self.dispatcher = Dispatcher(
            self.sessions, self.login, self.messaging, self.contacts, self.budgets
        )

    def connect(self, peer: str = "198.51.100.7:40000") -> FakePeer:
        """A new connection, opened as connection_made does."""
        conn = FakePeer(peer, self.settings.max_inflight_sends)
        self.sessions.opened(conn)
        return conn

    async def request(self, peer: FakePeer, req: Request | Any) -> list[dict[str, Any]]:
        """Hand one request to the dispatcher; the frames it wrote in reply (and
        what it started in the background, such as presence pushes, has run)."""
        before = len(peer.frames)
        await self.dispatcher.handle(peer, req)
        await self.settle()
        return peer.frames[before:]

    async def log_in(
        self, user: str = "alice", device: str = "phone", peer: FakePeer | None = None
    ) -> FakePeer:
        """A connection logged in with hello (the user is created if need be)."""
        if user not in self.store.users:
            self.store.add_user(user)
        conn = peer or self.connect()
        frames = await self.request(conn, Hello(user=user, password=GOOD_PASSWORD, device=device))
        assert [f["op"] for f in frames] == ["welcome"], frames
        return conn

    async def lose(self, peer: FakePeer) -> None:
        """The connection dropped (connection_lost), and what that started has run."""
        peer.close()
        self.sessions.lost(peer)
        await self.settle()

    async def settle(self) -> None:
        """Run the fire-and-forget tasks the registry holds to their end."""
        while self.registry._background:
            await asyncio.gather(*self.registry._background, return_exceptions=True)


# ---- the real connection adapter over the fakes ---------------------------------


class FakeTransport:
    """What the connection uses of an asyncio transport; records writes and closes."""

    def __init__(self, peer: tuple[str, int] | None) -> None:
        self.peer = peer
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True


def real_connection(
    h: Harness, peer: tuple[str, int] | None = ("127.0.0.1", 43210), deadlines: Any = None
) -> tuple[Any, FakeTransport]:
    """A real `ClientConnection` on the harness's request path, connected over a
    `FakeTransport` from ``peer`` (HAProxy's address by default)."""
    from app.protocol import Limits
    from app.worker.connection import ClientConnection, ConnectionParts
    from app.worker.edge import Edge
    from app.worker.timeouts import Deadlines

    parts = ConnectionParts(
        h.settings,
        Limits(),
        h.dispatcher,
        h.sessions,
        h.delivery,  # type: ignore[arg-type]
        Edge(h.settings),
        Deadlines(h.settings) if deadlines is None else deadlines,
    )
    conn = ClientConnection(parts)
    transport = FakeTransport(peer)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport
