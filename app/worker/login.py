"""Accounts on the wire: register, hello (password login), resume (resume token),
login_token (device token), password change.

Each kind passes its own admission queue (admission.py): a password costs an
argon2id hash, a resume or a token login a SHA-256 and a share of one batched
statement. Password attempts and registrations are counted per client address and
per (user, address) before any hash is computed; refused device tokens are counted
per (user, address) and per address too (app/store/throttle.py). An attempt that
fails on our side (the database, the hash pool: `internal`) is taken back, never
counted as the client's failure.

Tokens (resume, device) are never logged: only their SHA-256 reaches the database.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import asyncpg

from app.logs import get_logger
from app.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    LoginToken,
    PasswordChange,
    Register,
    Resume,
    frames,
)
from app.settings import Settings
from app.store import accounts
from app.store.accounts import Account
from app.store.device_tokens import Refusal, TokenLogin, TokenRefused
from app.store.errors import DB_ERRORS, UserExists
from app.store.eventlog import EventLog
from app.store.logins import LoggedIn, LoginRefused, PasswordLogin
from app.store.logins import Refusal as LoginRefusal
from app.store.passwords import Passwords
from app.store.sessions import ResumeRequest
from app.store.throttle import Admitted, Refused, Throttle, client_host
from app.worker import metrics
from app.worker.admission import Admission, Work
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
        push_key: bytes,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._passwords = passwords
        self._admission = admission
        self._throttle = Throttle(pool, settings)
        self._push_key = push_key
        self._commits = commits
        self._sessions = sessions
        self._announcer = announcer
        self._events = events
        self.resumes = 0
        self.token_logins = 0

    def _check_password_strength(self, password: str) -> None:
        least = self._settings.min_password_chars
        if len(password) < least:
            raise RequestError(
                ErrorCode.WEAK_PASSWORD, f"password must have at least {least} characters"
            )

    async def register(self, peer: Peer, req: Register) -> None:
        self._check_password_strength(req.password)
        host = client_host(peer.peer)
        async with self._admission.slot(Work.REGISTER):
            refused = await self._throttle.register_attempt(host)
            if refused is not None:
                log.info("register_rate_limited", addr=peer.peer)
                raise _rate_limited(refused, "too many registrations from this address")
            try:
                await self._create_user(req.user, await self._passwords.hash(req.password))
            except UserExists:
                raise RequestError(ErrorCode.USER_EXISTS, "that username is taken") from None
            except Exception:
                # Ours, not the client's: its attempt does not count.
                await self._throttle.register_void(host)
                raise
        log.info("user_registered", user=req.user)
        peer.write(frames.Registered(req.user).encode(req.rid))

    async def _create_user(self, username: str, password_hash: str) -> None:
        """Create the account; a commit that failed without saying whether it took
        effect (the connection cut while committing) is looked up by its hash.

        Without the lookup, a register answered ``internal`` could have created the
        account: the client's retry got ``user_exists``, and a client that gave the
        name up got ``auth_failed`` later on. The hash has a random salt, so finding it
        means this very request's row committed.
        """
        try:
            await accounts.create_user(self._pool, username, password_hash)
        except DB_ERRORS as exc:
            try:
                stored = await accounts.has_password_hash(self._pool, username, password_hash)
            except DB_ERRORS:
                stored = False
            if not stored:
                raise
            log.warning("register_committed_despite_error", user=username, error=type(exc).__name__)

    async def hello(self, peer: Peer, req: Hello) -> None:
        """Log in with the password: the attempt counted, argon2 in its slot, then the
        session opened in a group commit (Commits.log_in_by_password)."""
        if req.v != PROTOCOL_VERSION:
            raise RequestError(
                ErrorCode.UNSUPPORTED_VERSION, f"this server speaks v{PROTOCOL_VERSION}"
            )
        async with self._admission.slot(Work.LOGIN):
            checked = await self._verify_password(peer, req.user, req.password)
        if checked is None:
            metrics.LOGINS.labels("failed").inc()
            raise RequestError(ErrorCode.AUTH_FAILED, "wrong username or password")
        account, attempt = checked
        if account.disabled:
            await self._password_right(attempt)
            raise RequestError(ErrorCode.ACCOUNT_DISABLED, "this account is disabled")
        token = secrets.token_urlsafe(24)  # 192 random bits; only its hash is stored
        device_token = new_device_token()
        try:
            opened = await self._commits.log_in_by_password(
                PasswordLogin(
                    account.id,
                    req.device,
                    account.password_hash,
                    token_hash(device_token),
                    token_hash(token),
                    peer.peer,
                    attempt.pair_key,
                    attempt.addr_key,
                )
            )
        except Exception:
            # Not committed (the database, the batch): ours, not the client's.
            await self._throttle.password_void(attempt)
            raise
        if isinstance(opened, LoginRefused):
            raise self._refusal(opened)
        metrics.LOGINS.labels("ok").inc()
        await self._welcome(peer, opened, req, token, device_token, "hello")

    async def _welcome(
        self,
        peer: Peer,
        opened: LoggedIn,
        req: Hello | LoginToken,
        token: str,
        device_token: str,
        why: str,
    ) -> None:
        """Attach a session a login opened, and fence out the one it replaced."""
        user_id = opened.user_id
        if opened.replaced_session_id is not None:  # logged first: never two at once
            self._events.session_replaced(
                user_id, opened.replaced_session_id, opened.epoch - 1, opened.replaced_worker_id
            )
        self._events.session_opened(user_id, opened.session_id, opened.epoch)
        session = Session(
            opened.session_id, user_id, req.user, req.device, opened.epoch, opened.acked
        )
        await self._sessions.attach(
            peer,
            session,
            token,
            opened.last_seq,
            opened.acked,
            req.rid,
            why=why,
            has_contacts=opened.has_contacts,
            device_token=device_token,
        )
        if opened.replaced_session_id is not None:
            self._announcer.replace_session(user_id, opened.replaced_session_id, None)

    def _refusal(self, refused: LoginRefused) -> RequestError:
        if refused.why is LoginRefusal.DISABLED:  # disabled since find_user read the account
            return RequestError(ErrorCode.ACCOUNT_DISABLED, "this account is disabled")
        if refused.why is LoginRefusal.PASSWORD_CHANGED:  # the hash checked is not current
            return RequestError(ErrorCode.AUTH_FAILED, "wrong username or password")
        return RequestError(
            ErrorCode.TOO_MANY_DEVICES,
            f"{self._settings.max_devices_per_user} other devices of this user are logged in; "
            "end one (bye) first",
        )

    async def resume(self, peer: Peer, req: Resume) -> None:
        """Take over a session on this worker with its resume token: no password hash needed."""
        async with self._admission.slot(Work.RESUME):
            token = secrets.token_urlsafe(24)  # rotated at every takeover
            resumed = await self._commits.take_over(
                ResumeRequest(
                    req.user, req.device, token_hash(req.token), token_hash(token), peer.peer
                )
            )
        if resumed is None:
            # Also for a disabled account: resume says nothing about accounts.
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

    async def login_token(self, peer: Peer, req: LoginToken) -> None:
        """Log in with a device token: no password hash, a share of a batched statement.

        The token is rotated (the welcome carries the new one); the one presented
        stays valid for device_token_overlap_s, in case this welcome is lost.
        """
        host = client_host(peer.peer)
        pair_key, addr_key = self._throttle.token_keys(req.user, host)
        token = secrets.token_urlsafe(24)
        device_token = new_device_token()
        async with self._admission.slot(Work.TOKEN):
            opened = await self._commits.log_in_by_token(
                TokenLogin(
                    req.user,
                    req.device,
                    token_hash(req.device_token),
                    token_hash(device_token),
                    token_hash(token),
                    peer.peer,
                    pair_key,
                    addr_key,
                )
            )
        if isinstance(opened, TokenRefused):
            await self._refuse_token(req, host, opened, pair_key, addr_key)
            return
        self.token_logins += 1
        metrics.LOGINS.labels("token_ok").inc()
        await self._welcome(peer, opened, req, token, device_token, "login_token")

    async def _refuse_token(
        self, req: LoginToken, host: str, refused: TokenRefused, pair_key: str, addr_key: str | None
    ) -> None:
        why = refused.why
        if why is Refusal.THROTTLED:
            log.info("login_token_rate_limited", user=req.user, addr=host)
            raise RequestError(
                ErrorCode.RATE_LIMITED,
                "too many refused device tokens; wait before trying again",
                retry_after=max(1, math.ceil(refused.retry_after_s)),
            )
        if why is Refusal.DISABLED:
            raise RequestError(ErrorCode.ACCOUNT_DISABLED, "this account is disabled")
        if why is Refusal.TOO_MANY_DEVICES:
            raise RequestError(
                ErrorCode.TOO_MANY_DEVICES,
                f"{self._settings.max_devices_per_user} other devices of this user are "
                "logged in; end one (bye) first",
            )
        metrics.LOGINS.labels("token_failed").inc()
        log.info("login_token_failed", user=req.user, device=req.device, addr=host)
        try:
            await self._throttle.token_failed(pair_key, addr_key)
        except DB_ERRORS as exc:  # the refusal stands; only its count is lost
            log.warning("token_failure_not_counted", error=type(exc).__name__)
        raise RequestError(
            ErrorCode.AUTH_FAILED,
            "unknown, expired or revoked device token; log in with the password",
        )

    async def change_password(self, peer: Peer, req: PasswordChange) -> None:
        """Check the old password (throttled like a login), set the new one, and end
        the user's other sessions and their resume tokens in the same transaction."""
        assert peer.session is not None, "the gate admits only ACTIVE sessions here"
        session = peer.session
        self._check_password_strength(req.new)
        async with self._admission.slot(Work.LOGIN):
            if await self._check_password(peer, session.username, req.old) is None:
                raise RequestError(ErrorCode.AUTH_FAILED, "the old password is wrong")
            ended = await accounts.change_password(
                self._pool,
                session.user_id,
                session.session_id,
                await self._passwords.hash(req.new),
                self._push_key,
            )
        log.info("password_changed", user=session.username, sessions_ended=ended)
        peer.write(OK.encode(req.rid))

    async def _check_password(self, peer: Peer, username: str, password: str) -> Account | None:
        """The account if ``password`` is its password (the attempt settled), else None."""
        checked = await self._verify_password(peer, username, password)
        if checked is None:
            return None
        account, attempt = checked
        await self._password_right(attempt)
        return account

    async def _verify_password(
        self, peer: Peer, username: str, password: str
    ) -> tuple[Account, Admitted] | None:
        """The account and its counted attempt if ``password`` is its password, else
        None (after counting the attempt; `RequestError` rate_limited when the attempt
        may not be made yet). A right attempt is still to be settled: `_password_right`,
        or the login batch's settlement (throttle.settle_rights)."""
        host = client_host(peer.peer)
        attempt = await self._throttle.password_attempt(username, host)
        if isinstance(attempt, Refused):
            log.info("login_rate_limited", user=username, addr=host, by=attempt.by)
            raise _rate_limited(attempt, "too many failed logins; wait before trying again")
        try:
            account = await accounts.find_user(self._pool, username)
            ok = await self._passwords.verify(account.password_hash if account else None, password)
        except Exception:
            # The database or the hash pool failed, not the client: it answers
            # `internal`, and its attempt does not count.
            await self._throttle.password_void(attempt)
            raise
        if not ok or account is None:
            # A name that is no user's is not logged: it may be a password typed in
            # the wrong field (review L12).
            log.info("login_failed", user=username if account else "(no such user)", addr=host)
            return None
        return account, attempt

    async def _password_right(self, attempt: Admitted) -> None:
        try:
            await self._throttle.password_right(attempt)
        except DB_ERRORS as exc:  # the password was right: the login goes on
            log.warning("login_success_not_counted", error=type(exc).__name__)


def _rate_limited(refused: Refused, message: str) -> RequestError:
    return RequestError(ErrorCode.RATE_LIMITED, message, retry_after=refused.retry_after)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_device_token() -> str:
    """A device token: 256 random bits (only its SHA-256 is stored)."""
    return secrets.token_urlsafe(32)
