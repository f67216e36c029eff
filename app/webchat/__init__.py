"""The web chat page: static files (plain ES modules, no build step) at ``/chat/``.

Every worker serves them on its WebSocket port (app/worker/websocket.py), so the page
and its WebSocket share one origin behind HAProxy (https://<host>:5281/chat/ and
wss://<host>:5281/ws). The page keeps its device token and resume state in the
browser's localStorage; docs/protocol.md is all it speaks.

The Content-Security-Policy allows nothing but this origin: no inline script, no
third-party host, no framing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from aiohttp import web

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FILES: Final = {
    "app.js": "text/javascript",
    "wire.js": "text/javascript",
    "store.js": "text/javascript",
    "chat.css": "text/css",
}


async def _index(_: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers=HEADERS)


async def _file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in FILES:  # a fixed list: no path ever reaches the file system
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC_DIR / name, headers={**HEADERS, "Content-Type": FILES[name]})


async def _redirect(_: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/chat/")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", _redirect)
    app.router.add_get("/chat", _redirect)
    app.router.add_get("/chat/", _index)
    app.router.add_get("/chat/{name}", _file)
