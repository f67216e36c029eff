"""``switchboard dashboard`` and ``switchboard admin create|set-password``.

There is no default admin and no default password: the first admin is made
with ``switchboard admin create NAME``, the password taken from ``--password``,
else ``$SWITCHBOARD_ADMIN_PASSWORD``, else a prompt (asked twice).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Callable
from typing import Final

import asyncpg

from app.settings import Settings

# Commands import what they use inside the function, as app/cli.py does: every
# `switchboard` command imports this module to build its parser, and only these need
# aiohttp, argon2 or the store's queries.

PASSWORD_ENV: Final = "SWITCHBOARD_ADMIN_PASSWORD"


class Refused(Exception):
    """A command-line mistake; the text says what to do."""


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``dashboard`` and ``admin`` on the ``switchboard`` sub-command parser."""
    help_ = "run the admin web dashboard in the foreground (`switchboard up` starts one)"
    p = sub.add_parser("dashboard", help=help_, description=help_)
    common(p)
    p.set_defaults(func=cmd_dashboard)

    help_ = "manage dashboard admin accounts"
    admin = sub.add_parser("admin", help=help_, description=help_)
    actions = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    for name, func, text in (
        ("create", cmd_admin_create, "create a dashboard admin (the first one, or another)"),
        ("set-password", cmd_admin_set_password, "set an admin's password (and re-enable it)"),
    ):
        p = actions.add_parser(name, help=text, description=text)
        common(p)
        p.add_argument("name", help="admin name")
        p.add_argument(
            "--password",
            help=f"the password (default: ${PASSWORD_ENV}, else a prompt; "
            "visible to other local users when given here)",
        )
        p.set_defaults(func=func)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(
        config_file=getattr(args, "config", None), state_dir=getattr(args, "state_dir", None)
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    from app.dashboard.main import main

    main(_settings(args))
    return 0


def read_password(given: str | None, minimum: int) -> str:
    """From the flag, the environment, or a prompt asked twice; at least ``minimum`` long."""
    password = given if given is not None else os.environ.get(PASSWORD_ENV)
    if password is None:
        if not sys.stdin.isatty():
            raise Refused(f"no password: pass --password, set ${PASSWORD_ENV}, or use a terminal")
        password = getpass.getpass("admin password: ")
        if getpass.getpass("again: ") != password:
            raise Refused("the two passwords differ")
    if len(password) < minimum:
        raise Refused(f"the password must have at least {minimum} characters")
    return password


def _run(args: argparse.Namespace, create: bool) -> int:
    settings = _settings(args)
    name = args.name.strip()
    try:
        if not name or len(name) > 64:
            raise Refused("an admin name has 1 to 64 characters")
        password = read_password(args.password, settings.min_password_chars)
        done = asyncio.run(save_admin(settings, name, password, create))
    except Refused as exc:
        print(f"switchboard: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, KeyError, asyncpg.PostgresError) as exc:
        print(f"switchboard: error: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    print(done)
    return 0


async def save_admin(settings: Settings, name: str, password: str, create: bool) -> str:
    """Create an admin (or set its password): argon2id hash, one row in ``admins``."""
    from app.store import dashboard as store
    from app.store.db import dsn
    from app.store.errors import AdminExists
    from app.store.passwords import Passwords

    passwords = Passwords(settings)
    try:
        password_hash = await passwords.hash(password)
    finally:
        passwords.close()
    pool = await asyncpg.create_pool(
        dsn(settings), min_size=1, max_size=1, timeout=settings.db_connect_timeout_s
    )
    try:
        if create:
            try:
                await store.create_admin(pool, name, password_hash)
            except AdminExists:
                raise Refused(
                    f"admin {name!r} exists; `switchboard admin set-password {name}` changes "
                    "its password"
                ) from None
            return f"admin {name} created"
        if not await store.set_admin_password(pool, name, password_hash):
            raise Refused(f"no admin {name!r}; `switchboard admin create {name}` makes one")
        return f"admin {name}: password set"
    finally:
        await pool.close()


def cmd_admin_create(args: argparse.Namespace) -> int:
    return _run(args, create=True)


def cmd_admin_set_password(args: argparse.Namespace) -> int:
    return _run(args, create=False)
