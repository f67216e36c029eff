"""The cluster's generated passwords, read from ``secrets.json`` in the state dir.

A ground-floor module beside ``settings.py``: the store, the worker, the
dashboard and the launcher all read secrets from here, downward. Creating them
is the launcher's job (``app.cluster.layout.load_or_create_secrets``).
"""

from __future__ import annotations

import json
from pathlib import Path

from app.settings import Settings

SECRET_NAMES = ("superuser", "replication", "rewind", "app", "reporting", "admin")


def secrets_file(state_dir: Path) -> Path:
    """Where the secrets of the cluster whose state dir is ``state_dir`` live (mode 0600)."""
    return state_dir.resolve() / "secrets.json"


def read_secrets(settings: Settings) -> dict[str, str]:
    data: dict[str, str] = json.loads(secrets_file(settings.state_dir).read_text())
    return data
