"""Device tokens (issue #15) against the real cluster: login_token after the resume
grace, rotation and its overlap, expiry, every revocation path on live sessions,
batching of a login storm, and no token in the logs or the events table.

Time is moved in the database (the session's detached_at, the token's
previous_valid_until and last_used_at) rather than waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.cluster.launcher import LocalCluster
from app.secrets import read_secrets
from app.store import dashboard as dash_store
from app.store.db import create_pool
from app.store.social import push_key
from app.worker.revoke import KICKED_MESSAGES
from tests.integration.helpers import PASSWORD, db, health_sums, login, new_user, register
from tests.linechat import LineClient

pytestmark = pytest.mark.integration

# Every device token a test saw: none may be in a log file or the events table.
SEEN_TOKENS: list[str] = []
# A revoked session's connection must end within this long (a push acts at once;
# the worker's recheck, every session_recheck_interval_s = 5 s, catches a lost one).
REVOKED_WITHIN_S = 8.0


@pytest.fixture
async def clients() -> AsyncIterator[list[LineClient]]:
    """Connections a test opened; all closed at its end, whatever happened."""
    opened: list[LineClient] = []
    try:
        yield opened
    finally:
        for client in opened:
            with contextlib.suppress(Exception):
                await client.close()


def _seen(welcome: dict[str, Any]) -> str:
    token = welcome["device_token"]
    assert isinstance(token, str) and len(token) >= 43, welcome
    SEEN_TOKENS.append(token)
    return token


async def _connect(cluster: LocalCluster, clients: list[LineClient]) -> LineClient:
    s = cluster.settings
    client = await LineClient.connect(s.host, s.client_port)
    clients.append(client)
    return client


async def _token_login(
    cluster: LocalCluster, clients: list[LineClient], user: str, device: str, token: str
) -> tuple[LineClient, dict[str, Any]]:
    client = await _connect(cluster, clients)
    reply = await client.request(
        {"op": "login_token", "user": user, "device": device, "device_token": token, "rid": 1}
    )
    if reply["op"] == "welcome":
        _seen(reply)
    return client, reply


async def _hello(
    cluster: LocalCluster, clients: list[LineClient], user: str, device: str, first: bool = True
) -> tuple[LineClient, str]:
    client, welcome = await login(cluster, user, device=device, register_first=first)
    clients.append(client)
    return client, _seen(welcome)


async def _set_rows(cluster: LocalCluster, table: str, assignment: str, user: str) -> None:
    """Move time for ``user``'s rows of ``table`` (sessions, device_credentials)."""
    async with db(cluster) as conn:
        await conn.execute(
            f"UPDATE {table} SET {assignment} "
            "WHERE user_id = (SELECT id FROM users WHERE username = $1)",
            user,
        )


async def test_a_device_token_logs_in_after_the_resume_grace(
    cluster: LocalCluster, clients: list[LineClient]
) -> None:
    user, friend = new_user("dt"), new_user("df")
    a, token = await _hello(cluster, clients, user, "phone")
    f, _ = await _hello(cluster, clients, friend, "pc")
    await a.close()  # dropped: detached, resumable for resume_grace_s
    assert (await f.request({"op": "send", "to": user, "cmid": "c1", "body": "while away"}))[
        "op"
    ] == "sent"
    await _set_rows(cluster, "sessions", "detached_at = now() - interval '1 day'", user)
    b, welcome = await _token_login(cluster, clients, user, "phone", token)
    assert welcome["op"] == "welcome", welcome
    assert welcome["device_token"] != token and welcome["resume_token"]
    assert (welcome["user"], welcome["device"]) == (user, "phone")
    msg = await b.recv_until("msg")
    assert msg["body"] == "while away"


async def test_rotation_overlap_and_a_stolen_old_token(
    cluster: LocalCluster, clients: list[LineClient]
) -> None:
    user = new_user("rot")
    a, t0 = await _hello(cluster, clients, user, "laptop")
    await a.request({"op": "bye", "rid": 2})
    b, w1 = await _token_login(cluster, clients, user, "laptop", t0)
    assert w1["op"] == "welcome", w1
    t1 = w1["device_token"]
    await b.request({"op": "bye", "rid": 2})
    # The welcome with t1 "was lost": t0 still works within the overlap, and gives t2.
    c, w2 = await _token_login(cluster, clients, user, "laptop", t0)
    assert w2["op"] == "welcome", w2
    t2 = w2["device_token"]
    assert len({t0, t1, t2}) == 3
    await c.request({"op": "bye", "rid": 2})
    # t1 was never used: superseded by t2, it is neither current nor previous.
    _, refused = await _token_login(cluster, clients, user, "laptop", t1)
    assert refused["code"] == "auth_failed", refused
    # After the overlap, the old token (stolen, say) is refused; the current one works.
    await _set_rows(
        cluster, "device_credentials", "previous_valid_until = now() - interval '1 s'", user
    )
    _, stolen = await _token_login(cluster, clients, user, "laptop", t0)
    assert stolen["code"] == "auth_failed", stolen
    d, w3 = await _token_login(cluster, clients, user, "laptop", t2)
    assert w3["op"] == "welcome", w3
    await d.request({"op": "bye", "rid": 2})


