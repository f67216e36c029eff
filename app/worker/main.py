"""Entry point of a worker process."""

from __future__ import annotations

import sys

import uvloop

from app import logs
from app.settings import Settings, SettingsError


def main() -> None:
    try:
        settings = Settings.load()
    except SettingsError as exc:
        print(f"switchboard worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(settings.log_level, sys.stdout, worker=settings.worker_id)
    from app.worker.server import Worker

    uvloop.run(Worker(settings).run())
