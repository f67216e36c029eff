"""Revocation that sticks (review item H3), and signed pushes that cannot be replayed
(M6), against a real cluster.

The attacker is a user who keeps a session the administrator means to end: a
`hello` in flight while the account is disabled, or a connection whose kick is
sent while its worker's listener is reconnecting (the NOTIFY is lost); or
someone who can LISTEN and NOTIFY on the database and replays a captured push.
Each attack has bystanders on the same worker and on another one, who must
stay connected and keep sending and receiving.

The cluster is this module's own: two workers, a session recheck every
RECHECK_S, pushes fresh for PUSH_MAX_AGE_S, and the test-only hook that delays
each password verification by VERIFY_DELAY_S (settings.test_verify_delay_s),
which opens the window a disable must hit during a login.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.cluster.launcher import LocalCluster
from app.secrets import read_secrets
from app.store import accounts, logins
from app.store import dashboard as dash_store
from app.store.db import create_pool, dsn
from app.store.logins import LoggedIn, LoginRefused, PasswordLogin, Refusal
from app.store.social import push_key
from tests.cluster_fixture import make_settings, running_cluster
from tests.integration.helpers import (
    PASSWORD,
    contacts_on_two_workers,
    login,
    new_user,
    only_worker,
    register,
)
from tests.linechat import LineClient

RECHECK_S = 3.0
VERIFY_DELAY_S = 1.5
PUSH_MAX_AGE_S = 4.0
# How long past the recheck interval a stale connection may live (a tick's query,
# the write, the close, a loaded 2-core machine).
SLACK_S = 3.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    settings = make_settings(
        workers=2,
        session_recheck_interval_s=RECHECK_S,
        push_max_age_s=PUSH_MAX_AGE_S,
        test_verify_delay_s=VERIFY_DELAY_S,
    )
    with running_cluster(settings) as c:
        yield c


@pytest.fixture
async def pool(cluster: LocalCluster) -> AsyncIterator[asyncpg.Pool]:
    # Room for the serialisation test's four at once: a lock holder, the login batch,
    # the disable, and the poll of pg_stat_activity.
    p = await create_pool(cluster.settings, size=6)
    try:
        yield p
    finally:
        await p.close()


def admin_key(cluster: LocalCluster) -> bytes:
    return push_key(read_secrets(cluster.settings)["admin"])


class Bystanders:
    """One user on w1 (the attacker's worker) and one on w2, messaging each other."""

    def __init__(self, near: LineClient, far: LineClient, names: tuple[str, str]) -> None:
        self.near, self.far = near, far
        self.names = names

    @classmethod
    async def log_in(cls, cluster: LocalCluster) -> Bystanders:
        a, b = new_user("near"), new_user("far")
        near, _ = await login(cluster, a, worker="w1")
        far, _ = await login(cluster, b, worker="w2")
        return cls(near, far, (a, b))

    async def still_served(self) -> None:
        """Both ways, a message is stored and delivered within normal latency."""
        pairs = ((self.near, self.far, self.names[1]), (self.far, self.near, self.names[0]))
        for sender, receiver, to in pairs:
            body = "still here " + uuid.uuid4().hex[:6]
            started = time.monotonic()
            sent = await sender.request({"op": "send", "to": to, "cmid": body, "body": body})
            assert sent["op"] == "sent", sent
            assert (await receiver.recv_until("msg"))["body"] == body
            assert time.monotonic() - started < 2.0

    async def close(self) -> None:
        await self.near.close()
        await self.far.close()


async def live_sessions(pool: asyncpg.Pool, user: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT s.state FROM sessions s JOIN users u ON u.id = s.user_id "
        "WHERE u.username = $1 AND s.state <> 'closed'",
        user,
    )
    return [r["state"] for r in rows]


async def expect_kicked(client: LineClient, message: str, within_s: float) -> float:
    """Seconds until the connection got `kicked` (with ``message``) and was closed."""
    started = time.monotonic()
    frame = await client.recv_until("error", timeout=within_s)
    assert (frame["code"], frame["message"]) == ("kicked", message)
    assert await client.closed(timeout=2.0)
    return time.monotonic() - started


def worker_metric(cluster: LocalCluster, worker: str, sample: str, **labels: str) -> float:
    url = f"http://{cluster.settings.host}:{cluster.settings.worker_health_port(worker)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
    return 0.0


async def kicked_by_recheck(cluster: LocalCluster, worker: str = "w1") -> float:
    """Connections the worker kicked because the rows' recheck found them stale."""
    return await asyncio.to_thread(
        worker_metric,
        cluster,
        worker,
        "switchboard_sessions_revoked_total",
        found="recheck",
        end="kicked",
    )


# ---- a disable racing a login ---------------------------------------------------------------


async def test_a_disable_during_a_login_leaves_no_live_session(
    cluster: LocalCluster, pool: asyncpg.Pool
) -> None:
    bystanders = await Bystanders.log_in(cluster)
    attacker = new_user("attacker")
    await register(cluster, attacker)
    by_recheck = await kicked_by_recheck(cluster)
    with only_worker(cluster, "w1"):
        client = await LineClient.connect(cluster.settings.host, cluster.settings.client_port)
        await client.send(
            {"op": "hello", "user": attacker, "password": PASSWORD, "device": "d", "rid": 1}
        )
        # The worker has read the account (enabled) and is verifying the password.
        await asyncio.sleep(VERIFY_DELAY_S / 3)
        started = time.monotonic()
        assert await dash_store.set_user_disabled(pool, attacker, True, admin_key(cluster)) == 0
        reply = await client.recv(timeout=10)
    assert time.monotonic() - started < VERIFY_DELAY_S  # the disable came mid-login
    if reply["op"] == "welcome":
        # Opened before the disable's UPDATE: the disable closed it and its push (not
        # the rows' recheck, which would also find a row the disable missed) kicks it.
        await expect_kicked(client, "this account was disabled", within_s=1.0)
        assert await kicked_by_recheck(cluster) == by_recheck
    else:
        assert (reply["op"], reply["code"], reply["rid"]) == ("error", "account_disabled", 1)
    assert await live_sessions(pool, attacker) == []
    await client.close()
    await bystanders.still_served()
    await bystanders.close()


async def test_a_password_change_during_a_login_refuses_it(
    cluster: LocalCluster, pool: asyncpg.Pool
) -> None:
    """argon2 verified the old password while the change committed: the login's batch
    finds another hash on the locked row and answers auth_failed; no session opens."""
    user = new_user("changing")
    await register(cluster, user)
    with only_worker(cluster, "w1"):
        client = await LineClient.connect(cluster.settings.host, cluster.settings.client_port)
        await client.send(
            {"op": "hello", "user": user, "password": PASSWORD, "device": "d", "rid": 1}
        )
        await asyncio.sleep(VERIFY_DELAY_S / 3)  # find_user has read the old hash
        started = time.monotonic()
        await pool.execute(
            "UPDATE users SET password_hash = password_hash || 'changed' WHERE username = $1", user
        )
        reply = await client.recv(timeout=10)
    assert time.monotonic() - started < VERIFY_DELAY_S  # the change came mid-login
    assert (reply["op"], reply["code"], reply["rid"]) == ("error", "auth_failed", 1)
    assert await live_sessions(pool, user) == []
    await client.close()


def _login(user_id: int, device: str) -> PasswordLogin:
    digest = hashlib.sha256(f"{user_id}{device}".encode()).digest()
    return PasswordLogin(user_id, device, "x", digest, digest, "test", "pair", None)


async def _open(pool: asyncpg.Pool, user_id: int, device: str) -> LoggedIn | LoginRefused:
    async with pool.acquire() as conn:
        (result,) = await logins.open_batch(
            conn, [_login(user_id, device)], worker_id="w9", max_devices=10
        )
    return result


async def test_a_login_batch_and_a_disable_serialise_on_the_user_row(
    cluster: LocalCluster, pool: asyncpg.Pool
) -> None:
    """Both orders, in the store: a disable that commits first makes the login batch
    refuse; a batch that locked the user's row first makes the disable wait for it and
    close the row it opened."""
    key = admin_key(cluster)
    first = new_user("first")
    first_id = await accounts.create_user(pool, first, "x")
    await dash_store.set_user_disabled(pool, first, True, key)
    assert await _open(pool, first_id, "d") == LoginRefused(Refusal.DISABLED)

    second = new_user("second")
    user_id = await accounts.create_user(pool, second, "x")
    earlier = await _open(pool, user_id, "d")
    assert isinstance(earlier, LoggedIn)
    async with pool.acquire() as holder, holder.transaction():
        # Hold the device's earlier row: the batch takes the user's row, then waits here.
        await holder.execute("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", earlier.session_id)
        opening = asyncio.ensure_future(_open(pool, user_id, "d"))
        await waiting_on_a_lock(pool, "%AS t(user_id, device, device_token_hash%")
        disabling = asyncio.ensure_future(dash_store.set_user_disabled(pool, second, True, key))
        # The disable waits for the lock the batch holds on the user's row.
        await waiting_on_a_lock(pool, "UPDATE users SET disabled%")
    opened = await asyncio.wait_for(opening, 10)
    assert isinstance(opened, LoggedIn)
    assert await asyncio.wait_for(disabling, 10) == 1  # it saw and closed the new row
    row = await pool.fetchrow(
        "SELECT state, close_reason FROM sessions WHERE id = $1", opened.session_id
    )
    assert (row["state"], row["close_reason"]) == ("closed", "disabled")


async def waiting_on_a_lock(pool: asyncpg.Pool, query_like: str) -> None:
    for _ in range(100):
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND query LIKE $1",
            query_like,
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no statement like {query_like!r} waits on a lock")


# ---- a kick missed across a listener reconnect ------------------------------------------------


async def listener_pid(conn: asyncpg.Connection, worker: str) -> int | None:
    pid: int | None = await conn.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
        f"switchboard-{worker}-listener",
    )
    return pid