async def test_a_token_expires_after_its_ttl_of_non_use(
    cluster: LocalCluster, clients: list[LineClient]
) -> None:
    user = new_user("ttl")
    a, token = await _hello(cluster, clients, user, "tab")
    await a.request({"op": "bye", "rid": 2})
    days = cluster.settings.device_token_ttl_days
    since = f"last_used_at = now() - make_interval(secs => {days * 86400 + 60})"
    await _set_rows(cluster, "device_credentials", since, user)
    _, reply = await _token_login(cluster, clients, user, "tab", token)
    assert reply["code"] == "auth_failed", reply


async def test_refused_tokens_are_throttled_per_user_and_address(
    cluster: LocalCluster, clients: list[LineClient]
) -> None:
    user = new_user("thr")
    await register(cluster, user)
    free = cluster.settings.login_free_failures
    codes = []
    for _ in range(free + 1):
        _, reply = await _token_login(cluster, clients, user, "x", "not-a-real-token-" + "x" * 30)
        codes.append(reply["code"])
    assert codes == ["auth_failed"] * free + ["rate_limited"], codes


async def test_bye_forget_revokes_the_device_token(
    cluster: LocalCluster, clients: list[LineClient]
) -> None:
    user = new_user("bye")
    a, token = await _hello(cluster, clients, user, "phone")
    assert (await a.request({"op": "bye", "forget": True, "rid": 2}))["op"] == "ok"
    _, reply = await _token_login(cluster, clients, user, "phone", token)
    assert reply["code"] == "auth_failed", reply


async def test_a_password_change_keeps_only_the_current_devices_token(
    cluster: LocalCluster, clients: list[LineClient]
) -> None:
    user = new_user("pwd")
    a, token_a = await _hello(cluster, clients, user, "A")
    _, token_b = await _hello(cluster, clients, user, "B", first=False)
    c, token_c = await _hello(cluster, clients, user, "C", first=False)
    # C is live on a token login when the password changes: kicked within seconds.
    await c.request({"op": "bye", "rid": 2})
    c2, welcome_c = await _token_login(cluster, clients, user, "C", token_c)
    assert welcome_c["op"] == "welcome", welcome_c
    changed = await a.request({"op": "password", "old": PASSWORD, "new": PASSWORD + "!", "rid": 3})
    assert changed["op"] == "ok", changed
    kicked = await c2.recv_until("error", timeout=REVOKED_WITHIN_S)
    assert (kicked["code"], kicked["message"]) == ("kicked", KICKED_MESSAGES["password_changed"])
    for device, token in (("B", token_b), ("C", welcome_c["device_token"])):
        _, reply = await _token_login(cluster, clients, user, device, token)
        assert reply["code"] == "auth_failed", (device, reply)
    await a.request({"op": "bye", "rid": 4})
    _, again = await _token_login(cluster, clients, user, "A", token_a)
    assert again["op"] == "welcome", again


@pytest.fixture
async def pool(cluster: LocalCluster) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(cluster.settings, size=2)
    try:
        yield p
    finally:
        await p.close()


async def test_disabling_revokes_every_token_and_kicks_token_sessions(
    cluster: LocalCluster, clients: list[LineClient], pool: asyncpg.Pool
) -> None:
    user = new_user("dis")
    a, token = await _hello(cluster, clients, user, "phone")
    await a.request({"op": "bye", "rid": 2})
    b, welcome = await _token_login(cluster, clients, user, "phone", token)
    key = push_key(read_secrets(cluster.settings)["admin"])
    assert await dash_store.set_user_disabled(pool, user, True, key) == 1
    kicked = await b.recv_until("error", timeout=REVOKED_WITHIN_S)
    assert (kicked["code"], kicked["message"]) == ("kicked", KICKED_MESSAGES["disabled"])
    await dash_store.set_user_disabled(pool, user, False, key)
    _, reply = await _token_login(cluster, clients, user, "phone", welcome["device_token"])
    assert reply["code"] == "auth_failed", reply


async def test_a_valid_token_of_a_disabled_account_says_account_disabled(
    cluster: LocalCluster, clients: list[LineClient]
) -> None:
    user = new_user("dsq")
    a, token = await _hello(cluster, clients, user, "phone")
    await a.request({"op": "bye", "rid": 2})
    async with db(cluster) as conn:  # disabled by hand: the token is still there
        await conn.execute("UPDATE users SET disabled = true WHERE username = $1", user)
    _, reply = await _token_login(cluster, clients, user, "phone", token)
    assert reply["code"] == "account_disabled", reply


