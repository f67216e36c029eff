"""The admin dashboard in a real headless Chromium against the real cluster.

Logging in and watching the live session count move; draining a worker from the
UI and watching its clients resume on the others; kicking a session; disabling a
user; and the refusals: no CSRF token, a wrong password, no session at all.
Every page visited is saved under artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest_asyncio

from app.client.resilient import LinkState, ResilientClient
from app.cluster import haproxy
from app.cluster.health import http_json
from app.cluster.launcher import LocalCluster
from tests.browser.conftest import Admin
from tests.browser.helpers import eventually, number, shot, sign_in
from tests.integration.helpers import PASSWORD, db, login, new_user, only_worker, register
from tests.linechat import LineClient

Page = Any  # playwright.async_api.Page


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser_context: Any) -> AsyncIterator[Page]:
    page = await browser_context.new_page()

    async def accept(dialog: Any) -> None:
        await dialog.accept()

    page.on("dialog", accept)
    try:
        yield page
    finally:
        await page.close()


async def test_unauthenticated_pages_redirect_to_login(
    browser_context: Any, page: Page, base_url: str, screenshots: Path
) -> None:
    await browser_context.clear_cookies()
    for path in ("/", "/workers", "/sessions", "/database", "/users", "/events"):
        await page.goto(base_url + path)
        url = urlsplit(page.url)
        assert url.path == "/login", (path, page.url)
        assert parse_qs(url.query)["next"] == [path]
        assert await page.locator("input[name=password]").count() == 1
    await shot(page, screenshots, "login")
    # Nor can anything be done, or watched, without a session.
    status = await page.evaluate(
        "async () => (await fetch('/workers/w1/drain', {method: 'POST'})).status"
    )
    assert status == 401
    assert await page.evaluate("async () => (await fetch('/live')).status") == 401


async def test_a_wrong_password_is_rejected(
    browser_context: Any, page: Page, base_url: str, admin: Admin, screenshots: Path
) -> None:
    await browser_context.clear_cookies()
    await page.goto(base_url + "/login")
    await page.fill("input[name=username]", admin.name)
    await page.fill("input[name=password]", "not the password at all")
    async with page.expect_response(
        lambda r: r.request.method == "POST" and urlsplit(r.url).path == "/login"
    ) as answer:
        await page.click("section.login button[type=submit]")
    assert (await answer.value).status == 401
    assert "Wrong admin name or password" in await page.inner_text("p.error")
    assert urlsplit(page.url).path == "/login"
    cookies = {c["name"] for c in await browser_context.cookies()}
    assert "sb_admin" not in cookies
    await shot(page, screenshots, "login-wrong-password")


async def test_login_then_watch_the_session_count_change_live(
    cluster: LocalCluster,
    browser_context: Any,
    page: Page,
    base_url: str,
    admin: Admin,
    screenshots: Path,
) -> None:
    await browser_context.clear_cookies()
    await sign_in(page, base_url, admin, "/")
    cookie = next(c for c in await browser_context.cookies() if c["name"] == "sb_admin")
    # Secure: the dashboard is HTTPS (tests/browser/test_https.py checks the rest of it).
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["secure"]
    # Wait for the live stream, then mark this page load: a reload would lose the mark.
    await page.wait_for_selector("#live-status[data-state=live]")
    await page.evaluate("() => { window.sbMark = 'same page'; }")
    before = await number(page, "#sessions-active")

    client, _ = await login(cluster, new_user("live"))
    try:
        await page.wait_for_function(
            "n => Number(document.querySelector('#sessions-active').textContent"
            ".replace(/,/g, '')) >= n",
            arg=before + 1,
            timeout=15_000,
        )
        assert await page.evaluate("() => window.sbMark") == "same page"
        await page.wait_for_timeout(1500)  # a few points on the charts
        await shot(page, screenshots, "overview")
    finally:
        await client.close()


async def test_every_page_renders(
    page: Page, base_url: str, admin: Admin, screenshots: Path
) -> None:
    await sign_in(page, base_url, admin, "/")
    for path, name, heading in (
        ("/workers", "workers", "Workers"),
        ("/sessions", "sessions-all", "Sessions"),
        ("/database", "database", "Database"),
        ("/users", "users", "Users"),
        ("/events", "events", "Events"),
    ):
        response = await page.goto(base_url + path)
        assert response is not None and response.status == 200, path
        assert await page.inner_text("h1") == heading
        await page.wait_for_selector("#live-status[data-state=live]")
        if path == "/workers":
            # Each worker's /health reports its worst event-loop lag; the page shows it.
            lag = await page.inner_text('[data-field="workers.w1.loop_lag"]')
            assert lag.endswith(" ms") and lag[:-3].isdigit(), lag
        await shot(page, screenshots, name)
    # Earlier tests logged in: the events page lists them.
    assert await page.locator("#events tbody tr td.when").count() >= 1
    # The switchover asks for confirmation on a page of its own; cancel it here.
    await page.goto(base_url + "/database")
    await page.click("text=Switch over…")
    assert await page.inner_text("h1") == "Confirm switchover"
    await shot(page, screenshots, "database-switchover-confirm")
    await page.click("text=Cancel")
    assert urlsplit(page.url).path == "/database"


async def test_a_post_without_the_csrf_token_is_rejected(
    cluster: LocalCluster, page: Page, base_url: str, admin: Admin, screenshots: Path
) -> None:
    await sign_in(page, base_url, admin, "/workers")
    s = cluster.settings
    for headers in ("{}", "{'X-CSRF-Token': 'not-the-token'}"):
        status = await page.evaluate(
            "async () => (await fetch('/workers/w1/drain', "
            f"{{method: 'POST', headers: {headers}}})).status"
        )
        assert status == 403
    # A form posted with a wrong token, as a forged page would.
    await page.evaluate(
        """() => {
            const form = document.querySelector('tr[data-worker="w1"] form');
            form.querySelector('input[name=csrf]').value = 'forged';
            form.removeAttribute('data-confirm');
            form.submit();
        }"""
    )
    await page.wait_for_load_state()
    assert await page.inner_text("h1") == "Forbidden"
    await shot(page, screenshots, "csrf-rejected")
    code, health = await asyncio.to_thread(
        http_json, f"http://{s.host}:{s.worker_health_port('w1')}/health"
    )
    assert code == 200 and health["state"] == "serving"
    # With the page's own token the same kind of request goes through.
    await page.goto(base_url + "/workers")
    token = await page.get_attribute("input[name=csrf]", "value")
    kind = await page.evaluate(
        "async t => (await fetch('/sessions/0/kick', {method: 'POST', redirect: 'manual', "
        "headers: {'X-CSRF-Token': t}})).type",
        token,
    )
    assert kind == "opaqueredirect"


async def test_kick_a_session(
    cluster: LocalCluster, page: Page, base_url: str, admin: Admin, screenshots: Path
) -> None:
    user = new_user("kick")
    client, welcome = await login(cluster, user)
    try:
        await sign_in(page, base_url, admin, f"/sessions?user={user}")
        row = page.locator(f'tr[data-user="{user}"]')
        assert await row.count() == 1
        assert welcome["worker"] in await row.inner_text()
        await shot(page, screenshots, "sessions")
        await row.locator("button", has_text="Kick").click()
        await page.wait_for_url("**done=kicked**")
        assert "was kicked" in await page.inner_text("p.notice")
        assert await page.locator(f'tr[data-user="{user}"]').count() == 0
        await shot(page, screenshots, "sessions-kicked")

        frame = await client.recv_until("error", timeout=10)
        assert (frame["code"], frame["message"]) == (
            "kicked",
            "an administrator closed this session",
        )
        assert await asyncio.wait_for(client.reader.read(), 10) == b""
        async with db(cluster) as conn:
            row_state = await conn.fetchrow(
                "SELECT state, close_reason FROM sessions WHERE id = $1", int(welcome["session"])
            )
            assert (row_state["state"], row_state["close_reason"]) == ("closed", "kicked")
            # The worker that held it logs the close (its events buffer flushes each second).
            logged = None
            for _ in range(50):
                logged = await conn.fetchval(
                    "SELECT reason FROM events WHERE kind = 'session_closed' AND session_id = $1",
                    int(welcome["session"]),
                )
                if logged is not None:
                    break
                await asyncio.sleep(0.1)
            assert logged == "kicked"
        # A kicked session cannot be resumed with its token.
        s = cluster.settings
        again = await LineClient.connect(s.host, s.client_port)
        try:
            reply = await again.request(
                {
                    "op": "resume",
                    "user": user,
                    "device": "laptop",
                    "token": welcome["resume_token"],
                    "last_seq": 0,
                }
            )
            assert reply["code"] == "bad_token"
        finally:
            await again.close()
    finally:
        await client.close()


async def test_disable_and_enable_a_user(
    cluster: LocalCluster, page: Page, base_url: str, admin: Admin, screenshots: Path
) -> None:
    user = new_user("dis")
    client, _ = await login(cluster, user)
    try:
        await sign_in(page, base_url, admin, f"/users?user={user}")
        await page.locator(f'tr[data-user="{user}"] button', has_text="Disable").click()
        await page.wait_for_url("**done=disabled**")
        assert "1 live session" in await page.inner_text("p.notice")
        await shot(page, screenshots, "users-disabled")
        frame = await client.recv_until("error", timeout=10)
        assert (frame["code"], frame["message"]) == ("kicked", "this account was disabled")
        s = cluster.settings
        probe = await LineClient.connect(s.host, s.client_port)
        try:
            reply = await probe.request(
                {"op": "hello", "user": user, "password": PASSWORD, "device": "phone"}
            )
            assert reply["code"] == "account_disabled"
        finally:
            await probe.close()
        await page.locator(f'tr[data-user="{user}"] button', has_text="Enable").click()
        await page.wait_for_url("**done=enabled**")
        back, _ = await login(cluster, user, device="phone", register_first=False)
        await back.close()
    finally:
        await client.close()


async def test_drain_a_worker_from_the_ui_and_watch_its_clients_move(
    cluster: LocalCluster, page: Page, base_url: str, admin: Admin, screenshots: Path
) -> None:
    s = cluster.settings
    target = "w2"
    others = [w for w in s.worker_ids() if w != target]
    users = [new_user("drn") for _ in range(6)]
    await asyncio.gather(*(register(cluster, u) for u in users))
    clients: list[ResilientClient] = []
    try:
        for user in users:
            clients.append(await _client_on(cluster, target, user))
        assert {c.worker for c in clients} == {target}

        await sign_in(page, base_url, admin, "/workers")
        cell = f'[data-field="workers.{target}.sessions"]'

        async def target_holds_them() -> bool:
            return await number(page, cell) >= len(users)

        await eventually(target_holds_them, f"{target} shows {len(users)} sessions")
        before = {w: await number(page, f'[data-field="workers.{w}.sessions"]') for w in others}

        await page.click(f'tr[data-worker="{target}"] button[name=drain]')
        await page.wait_for_url("**done=drain**")
        assert "is draining" in await page.inner_text("p.notice")

        async def moved_on_the_page() -> bool:
            moved = await number(page, cell) == 0
            now = [await number(page, f'[data-field="workers.{w}.sessions"]') for w in others]
            return moved and sum(now) >= sum(before.values()) + len(users)

        await eventually(moved_on_the_page, "the clients show up on the other workers", 30)
        state = page.locator(f'[data-field="workers.{target}.state"]')
        assert await state.inner_text() == "draining"
        await shot(page, screenshots, "workers-drained")

        async def clients_moved() -> bool:
            return all(c.state is LinkState.ONLINE and c.worker in others for c in clients)

        await eventually(clients_moved, "every client resumed on another worker")

        await page.click(f'tr[data-worker="{target}"] button[name=undrain]')
        await page.wait_for_url("**done=undrain**")

        async def serving_again() -> bool:
            return await state.inner_text() == "serving"

        await eventually(serving_again, f"{target} serving again")
    finally:
        await asyncio.to_thread(cluster.drain_worker, target, True)
        await _wait_up_in_haproxy(cluster, target)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def _client_on(cluster: LocalCluster, worker: str, user: str) -> ResilientClient:
    """A logged-in client on ``worker``.

    HAProxy picks the server after it has accepted the connection, so the login
    (whose welcome names the worker) happens inside ``only_worker``; a client
    that still lands elsewhere on a loaded machine is closed and tried again.
    """
    s = cluster.settings
    for _ in range(20):
        with only_worker(cluster, worker):
            client = await ResilientClient.connect(s.host, s.client_port, keep_events=False)
            await client.login(user, PASSWORD, "laptop")
        if client.worker == worker:
            return client
        await client.close()
    raise AssertionError(f"no connection landed on {worker}")


async def _wait_up_in_haproxy(cluster: LocalCluster, worker: str) -> None:
    async def up() -> bool:
        states = await asyncio.to_thread(haproxy.server_states, cluster.layout)
        return any(x.server == worker and x.status == "UP" for x in states)

    await eventually(up, f"HAProxy sees {worker} UP", 15)


async def test_sign_out(browser_context: Any, page: Page, base_url: str, admin: Admin) -> None:
    await sign_in(page, base_url, admin, "/")
    await page.click("text=Sign out")
    await page.wait_for_url("**/login?bye=1")
    await page.goto(base_url + "/workers")
    assert urlsplit(page.url).path == "/login"
