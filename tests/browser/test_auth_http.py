"""Admin authentication over plain HTTP, on a dashboard app built in this process.

The app runs against the real cluster's database with its own settings (a short
idle timeout), so the limits are tested in seconds rather than half an hour.
"""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from app.cluster.launcher import LocalCluster
from app.dashboard.cli import save_admin
from app.dashboard.server import build_app
from tests.browser.conftest import ADMIN_PASSWORD
from tests.integration.helpers import db, login, new_user
from tests.linechat import LineClient

IDLE_S = 2.0


@pytest_asyncio.fixture(loop_scope="session")
async def client(cluster: LocalCluster) -> AsyncIterator[TestClient]:
    settings = cluster.settings.replace(dashboard_idle_timeout_s=IDLE_S)
    async with TestClient(TestServer(build_app(settings))) as test_client:
        yield test_client


async def new_admin(cluster: LocalCluster) -> str:
    name = "http-" + uuid.uuid4().hex[:8]
    await save_admin(cluster.settings, name, ADMIN_PASSWORD, create=True)
    return name


async def post_login(
    client: TestClient,
    name: str,
    password: str,
    headers: dict[str, str] | None = None,
    next_path: str = "/",
) -> ClientResponse:
    page = await client.get("/login")
    token = re.search(r'name="form_token" value="([^"]+)"', await page.text())
    assert token is not None
    return await client.post(
        "/login",
        data={
            "form_token": token.group(1),
            "username": name,
            "password": password,
            "next": next_path,
        },
        headers=headers or {},
        allow_redirects=False,
    )


