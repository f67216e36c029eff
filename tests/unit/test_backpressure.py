"""Long output is paced by the reader (review M2, L6; docs/protocol.md "Slow links"):
delivery's pages stop at the write buffer's high-water mark and go on when the peer
has read; `history` replies are capped in bytes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from app.store.messages import InboxEntry
from app.store.schema import INBOX_KIND_MESSAGE
from app.worker.delivery import Delivery
from app.worker.registry import Registry
from tests.unit.worker_fakes import (
    NO_POOL,
    FakeAnnouncer,
    FakeEvents,
    Harness,
    active_peer,
    real_connection,
)

BODY = "x" * 16384
NOW = datetime(2026, 12, 5, tzinfo=UTC)


def entries(user_id: int, seqs: range) -> list[InboxEntry]:
    return [
        InboxEntry(
            user_id,
            seq,
            INBOX_KIND_MESSAGE,
            seq,
            2,
            "d",
            user_id,
            None,
            BODY,
            f"c{seq}",
            NOW,
            None,
            None,
        )
        for seq in seqs
    ]


def delivery() -> Delivery:
    async def no_names(ids: Any) -> dict[int, str]:
        return {}

    registry = Registry(no_names, no_names)  # type: ignore[arg-type]
    return Delivery(NO_POOL, registry, FakeAnnouncer(), FakeEvents(), 0.01)  # type: ignore[arg-type]


def test_a_page_stops_once_the_write_room_is_used_up() -> None:
    d = delivery()
    peer = active_peer(user_id=1)
    peer.room = 40_000  # room for two 16 KiB frames and the start of a third
    d._write_entries(peer, entries(1, range(1, 501)), {1: "alice", 2: "bob"})  # type: ignore[arg-type]
    assert [f["seq"] for f in peer.frames] == [1, 2, 3]  # the third crosses the mark
    assert peer.session is not None and peer.session.delivered_seq == 3
    assert 1 in d._dirty  # the rest follows in a later round


def test_with_room_a_whole_page_goes_in_one_write() -> None:
    d = delivery()
    peer = active_peer(user_id=1)
    d._write_entries(peer, entries(1, range(1, 101)), {1: "alice", 2: "bob"})  # type: ignore[arg-type]
    assert [f["seq"] for f in peer.frames] == list(range(1, 101))
    assert 1 not in d._dirty


async def test_requests_wait_while_the_peer_does_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.protocol.proxy import build_proxy_header

    h = Harness(monkeypatch)
    conn, transport = real_connection(h)
    conn.data_received(build_proxy_header(("203.0.113.9", 50000)))
    conn.pause_writing()  # the transport's buffer passed the high-water mark
    conn.data_received(b'{"op":"ping","rid":1}\n{"op":"ping","rid":2}\n')
    for _ in range(10):
        await asyncio.sleep(0)
    assert transport.out == b""  # nothing handled while output is unread
    conn.resume_writing()
    for _ in range(10):
        await asyncio.sleep(0)
    assert transport.out.count(b'"pong"') == 2
    conn.connection_lost(None)
