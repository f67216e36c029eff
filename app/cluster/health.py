"""Small blocking probes the launcher polls while it waits for components."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from app.cluster.errors import ComponentFailed


def http_json(url: str, timeout: float = 1.0) -> tuple[int, Any]:
    """GET ``url``; (status, parsed body). Status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.load(exc)
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_for(
    what: str,
    check: Callable[[], tuple[bool, str]],
    timeout: float,
    alive: Callable[[], str | None] = lambda: None,
    interval: float = 0.2,
) -> None:
    """Poll ``check`` until it passes; fail early when ``alive`` names a dead process."""
    deadline = time.monotonic() + timeout
    reason = "no answer"
    while time.monotonic() < deadline:
        ok, reason = check()
        if ok:
            return
        dead = alive()
        if dead:
            raise ComponentFailed(f"{what}: {dead}")
        time.sleep(interval)
    raise ComponentFailed(f"{what} not healthy after {timeout:.0f} s: {reason}")
