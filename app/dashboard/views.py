"""Pages and actions. Pages are GETs rendered on the server; actions are POSTs that
redirect back (303) with a short notice, so a reload never repeats them.

Numbers that change live are rendered from `live_fields` and carry
``data-field`` attributes; ``/live`` streams the same fields as server-sent
events and ``static/dashboard.js`` swaps the text in place.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import orjson
from aiohttp import web

from app.dashboard import keys
from app.dashboard.auth import identity_of, redirect
from app.dashboard.control import ControlError
from app.dashboard.sampler import Snapshot, WorkerView
from app.dashboard.templating import render
from app.logs import get_logger
from app.secrets import read_secrets
from app.store import dashboard as dash_store
from app.store.social import push_key

log = get_logger("dashboard")

# How often an open live stream re-checks that its admin session is still valid.
LIVE_RECHECK_S = 30.0
LIVE_KEEPALIVE_S = 15.0

NOTICES = {
    "drain": "{worker} is draining: its clients are told to reconnect to the other workers.",
    "undrain": "{worker} takes new clients again.",
    "kicked": "Session {session} was kicked: its connection is closed and it cannot resume.",
    "not_live": "Session {session} was no longer live.",
    "disabled": "{user} is disabled; {kicked} live session(s) were kicked.",
    "enabled": "{user} can log in again.",
    "revoked": "{user}'s device {device} was signed out: its token is revoked and {kicked}"
    " live session(s) were kicked.",
    "switchover": "Switchover requested: {result}",
}


def _notice(query: Any) -> str | None:
    template = NOTICES.get(query.get("done", ""))
    if template is None:
        return None
    values = {
        k: query.get(k, "?")[:80]
        for k in ("worker", "session", "user", "kicked", "result", "device")
    }
    return template.format(**values)


# ---- the live fields ---------------------------------------------------------------


def _load(w: WorkerView) -> str:
    """Weight, queued and refused requests, and why the worker sheds load if it does."""
    parts = [
        "-" if w.weight is None else f"{w.weight}%",
        f"{_n(w.queued)} queued",
        f"{_n(w.shed)} shed",
    ]
    if w.shedding:
        parts.insert(0, f"SHEDDING: {w.shedding}")
    return " · ".join(parts)


def _n(value: float | int | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def live_fields(snap: Snapshot) -> dict[str, str]:
    """Every number a page shows live, formatted, keyed by its ``data-field``."""
    fields = {
        "sessions_active": _n(snap.sessions_active),
        "sessions_detached": _n(snap.sessions_detached),
        "users_online": _n(snap.users_online),
        "messages_in_per_s": _n(snap.messages_in_per_s, 1),
        "messages_out_per_s": _n(snap.messages_out_per_s, 1),
        "workers_serving": f"{snap.workers_serving} / {len(snap.workers)}",
        "leader": snap.leader or "none",
        "db": "reachable" if snap.db_ok else "unreachable",
        "sampled_at": time.strftime("%H:%M:%S", time.localtime(snap.at)) if snap.at else "-",
        "problems": "; ".join(snap.problems) or "none",
        "restarts": "; ".join(
            f"{r.component} {r.count} (last at "
            f"{time.strftime('%H:%M:%S', time.localtime(r.last_at))}: {r.last_reason})"
            for r in snap.restarts
        )
        or "none",
    }
    for w in snap.workers:
        prefix = f"workers.{w.id}."
        fields[prefix + "state"] = w.state
        fields[prefix + "health"] = (
            "ok" if w.healthy else ("no answer" if w.http_status == 0 else str(w.http_status))
        )
        fields[prefix + "haproxy"] = w.haproxy
        fields[prefix + "sessions"] = _n(w.sessions)
        fields[prefix + "connections"] = _n(w.connections)
        fields[prefix + "db_active"] = _n(w.db_active)
        fields[prefix + "db_detached"] = _n(w.db_detached)
        fields[prefix + "lease"] = "-" if w.lease_age_s is None else f"{w.lease_age_s:.1f} s"
        fields[prefix + "rate"] = _n(w.messages_per_s, 1)
        fields[prefix + "loop_lag"] = "-" if w.loop_lag_ms is None else f"{w.loop_lag_ms:.0f} ms"
        fields[prefix + "load"] = _load(w)
        fields[prefix + "pid"] = _n(w.pid).replace(",", "")
    for m in snap.members:
        prefix = f"members.{m.name}."
        fields[prefix + "role"] = m.role
        fields[prefix + "state"] = m.state
        fields[prefix + "timeline"] = _n(m.timeline)
        fields[prefix + "lag"] = "-" if m.lag is None else f"{m.lag:,} B"
    for b in snap.backends:
        prefix = f"backends.{b.backend}.{b.server}."
        fields[prefix + "status"] = b.status
        fields[prefix + "sessions"] = _n(b.sessions)
    return fields


def _history(request: web.Request) -> list[list[float]]:
    return [
        [p.t, p.sessions, p.users, p.msg_in, p.msg_out] for p in request.app[keys.SAMPLER].history
    ]


def _live_context(request: web.Request) -> dict[str, Any]:
    snap = request.app[keys.SAMPLER].latest
    return {"snap": snap, "fields": live_fields(snap), "notice": _notice(request.query)}


# ---- pages -------------------------------------------------------------------------


async def overview(request: web.Request) -> web.StreamResponse:
    return render(request, "overview.html", history=_history(request), **_live_context(request))


async def workers(request: web.Request) -> web.StreamResponse:
    return render(request, "workers.html", **_live_context(request))


async def sessions(request: web.Request) -> web.StreamResponse:
    s = request.app[keys.SETTINGS]
    q = request.query
    user = q.get("user", "").strip()[:64]
    worker = q.get("worker", "").strip()[:16]
    state = q.get("state", "live")
    state = state if state in dash_store.LIVE_STATES else "live"
    before = _int(q.get("before"))
    page = await dash_store.session_page(
        request.app[keys.POOL],
        user=user,
        worker=worker,
        state=state,
        before=before,
        limit=s.dashboard_page_size,
    )
    filters = {"user": user, "worker": worker, "state": state}
    return render(
        request,
        "sessions.html",
        page=page,
        filters=filters,
        worker_ids=s.worker_ids(),
        first_url="/sessions?" + urlencode(filters),
        next_url=(
            "/sessions?" + urlencode({**filters, "before": page.next_before})
            if page.next_before is not None
            else None
        ),
        back=request.path_qs,
        **_live_context(request),
    )


async def database(request: web.Request) -> web.StreamResponse:
    s = request.app[keys.SETTINGS]
    failovers = await request.app[keys.CONTROL].failovers(10)
    return render(
        request,
        "database.html",
        failovers=failovers,
        node_names=s.node_names(),
        rest_ports={n: s.patroni_rest_port(n) for n in s.node_names()},
        **_live_context(request),
    )


async def users(request: web.Request) -> web.StreamResponse:
    s = request.app[keys.SETTINGS]
    prefix = request.query.get("user", "").strip()[:64]
    after = request.query.get("after", "")[:64]
    page = await dash_store.user_page(
        request.app[keys.POOL], prefix=prefix, after=after, limit=s.dashboard_page_size
    )
    return render(
        request,
        "users.html",
        page=page,
        prefix=prefix,
        first_url="/users?" + urlencode({"user": prefix}),
        next_url=(
            "/users?" + urlencode({"user": prefix, "after": page.next_after})
            if page.next_after is not None
            else None
        ),
        back=request.path_qs,
        **_live_context(request),
    )


async def user_detail(request: web.Request) -> web.StreamResponse:
    """One user: the account, and the devices holding a token (last seen, address)."""
    s = request.app[keys.SETTINGS]
    username = request.match_info["user"][:64]
    found = await dash_store.user_devices(request.app[keys.POOL], username, s.device_token_ttl_days)
    if found is None:
        return render(
            request, "error.html", status=404, title="Not found", message=f"No user {username!r}."
        )
    return render(
        request,
        "user.html",
        user=found.user,
        devices=found.devices,
        back=request.path,
        **_live_context(request),
    )


async def events(request: web.Request) -> web.StreamResponse:
    """The events log (issue #6) when there is one; else what the tables tell."""
    pool = request.app[keys.POOL]
    failovers = await request.app[keys.CONTROL].failovers(20)
    source = "log"
    problem = None
    try:
        rows = await dash_store.logged_events(pool, 100)
    except (TimeoutError, asyncpg.PostgresError) as exc:
        rows, problem = None, f"the events log did not answer ({type(exc).__name__})"
    if rows is None:
        source = "tables"
        rows = sorted(await dash_store.recent_events(pool, 30), key=lambda e: e.at, reverse=True)[
            :100
        ]
    return render(
        request,
        "events.html",
        events=rows,
        source=source,
        problem=problem,
        failovers=failovers,
        **_live_context(request),
    )


# ---- actions -------------------------------------------------------------------------


def _admin(request: web.Request) -> str:
    return request[keys.IDENTITY].username


def _back(form: Any, default: str) -> str:
    """Where an action returns: a local path the form named, else the page it belongs to."""
    target = str(form.get("back", ""))
    return target if target.startswith("/") and not target.startswith("//") else default


def _with(path: str, **params: object) -> str:
    return path + ("&" if "?" in path else "?") + urlencode(params)


async def worker_action(request: web.Request) -> web.StreamResponse:
    worker_id = request.match_info["worker"]
    action = request.match_info["action"]
    metrics = request.app[keys.METRICS]
    try:
        state = await request.app[keys.CONTROL].drain(worker_id, undo=action == "undrain")
    except ControlError as exc:
        metrics.actions.labels(action, "failed").inc()
        return render(request, "error.html", status=502, title="Not done", message=str(exc))
    metrics.actions.labels(action, "ok").inc()
    log.info(f"admin_{action}", admin=_admin(request), worker=worker_id, state=state)
    return redirect(_with("/workers", done=action, worker=worker_id))


def _push_key(request: web.Request) -> bytes:
    return push_key(read_secrets(request.app[keys.SETTINGS])["admin"])


async def kick(request: web.Request) -> web.StreamResponse:
    session_id = _int(request.match_info["session"])
    form = await request.post()
    user_id = (
        await dash_store.kick_session(request.app[keys.POOL], session_id, _push_key(request))
        if session_id is not None
        else None
    )
    done = "kicked" if user_id is not None else "not_live"
    request.app[keys.METRICS].actions.labels("kick", "ok" if user_id else "not_live").inc()
    log.info("admin_kick", admin=_admin(request), session=session_id, user_id=user_id)
    return redirect(_with(_back(form, "/sessions"), done=done, session=session_id))


async def user_action(request: web.Request) -> web.StreamResponse:
    username = request.match_info["user"]
    action = request.match_info["action"]
    form = await request.post()
    kicked = await dash_store.set_user_disabled(
        request.app[keys.POOL], username, action == "disable", _push_key(request)
    )
    if kicked is None:
        return render(
            request, "error.html", status=404, title="Not found", message=f"No user {username!r}."
        )
    request.app[keys.METRICS].actions.labels(action, "ok").inc()
    log.info(f"admin_user_{action}", admin=_admin(request), user=username, kicked=kicked)
    done = "disabled" if action == "disable" else "enabled"
    return redirect(_with(_back(form, "/users"), done=done, user=username, kicked=kicked))


async def revoke_device(request: web.Request) -> web.StreamResponse:
    """Revoke a device's token and kick its live session (the kick's push and recheck)."""
    username = request.match_info["user"]
    device = request.match_info["device"]
    form = await request.post()
    done = await dash_store.revoke_device(
        request.app[keys.POOL], username, device, _push_key(request)
    )
    if done is None:
        return render(
            request, "error.html", status=404, title="Not found", message=f"No user {username!r}."
        )
    had_token, kicked = done
    request.app[keys.METRICS].actions.labels("revoke_device", "ok").inc()
    log.info(
        "admin_revoke_device",
        admin=_admin(request),
        user=username,
        device=device,
        had_token=had_token,
        kicked=kicked,
    )
    back = _back(form, "/users/" + quote(username, safe=""))
    return redirect(_with(back, done="revoked", user=username, device=device, kicked=kicked))


async def switchover(request: web.Request) -> web.StreamResponse:
    """First POST: a confirmation page. Second POST, with ``confirm=yes``: do it."""
    form = await request.post()
    leader = str(form.get("leader", ""))
    candidate = str(form.get("candidate", ""))
    snap = request.app[keys.SAMPLER].latest
    if form.get("confirm") != "yes":
        return render(
            request,
            "switchover.html",
            leader=leader,
            candidate=candidate,
            **_live_context(request),
        )
    if snap.leader is not None and leader != snap.leader:
        return render(
            request,
            "error.html",
            status=409,
            title="Not done",
            message=f"The leader is now {snap.leader}, not {leader}: look again and retry.",
        )
    metrics = request.app[keys.METRICS]
    try:
        result = await request.app[keys.CONTROL].switchover(leader, candidate)
    except ControlError as exc:
        metrics.actions.labels("switchover", "failed").inc()
        return render(request, "error.html", status=502, title="Not done", message=str(exc))
    metrics.actions.labels("switchover", "ok").inc()
    log.info("admin_switchover", admin=_admin(request), leader=leader, candidate=candidate)
    return redirect(_with("/database", done="switchover", result=result[:80]))


# ---- the live stream, health and metrics -------------------------------------------


def live_payload(snap: Snapshot) -> bytes:
    point = {
        "t": snap.at,
        "sessions": snap.sessions_active,
        "users": snap.users_online,
        "msg_in": snap.messages_in_per_s,
        "msg_out": snap.messages_out_per_s,
    }
    return orjson.dumps({"fields": live_fields(snap), "point": point})


async def live(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``snapshot`` per sample; ``expired`` when the session ends."""
    sampler = request.app[keys.SAMPLER]
    stopping = request.app[keys.STOPPING]
    metrics = request.app[keys.METRICS]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    metrics.live_streams.inc()
    try:
        if sampler.samples:
            await response.write(_event("snapshot", live_payload(sampler.latest)))
        checked = time.monotonic()
        while not stopping.is_set():
            snap = await sampler.next_snapshot(LIVE_KEEPALIVE_S)
            if stopping.is_set():
                break
            if time.monotonic() - checked > LIVE_RECHECK_S:
                checked = time.monotonic()
                identity, _ = await identity_of(request)
                if identity is None:
                    await response.write(_event("expired", b"{}"))
                    break
            if snap is None:
                await response.write(b": keep-alive\n\n")
            else:
                await response.write(_event("snapshot", live_payload(snap)))
    except (ConnectionResetError, ConnectionError):
        pass  # the page was closed
    finally:
        metrics.live_streams.dec()
    return response


def _event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


async def healthz(request: web.Request) -> web.StreamResponse:
    """200 while the process serves (HAProxy checks this); the body says what it sees."""
    sampler = request.app[keys.SAMPLER]
    snap = sampler.latest
    fresh = bool(sampler.samples) and time.time() - snap.at < 10
    return web.json_response(
        {
            "healthy": True,
            "sampling": fresh,
            "db": snap.db_ok,
            "sessions": snap.sessions_active,
            "problems": list(snap.problems),
        }
    )


async def metrics_page(request: web.Request) -> web.StreamResponse:
    body, content_type = request.app[keys.METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def _int(value: str | None) -> int | None:
    """A query or path number; None when absent, not a number, or beyond a bigint
    (which the database would refuse: a 500 before, review L12)."""
    try:
        number = int(value) if value else None
    except ValueError:
        return None
    return number if number is not None and 0 <= number < 2**63 else None
