"""Real headless Chromium (Debian's, driven by Playwright) against the dashboard of a real cluster.

Playwright never downloads a browser here: it drives ``/usr/bin/chromium``. When
that is missing, the setup installs it with ``scripts/bootstrap.sh --tests`` (as
root; otherwise the tests are skipped with the command to run). Each module gets a
browser with a fresh profile directory; every page it visits is saved as a
screenshot under ``artifacts/screenshots/``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from app.cluster.launcher import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_PASSWORD = "correct horse battery staple"


def _ensure_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.geteuid() != 0:
        pytest.skip("Debian's chromium is missing: run `scripts/bootstrap.sh --tests` as root")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "bootstrap.sh"), "--tests"], check=True, timeout=900
    )
    if not CHROMIUM.exists():
        pytest.fail("scripts/bootstrap.sh --tests did not install /usr/bin/chromium")


@dataclass(frozen=True, slots=True)
class Admin:
    name: str
    password: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def admin(cluster: LocalCluster) -> Admin:
    """A dashboard admin, stored as `switchboard admin create` stores one."""
    from app.dashboard.cli import save_admin

    name = "admin-" + uuid.uuid4().hex[:8]
    await save_admin(cluster.settings, name, ADMIN_PASSWORD, create=True)
    return Admin(name, ADMIN_PASSWORD)


@pytest.fixture(scope="module")
def base_url(cluster: LocalCluster) -> str:
    s = cluster.settings
    return f"http://{s.host}:{s.dashboard_port}"


@pytest.fixture(scope="session")
def screenshots() -> Iterator[Path]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield SCREENSHOTS


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser_context() -> AsyncIterator[object]:
    """One Chromium per module, with a fresh --user-data-dir."""
    _ensure_chromium()
    from playwright.async_api import async_playwright

    profile = tempfile.mkdtemp(prefix="switchboard-chromium-")
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            await context.close()
            await asyncio.to_thread(shutil.rmtree, profile, True)
