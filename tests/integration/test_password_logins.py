"""Password logins in group commits, against the real cluster: the batch statement
itself (logins.open_batch: every refusal per login, the same user on two devices, the
same device twice) and concurrent hellos over the wire sharing transactions.

A password changed or an account disabled *during* a login (argon2 slowed by the
test hook) is in tests/hostile/test_revocation.py, whose cluster has the hook on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.cluster.launcher import LocalCluster
from app.store import accounts, logins
from app.store.db import create_pool
from app.store.logins import LoggedIn, LoginRefused, PasswordLogin, Refusal
from tests.integration.helpers import PASSWORD, health_sums, new_user, register
from tests.linechat import LineClient

pytestmark = pytest.mark.integration

WORKER = "w9"  # the store tests' sessions belong to no running worker


@pytest.fixture
async def pool(cluster: LocalCluster) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(cluster.settings, size=2)
    try:
        yield p
    finally:
        await p.close()


def request(user_id: int, device: str, password_hash: str = "h", tag: str = "") -> PasswordLogin:
    def digest(kind: str) -> bytes:
        return hashlib.sha256(f"{kind}{user_id}{device}{tag}".encode()).digest()

    return PasswordLogin(
        user_id, device, password_hash, digest("dt"), digest("rt"), "127.0.0.9:1", "p", None
    )


async def open_batch(
    pool: asyncpg.Pool, batch: list[PasswordLogin], max_devices: int = 10
) -> list[LoggedIn | LoginRefused]:
    async with pool.acquire() as conn:
        return await logins.open_batch(conn, batch, worker_id=WORKER, max_devices=max_devices)


async def live(pool: asyncpg.Pool, user_id: int) -> list[tuple[str, int, bytes]]:
    rows = await pool.fetch(
        "SELECT device, epoch, resume_token_hash FROM sessions "
        "WHERE user_id = $1 AND state <> 'closed' ORDER BY device",
        user_id,
    )
    return [(r["device"], r["epoch"], r["resume_token_hash"]) for r in rows]


async def test_one_batch_opens_every_login_and_refuses_each_on_its_own(
    pool: asyncpg.Pool,
) -> None:
    a, b, off, full, changed = [
        await accounts.create_user(pool, new_user(p), "h") for p in ("a", "b", "off", "full", "ch")
    ]
    await pool.execute("UPDATE users SET disabled = true WHERE id = $1", off)
    await pool.execute("UPDATE users SET password_hash = 'h2' WHERE id = $1", changed)
    for device in ("x", "y"):  # `full` is at a cap of 2
        assert isinstance((await open_batch(pool, [request(full, device)]))[0], LoggedIn)
    batch = [
        request(a, "phone"),
        request(b, "phone"),
        request(a, "laptop"),  # the same user on a second device
        request(off, "phone"),
        request(full, "z"),
        request(changed, "phone"),  # argon2 checked "h"; the account's hash is now "h2"
        request(b, "phone", tag="later"),  # the same device twice: the later one wins
    ]
    results = await open_batch(pool, batch, max_devices=2)
    assert [r.why if isinstance(r, LoginRefused) else "ok" for r in results] == [
        "ok",
        "ok",
        "ok",
        Refusal.DISABLED,
        Refusal.TOO_MANY_DEVICES,
        Refusal.PASSWORD_CHANGED,
        "ok",
    ]
    a_phone, b_first, a_laptop, b_later = (results[i] for i in (0, 1, 2, 6))
    assert isinstance(a_phone, LoggedIn) and isinstance(a_laptop, LoggedIn)
    assert isinstance(b_first, LoggedIn) and isinstance(b_later, LoggedIn)
    assert (a_phone.user_id, a_phone.epoch, a_phone.replaced_session_id) == (a, 1, None)
    assert await live(pool, a) == [
        ("laptop", 1, batch[2].resume_token_hash),
        ("phone", 1, batch[0].resume_token_hash),
    ]
    # b's phone: the earlier login's session, replaced in the same transaction.
    assert (b_later.epoch, b_later.replaced_session_id) == (2, b_first.session_id)
    assert b_later.replaced_worker_id == WORKER
    assert await live(pool, b) == [("phone", 2, batch[6].resume_token_hash)]
    token = await pool.fetchval(
        "SELECT token_hash FROM device_credentials WHERE user_id = $1 AND device = 'phone'", b
    )
    assert token == batch[6].device_token_hash
    assert [d for d, _, _ in await live(pool, full)] == ["x", "y"]
    for user_id in (off, changed):
        assert await live(pool, user_id) == []
        assert not await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM device_credentials WHERE user_id = $1)", user_id
        )
    assert await pool.fetchval("SELECT count(*) FROM devices WHERE user_id = $1", a) == 2


async def test_a_users_logins_in_one_batch_respect_the_device_cap(pool: asyncpg.Pool) -> None:
    """One round per login of a user: the second new device counts the first."""
    user = await accounts.create_user(pool, new_user("cap"), "h")
    results = await open_batch(
        pool, [request(user, "one"), request(user, "two"), request(user, "three")], max_devices=2
    )
    assert [isinstance(r, LoggedIn) for r in results] == [True, True, False]
    assert results[2] == LoginRefused(Refusal.TOO_MANY_DEVICES)


def _password_batches(cluster: LocalCluster) -> list[int]:
    return health_sums(cluster, "password_logins", "password_login_batches")


@contextlib.asynccontextmanager
async def connections(cluster: LocalCluster, n: int) -> AsyncIterator[list[LineClient]]:
    s = cluster.settings
    opened = [await LineClient.connect(s.host, s.client_port) for _ in range(n)]
    try:
        yield opened
    finally:
        for client in opened:
            with contextlib.suppress(Exception):
                await client.close()


def hello(user: str, device: str) -> dict[str, object]:
    return {"op": "hello", "user": user, "password": PASSWORD, "device": device}


async def test_concurrent_hellos_share_transactions(cluster: LocalCluster) -> None:
    n = 60
    users = [new_user("pl") for _ in range(n)]
    for user in users:
        await register(cluster, user)
    items_before, batches_before = await asyncio.to_thread(_password_batches, cluster)
    async with connections(cluster, n) as clients:
        replies = await asyncio.gather(
            *(c.request(hello(u, "d")) for c, u in zip(clients, users, strict=True))
        )
        assert [r["op"] for r in replies] == ["welcome"] * n, [r for r in replies if "code" in r]
        assert all(r["device_token"] and r["resume_token"] for r in replies)
    items_after, batches_after = await asyncio.to_thread(_password_batches, cluster)
    assert items_after - items_before == n
    # Fewer transactions than logins: concurrent ones shared a batch.
    assert batches_after - batches_before < n, (batches_after - batches_before, n)


async def test_one_user_on_two_devices_and_one_device_twice_at_once(
    cluster: LocalCluster, pool: asyncpg.Pool
) -> None:
    user = new_user("tw")
    await register(cluster, user)
    user_id = await pool.fetchval("SELECT id FROM users WHERE username = $1", user)
    async with connections(cluster, 4) as (phone, laptop, tablet1, tablet2):
        replies = await asyncio.gather(
            *(
                c.request(hello(user, d))
                for c, d in (
                    (phone, "phone"),
                    (laptop, "laptop"),
                    (tablet1, "tab"),
                    (tablet2, "tab"),
                )
            )
        )
        assert [r["op"] for r in replies] == ["welcome"] * 4, replies
        # One live session per device: of the two tablets, the later login's; the
        # earlier one is told it was replaced.
        rows = await live(pool, user_id)
        assert [d for d, _, _ in rows] == ["laptop", "phone", "tab"]
        assert next(e for d, e, _ in rows if d == "tab") == 2
        live_tab = await pool.fetchval(
            "SELECT id FROM sessions WHERE user_id = $1 AND device = 'tab' AND state <> 'closed'",
            user_id,
        )
        loser = tablet1 if replies[2]["session"] != str(live_tab) else tablet2
        ended = await loser.recv_until("error", timeout=10)
        assert ended["code"] == "session_replaced", ended
        assert (await phone.request({"op": "ping"}))["op"] == "pong"
