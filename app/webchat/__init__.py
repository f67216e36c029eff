"""The web chat page: static files (plain ES modules, no build step) at ``/chat/``.

Every worker serves them on its WebSocket port (app/worker/websocket.py), so the page
and its WebSocket share one origin behind HAProxy (https://<host>:5281/chat/ and
wss://<host>:5281/ws). The page keeps its device token and resume state in the
browser's localStorage; docs/protocol.md is all it speaks.

The Content-Security-Policy allows nothing but this origin: no inline script, no
third-party host, no framing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from aiohttp import web

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# A Host header that can name the page's WebSocket in the CSP (nothing else gets in).
HOST: Final = re.compile(
    r"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?"
)
HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FILES: Final = {
    "app.js": "text/javascript",
    "wire.js": "text/javascript",
    "store.js": "text/javascript",
    "chat.css": "text/css",
    "icon.svg": "image/svg+xml",
}


def _headers(request: web.Request) -> dict[str, str]:
    """The page's headers; the CSP names its own WebSocket URLs explicitly as well as
    'self' (which CSP 3 browsers extend to ws:/wss: of the same host and port)."""
    host = request.headers.get("Host", "")
    sockets = f" wss://{host} ws://{host}" if HOST.fullmatch(host) else ""
    return {**HEADERS, "Content-Security-Policy": CSP.format(sockets=sockets)}


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers=_headers(request))


async def _file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in FILES:  # a fixed list: no path ever reaches the file system
        raise web.HTTPNotFound()
    return web.FileResponse(
        STATIC_DIR / name, headers={**_headers(request), "Content-Type": FILES[name]}
    )


async def _redirect(_: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/chat/")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", _redirect)
    app.router.add_get("/chat", _redirect)
    app.router.add_get("/chat/", _index)
    app.router.add_get("/chat/{name}", _file)
