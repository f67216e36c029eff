"""Jinja2 pages rendered on the server, autoescaped, with a few display filters."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from app.dashboard import keys

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"


def _when(value: object) -> str:
    """A timestamp as UTC ``YYYY-MM-DD HH:MM:SS``; '' for None."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _ago(value: object) -> str:
    """How long ago a timestamp was, roughly: '12 s', '5 min', '3 h', '2 d'."""
    if not isinstance(value, dt.datetime):
        return ""
    seconds = max(0.0, (dt.datetime.now(dt.UTC) - value).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _num(value: object, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    env.filters["num"] = _num
    return env


def render(request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
    """Render a page; every page gets the signed-in admin (or None) and the CSRF token."""
    identity = request.get(keys.IDENTITY)
    env = request.app[keys.TEMPLATES]
    html = env.get_template(name).render(
        admin=identity.username if identity else None,
        csrf=identity.csrf_token if identity else "",
        path=request.path,
        **context,
    )
    return web.Response(text=html, status=status, content_type="text/html")
