"""Database bootstrap: the application role and database, then Alembic migrations."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config

from app.secrets import read_secrets
from app.settings import Settings
from app.store.db import dsn, sqlalchemy_url

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


async def ensure_roles_and_database(settings: Settings) -> None:
    """Create the application and reporting roles and the database, if missing, and
    let only those two roles connect to it."""
    secrets = read_secrets(settings)
    conn = await asyncpg.connect(dsn(settings, role="superuser"), timeout=5)
    try:
        for role, password in (
            (settings.db_user, secrets["app"]),
            ("reporting", secrets["reporting"]),
        ):
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            verb = "ALTER" if exists else "CREATE"
            # Role names and passwords cannot be bind parameters in DDL.
            ident = _quote_ident(role)
            literal = _quote_literal(password)
            await conn.execute(f"{verb} ROLE {ident} LOGIN PASSWORD {literal}")
        if not await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", settings.db_name
        ):
            await conn.execute(
                f"CREATE DATABASE {_quote_ident(settings.db_name)} "
                f"OWNER {_quote_ident(settings.db_user)}"
            )
        # Only the two roles may connect, not every role there is (PUBLIC's default).
        # Where `reporting` may connect (replicas only) is pg_hba's business:
        # app/cluster/reporting_gate.py.
        database = _quote_ident(settings.db_name)
        await conn.execute(f"REVOKE CONNECT ON DATABASE {database} FROM PUBLIC")
        await conn.execute(
            f"GRANT CONNECT ON DATABASE {database} TO {_quote_ident(settings.db_user)}, reporting"
        )
    finally:
        await conn.close()


def alembic_config(settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = sqlalchemy_url(settings)
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(alembic_config(settings), revision)


def bootstrap(settings: Settings) -> None:
    asyncio.run(ensure_roles_and_database(settings))
    upgrade(settings)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
