"""The secrets file: the launcher writes it where every process reads it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from app.cluster.layout import Layout, load_or_create_secrets
from app.secrets import SECRET_NAMES, read_secrets
from app.settings import Settings


def test_created_secrets_are_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(state_dir=Path("state"))  # relative, as the default is
    layout = Layout.for_settings(settings)
    layout.ensure()
    created = load_or_create_secrets(layout)
    assert set(created) == set(SECRET_NAMES)
    assert stat.S_IMODE(layout.secrets_file.stat().st_mode) == 0o600
    assert read_secrets(settings) == created
    assert load_or_create_secrets(layout) == created  # kept, not regenerated
