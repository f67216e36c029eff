"""The cluster's generated passwords, read from ``secrets.json`` in the state dir.

A ground-floor module beside ``settings.py``: the store, the worker, the
dashboard and the launcher all read secrets from here, downward. Creating them
is the launcher's job (``app.cluster.layout.load_or_create_secrets``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from app.settings import Settings

# ``patroni``: the password of Patroni's REST API for unsafe methods (user PATRONI_REST_USER).
SECRET_NAMES = ("superuser", "replication", "rewind", "app", "reporting", "admin", "patroni")
PATRONI_REST_USER = "switchboard"


def secrets_file(state_dir: Path) -> Path:
    """Where the secrets of the cluster whose state dir is ``state_dir`` live (mode 0600)."""
    return state_dir.resolve() / "secrets.json"


def read_secrets(settings: Settings) -> dict[str, str]:
    data: dict[str, str] = json.loads(secrets_file(settings.state_dir).read_text())
    return data


def derive_key(secret: str, label: str) -> bytes:
    """A key for one purpose, derived from ``secret`` under ``label`` (HKDF-Expand, one block).

    Keys derived under different labels are independent: knowing one (a token seen on
    the wire) tells nothing about the secret or about any other.
    """
    return hmac.new(secret.encode(), label.encode() + b"\x01", hashlib.sha256).digest()


def worker_admin_token(admin_secret: str) -> str:
    """What the dashboard and the CLI send as ``X-Switchboard-Admin`` to a worker's
    ``/admin`` endpoint: derived from the admin secret, never the secret itself, so a
    token read off the plain-HTTP health port does not give away the push-signing key
    (``app.store.social.push_key``, derived under its own label)."""
    return derive_key(admin_secret, "switchboard worker-admin v1").hex()
