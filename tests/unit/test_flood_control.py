"""Flood control degrades, it does not kill (review M1; docs/protocol.md "Flood control").

The real `ClientConnection` and dispatcher over a fake transport: frames beyond the
connection's bucket are answered `rate_limited` in their place and the socket is
paused; only far beyond is `flood` fatal. Costly ops pass a per-user budget."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.protocol import ContactList, Ping, SetPresence, Typing
from app.protocol.proxy import build_proxy_header
from app.settings import Settings
from app.worker.ratelimit import OpBudgets
from app.worker.states import Peer
from tests.unit.worker_fakes import GOOD_PASSWORD, Harness, frames_of, real_connection

CLIENT = ("203.0.113.9", 50000)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def pings(n: int, first_rid: int = 1) -> bytes:
    return b"".join(b'{"op":"ping","rid":%d}\n' % (first_rid + i) for i in range(n))


def opened(h: Harness) -> tuple[Any, Any]:
    conn, transport = real_connection(h)
    conn.data_received(build_proxy_header(CLIENT))
    return conn, transport


async def test_frames_beyond_the_burst_are_answered_rate_limited_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch, frame_burst=10, frames_per_s=100.0, flood_fatal_frames=50)
    conn, transport = opened(h)
    conn.data_received(pings(15))
    await settle()
    replies = frames_of(bytes(transport.out))
    assert [r["rid"] for r in replies] == list(range(1, 16))  # one reply each, in order
    assert [r["op"] for r in replies[:10]] == ["pong"] * 10
    for r in replies[10:]:
        assert r["op"] == "error" and r["code"] == "rate_limited", r
        assert 0 < r["retry_after"] <= 0.06 + 0.01  # (1 + 5 over) / 100 per second
    assert not transport.closed and not transport.aborted
    assert not transport.reading  # not read again until a token is back

    await asyncio.sleep(replies[-1]["retry_after"] + 0.02)
    assert transport.reading
    transport.out.clear()
    conn.data_received(pings(1, first_rid=99))
    await settle()
    assert frames_of(bytes(transport.out)) == [{"op": "pong", "rid": 99}]


async def test_only_far_beyond_the_budget_is_a_flood(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, frame_burst=10, frames_per_s=100.0, flood_fatal_frames=50)
    conn, transport = opened(h)
    conn.data_received(pings(10 + 50))  # 50 over: still degraded, not fatal
    await settle()
    assert not transport.closed
    await asyncio.sleep(0.6)
    transport.out.clear()
    conn.data_received(pings(10 + 51))  # one more than that: fatal
    await settle()
    replies = frames_of(bytes(transport.out))
    # The frames within the budget are answered, then flood; the rest get nothing.
    assert [r["op"] for r in replies[:-1]] == ["pong"] * 10
    assert replies[-1]["code"] == "flood"
    assert transport.closed


def test_budgets_refill_at_their_rate_per_user_and_class() -> None:
    budgets = OpBudgets(Settings(presence_ops_per_s=1.0, presence_ops_burst=5))
    presence = SetPresence(state="away")
    assert [budgets.take(1, presence, now=100.0) for _ in range(5)] == [None] * 5
    assert budgets.take(1, presence, now=100.0) == pytest.approx(1.0)
    assert budgets.take(1, presence, now=100.5) == pytest.approx(0.5)  # refused, not spent
    assert budgets.take(1, presence, now=101.0) is None  # a token a second
    assert budgets.take(2, presence, now=101.0) is None  # another user: its own budget
    assert budgets.take(1, Typing(to="bob"), now=101.0) is None  # another class
    assert budgets.take(1, Ping(), now=101.0) is None  # no class: free
    assert len(budgets) == 3


def test_full_buckets_are_forgotten() -> None:
    budgets = OpBudgets(Settings())
    budgets.take(1, ContactList(), now=0.0)
    budgets.take(2, ContactList(), now=0.0)
    assert len(budgets) == 2
    budgets.take(3, ContactList(), now=OpBudgets.PRUNE_EVERY_S + 1)  # prunes the refilled
    assert len(budgets) == 1


async def test_a_costly_op_over_budget_is_refused_and_not_carried_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch, presence_ops_per_s=0.1, presence_ops_burst=2)
    h.store.add_user("alice")
    conn, transport = opened(h)
    conn.data_received(
        b'{"op":"hello","user":"alice","password":"%s","device":"d"}\n' % GOOD_PASSWORD.encode()
    )
    await settle()
    carried_out = []

    async def set_presence(peer: Peer, req: SetPresence) -> None:
        carried_out.append(req.state)
        peer.write(b'{"op":"ok"}\n')

    h.dispatcher._handlers[SetPresence] = set_presence
    transport.out.clear()
    conn.data_received(b'{"op":"presence","state":"away","rid":1}\n' * 4)
    await settle()
    replies = frames_of(bytes(transport.out))
    assert [r["op"] for r in replies] == ["ok", "ok", "error", "error"]
    assert replies[2]["code"] == "rate_limited" and replies[2]["retry_after"] > 9
    assert carried_out == ["away", "away"]
    assert not transport.closed
