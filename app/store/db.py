"""Connections to PostgreSQL, always through HAProxy's Patroni-checked ports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import quote

import asyncpg

from app import sockopts
from app.secrets import read_secrets
from app.settings import Settings


def _password(settings: Settings, role: str) -> str:
    return read_secrets(settings)[role]


def dsn(settings: Settings, *, replica: bool = False, role: str = "app") -> str:
    """A libpq URL for the primary (default) or replica port of HAProxy."""
    user = {"app": settings.db_user, "superuser": "postgres", "reporting": "reporting"}[role]
    database = "postgres" if role == "superuser" else settings.db_name
    port = settings.db_replica_port if replica else settings.db_primary_port
    password = quote(_password(settings, role), safe="")
    return f"postgresql://{user}:{password}@{settings.db_address()}:{port}/{database}"


class Connection(asyncpg.Connection):  # type: ignore[misc]
    """A connection that notices a dead peer within 3 s (`DEAD_PEER_PROBES`).

    Every connection goes through HAProxy, and with many hosts through the balancer
    holding the virtual IP. When that balancer's host dies, its connections die
    without a FIN or a reset: a statement on one would wait out ``command_timeout``
    (and its retry on the next pooled one as long again), a LISTEN would miss every
    notification, all silently. Keepalive probes after 1 s idle, 2 of them 1 s apart,
    and TCP_USER_TIMEOUT for data in flight end such a connection in 3 s; the retry
    connects through the address's new holder. HAProxy's kernel answers the probes
    while PostgreSQL is only slow (a long commit, a failover behind HAProxy)."""

    def __init__(self, protocol: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(protocol, transport, *args, **kwargs)
        sockopts.tcp_keepalive(transport.get_extra_info("socket"), *DEAD_PEER_PROBES)


# keepalive idle, interval (s) and probes: a dead peer is noticed in 1 + 1 x 2 s
DEAD_PEER_PROBES: Final = (1, 1, 2)


async def _reset(conn: asyncpg.Connection) -> None:
    """On release to the pool. asyncpg's default runs a reset query (a round trip per
    query); our code sets no session state, so only an unfinished transaction needs undoing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def sqlalchemy_url(settings: Settings) -> str:
    return dsn(settings).replace("postgresql://", "postgresql+asyncpg://", 1)


async def create_pool(
    settings: Settings,
    *,
    size: int | None = None,
    purpose: str = "",
    plan_cache_mode: str | None = None,
) -> asyncpg.Pool:
    server_settings = {"application_name": f"switchboard-{settings.worker_id or 'cli'}{purpose}"}
    if plan_cache_mode is not None:
        server_settings["plan_cache_mode"] = plan_cache_mode
    pool = await asyncpg.create_pool(
        dsn(settings),
        min_size=min(settings.db_pool_min, size or settings.db_pool_max),
        max_size=size or settings.db_pool_max,
        timeout=settings.db_connect_timeout_s,
        command_timeout=settings.db_command_timeout_s,
        server_settings=server_settings,
        reset=_reset,
        connection_class=Connection,
    )
    assert pool is not None
    return pool


def columns(rows: Sequence[object], *fields: str) -> list[list[Any]]:
    """One array parameter per field, for set-based statements that ``unnest`` them."""
    return [[getattr(row, field) for row in rows] for field in fields]
