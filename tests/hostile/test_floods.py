"""Floods degrade, they do not kill (review M1; docs/protocol.md "Flood control"),
against a real cluster: frames beyond a connection's budget are answered
`rate_limited` and the connection lives; costly ops have per-user budgets; typing
goes to contacts only; one user holds at most `max_devices_per_user` sessions.
Each attack ends with a bystander who logs in, sends and receives as usual."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.cluster.launcher import LocalCluster
from tests.hostile.bystander import bystander_is_unaffected
from tests.integration.helpers import (
    PASSWORD,
    contacts_on_two_workers,
    db,
    login,
    new_user,
    register,
)
from tests.linechat import LineClient


def pings(n: int) -> bytes:
    return b"".join(b'{"op":"ping","rid":%d}\n' % i for i in range(n))


async def replies(client: LineClient, n: int) -> list[dict[str, Any]]:
    return [await client.recv() for _ in range(n)]


async def test_frames_beyond_the_budget_are_refused_one_by_one(cluster: LocalCluster) -> None:
    attacker, _ = await login(cluster, new_user("flood"))
    n = cluster.settings.frame_burst + 200
    await attacker.send(pings(n))
    got = await replies(attacker, n)
    assert [r["rid"] for r in got] == list(range(n))  # exactly one reply each, in order
    pongs = [r for r in got if r["op"] == "pong"]
    limited = [r for r in got if r["op"] == "error"]
    assert len(pongs) >= cluster.settings.frame_burst - 1  # the hello took a token
    assert limited and all(r["code"] == "rate_limited" for r in limited)
    assert all(0 < r["retry_after"] <= 2.0 for r in limited)
    await asyncio.sleep(max(r["retry_after"] for r in limited))
    assert (await attacker.request({"op": "ping"}))["op"] == "pong"  # still connected
    await attacker.close()
    await bystander_is_unaffected(cluster)


async def test_presence_over_its_budget_is_refused_and_not_stored(cluster: LocalCluster) -> None:
    user = new_user("presence")
    attacker, _ = await login(cluster, user)
    n = 30
    await attacker.send(
        b"".join(
            b'{"op":"presence","state":"away","text":"t%d","rid":%d}\n' % (i, i) for i in range(n)
        )
    )
    got = await replies(attacker, n)
    accepted = [r["rid"] for r in got if r["op"] == "ok"]
    refused = [r for r in got if r["op"] == "error"]
    assert len(accepted) <= cluster.settings.presence_ops_burst + 2, got
    assert refused and {r["code"] for r in refused} == {"rate_limited"}
    async with db(cluster) as conn:
        text = await conn.fetchval("SELECT status_text FROM users WHERE username = $1", user)
    assert text == f"t{accepted[-1]}"  # the refused ones changed nothing
    await attacker.close()
    await bystander_is_unaffected(cluster)


async def test_contact_requests_cannot_become_a_stream(cluster: LocalCluster) -> None:
    attacker, _ = await login(cluster, new_user("spam"))
    victims = [new_user("victim") for _ in range(25)]
    for v in victims:
        await register(cluster, v)
    for i, v in enumerate(victims):
        await attacker.send({"op": "contact_add", "user": v, "rid": i})
    got = await replies(attacker, len(victims))
    oks = sum(1 for r in got if r["op"] == "ok")
    assert oks <= cluster.settings.social_ops_burst + 3, got
    assert any(r.get("code") == "rate_limited" for r in got)
    await attacker.close()
    await bystander_is_unaffected(cluster)


@pytest.mark.parametrize(
    ("op", "budget"),
    [
        ({"op": "typing"}, "typing_ops_burst"),
        ({"op": "room_create", "name": "flood"}, "social_ops_burst"),
        ({"op": "history"}, "query_ops_burst"),
    ],
    ids=["typing", "room_create", "history"],
)
async def test_each_costly_op_has_its_own_budget(
    cluster: LocalCluster, op: dict[str, Any], budget: str
) -> None:
    """Three times an op class's burst, pipelined on one connection: about a burst
    is served, the rest is refused `rate_limited`, the connection lives, and a
    bystander notices nothing."""
    attacker, _ = await login(cluster, new_user("opflood"))
    room = (await attacker.request({"op": "room_create", "name": "mine"}))["room"]
    if op["op"] in ("typing", "history"):
        op = {**op, "room": room}
    burst = int(getattr(cluster.settings, budget))
    n = 3 * burst
    for i in range(n):
        await attacker.send({**op, "rid": i})
    got = await replies(attacker, n)
    assert [r["rid"] for r in got] == list(range(n))
    served = [r for r in got if r["op"] != "error"]
    refused = [r for r in got if r["op"] == "error"]
    assert len(served) <= burst + 2, got
    assert refused and {r["code"] for r in refused} == {"rate_limited"}, refused
    assert (await attacker.request({"op": "ping"}))["op"] == "pong"
    await attacker.close()
    await bystander_is_unaffected(cluster)


async def test_typing_goes_to_contacts_only(cluster: LocalCluster) -> None:
    alice, bob, a, b, _ = await contacts_on_two_workers(cluster)
    stranger = new_user("stranger")
    s, _ = await login(cluster, stranger)
    assert (await a.request({"op": "typing", "to": bob}))["op"] == "ok"
    assert (await b.recv_until("typing"))["from"] == alice
    refused = await a.request({"op": "typing", "to": stranger})
    assert refused["code"] == "forbidden", refused
    unknown = await a.request({"op": "typing", "to": new_user("nobody")})
    assert unknown["code"] == "forbidden"  # the same answer: typing tells nobody who exists
    assert (await s.request({"op": "ping"}))["op"] == "pong"
    assert not [f for f in s.backlog if f.get("op") == "typing"]
    for c in (a, b, s):
        await c.close()


async def test_one_user_holds_at_most_max_devices_sessions(cluster: LocalCluster) -> None:
    user = new_user("devices")
    cap = cluster.settings.max_devices_per_user
    clients = [
        (await login(cluster, user, device=f"d{i}", register_first=i == 0))[0] for i in range(cap)
    ]
    extra = await LineClient.connect(cluster.settings.host, cluster.settings.client_port)
    hello = {"op": "hello", "user": user, "password": PASSWORD, "device": "one-more"}
    assert (await extra.request(hello))["code"] == "too_many_devices"
    again, _ = await login(cluster, user, device="d0", register_first=False)  # replaces d0
    assert (await clients[1].request({"op": "bye"}))["op"] == "ok"
    assert (await extra.request(hello))["op"] == "welcome"
    for c in [again, extra, *clients]:
        await c.close()
    await bystander_is_unaffected(cluster)