async def test_the_dashboard_revokes_a_device_and_ends_its_live_session(
    cluster: LocalCluster, clients: list[LineClient], pool: asyncpg.Pool
) -> None:
    user = new_user("rev")
    a, token_a = await _hello(cluster, clients, user, "phone")
    b, token_b = await _hello(cluster, clients, user, "laptop", first=False)
    found = await dash_store.user_devices(pool, user, cluster.settings.device_token_ttl_days)
    assert found is not None
    assert sorted(d.device for d in found.devices) == ["laptop", "phone"]
    assert all(d.last_addr and d.last_used_at for d in found.devices)
    key = push_key(read_secrets(cluster.settings)["admin"])
    assert await dash_store.revoke_device(pool, user, "phone", key) == (True, 1)
    kicked = await a.recv_until("error", timeout=REVOKED_WITHIN_S)
    assert (kicked["code"], kicked["message"]) == ("kicked", KICKED_MESSAGES["device_revoked"])
    _, reply = await _token_login(cluster, clients, user, "phone", token_a)
    assert reply["code"] == "auth_failed", reply
    # The other device is untouched.
    assert (await b.request({"op": "ping", "rid": 5}))["op"] == "pong"
    await b.request({"op": "bye", "rid": 6})
    _, ok = await _token_login(cluster, clients, user, "laptop", token_b)
    assert ok["op"] == "welcome", ok


def _token_batches(cluster: LocalCluster) -> list[int]:
    return health_sums(cluster, "token_logins", "token_login_batches")


async def test_a_token_login_storm_shares_batched_statements(
    cluster: LocalCluster, clients: list[LineClient]
) -> None:
    n = 120
    users = [new_user("st") for _ in range(n)]
    tokens = []
    for user in users:
        client, token = await _hello(cluster, clients, user, "d")
        await client.request({"op": "bye", "rid": 2})
        tokens.append(token)
    logins_before, batches_before = await asyncio.to_thread(_token_batches, cluster)
    s = cluster.settings
    storm = [await LineClient.connect(s.host, s.client_port) for _ in range(n)]
    clients.extend(storm)
    replies = await asyncio.gather(
        *(
            c.request({"op": "login_token", "user": u, "device": "d", "device_token": t})
            for c, u, t in zip(storm, users, tokens, strict=True)
        )
    )
    assert [r["op"] for r in replies] == ["welcome"] * n, [r for r in replies if "code" in r][:3]
    for reply in replies:
        _seen(reply)
    logins_after, batches_after = await asyncio.to_thread(_token_batches, cluster)
    assert logins_after - logins_before == n
    # Fewer transactions than logins: concurrent ones shared a batch.
    assert batches_after - batches_before < n, (batches_after - batches_before, n)


async def test_no_device_token_in_the_logs_or_the_events_table(cluster: LocalCluster) -> None:
    """Runs last in this module: every token the tests above saw."""
    assert SEEN_TOKENS, "run with the other tests of this module"
    layout_logs = cluster.layout.logs
    blobs = [path.read_bytes() for path in layout_logs.glob("*.log")]
    async with db(cluster) as conn:
        events = await conn.fetchval(
            "SELECT coalesce(string_agg(coalesce(reason, '') || coalesce(detail::text, ''), ' '), "
            "'') FROM events"
        )
    for token in SEEN_TOKENS:
        assert not any(token.encode() in blob for blob in blobs), "a device token in a log"
        assert token not in events, "a device token in the events table"


async def test_switchboard_chat_asks_for_the_password_only_on_first_use(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """`switchboard chat` with no password and no terminal: fails on a new device,
    logs in with the stored device token afterwards, and asks again once the token
    is revoked. The devices file is private to its owner."""
    user = new_user("chat")
    devices = tmp_path / "devices.json"
    s = cluster.settings

    async def chat(*extra: str) -> tuple[int, str]:
        argv = ["chat", "--host", s.host, "--port", str(s.client_port), "--user", user]
        argv += ["--device", "cli", "--devices-file", str(devices), *extra]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "SWITCHBOARD_PASSWORD": ""},
        )
        out, _ = await asyncio.wait_for(proc.communicate(b"/quit\n"), 60)
        return proc.returncode or 0, out.decode()

    code, out = await chat()
    assert code != 0 and "no password" in out, out
    code, out = await chat("--register", "--password", PASSWORD)
    assert code == 0 and f"logged in as {user}" in out, out
    assert devices.stat().st_mode & 0o777 == 0o600
    stored = devices.read_text()
    SEEN_TOKENS.extend(re.findall(r'"([A-Za-z0-9_-]{43,})"', stored))
    code, out = await chat()  # no password: the device token logs in
    assert code == 0 and f"logged in as {user}" in out, out
    assert devices.read_text() != stored  # rotated, and the new one kept
    await _set_rows(cluster, "device_credentials", "last_used_at = now() - interval '1 year'", user)
    code, out = await chat()
    assert code != 0 and "token was refused" in out and "no password" in out, out
