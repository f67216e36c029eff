"""Real headless Chromium (Debian's, driven by Playwright) against the dashboard of a real cluster.

Playwright never downloads a browser here: it drives ``/usr/bin/chromium``. When
that is missing, the setup installs it with ``scripts/bootstrap.sh --tests`` (as
root; otherwise the tests are skipped with the command to run). Each module gets a
browser with a fresh profile directory; every page it visits is saved as a
screenshot under ``artifacts/screenshots/``.

The dashboard is HTTPS, with the cluster's generated certificate, and Chromium
trusts it for real: each browser runs with a HOME of its own whose NSS database
(``~/.pki/nssdb``, where Chromium on Linux reads local trust anchors) holds the
cluster's CA, made with ``certutil`` (Debian's libnss3-tools, also installed by
``bootstrap.sh --tests``). No certificate error is ignored: a page that does not
verify fails to load.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from app.cluster.launcher import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CERTUTIL = Path("/usr/bin/certutil")
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
    if CHROMIUM.exists() and CERTUTIL.exists():
        return
    if os.geteuid() != 0:
        pytest.skip(
            "Debian's chromium or certutil is missing: run `scripts/bootstrap.sh --tests` as root"
        )
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "bootstrap.sh"), "--tests"], check=True, timeout=900
    )
    if not (CHROMIUM.exists() and CERTUTIL.exists()):
        pytest.fail("scripts/bootstrap.sh --tests did not install chromium and libnss3-tools")


def home_trusting(ca_file: Path | None) -> Path:
    """A fresh HOME for Chromium whose NSS database trusts ``ca_file`` to identify
    servers (``-t C,,``); with None, an empty one that trusts nothing extra."""
    home = Path(tempfile.mkdtemp(prefix="switchboard-chromium-home-"))
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(
        [str(CERTUTIL), "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, timeout=30
    )
    if ca_file is not None:
        argv = [str(CERTUTIL), "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "switchboard-ca"]
        subprocess.run([*argv, "-i", str(ca_file)], check=True, timeout=30)
    return home


@asynccontextmanager
async def chromium(ca_file: Path | None) -> AsyncIterator[Any]:
    """A headless Chromium with a fresh profile and a HOME that trusts ``ca_file``."""
    from playwright.async_api import async_playwright

    profile = tempfile.mkdtemp(prefix="switchboard-chromium-")
    home = await asyncio.to_thread(home_trusting, ca_file)
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
            env={**os.environ, "HOME": str(home)},
        )
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            await context.close()
            await asyncio.to_thread(shutil.rmtree, profile, True)
            await asyncio.to_thread(shutil.rmtree, home, True)


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
    scheme = "https" if s.dashboard_tls or s.dashboard_tls_pem else "http"
    return f"{scheme}://{s.host}:{s.dashboard_port}"


@pytest.fixture(scope="session")
def screenshots() -> Iterator[Path]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield SCREENSHOTS


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser_context(cluster: LocalCluster) -> AsyncIterator[object]:
    """One Chromium per module, with a fresh --user-data-dir, trusting the cluster's CA."""
    _ensure_chromium()
    async with chromium(cluster.settings.tls_ca_file()) as context:
        yield context
