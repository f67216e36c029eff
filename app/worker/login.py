"""Accounts on the wire: register, hello (password login), resume (token), password change.

Logins and resumes pass admission control (admission.py); a password costs an
argon2id hash, a resume a SHA-256 and a share of one batched statement.
"""

from __future__ import annotations

import hashlib
import secrets

import asyncpg

from app.logs import get_logger
from app.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    PasswordChange,
    Register,
    Resume,
    frames,
)
from app.protocol.proxy import address_key
from app.settings import Settings
from app.store import accounts
from app.store import messages as message_store
from app.store import sessions as session_store
from app.store.errors import AccountDisabled, UserExists
from app.store.eventlog import EventLog
from app.store.passwords import Passwords
from app.store.sessions import ResumeRequest
from app.worker import metrics
from app.worker.admission import Admission
from app.worker.announce import Announcer
from app.worker.commits import Commits
from app.worker.errors import RequestError
from app.worker.session import OK, Sessions
from app.worker.states import Peer, Session

log = get_logger("session")


class Login:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        passwords: Passwords,
        admission: Admission,
        commits: Commits,
        sessions: Sessions,
        announcer: Announcer,
        events: EventLog,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._passwords = passwords
        self._admission = admission
        self._commits = commits
        self._sessions = sessions
        self._announcer = announcer
        self._events = events
        self.resumes = 0

    def _check_password_strength(self, password: str) -> None:
        least = self._settings.min_password_chars
        if len(password) < least:
            raise RequestError(
                ErrorCode.WEAK_PASSWORD, f"password must have at least {least} characters"
            )

    async def register(self, peer: Peer, req: Register) -> None:
        self._check_password_strength(req.password)
        async with self._admission.slot():
            password_hash = await self._passwords.hash(req.password)
            try:
                await accounts.create_user(self._pool, req.user, password_hash)
            except UserExists:
                raise RequestError(ErrorCode.USER_EXISTS, "that username is taken") from None
        log.info("user_registered", user=req.user)
        peer.write(frames.Registered(req.user).encode(req.rid))

    async def hello(self, peer: Peer, req: Hello) -> None:
        if req.v != PROTOCOL_VERSION:
            raise RequestError(
                ErrorCode.UNSUPPORTED_VERSION, f"this server speaks v{PROTOCOL_VERSION}"
            )
        pool = self._pool
        addr = address_key(peer.peer)  # the client's (PROXY header); an IPv6 /64
        keys = [f"user:{req.user}", f"addr:{addr}"]
        s = self._settings
        async with self._admission.slot():
            counts = await accounts.failure_counts(pool, keys, s.login_failure_window_s)
            if (
                counts[keys[0]] >= s.max_login_failures_per_user
                or counts[keys[1]] >= s.max_login_failures_per_addr
            ):
                raise RequestError(
                    ErrorCode.RATE_LIMITED,
                    "too many failed logins; wait before trying again",
                    retry_after=int(s.login_failure_window_s),
                )
            account = await accounts.find_user(pool, req.user)
            ok = await self._passwords.verify(
                account.password_hash if account else None, req.password
            )
            if not ok or account is None:
                await accounts.record_failure(pool, keys, s.login_failure_window_s)
                log.info("login_failed", user=req.user, addr=addr)
                metrics.LOGINS.labels("failed").inc()
                raise RequestError(ErrorCode.AUTH_FAILED, "wrong username or password")
            if account.disabled:
                raise RequestError(ErrorCode.ACCOUNT_DISABLED, "this account is disabled")
            if counts[keys[0]]:
                await accounts.clear_failures(pool, keys[0])
        token = secrets.token_urlsafe(24)  # 192 random bits; only its hash is stored
        try:
            opened = await session_store.open_session(
                pool, account.id, req.device, s.worker_id, peer.peer, token_hash(token)
            )
        except AccountDisabled:  # disabled since find_user read the account
            raise RequestError(ErrorCode.ACCOUNT_DISABLED, "this account is disabled") from None
        if opened.replaced_session_id is not None:  # logged first: never two at once
            self._events.session_replaced(
                account.id, opened.replaced_session_id, opened.epoch - 1, opened.replaced_worker_id
            )
        self._events.session_opened(account.id, opened.session_id, opened.epoch)
        last_seq, acked = await message_store.inbox_position(pool, account.id, req.device)
        session = Session(
            opened.session_id, account.id, account.username, req.device, opened.epoch, acked
        )
        metrics.LOGINS.labels("ok").inc()
        await self._sessions.attach(peer, session, token, last_seq, acked, req.rid, why="hello")
        if opened.replaced_session_id is not None:
            self._announcer.replace_session(account.id, opened.replaced_session_id, None)

    async def resume(self, peer: Peer, req: Resume) -> None:
        """Take over a session on this worker with its resume token: no password hash needed."""
        async with self._admission.slot(resume=True):
            token = secrets.token_urlsafe(24)  # rotated at every takeover
            resumed = await self._commits.take_over(
                ResumeRequest(
                    req.user, req.device, token_hash(req.token), token_hash(token), peer.peer
                )
            )
        if resumed is None:
            account = await accounts.find_user(self._pool, req.user)
            if account is not None and account.disabled:
                raise RequestError(ErrorCode.ACCOUNT_DISABLED, "this account is disabled")
            raise RequestError(
                ErrorCode.BAD_TOKEN, "unknown or expired resume token; log in with hello"
            )
        last_seq, acked = resumed.last_seq, resumed.acked or 0
        session = Session(
            resumed.session_id,
            resumed.user_id,
            req.user,
            req.device,
            resumed.epoch,
            min(req.last_seq, last_seq),
        )
        self.resumes += 1
        self._events.session_resumed(
            resumed.user_id,
            resumed.session_id,
            resumed.epoch,
            resumed.previous_worker_id,
            resumed.previous_state,
        )
        why = (
            f"resume from {resumed.previous_worker_id or '-'} ({resumed.previous_state}),"
            f" client at seq {req.last_seq}"
        )
        await self._sessions.attach(
            peer,
            session,
            token,
            last_seq,
            acked,
            req.rid,
            why=why,
            has_contacts=resumed.has_contacts,
        )
        if resumed.previous_state == "active":
            # Its previous owner may still hold a connection: the new epoch fences it out.
            self._announcer.replace_session(resumed.user_id, resumed.session_id, resumed.epoch)

    async def change_password(self, peer: Peer, req: PasswordChange) -> None:
        assert peer.session is not None, "the gate admits only ACTIVE sessions here"
        session = peer.session
        self._check_password_strength(req.new)
        async with self._admission.slot():
            account = await accounts.find_user(self._pool, session.username)
            if account is None or not await self._passwords.verify(account.password_hash, req.old):
                raise RequestError(ErrorCode.AUTH_FAILED, "the old password is wrong")
            await accounts.set_password(
                self._pool, session.user_id, await self._passwords.hash(req.new)
            )
        log.info("password_changed", user=session.username)
        peer.write(OK.encode(req.rid))


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
