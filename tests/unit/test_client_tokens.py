"""Device tokens in the SDK: the token stores, and `ResilientClient`'s order of logins
after a loss (resume, then the device token, then the password), against the fake
server of test_client_resume.py."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.client import (
    ClientError,
    Disconnected,
    FileTokenStore,
    MemoryTokenStore,
    ResilienceStats,
    ResilientClient,
    Resumed,
    ServerClosed,
    ServerError,
)
from tests.unit.test_client_resume import (
    FAST,
    PASSWORD,
    FakeSwitchboard,
    logged_in,
    take,
)

SERVER = "127.0.0.1:5222"


def test_the_file_store_round_trips_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "switchboard" / "devices.json"
    store = FileTokenStore(path)
    assert store.get(SERVER, "alice", "laptop") is None
    store.put(SERVER, "alice", "laptop", "t1")
    store.put(SERVER, "alice", "phone", "t2")
    store.put("other:1", "alice", "laptop", "t3")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = FileTokenStore(path)  # another process reads what this one wrote
    assert again.get(SERVER, "alice", "laptop") == "t1"
    assert again.get(SERVER, "alice", "phone") == "t2"
    assert again.get("other:1", "alice", "laptop") == "t3"
    again.put(SERVER, "alice", "laptop", "t1b")  # rotated: replaced in place
    again.delete(SERVER, "alice", "phone")
    assert store.get(SERVER, "alice", "laptop") == "t1b"
    assert store.get(SERVER, "alice", "phone") is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["devices.json"]  # no temp file left


def test_an_unreadable_file_is_an_empty_store(tmp_path: Path) -> None:
    path = tmp_path / "devices.json"
    path.write_text("{not json")
    store = FileTokenStore(path)
    assert store.get(SERVER, "alice", "laptop") is None
    store.put(SERVER, "alice", "laptop", "t")
    assert FileTokenStore(path).get(SERVER, "alice", "laptop") == "t"


def test_the_memory_store() -> None:
    store = MemoryTokenStore()
    store.put(SERVER, "alice", "laptop", "t")
    assert store.get(SERVER, "alice", "laptop") == "t"
    assert store.get(SERVER, "alice", "phone") is None
    store.delete(SERVER, "alice", "laptop")
    assert store.get(SERVER, "alice", "laptop") is None


@pytest.fixture
async def server() -> AsyncIterator[FakeSwitchboard]:
    fake = FakeSwitchboard()
    fake.issue_device_tokens = True
    await fake.start()
    yield fake
    await fake.stop()


async def test_a_refused_resume_logs_in_with_the_device_token_then_the_password(
    server: FakeSwitchboard,
) -> None:
    store = MemoryTokenStore()
    async with logged_in(server, token_store=store) as client:
        key = (f"127.0.0.1:{server.port}", "alice", "laptop")
        first = store.get(*key)
        assert first is not None and first == server.device_token
        # Resume token expired: the device token logs in, and the rotated one is stored.
        server.token = "expired-expired-expired"
        server.live.drop()
        assert await take(client, 2) == [
            Disconnected("the server closed the connection"),
            Resumed("w2", 0, fallback_login=True),
        ]
        assert server.ops(2) == ["resume", "login_token"]
        assert server.frames("login_token")[-1][1]["device_token"] == first
        assert store.get(*key) == server.device_token != first
        # Both refused (revoked): the password, and a new device token.
        server.token = "expired-expired-expired"
        server.device_token = "revoked-revoked-revoked"
        server.live.drop()
        assert await take(client, 2) == [
            Disconnected("the server closed the connection"),
            Resumed("w3", 0, fallback_login=True),
        ]
        assert server.ops(3) == ["resume", "login_token", "hello"]
        assert store.get(*key) == server.device_token
        assert client.stats == ResilienceStats(reconnects=2, fallback_logins=2)


async def test_with_a_token_store_and_no_password_only_the_token_is_used(
    server: FakeSwitchboard,
) -> None:
    store = MemoryTokenStore()
    async with logged_in(server, token_store=store):
        pass  # a first login with the password put the device's token in the store
    client = await ResilientClient.connect(
        "127.0.0.1", server.port, policy=FAST, timeout=2.0, token_store=store
    )
    try:
        welcome = await client.login_token("alice", "laptop")
        assert welcome.device_token == server.device_token
        assert store.get(f"127.0.0.1:{server.port}", "alice", "laptop") == server.device_token
        # Every token refused and no password: the session ends, no hello is sent.
        server.token = "expired-expired-expired"
        server.device_token = "revoked-revoked-revoked"
        hellos = len(server.frames("hello"))
        server.live.drop()
        events = await take(client, 2)
        assert isinstance(events[0], Disconnected)
        assert isinstance(events[1], ServerClosed) and "auth_failed" in events[1].reason
        assert len(server.frames("hello")) == hellos
        assert store.get(f"127.0.0.1:{server.port}", "alice", "laptop") is None
    finally:
        await client.close()


async def test_login_token_without_a_stored_token_or_with_a_revoked_one(
    server: FakeSwitchboard,
) -> None:
    store = MemoryTokenStore()
    client = await ResilientClient.connect(
        "127.0.0.1", server.port, policy=FAST, timeout=2.0, token_store=store
    )
    try:
        with pytest.raises(ClientError, match="no device token"):
            await client.login_token("alice", "laptop")
        store.put(f"127.0.0.1:{server.port}", "alice", "laptop", "revoked-revoked-revoked")
        with pytest.raises(ServerError, match="auth_failed"):
            await client.login_token("alice", "laptop")
        assert store.get(f"127.0.0.1:{server.port}", "alice", "laptop") is None
        await client.login("alice", PASSWORD, "laptop")  # the way back in
    finally:
        await client.close()
