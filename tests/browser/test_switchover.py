"""The Database page's switchover button, on a cluster of its own (it moves the primary)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.cluster import patroni
from app.cluster.launcher import LocalCluster
from tests.browser.conftest import Admin
from tests.browser.helpers import eventually, shot, sign_in
from tests.cluster_fixture import make_settings, running_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Overrides the shared cluster for this module: a switchover must not disturb others."""
    with running_cluster(make_settings(workers=1)) as own:
        yield own


async def test_switchover_from_the_database_page(
    cluster: LocalCluster, browser_context: Any, base_url: str, admin: Admin, screenshots: Path
) -> None:
    view = await asyncio.to_thread(patroni.cluster_view, cluster.settings)
    assert view is not None and view.leader is not None
    old_leader = view.leader.name
    page = await browser_context.new_page()
    try:
        await sign_in(page, base_url, admin, "/database")
        candidate = await page.eval_on_selector("select[name=candidate]", "s => s.value")
        assert candidate and candidate != old_leader
        await page.click("text=Switch over…")
        assert await page.inner_text("h1") == "Confirm switchover"
        async with page.expect_navigation(timeout=90_000):
            await page.click(f"text=Yes, switch over to {candidate}")
        assert "Switchover requested" in await page.inner_text("p.notice")

        async def moved() -> bool:
            now = await asyncio.to_thread(patroni.cluster_view, cluster.settings)
            return now is not None and now.leader is not None and now.leader.name == candidate

        await eventually(moved, f"{candidate} leads", 60)
        await asyncio.to_thread(cluster.wait_db_healthy, 60)

        async def page_shows_it() -> bool:
            return await page.inner_text('[data-field="leader"]') == candidate

        await eventually(page_shows_it, "the page shows the new primary", 20)

        # Patroni's /history can lag the promotion (one clean run saw it empty right
        # after the new leader was visible): reload until it lists the switchover.
        async def history_lists_it() -> bool:
            await page.reload()
            return await page.locator("#failovers tbody tr td.num").count() >= 1

        await eventually(history_lists_it, "the failover history lists the switchover", 20)
        await shot(page, screenshots, "database-after-switchover")
    finally:
        await page.close()
