"""What the hostile tests share: clients from chosen source addresses, and the bystander.

Attackers connect from 127.0.0.9 and bystanders from 127.0.0.7. Until HAProxy
sends the PROXY protocol, workers see both as HAProxy's 127.0.0.1, a shared
address (``shared_client_addrs``): no per-address budget applies and everyone
shares one (user, address) pair. Where that changes what a test can observe, it
asks the sessions table which address the workers saw (`bystander_is_unaffected`)
and asserts what is true for it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from app.cluster.launcher import LocalCluster
from tests.integration.helpers import PASSWORD, db, login, new_user, register
from tests.linechat import LineClient

ATTACKER_IP = "127.0.0.9"
_attackers = itertools.count(1)


def attacker_ip() -> str:
    """A loopback address no other test has used: the tests of a module share one
    cluster, and an address's budgets must start afresh in each."""
    return f"127.0.2.{next(_attackers)}"


def checked_at_most(free: int, base_s: float, elapsed_s: float) -> int:
    """How many wrong passwords for one pair may be checked in ``elapsed_s``: the free
    ones, then one more each time the doubling wait (``base_s``, 2x, 4x, ...) has
    passed. Parallel attempts on a loaded machine can span a wait or two."""
    extra, waited, wait = 0, 0.0, base_s
    while waited + wait <= elapsed_s:
        extra, waited, wait = extra + 1, waited + wait, wait * 2
    return free + extra


BYSTANDER_IP = "127.0.0.7"
WRONG = "wrong password, wrong"
# A bystander's request takes well under this on the test cluster, attack or not.
NORMAL_LATENCY_S = 2.0


async def connect_from(cluster: LocalCluster, source_ip: str) -> LineClient:
    s = cluster.settings
    reader, writer = await asyncio.open_connection(
        s.host, s.client_port, local_addr=(source_ip, 0), limit=1 << 20
    )
    return LineClient(reader, writer)


def hello(user: str, password: str, device: str = "d") -> dict[str, Any]:
    return {"op": "hello", "user": user, "password": password, "device": device}


async def timed(client: LineClient, frame: dict[str, Any]) -> dict[str, Any]:
    """The reply to ``frame``, which must come within normal latency."""
    started = time.monotonic()
    reply = await client.request(frame)
    assert time.monotonic() - started < NORMAL_LATENCY_S, (frame["op"], reply)
    return reply


async def bystander_is_unaffected(cluster: LocalCluster) -> str:
    """A new user logs in from the bystander's address and sends to a friend, who gets
    it, all within normal latency; returns the address the worker recorded for the login."""
    me, friend = new_user("bystander"), new_user("friend")
    await register(cluster, me)
    f, _ = await login(cluster, friend)
    client = await connect_from(cluster, BYSTANDER_IP)
    welcome = await timed(client, hello(me, PASSWORD))
    assert welcome["op"] == "welcome", welcome
    sent = await timed(client, {"op": "send", "to": friend, "cmid": "c1", "body": "still here"})
    assert sent["op"] == "sent", sent
    assert (await f.recv(timeout=NORMAL_LATENCY_S))["body"] == "still here"
    for each in (client, f):
        await each.close()
    async with db(cluster) as conn:
        addr = await conn.fetchval(
            "SELECT remote_addr FROM sessions WHERE id = $1", int(welcome["session"])
        )
    return str(addr)


def workers_see_client_addresses(recorded: str) -> bool:
    """Whether workers see the client's own address (HAProxy sends the PROXY protocol)."""
    return recorded.rsplit(":", 1)[0] == BYSTANDER_IP
