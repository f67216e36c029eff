"""Where a client keeps its device tokens, by (server, user, device).

A device token (docs/protocol.md, "Device tokens") logs a device in without its
password and rotates at every use, so the store is written after every login.
`FileTokenStore` keeps them in a JSON file only its owner can read (mode 0600),
replaced atomically so a crash never leaves half a file; `MemoryTokenStore`
keeps them for the life of the process.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

import orjson

# `switchboard chat` keeps its tokens here unless told otherwise.
DEVICES_ENV = "SWITCHBOARD_DEVICES_FILE"


def default_devices_file() -> Path:
    configured = os.environ.get(DEVICES_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "switchboard" / "devices.json"


class TokenStore(Protocol):
    """Device tokens by ``server`` (``host:port``), user and device."""

    def get(self, server: str, user: str, device: str) -> str | None: ...

    def put(self, server: str, user: str, device: str, token: str) -> None: ...

    def delete(self, server: str, user: str, device: str) -> None: ...


def _key(server: str, user: str, device: str) -> str:
    return f"{user}@{server}/{device}"


class MemoryTokenStore:
    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}

    def get(self, server: str, user: str, device: str) -> str | None:
        return self._tokens.get(_key(server, user, device))

    def put(self, server: str, user: str, device: str, token: str) -> None:
        self._tokens[_key(server, user, device)] = token

    def delete(self, server: str, user: str, device: str) -> None:
        self._tokens.pop(_key(server, user, device), None)


class FileTokenStore:
    """A JSON object ``{"user@host:port/device": token}`` in ``path`` (mode 0600)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = default_devices_file() if path is None else path

    def _read(self) -> dict[str, str]:
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except orjson.JSONDecodeError:
            return {}  # unreadable: start afresh (the next password login fills it)
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def _write(self, tokens: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mkstemp creates the file 0600; renamed over the old one, atomically.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".devices-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(orjson.dumps(tokens, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get(self, server: str, user: str, device: str) -> str | None:
        return self._read().get(_key(server, user, device))

    def put(self, server: str, user: str, device: str, token: str) -> None:
        tokens = self._read()
        tokens[_key(server, user, device)] = token
        self._write(tokens)

    def delete(self, server: str, user: str, device: str) -> None:
        tokens = self._read()
        if tokens.pop(_key(server, user, device), None) is not None:
            self._write(tokens)
