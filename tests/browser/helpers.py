"""Small steps the browser tests share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from tests.browser.conftest import Admin

Page = Any  # playwright.async_api.Page


async def sign_in(page: Page, base_url: str, admin: Admin, target: str = "/") -> None:
    await page.goto(f"{base_url}/login?next={quote(target, safe='')}")
    if urlsplit(page.url).path != "/login":
        return  # already signed in
    await page.fill("input[name=username]", admin.name)
    await page.fill("input[name=password]", admin.password)
    async with page.expect_navigation():
        await page.click("section.login button[type=submit]")
    assert urlsplit(page.url).path == target.split("?")[0], page.url


async def shot(page: Page, screenshots: Path, name: str) -> None:
    await page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)


async def number(page: Page, selector: str) -> int:
    text = (await page.inner_text(selector)).replace(",", "").strip()
    return int(text) if text.lstrip("-").isdigit() else 0


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")
