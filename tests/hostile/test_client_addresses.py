"""Real client addresses (review item C2): HAProxy names each client in a PROXY v2
header, workers refuse connections without one, and the address is the client's
in `sessions.remote_addr` and in the per-address login limit.

Loopback addresses other than 127.0.0.1 play other hosts: a client binds its
socket to 127.0.0.2, 127.0.0.3, ... before connecting to HAProxy.
"""

from __future__ import annotations

import asyncio

from app.cluster.launcher import LocalCluster
from tests.hostile.edge import client_from, login_from, resume_from, still_open, worker_counter
from tests.integration.helpers import PASSWORD, db, login, new_user, register
from tests.linechat import LineClient


async def remote_addr(cluster: LocalCluster, session_id: str) -> str:
    async with db(cluster) as conn:
        value = await conn.fetchval(
            "SELECT remote_addr FROM sessions WHERE id = $1", int(session_id)
        )
    assert isinstance(value, str)
    return value


async def test_each_client_is_recorded_at_its_own_address(cluster: LocalCluster) -> None:
    alice, bob = new_user("alice"), new_user("bob")
    a, a_welcome = await login_from(cluster, alice, "127.0.0.2")
    b, b_welcome = await login_from(cluster, bob, "127.0.0.3")
    a_port = a.writer.get_extra_info("sockname")[1]
    b_port = b.writer.get_extra_info("sockname")[1]
    assert await remote_addr(cluster, str(a_welcome["session"])) == f"127.0.0.2:{a_port}"
    assert await remote_addr(cluster, str(b_welcome["session"])) == f"127.0.0.3:{b_port}"

    # A resume from elsewhere records where the session is now.
    await a.close()
    moved, resumed = await resume_from(cluster, a_welcome, "127.0.0.4")
    port = moved.writer.get_extra_info("sockname")[1]
    assert await remote_addr(cluster, str(resumed["session"])) == f"127.0.0.4:{port}"
    await moved.close()
    await b.close()


async def test_a_direct_connection_to_a_worker_is_refused(cluster: LocalCluster) -> None:
    """The attacker skips HAProxy (no PROXY header); the bystander goes through it."""
    s = cluster.settings
    before = await worker_counter(cluster, "switchboard_proxy_refused", reason="not_proxy_v2")
    bystander, _ = await login(cluster, new_user("by"))
    attackers = [await LineClient.connect(s.host, s.worker_port(w)) for w in s.worker_ids()]
    for attacker in attackers:
        await attacker.send({"op": "ping", "rid": 1})
    for attacker in attackers:
        assert await attacker.closed(timeout=5), "a worker answered a connection without PROXY"
        await attacker.close()
    assert await still_open(bystander)
    after = await worker_counter(cluster, "switchboard_proxy_refused", reason="not_proxy_v2")
    assert after - before == len(attackers)
    # Through HAProxy a new client still gets in.
    late, _ = await login(cluster, new_user("late"))
    await late.close()
    await bystander.close()


async def test_failed_logins_from_one_address_lock_out_only_that_address(
    cluster: LocalCluster,
) -> None:
    """The review's C2 scenario: before, HAProxy's address was everybody's."""
    s = cluster.settings
    attacker = await client_from(cluster, "127.0.3.9")
    replies = []
    for i in range(s.max_login_failures_per_addr + 1):
        reply = await attacker.request(
            {"op": "hello", "user": new_user(f"x{i}"), "password": "wrong password", "device": "d"}
        )
        replies.append(reply.get("code"))
    assert replies[:-1] == ["auth_failed"] * s.max_login_failures_per_addr
    assert replies[-1] == "rate_limited"

    # The bystander, from another address, logs in at once with the right password.
    bystander_user = new_user("by")
    await register(cluster, bystander_user)
    bystander = await client_from(cluster, "127.0.0.7")
    welcome = await bystander.request(
        {"op": "hello", "user": bystander_user, "password": PASSWORD, "device": "phone"}
    )
    assert welcome["op"] == "welcome", welcome
    # ... and the attacker's address is still refused, for every user.
    again = await attacker.request(
        {"op": "hello", "user": bystander_user, "password": PASSWORD, "device": "tablet"}
    )
    assert again.get("code") == "rate_limited", again
    await asyncio.gather(attacker.close(), bystander.close())
