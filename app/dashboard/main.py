"""Entry point of the dashboard process (``python -m app.dashboard``, ``switchboard dashboard``)."""

from __future__ import annotations

import asyncio
import sys

from app import logs
from app.settings import Settings, SettingsError


def main(settings: Settings | None = None) -> None:
    if settings is None:
        try:
            settings = Settings.load()
        except SettingsError as exc:
            print(f"switchboard dashboard: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    logs.configure(settings.log_level, sys.stdout, process="dashboard")
    from app.dashboard.server import serve

    asyncio.run(serve(settings))