@pytest.mark.parametrize("revoke", ["disable", "kick"])
async def test_a_revocation_missed_across_a_listener_reconnect_is_applied_within_the_recheck(
    cluster: LocalCluster, pool: asyncpg.Pool, revoke: str
) -> None:
    bystanders = await Bystanders.log_in(cluster)
    attacker = new_user("attacker")
    client, welcome = await login(cluster, attacker, worker="w1")
    rechecks = await asyncio.to_thread(
        worker_metric, cluster, "w1", "switchboard_session_rechecks_total", trigger="listener"
    )
    by_recheck = await kicked_by_recheck(cluster)
    conn = await asyncpg.connect(dsn(cluster.settings))
    try:
        pid = await listener_pid(conn, "w1")
        assert pid is not None
        # pg_terminate_backend(pid, timeout) returns once the backend has exited: a
        # backend still dying could take the revocation's NOTIFY and hand it over.
        assert await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
        started = time.monotonic()
        # While w1's listener reconnects (0.2 s), the revocation's NOTIFY reaches no one there.
        if revoke == "disable":
            await dash_store.set_user_disabled(pool, attacker, True, admin_key(cluster))
            message = "this account was disabled"
        else:
            await dash_store.kick_session(pool, int(welcome["session"]), admin_key(cluster))
            message = "an administrator closed this session"
        await expect_kicked(client, message, within_s=RECHECK_S + SLACK_S)
        assert time.monotonic() - started < RECHECK_S + SLACK_S
        new_pid = await listener_pid(conn, "w1")
        assert new_pid not in (None, pid)  # it did reconnect
    finally:
        await conn.close()
        await client.close()
    assert await live_sessions(pool, attacker) == []
    # The rows, not a push, ended it; the reconnect itself started a recheck.
    assert await kicked_by_recheck(cluster) == by_recheck + 1
    assert (
        await asyncio.to_thread(
            worker_metric, cluster, "w1", "switchboard_session_rechecks_total", trigger="listener"
        )
        == rechecks + 1
    )
    await bystanders.still_served()
    await bystanders.close()


