"""The dashboard over HTTPS in a real Chromium (issue #15, review item M8): the
certificate verifies against the cluster's CA (not by ignoring errors: a browser
that does not trust the CA refuses the page), HAProxy sends HSTS, and the sign-in
cookie is Secure."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Error as PlaywrightError

from app.cluster.launcher import LocalCluster
from tests.browser.conftest import Admin, chromium
from tests.browser.helpers import shot, sign_in

Page = Any


async def test_the_dashboard_is_served_over_trusted_https(
    cluster: LocalCluster, browser_context: Any, base_url: str, admin: Admin, screenshots: Path
) -> None:
    assert urlsplit(base_url).scheme == "https"
    page = await browser_context.new_page()
    try:
        await browser_context.clear_cookies()
        response = await page.goto(base_url + "/login")
        assert response is not None and response.ok
        assert response.headers["strict-transport-security"] == "max-age=63072000"
        security = await response.security_details()
        assert security is not None
        assert security["protocol"] in ("TLS 1.2", "TLS 1.3")
        assert security["issuer"].startswith("Switchboard cluster CA")
        assert security["subjectName"] in ("localhost", cluster.settings.host)

        await sign_in(page, base_url, admin, "/")
        await shot(page, screenshots, "https-overview")
        cookies = {c["name"]: c for c in await browser_context.cookies()}
        assert cookies, "no cookie after signing in"
        for cookie in cookies.values():
            assert cookie["secure"], cookie["name"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie["name"]
    finally:
        await page.close()


async def test_a_browser_that_does_not_trust_the_ca_refuses_the_page(base_url: str) -> None:
    async with chromium(None) as untrusting:
        page = await untrusting.new_page()
        with pytest.raises(PlaywrightError, match="ERR_CERT_AUTHORITY_INVALID"):
            await page.goto(base_url + "/login")
