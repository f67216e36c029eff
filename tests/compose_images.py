"""The compose images' scripts (compose/images/*.py) are not a package: tests load them
by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

IMAGES = Path(__file__).resolve().parents[1] / "compose" / "images"


def compose_image_module(name: str) -> ModuleType:
    """compose/images/<name>.py, loaded as module ``compose_<name>``."""
    spec = importlib.util.spec_from_file_location(f"compose_{name}", IMAGES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