async def test_a_session_closed_without_any_notify_is_dropped_by_the_timer(
    cluster: LocalCluster, pool: asyncpg.Pool
) -> None:
    """A row closed behind the workers' back (no push at all): only the timer finds it."""
    bystanders = await Bystanders.log_in(cluster)
    attacker = new_user("attacker")
    client, welcome = await login(cluster, attacker, worker="w1")
    await pool.execute(
        "UPDATE sessions SET state = 'closed', closed_at = now(), close_reason = 'kicked' "
        "WHERE id = $1",
        int(welcome["session"]),
    )
    elapsed = await expect_kicked(
        client, "an administrator closed this session", within_s=RECHECK_S + SLACK_S
    )
    assert elapsed < RECHECK_S + SLACK_S
    await client.close()
    await bystanders.still_served()
    await bystanders.close()


# ---- a captured push replayed -------------------------------------------------------------------


async def nothing_arrives(client: LineClient, within_s: float) -> None:
    with pytest.raises(TimeoutError):
        frame = await client.recv(timeout=within_s)
        raise AssertionError(f"got {frame}")


async def test_a_captured_push_replayed_at_once_or_later_is_dropped(cluster: LocalCluster) -> None:
    """A spy on sb_push captures bob's signed "away" and NOTIFYs it again, at once
    (the same nonce: replayed) and after the window (stale). Alice, his contact, is
    told once; both keep messaging."""
    alice, bob, a, b, _ = await contacts_on_two_workers(cluster)
    spy = await asyncpg.connect(dsn(cluster.settings))
    captured: list[str] = []
    await spy.add_listener("sb_push", lambda *args: captured.append(args[3]))
    try:
        assert (await b.request({"op": "presence", "state": "away", "text": "lunch"}))["op"] == "ok"
        assert (await a.recv_until("presence"))["text"] == "lunch"
        await asyncio.sleep(0.2)
        [away] = [p for p in captured if '"lunch"' in p]
        assert (await b.request({"op": "presence", "state": "online"}))["op"] == "ok"
        assert (await a.recv_until("presence"))["state"] == "online"
        await spy.execute("SELECT pg_notify('sb_push', $1)", away)
        await nothing_arrives(a, within_s=1.5)
        await asyncio.sleep(PUSH_MAX_AGE_S)
        await spy.execute("SELECT pg_notify('sb_push', $1)", away)
        await nothing_arrives(a, within_s=1.5)
    finally:
        await spy.close()
    messaging = Bystanders(a, b, (alice, bob))
    await messaging.still_served()
    await messaging.close()