async def test_session_cookie_flags_and_security_headers(
    cluster: LocalCluster,
    client: TestClient,
) -> None:
    name = await new_admin(cluster)
    response = await post_login(client, name, ADMIN_PASSWORD)
    assert response.status == 303 and response.headers["Location"] == "/"
    cookie = next(v for v in response.headers.getall("Set-Cookie") if v.startswith("sb_admin="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    page = await client.get("/")
    assert page.status == 200
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Cache-Control"] == "no-store"
    # Behind HAProxy with TLS (it sets X-Forwarded-Proto), the cookie is Secure.
    client.session.cookie_jar.clear()
    tls = await post_login(client, name, ADMIN_PASSWORD, {"X-Forwarded-Proto": "https"})
    cookie = next(v for v in tls.headers.getall("Set-Cookie") if v.startswith("sb_admin="))
    assert "Secure" in cookie


async def test_the_login_form_needs_its_token_and_redirects_only_locally(
    cluster: LocalCluster,
    client: TestClient,
) -> None:
    name = await new_admin(cluster)
    forged = await client.post(
        "/login",
        data={"form_token": "forged", "username": name, "password": ADMIN_PASSWORD},
        allow_redirects=False,
    )
    assert forged.status == 403
    away = await post_login(client, name, ADMIN_PASSWORD, next_path="//evil.example/")
    assert away.status == 303 and away.headers["Location"] == "/"


async def test_a_session_ends_after_the_idle_timeout(
    cluster: LocalCluster,
    client: TestClient,
) -> None:
    name = await new_admin(cluster)
    assert (await post_login(client, name, ADMIN_PASSWORD)).status == 303
    assert (await client.get("/workers", allow_redirects=False)).status == 200
    await asyncio.sleep(IDLE_S + 1.0)
    expired = await client.get("/workers", allow_redirects=False)
    assert expired.status == 303
    assert expired.headers["Location"].startswith("/login?next=/workers&expired=1")
    async with db(cluster) as conn:
        rows = await conn.fetchval(
            "SELECT count(*) FROM admin_sessions s JOIN admins a ON a.id = s.admin_id "
            "WHERE a.username = $1",
            name,
        )
    assert rows == 0


async def test_failed_logins_are_rate_limited(
    cluster: LocalCluster,
    client: TestClient,
) -> None:
    name = await new_admin(cluster)
    free = cluster.settings.dashboard_login_free_failures
    for _ in range(free):
        assert (await post_login(client, name, "wrong password, wrong")).status == 401
    # Past the free failures even the right password waits: 1 s, then 2 s, 4 s, ...
    limited = await post_login(client, name, ADMIN_PASSWORD)
    assert limited.status == 429 and limited.headers["Retry-After"] == "1"
    assert "Too many failed sign-ins; wait 1 s" in await limited.text()
    await asyncio.sleep(1.0)
    assert (await post_login(client, name, ADMIN_PASSWORD)).status == 303


async def test_cross_origin_posts_and_logout(
    cluster: LocalCluster,
    client: TestClient,
) -> None:
    name = await new_admin(cluster)
    assert (await post_login(client, name, ADMIN_PASSWORD)).status == 303
    page = await (await client.get("/workers")).text()
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token is not None
    other_site = await client.post(
        "/logout",
        data={"csrf": token.group(1)},
        headers={"Origin": "http://evil.example"},
        allow_redirects=False,
    )
    assert other_site.status == 403
    out = await client.post("/logout", data={"csrf": token.group(1)}, allow_redirects=False)
    assert out.status == 303 and out.headers["Location"] == "/login?bye=1"
    assert (await client.get("/", allow_redirects=False)).status == 303


async def test_static_script_and_health(
    client: TestClient,
) -> None:
    script = await client.get("/static/dashboard.js")
    assert script.status == 200
    assert "javascript" in script.headers["Content-Type"]
    assert "EventSource" in await script.text()
    health = await client.get("/healthz")
    assert health.status == 200 and (await health.json())["healthy"] is True


CLI = """
import argparse, sys
from pathlib import Path
from app.dashboard.cli import add_commands
parser = argparse.ArgumentParser(prog="switchboard")
parser.add_argument("--config", type=Path)
sub = parser.add_subparsers(dest="command", required=True)
add_commands(sub, lambda p: p.add_argument("--state-dir", type=Path))
args = parser.parse_args(sys.argv[1:])
raise SystemExit(args.func(args))
"""


async def test_admin_create_takes_the_password_from_flag_env_or_nowhere(
    cluster: LocalCluster,
) -> None:
    """`switchboard admin create`: no default password, and no silent overwrite."""

    async def run(*argv: str, password_env: str | None = None) -> tuple[int, str]:
        env = {**cluster.settings.to_env(), "PATH": "/usr/bin:/bin"}
        if password_env is not None:
            env["SWITCHBOARD_ADMIN_PASSWORD"] = password_env
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLI,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode()

    name = "cli-" + uuid.uuid4().hex[:8]
    code, out = await run("admin", "create", name)
    assert code == 1 and "no password" in out
    code, out = await run("admin", "create", name, "--password", "short")
    assert code == 1 and "at least 12 characters" in out
    code, out = await run("admin", "create", name, password_env=ADMIN_PASSWORD)
    assert code == 0 and f"admin {name} created" in out
    code, out = await run("admin", "create", name, "--password", ADMIN_PASSWORD)
    assert code == 1 and "exists" in out
    code, out = await run("admin", "set-password", name, "--password", "another long password")
    assert code == 0 and "password set" in out
    async with db(cluster) as conn:
        stored = await conn.fetchval("SELECT password_hash FROM admins WHERE username = $1", name)
    assert stored.startswith("$argon2id$")


async def test_the_user_page_lists_devices_and_revoke_signs_one_out(
    cluster: LocalCluster,
    client: TestClient,
) -> None:
    """GET /users/{name} lists the devices holding a token (never the token); its
    Revoke button (a CSRF-checked POST) kicks that device's live session and its
    token stops working."""
    user = new_user("devpage")
    phone, welcome = await login(cluster, user, device="phone")
    token = welcome["device_token"]
    try:
        assert (await post_login(client, await new_admin(cluster), ADMIN_PASSWORD)).status == 303
        page = await client.get(f"/users/{user}")
        html = await page.text()
        assert page.status == 200 and 'data-device="phone"' in html
        assert token not in html
        csrf = re.search(r'name="csrf" value="([^"]+)"', html)
        assert csrf is not None
        action = f"/users/{user}/devices/phone/revoke"
        forged = await client.post(action, data={"csrf": "forged"}, allow_redirects=False)
        assert forged.status == 403
        done = await client.post(action, data={"csrf": csrf.group(1)}, allow_redirects=False)
        assert done.status == 303 and "done=revoked" in done.headers["Location"]
        kicked = await phone.recv_until("error", timeout=8.0)
        assert kicked["code"] == "kicked"
        after = await (await client.get(f"/users/{user}")).text()
        assert 'data-device="phone"' not in after and "No device holds a token." in after
        s = cluster.settings
        again = await LineClient.connect(s.host, s.client_port)
        try:
            refused = await again.request(
                {"op": "login_token", "user": user, "device": "phone", "device_token": token}
            )
            assert refused["code"] == "auth_failed", refused
        finally:
            await again.close()
        missing = await client.get("/users/nobody-" + uuid.uuid4().hex[:6])
        assert missing.status == 404
    finally:
        await phone.close()
