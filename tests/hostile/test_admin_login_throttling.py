"""Attacks on the dashboard's admin sign-in, on a dashboard app built in this process
against the real cluster's database.

The app takes the browser's address from X-Forwarded-For (HAProxy's, in the
real deployment), so attacker and bystander here come from addresses of their
own: 203.0.113.66 and 198.51.100.20.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from app.cluster.launcher import LocalCluster
from app.dashboard.cli import save_admin
from app.dashboard.server import build_app
from tests.hostile.bystander import checked_at_most

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
WRONG = "wrong password, wrong"
ATTACKER = "203.0.113.66"
BYSTANDER = "198.51.100.20"


@pytest_asyncio.fixture(loop_scope="session")
async def client(cluster: LocalCluster) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_app(cluster.settings))) as test_client:
        yield test_client


async def new_admin(cluster: LocalCluster) -> str:
    name = "hostile-" + uuid.uuid4().hex[:8]
    await save_admin(cluster.settings, name, PASSWORD, create=True)
    return name


async def form_token(client: TestClient) -> str:
    client.session.cookie_jar.clear()  # signed out: /login shows the form
    page = await client.get("/login")
    found = re.search(r'name="form_token" value="([^"]+)"', await page.text())
    assert found is not None
    return found.group(1)


async def sign_in(
    client: TestClient, token: str, name: str, password: str, addr: str
) -> ClientResponse:
    return await client.post(
        "/login",
        data={"form_token": token, "username": name, "password": password, "next": "/"},
        headers={"X-Forwarded-For": addr},
        allow_redirects=False,
    )


async def test_parallel_wrong_sign_ins_get_at_most_the_free_failures(
    cluster: LocalCluster, client: TestClient
) -> None:
    """M4: 50 wrong passwords for one admin at once; the admin signs in from elsewhere."""
    free = cluster.settings.dashboard_login_free_failures
    victim = await new_admin(cluster)
    token = await form_token(client)
    started = time.monotonic()
    responses = await asyncio.gather(
        *(sign_in(client, token, victim, WRONG, ATTACKER) for _ in range(50))
    )
    elapsed = time.monotonic() - started
    statuses = Counter(r.status for r in responses)
    assert set(statuses) == {401, 429}, statuses
    base = cluster.settings.login_backoff_base_s
    assert free <= statuses[401] <= checked_at_most(free, base, elapsed), (statuses, elapsed)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in responses if r.status == 429)
    # Even the right password waits at the attacker's address...
    refused = await sign_in(client, token, victim, PASSWORD, ATTACKER)
    assert refused.status == 429
    # ... while the admin, from their own, is in at once.
    signed_in = await sign_in(client, await form_token(client), victim, PASSWORD, BYSTANDER)
    assert (signed_in.status, signed_in.headers["Location"]) == (303, "/")
    assert (await client.get("/workers", allow_redirects=False)).status == 200


async def test_guessing_across_admin_names_meets_the_address_budget(
    cluster: LocalCluster, client: TestClient
) -> None:
    """Credential stuffing from one address: past its budget it waits, whatever the
    name; another address is unaffected."""
    budget = cluster.settings.dashboard_login_failures_per_addr
    admin = await new_admin(cluster)
    attacker = "203.0.113." + str(100 + uuid.uuid4().int % 100)
    token = await form_token(client)
    statuses = [
        (await sign_in(client, token, f"guess-{i}", WRONG, attacker)).status
        for i in range(budget + 1)
    ]
    assert statuses == [401] * budget + [429]
    assert (await sign_in(client, token, admin, PASSWORD, attacker)).status == 429
    signed_in = await sign_in(client, token, admin, PASSWORD, BYSTANDER)
    assert signed_in.status == 303


async def test_set_password_signs_the_admin_out_everywhere(
    cluster: LocalCluster, client: TestClient
) -> None:
    """M3: `switchboard admin set-password` ends the admin's sessions (a stolen cookie
    dies with them); another admin's session goes on."""

    async def session_cookie(name: str, addr: str) -> str:
        signed_in = await sign_in(client, await form_token(client), name, PASSWORD, addr)
        assert signed_in.status == 303
        return signed_in.cookies["sb_admin"].value

    async def workers_page(cookie: str) -> ClientResponse:
        client.session.cookie_jar.clear()
        return await client.get("/workers", cookies={"sb_admin": cookie}, allow_redirects=False)

    victim, bystander = await new_admin(cluster), await new_admin(cluster)
    stolen = await session_cookie(victim, ATTACKER)
    other = await session_cookie(bystander, BYSTANDER)
    assert (await workers_page(stolen)).status == 200
    await save_admin(cluster.settings, victim, PASSWORD + " (new)", create=False)
    refused = await workers_page(stolen)
    assert refused.status == 303 and refused.headers["Location"].startswith("/login")
    assert (await workers_page(other)).status == 200
