"""The web chat page (/chat/) in two real headless Chromiums against the real cluster.

Two browsers (separate profiles, so separate localStorage) register, become contacts,
chat 1:1 and in a room; then the worker one of them is on is killed with SIGKILL. Both
pages must come back by themselves (resume with the token and last seq kept in the
browser) and show every message exactly once, in order, including those sent while
one of them was reconnecting. A screenshot of each step goes to artifacts/screenshots/.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest_asyncio

from app.cluster.launcher import LocalCluster
from tests.browser.conftest import _ensure_chromium, chromium
from tests.browser.helpers import eventually, shot
from tests.integration.helpers import PASSWORD, new_user

Page = Any  # playwright.async_api.Page


@pytest_asyncio.fixture(loop_scope="session")
async def two_pages(cluster: LocalCluster) -> AsyncIterator[tuple[Page, Page]]:
    """A page in each of two Chromiums (two profiles: two browsers' localStorage)."""
    _ensure_chromium()
    ca = cluster.settings.tls_ca_file()
    async with chromium(ca) as first, chromium(ca) as second:
        # Each browser's own first tab: a background tab may count as hidden, and the
        # page sends read receipts only while it is visible.
        pages = [ctx.pages[0] if ctx.pages else await ctx.new_page() for ctx in (first, second)]
        for page in pages:
            _record(page)
        yield pages[0], pages[1]


def _record(page: Page) -> None:
    """Keep what the page's WebSockets carried and what it logged, for a failure's report."""
    log: list[str] = []
    page.sb_log = log

    def on_socket(ws: Any) -> None:
        log.append(f"open {ws.url}")
        ws.on("framereceived", lambda data: log.append(f"<- {str(data)[:200]}"))
        ws.on("framesent", lambda data: log.append(f"-> {str(data)[:200]}"))
        ws.on("close", lambda _ws: log.append("closed"))

    page.on("websocket", on_socket)
    page.on("console", lambda msg: log.append(f"console {msg.type}: {msg.text[:200]}"))


async def _report(pages: dict[str, Page]) -> str:
    parts = []
    for who, page in pages.items():
        lines = page.sb_log[-40:]
        status = await page.evaluate(
            "() => ({...document.getElementById('status').dataset,"
            " error: document.getElementById('side-error').textContent})"
        )
        parts.append(f"--- {who}'s page {status}, last {len(lines)} events:\n" + "\n".join(lines))
    return "\n".join(parts)


def chat_url(cluster: LocalCluster) -> str:
    s = cluster.settings
    return f"https://{s.host}:{s.client_wss_port}/chat/"


async def register(page: Page, url: str, user: str) -> None:
    await page.goto(url)
    await page.get_by_label("User name", exact=True).fill(user)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Register and log in").click()
    await page.wait_for_selector("#status[data-state=online]")


async def bodies(page: Page) -> list[str]:
    texts: list[str] = await page.locator("#messages li.msg:not(.pending) .body").all_inner_texts()
    return texts


async def send(page: Page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    await box.fill(text)
    await box.press("Enter")


async def shows(page: Page, expected: list[str], what: str) -> None:
    async def check() -> bool:
        return await bodies(page) == expected

    try:
        await eventually(check, what, timeout=30)
    except AssertionError:
        raise AssertionError(f"{what}: shows {await bodies(page)}, expected {expected}") from None


async def test_two_browsers_chat_and_survive_a_worker_kill(
    cluster: LocalCluster, two_pages: tuple[Page, Page], screenshots: Path
) -> None:
    a, b = two_pages
    try:
        await _chat_and_survive(cluster, a, b, screenshots)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{await _report({'alice': a, 'bob': b})}") from exc


async def _chat_and_survive(cluster: LocalCluster, a: Page, b: Page, screenshots: Path) -> None:
    url = chat_url(cluster)
    alice, bob = new_user("alice"), new_user("bob")
    await a.goto(url)
    await shot(a, screenshots, "webchat-01-login")
    await register(a, url, alice)
    await register(b, url, bob)
    await shot(a, screenshots, "webchat-02-logged-in")

    # Contacts with presence: alice asks, bob accepts, alice sees him online.
    await a.get_by_label("Contact's user name").fill(bob)
    await a.get_by_role("button", name="Add contact").click()
    await b.get_by_role("button", name=f"Accept {alice}").click()
    await a.wait_for_selector(f'#contacts li[data-user="{bob}"] .presence[data-state=online]')
    await shot(a, screenshots, "webchat-03-contacts")

    # 1:1: alice writes; bob sees an unread count, opens the chat, reads.
    await a.locator(f'#contacts li[data-user="{bob}"] button.open').click()
    one_to_one = ["hi bob", "are you there?"]
    for text in one_to_one:
        await send(a, text)
    await shows(a, one_to_one, "alice's own messages")
    chat = b.locator(f'#chats li[data-key="u:{alice}"]')
    await b.wait_for_selector(f'#chats li[data-key="u:{alice}"] .badge:text-is("2")')
    await shot(b, screenshots, "webchat-04-unread")
    await chat.locator("button.open").click()
    await shows(b, one_to_one, "bob's view of the 1:1 chat")
    await send(b, "yes, here")
    one_to_one.append("yes, here")
    await shows(a, one_to_one, "alice sees bob's answer")
    await a.wait_for_selector("#messages li.msg.own .meta:has-text('read by')")
    await shot(a, screenshots, "webchat-05-one-to-one-read")

    # A room: alice creates it and invites bob, who joins from the invitation.
    await a.get_by_label("New room name").fill("standup")
    await a.get_by_role("button", name="Create room").click()
    await a.get_by_label("Invite to this room").fill(bob)
    await a.get_by_role("button", name="Invite").click()
    await b.get_by_role("button", name=f"Join # standup (from {alice})").click()
    await b.wait_for_selector("#conv-title:has-text('standup')")
    room_log = ["room opened", "morning"]
    await send(a, room_log[0])
    await shows(b, room_log[:1], "bob got the room's first message")
    await send(b, room_log[1])
    await shows(a, room_log, "alice's room")
    await shows(b, room_log, "bob's room")
    await shot(b, screenshots, "webchat-06-room")

    # Kill -9 the worker alice is on; both keep talking through it.
    worker = await a.get_attribute("#status", "data-worker")
    links_before = int(await a.get_attribute("#status", "data-links") or 0)
    pid = cluster.pid_of(worker)
    assert pid is not None, worker
    os.kill(pid, signal.SIGKILL)
    await send(a, "sent around the kill")  # kept in the outbox until resumed
    await send(b, "while alice reconnects")
    room_log += ["sent around the kill", "while alice reconnects"]
    await shot(a, screenshots, "webchat-07-after-kill")

    async def resumed() -> bool:
        links = int(await a.get_attribute("#status", "data-links") or 0)
        state = await a.get_attribute("#status", "data-state")
        return links > links_before and state == "online"

    await eventually(resumed, "alice's page logged in again", timeout=30)
    await b.wait_for_selector("#status[data-state=online]")
    await send(a, "back again")
    room_log.append("back again")
    # Order between the two sends around the kill is the server's: compare as stored.
    for page, who in ((a, "alice"), (b, "bob")):
        await eventually(partial(_has_all, page, room_log), f"{who} has every room message", 30)
        shown = await bodies(page)
        assert len(shown) == len(set(shown)) == len(room_log), shown
    assert await bodies(a) == await bodies(b)  # the same order (by message id) on both
    await shot(a, screenshots, "webchat-08-alice-resumed")
    await shot(b, screenshots, "webchat-09-bob-resumed")

    # The 1:1 chat is intact too: nothing lost, nothing twice.
    await a.locator(f'#chats li[data-key="u:{bob}"] button.open').click()
    await shows(a, one_to_one, "alice's 1:1 chat after the resume")

    # Narrow screen: the page still works (sidebar above the conversation).
    await b.set_viewport_size({"width": 380, "height": 800})
    await send(b, "from a phone-sized window")
    room_log.append("from a phone-sized window")
    await a.locator('#chats li[data-key^="r:"] button.open').click()  # back to the room
    await eventually(lambda: _has_all(a, room_log), "alice got the narrow-screen message", 30)
    await shot(b, screenshots, "webchat-10-narrow")


async def _has_all(page: Page, expected: list[str]) -> bool:
    return sorted(await bodies(page)) == sorted(expected)
