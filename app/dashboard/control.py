"""What the dashboard asks of the running tier over HTTP: worker health, drain, switchover.

Workers answer on their health port (``/health``, ``POST /admin/drain|undrain``
with the worker admin token derived from the ``admin`` secret); Patroni on each
node's REST port (``/history``, and ``POST /switchover`` with basic auth: the
``patroni`` secret). Every call has a timeout and maps failure to a readable
`ControlError`, never a traceback on a page.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from app.secrets import PATRONI_REST_USER, read_secrets, worker_admin_token
from app.settings import Settings


class ControlError(Exception):
    """A worker or Patroni did not do what was asked; the text says why."""


@dataclass(frozen=True, slots=True)
class Failover:
    timeline: int
    at: str
    reason: str
    new_leader: str


class Control:
    def __init__(self, settings: Settings, http: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.http = http

    def _worker_url(self, worker_id: str, path: str) -> str:
        return self.settings.worker_health_url(worker_id, path)

    def _patroni_url(self, node: str, path: str) -> str:
        s = self.settings
        return f"http://{s.address_of(node)}:{s.patroni_rest_port(node)}{path}"

    async def worker_health(
        self, worker_id: str, timeout: float = 0.8
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of a worker's /health; (0, {}) when it does not answer."""
        try:
            async with self.http.get(
                self._worker_url(worker_id, "/health"),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                body = await response.json(content_type=None)
                return response.status, body if isinstance(body, dict) else {}
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 0, {}

    async def drain(self, worker_id: str, undo: bool = False) -> str:
        """Ask a worker to drain (or to take clients again); returns its new state."""
        if worker_id not in self.settings.worker_ids():
            raise ControlError(f"no worker {worker_id!r}")
        action = "undrain" if undo else "drain"
        secret = await asyncio.to_thread(lambda: read_secrets(self.settings).get("admin", ""))
        if not secret:
            raise ControlError("no admin secret: cannot ask a worker")
        try:
            async with self.http.post(
                self._worker_url(worker_id, f"/admin/{action}"),
                headers={"X-Switchboard-Admin": worker_admin_token(secret)},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as response:
                body = await response.json(content_type=None)
                if response.status != 200:
                    raise ControlError(f"worker {worker_id} refused to {action}: {response.status}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ControlError(f"worker {worker_id} did not answer: {type(exc).__name__}") from None
        return str(body.get("state", "?")) if isinstance(body, dict) else "?"

    async def failovers(self, limit: int = 20) -> list[Failover]:
        """Patroni's timeline history, newest first: every promotion with its time and reason."""
        for node in self.settings.node_names():
            try:
                async with self.http.get(
                    self._patroni_url(node, "/history"), timeout=aiohttp.ClientTimeout(total=1)
                ) as response:
                    rows = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            if not isinstance(rows, list):
                continue
            out = [
                Failover(
                    timeline=int(row[0]) + 1,
                    at=_utc(str(row[3])) if len(row) > 3 else "",
                    reason=str(row[2]),
                    new_leader=str(row[4]) if len(row) > 4 else "",
                )
                for row in rows
                if isinstance(row, list) and len(row) >= 3
            ]
            return out[::-1][:limit]
        return []

    async def switchover(self, leader: str, candidate: str) -> str:
        """Ask Patroni to hand the primary role from ``leader`` to ``candidate``."""
        nodes = self.settings.node_names()
        if leader not in nodes or candidate not in nodes or leader == candidate:
            raise ControlError("choose a current leader and a different candidate")
        password = await asyncio.to_thread(lambda: read_secrets(self.settings).get("patroni", ""))
        if not password:
            raise ControlError("no patroni secret: Patroni refuses unauthenticated switchovers")
        auth = aiohttp.BasicAuth(PATRONI_REST_USER, password)
        last = "no Patroni REST API answered"
        # Any member can take the request; try the leader first.
        for node in [leader, *[n for n in nodes if n != leader]]:
            try:
                async with self.http.post(
                    self._patroni_url(node, "/switchover"),
                    json={"leader": leader, "candidate": candidate},
                    auth=auth,
                    timeout=aiohttp.ClientTimeout(total=60),
                ) as response:
                    text = (await response.text()).strip()
                    if response.status == 200:
                        return text or f"switched over to {candidate}"
                    raise ControlError(f"Patroni refused the switchover: {text[:300]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{node}: {type(exc).__name__}"
        raise ControlError(f"switchover not sent: {last}")


def _utc(stamp: str) -> str:
    """Patroni's ISO timestamp as ``YYYY-MM-DD HH:MM:SS`` UTC (as given when unparsable)."""
    try:
        return datetime.fromisoformat(stamp).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return stamp
