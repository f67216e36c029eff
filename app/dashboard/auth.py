"""Admin authentication: login, the session cookie, CSRF, idle timeout, login rate limits.

- Admins are rows of ``admins`` with an argon2id hash (``switchboard admin create``).
- A login sets ``sb_admin``: 256 random bits, HttpOnly, SameSite=Strict, Secure when
  the page came over TLS. Only its SHA-256 is stored (``admin_sessions.token_hash``).
- Every request other than GET/HEAD must carry the session's CSRF token (form field
  ``csrf`` or header ``X-CSRF-Token``); a cross-origin ``Origin`` is refused as well.
  The login form itself carries a double-submit token from the ``sb_login`` cookie.
- A session ends after ``dashboard_idle_timeout_s`` without a request (the live
  stream does not count as activity), after ``dashboard_session_max_age_s``, on
  logout, or when its admin is disabled.
- Sign-ins are throttled like client logins (app/store/throttle.py): each attempt
  is counted before the password is checked, per (admin name, address) with a
  doubling wait after ``dashboard_login_free_failures``, and per address within
  ``login_failure_window_s``; a refused attempt gets 429 with ``Retry-After``.
  Nobody can lock an admin out from another address.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlsplit

from aiohttp import web

from app.dashboard import keys
from app.dashboard.keys import Identity
from app.dashboard.templating import render
from app.logs import get_logger
from app.store import dashboard as dash_store
from app.store.throttle import Refused

log = get_logger("dashboard")

SESSION_COOKIE = "sb_admin"
LOGIN_COOKIE = "sb_login"
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = frozenset({"/login", "/healthz", "/metrics"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A session's last_seen_at is written at most this often (not on every request).
TOUCH_EVERY_S = 5.0

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# What the logs say for a login name that names no account.
UNKNOWN_NAME = "(no such name)"


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def client_addr(request: web.Request) -> str:
    """The browser's address: HAProxy's X-Forwarded-For (it appends the peer it saw).

    The app port listens on the cluster host only, so the peer is HAProxy or a
    local process; the last X-Forwarded-For entry is the one HAProxy added.
    """
    forwarded = ",".join(request.headers.getall("X-Forwarded-For", []))
    if forwarded.strip():
        return forwarded.rsplit(",", 1)[-1].strip()[:64]
    return request.remote or "?"


def is_tls(request: web.Request) -> bool:
    """Whether the browser reached us over TLS (HAProxy terminates it and says so)."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def redirect(location: str) -> web.Response:
    """303: the browser follows with a GET (after a POST, the page is not re-submitted)."""
    return web.Response(status=303, headers={"Location": location})


def safe_next(target: str | None) -> str:
    """Only local paths: never redirect to another site after login.

    Browsers drop tabs and newlines from a Location and read a backslash as a
    slash, so ``next=/%09/evil.com`` (a tab) would be ``//evil.com``: any control
    character, space or backslash makes the target ``/`` (review L2)."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or any(c <= " " or c in "\\\x7f" for c in target)
    ):
        return "/"
    return target


def _tokens_equal(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


async def identity_of(request: web.Request) -> tuple[Identity | None, str | None]:
    """The signed-in admin of this request, or None and why (``expired``)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None, None
    s = request.app[keys.SETTINGS]
    pool = request.app[keys.POOL]
    digest = token_hash(cookie)
    session = await dash_store.admin_session(pool, digest)
    if session is None:
        return None, "expired"
    if (
        session.disabled
        or session.idle_s > s.dashboard_idle_timeout_s
        or session.age_s > s.dashboard_session_max_age_s
    ):
        await dash_store.close_admin_session(pool, digest)
        return None, "expired"
    if request.path != "/live" and session.idle_s > TOUCH_EVERY_S:
        await dash_store.touch_admin_session(pool, digest)
    return Identity(session.admin_id, session.username, session.csrf_token, digest), None


def _origin_ok(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    scheme = "https" if is_tls(request) else "http"
    return parts.scheme == scheme and parts.netloc == request.host


def _forbidden(request: web.Request, why: str) -> web.Response:
    log.warning("request_refused", path=request.path, reason=why, addr=client_addr(request))
    return render(request, "error.html", status=403, title="Forbidden", message=why)


@web.middleware
async def security_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[keys.METRICS]
    started = time.monotonic()
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as exc:
        metrics.requests.labels(route_name, str(exc.status)).inc()
        raise
    metrics.requests.labels(route_name, str(response.status)).inc()
    if request.path != "/live":
        metrics.request_seconds.observe(time.monotonic() - started)
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    public = request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES)
    if public:
        return await handler(request)
    identity, why = await identity_of(request)
    if identity is None:
        if request.method not in SAFE_METHODS or request.path == "/live":
            return web.Response(status=401, text="sign in first")
        target = quote(request.path_qs, safe="/")
        return redirect(f"/login?next={target}" + ("&expired=1" if why else ""))
    request[keys.IDENTITY] = identity
    if request.method not in SAFE_METHODS:
        if not _origin_ok(request):
            return _forbidden(request, "This request came from another site.")
        form = await request.post()
        token = form.get("csrf") or request.headers.get("X-CSRF-Token")
        if not isinstance(token, str) or not _tokens_equal(token, identity.csrf_token):
            return _forbidden(
                request, "The form's CSRF token is missing or wrong; reload the page."
            )
    return await handler(request)


async def harden(request: web.Request, response: web.StreamResponse) -> None:
    """Security headers on every response, pages, errors, static files and streams alike."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    if not request.path.startswith("/static/"):
        headers.setdefault("Cache-Control", "no-store")


def _set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=is_tls(request),
    )


# ---- handlers ----------------------------------------------------------------------


async def login_page(request: web.Request) -> web.StreamResponse:
    identity, _ = await identity_of(request)
    if identity is not None:
        return redirect(safe_next(request.query.get("next")))
    return _login_form(request)


def _login_form(
    request: web.Request, status: int = 200, error: str | None = None, username: str = ""
) -> web.Response:
    form_token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    notice = None
    if request.query.get("expired"):
        notice = "Your session has ended; sign in again."
    elif request.query.get("bye"):
        notice = "Signed out."
    response = render(
        request,
        "login.html",
        status=status,
        form_token=form_token,
        next=safe_next(request.query.get("next")),
        error=error,
        notice=notice,
        username=username,
    )
    _set_cookie(response, request, LOGIN_COOKIE, form_token)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    s = request.app[keys.SETTINGS]
    pool = request.app[keys.POOL]
    metrics = request.app[keys.METRICS]
    form = await request.post()
    username = str(form.get("username", "")).strip()[:64]
    password = str(form.get("password", ""))
    if not _tokens_equal(str(form.get("form_token", "")), request.cookies.get(LOGIN_COOKIE)):
        return _login_form(request, 403, "The login form expired; try again.", username)
    addr = client_addr(request)
    throttle = request.app[keys.THROTTLE]
    attempt = await throttle.password_attempt(username, addr)
    if isinstance(attempt, Refused):
        metrics.logins.labels("rate_limited").inc()
        log.warning("admin_login_rate_limited", admin=username, addr=addr, by=attempt.by)
        wait = attempt.retry_after
        wait_text = f"{wait} s" if wait < 120 else f"{round(wait / 60)} min"
        refused = _login_form(
            request, 429, f"Too many failed sign-ins; wait {wait_text} and try again.", username
        )
        refused.headers["Retry-After"] = str(wait)
        return refused
    admin = await dash_store.find_admin(pool, username) if username else None
    passwords = request.app[keys.PASSWORDS]
    ok = await passwords.verify(admin.password_hash if admin else None, password)
    if not ok or admin is None or admin.disabled:
        metrics.logins.labels("failed").inc()
        # A name that is no admin's is not logged: it may be a password typed in
        # the wrong field (review L12).
        log.info("admin_login_failed", admin=username if admin else UNKNOWN_NAME, addr=addr)
        return _login_form(request, 401, "Wrong admin name or password.", username)
    await throttle.password_right(attempt)
    await dash_store.prune_admin_sessions(
        pool, s.dashboard_idle_timeout_s, s.dashboard_session_max_age_s
    )
    token = secrets.token_urlsafe(32)
    await dash_store.open_admin_session(
        pool, admin.id, token_hash(token), secrets.token_urlsafe(32), addr
    )
    metrics.logins.labels("ok").inc()
    log.info("admin_login", admin=admin.username, addr=addr)
    response = redirect(safe_next(str(form.get("next", "/"))))
    _set_cookie(response, request, SESSION_COOKIE, token)
    response.del_cookie(LOGIN_COOKIE, path="/")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    identity = request[keys.IDENTITY]
    await dash_store.close_admin_session(request.app[keys.POOL], identity.token_hash)
    log.info("admin_logout", admin=identity.username)
    response = redirect("/login?bye=1")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response
