"""The client SDK and the chat/send commands against an in-process fake server.

The fake server is a real asyncio TCP server on 127.0.0.1 whose test code reads
the client's frames and writes canned replies and events; no cluster involved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import orjson
import pytest

from app.client import (
    Client,
    ClientError,
    ConnectionLost,
    Contact,
    ContactRequest,
    ErrorEvent,
    Event,
    HistoryMessage,
    HistoryPage,
    Msg,
    Presence,
    ProtocolError,
    Receipt,
    Reconnect,
    Sent,
    ServerClosed,
    ServerError,
    Timeout,
    Typing,
    Unknown,
    Welcome,
)
from app.client.commands import Chat, Login, add_commands, cmd_send, send_message, stdin_lines

Frame = dict[str, Any]
TS = "2024-05-01T12:00:00.123Z"


class Peer:
    """The server's end of one accepted connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self, timeout: float = 5.0) -> Frame:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        assert line.endswith(b"\n"), f"client closed or sent a partial line: {line!r}"
        frame: Frame = orjson.loads(line)
        return frame

    async def send(self, *frames: Frame) -> None:
        self.writer.write(b"".join(orjson.dumps(f) + b"\n" for f in frames))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, request: Frame, frame: Frame) -> None:
        await self.send({**frame, "rid": request["rid"]})

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class FakeServer:
    def __init__(self) -> None:
        self._accepted: asyncio.Queue[Peer] = asyncio.Queue()
        self._peers: list[Peer] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self._peers.append(peer)
        self._accepted.put_nowait(peer)

    async def accept(self) -> Peer:
        return await asyncio.wait_for(self._accepted.get(), 5.0)

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for peer in self._peers:
            await peer.close()
        await self._server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    fake = FakeServer()
    await fake.start()
    yield fake
    await fake.aclose()


async def connect(server: FakeServer, **kwargs: Any) -> tuple[Client, Peer]:
    client = await Client.connect("127.0.0.1", server.port, **kwargs)
    return client, await server.accept()


@pytest.fixture
async def conn(server: FakeServer) -> AsyncIterator[tuple[Client, Peer]]:
    client, peer = await connect(server, timeout=2.0)
    yield client, peer
    await peer.close()  # the client then sees EOF at once instead of waiting for its bye
    await client.close()


def msg(seq: int, *, id: int = 0, body: str = "hi") -> Frame:
    return {
        "op": "msg",
        "seq": seq,
        "id": id or 1000 + seq,
        "from": "bob",
        "to": "alice",
        "body": body,
        "ts": TS,
        "cmid": f"b-{seq}",
    }


def receipt(seq: int, msg_id: int = 1001) -> Frame:
    return {"op": "receipt", "seq": seq, "by": "bob", "msg_id": msg_id, "ts": TS}


WELCOME: Frame = {
    "op": "welcome",
    "v": 1,
    "user": "alice",
    "device": "laptop",
    "session": "9f2c1e",
    "worker": "w1",
    "resume_token": "q8ZkP3m0vT1xLr6cYb2aWn4e",
    "seq": 7,
    "acked": 3,
    "some_future_field": True,
}


# --- requests and replies ---------------------------------------------------------------


async def test_replies_match_their_rid_with_events_interleaved(
    conn: tuple[Client, Peer],
) -> None:
    client, peer = conn
    login = asyncio.create_task(client.login("alice", "correct horse battery", "laptop"))
    ping = asyncio.create_task(client.ping())
    hello, ping_frame = await peer.recv(), await peer.recv()
    assert hello == {
        "op": "hello",
        "user": "alice",
        "password": "correct horse battery",
        "device": "laptop",
        "v": 1,
        "rid": hello["rid"],
    }
    assert ping_frame == {"op": "ping", "rid": ping_frame["rid"]}
    assert isinstance(hello["rid"], int)
    assert hello["rid"] != ping_frame["rid"]

    # Replies out of request order, with server-initiated frames in between.
    await peer.send(
        {"op": "presence", "user": "bob", "state": "away", "text": "lunch"},
        {"op": "pong", "rid": ping_frame["rid"]},
        msg(4),
        {**WELCOME, "rid": hello["rid"]},
        msg(5),
    )
    await ping
    welcome = await login
    assert welcome == Welcome("alice", "laptop", "9f2c1e", "w1", "q8ZkP3m0vT1xLr6cYb2aWn4e", 7, 3)
    assert "q8ZkP3m0" not in repr(welcome)
    assert (client.user, client.device, client.resume_token) == (
        "alice",
        "laptop",
        "q8ZkP3m0vT1xLr6cYb2aWn4e",
    )
    assert await client.next_event(1) == Presence("bob", "away", "lunch")
    assert await client.next_event(1) == Msg(4, 1004, "bob", "alice", None, "hi", TS, "b-4")
    assert (await client.next_event(1)) == Msg(5, 1005, "bob", "alice", None, "hi", TS, "b-5")
    assert client.last_seq == 5


async def test_error_reply_raises_server_error(conn: tuple[Client, Peer]) -> None:
    client, peer = conn
    task = asyncio.create_task(client.contact_add("bob"))
    request = await peer.recv()
    assert request == {"op": "contact_add", "user": "bob", "rid": request["rid"]}
    await peer.reply(
        request,
        {"op": "error", "code": "rate_limited", "message": "slow down", "retry_after": 1.5},
    )
    with pytest.raises(ServerError) as info:
        await task
    assert (info.value.code, info.value.message, info.value.retry_after) == (
        "rate_limited",
        "slow down",
        1.5,
    )
    assert info.value.retryable
    assert not info.value.fatal
    assert isinstance(info.value, ClientError)

    # The connection is still usable, and an error without retry_after has None.
    task2 = asyncio.create_task(client.room_join(99))
    request = await peer.recv()
    await peer.reply(request, {"op": "error", "code": "forbidden", "message": "not invited"})
    with pytest.raises(ServerError) as info:
        await task2
    assert (info.value.code, info.value.retry_after, info.value.retryable) == (
        "forbidden",
        None,
        False,
    )


async def test_reply_of_the_wrong_kind_is_a_protocol_error(conn: tuple[Client, Peer]) -> None:
    client, peer = conn
    task = asyncio.create_task(client.rooms())
    await peer.reply(await peer.recv(), {"op": "ok"})
    with pytest.raises(ProtocolError, match="expected 'rooms'"):
        await task
    task2 = asyncio.create_task(client.room_create("x"))
    await peer.reply(await peer.recv(), {"op": "room", "room": "not-a-number", "name": "x"})
    with pytest.raises(ProtocolError, match="'room'"):
        await task2


Call = Callable[[Client], Coroutine[Any, Any, Any]]

REQUEST_CASES: list[tuple[str, Call, Frame, Frame, Any]] = [
    (
        "contacts",
        lambda c: c.contacts(),
        {"op": "contacts"},
        {
            "op": "contacts",
            "contacts": [
                {"user": "bob", "status": "accepted", "state": "away", "text": "brb"},
                {"user": "carol", "status": "pending_in"},
            ],
        },
        [Contact("bob", "accepted", "away", "brb"), Contact("carol", "pending_in", None, None)],
    ),
    (
        "rooms",
        lambda c: c.rooms(),
        {"op": "rooms"},
        {"op": "rooms", "rooms": [{"room": 12, "name": "ops"}, {"room": 13, "name": "fun"}]},
        [(12, "ops"), (13, "fun")],
    ),
    (
        "room_create",
        lambda c: c.room_create("ops"),
        {"op": "room_create", "name": "ops"},
        {"op": "room", "room": 12, "name": "ops"},
        12,
    ),
    (
        "room_members",
        lambda c: c.room_members(12),
        {"op": "room_members", "room": 12},
        {"op": "members", "room": 12, "members": ["alice", "bob"]},
        ["alice", "bob"],
    ),
    (
        "room_invite",
        lambda c: c.room_invite(12, "bob"),
        {"op": "room_invite", "room": 12, "user": "bob"},
        {"op": "ok"},
        None,
    ),
    (
        "history",
        lambda c: c.history(with_user="bob", before=1005, limit=2),
        {"op": "history", "with": "bob", "before": 1005, "limit": 2},
        {
            "op": "history",
            "messages": [
                {"id": 1002, "from": "bob", "to": "alice", "body": "b", "ts": TS, "cmid": "x"},
                {"id": 1001, "from": "alice", "to": "bob", "body": "a", "ts": TS, "cmid": "y"},
            ],
            "more": True,
        },
        HistoryPage(
            [
                HistoryMessage(1002, "bob", "alice", None, "b", TS, "x"),
                HistoryMessage(1001, "alice", "bob", None, "a", TS, "y"),
            ],
            more=True,
        ),
    ),
    (
        "typing",
        lambda c: c.typing(room=12, active=False),
        {"op": "typing", "room": 12, "active": False},
        {"op": "ok"},
        None,
    ),
    (
        "presence",
        lambda c: c.set_presence("away"),
        {"op": "presence", "state": "away"},
        {"op": "ok"},
        None,
    ),
    ("read", lambda c: c.read(1001), {"op": "read", "msg_id": 1001}, {"op": "ok"}, None),
    (
        "password",
        lambda c: c.change_password("old-password", "a-much-longer-one"),
        {"op": "password", "old": "old-password", "new": "a-much-longer-one"},
        {"op": "ok"},
        None,
    ),
    (
        "register",
        lambda c: c.register("alice", "correct horse battery"),
        {"op": "register", "user": "alice", "password": "correct horse battery"},
        {"op": "registered", "user": "alice"},
        None,
    ),
]


@pytest.mark.parametrize(
    ("call", "expected_request", "reply", "expected_result"),
    [case[1:] for case in REQUEST_CASES],
    ids=[case[0] for case in REQUEST_CASES],
)
async def test_request_frames_and_parsed_replies(
    conn: tuple[Client, Peer],
    call: Call,
    expected_request: Frame,
    reply: Frame,
    expected_result: Any,
) -> None:
    client, peer = conn
    task = asyncio.create_task(call(client))
    request = await peer.recv()
    assert request == {**expected_request, "rid": request["rid"]}
    await peer.reply(request, reply)
    assert await task == expected_result


async def test_target_arguments_are_checked_locally(conn: tuple[Client, Peer]) -> None:
    client, _ = conn
    with pytest.raises(ValueError, match="exactly one"):
        await client.send("hi")
    with pytest.raises(ValueError, match="exactly one"):
        await client.history(with_user="bob", room=1)


# --- send: cmid and idempotent resends --------------------------------------------------


async def test_send_generates_a_cmid_or_uses_the_given_one(conn: tuple[Client, Peer]) -> None:
    client, peer = conn
    task = asyncio.create_task(client.send("hi bob", to="bob"))
    request = await peer.recv()
    cmid = request["cmid"]
    assert len(cmid) == 32
    int(cmid, 16)  # uuid4 hex
    assert request == {
        "op": "send",
        "cmid": cmid,
        "body": "hi bob",
        "to": "bob",
        "rid": request["rid"],
    }
    await peer.reply(request, {"op": "sent", "cmid": cmid, "id": 1001, "ts": TS, "seq": 4})
    assert await task == Sent(cmid, 1001, TS, 4)

    task = asyncio.create_task(client.send("hi room", room=12, cmid="mine-1"))
    request = await peer.recv()
    assert request == {
        "op": "send",
        "cmid": "mine-1",
        "body": "hi room",
        "room": 12,
        "rid": request["rid"],
    }
    await peer.reply(request, {"op": "sent", "cmid": "mine-1", "id": 1002, "ts": TS})
    assert await task == Sent("mine-1", 1002, TS, None)

    task = asyncio.create_task(client.send("again", to="bob"))
    assert (await peer.recv())["cmid"] not in (cmid, "mine-1")
    await peer.close()
    with pytest.raises(ConnectionLost):
        await task


async def test_send_resends_with_the_same_cmid_after_a_retryable_error(
    conn: tuple[Client, Peer],
) -> None:
    client, peer = conn
    task = asyncio.create_task(client.send("hi", to="bob"))
    first = await peer.recv()
    await peer.reply(
        first, {"op": "error", "code": "overloaded", "message": "busy", "retry_after": 0.01}
    )
    second = await peer.recv()
    assert second["cmid"] == first["cmid"]
    assert second["rid"] != first["rid"]
    assert {**second, "rid": 0} == {**first, "rid": 0}
    await peer.reply(second, {"op": "sent", "cmid": first["cmid"], "id": 1001, "ts": TS})
    assert (await task).id == 1001


async def test_send_resends_after_a_timeout_and_ignores_the_late_reply(
    server: FakeServer,
) -> None:
    client, peer = await connect(server, timeout=0.2)
    try:
        task = asyncio.create_task(client.send("hi", to="bob", cmid="c-1"))
        first = await peer.recv()  # ... and no answer in time
        second = await peer.recv()
        assert (second["cmid"], second["body"]) == ("c-1", "hi")
        assert second["rid"] != first["rid"]
        sent = {"op": "sent", "cmid": "c-1", "id": 1001, "ts": TS}
        await peer.reply(second, sent)
        await peer.reply(first, sent)  # the late reply to the first attempt
        assert await task == Sent("c-1", 1001, TS, None)
        with pytest.raises(Timeout):
            await client.next_event(timeout=0.1)  # the late reply is not an event
    finally:
        await peer.close()
        await client.close()


async def test_send_gives_up_after_its_retries_and_on_permanent_errors(
    conn: tuple[Client, Peer],
) -> None:
    client, peer = conn
    task = asyncio.create_task(client.send("hi", to="bob", retries=1))
    for _ in range(2):
        await peer.reply(await peer.recv(), {"op": "error", "code": "internal", "message": "oops"})
    with pytest.raises(ServerError, match="internal"):
        await task

    task = asyncio.create_task(client.send("hi", to="nobody"))
    await peer.reply(await peer.recv(), {"op": "error", "code": "not_found", "message": "no"})
    with pytest.raises(ServerError, match="not_found"):
        await task
    with pytest.raises(TimeoutError):
        await peer.recv(timeout=0.1)  # not sent again


# --- events, dedupe, ack ----------------------------------------------------------------


async def test_events_iterator_dedupes_inbox_entries_and_ends_with_server_closed(
    conn: tuple[Client, Peer],
) -> None:
    client, peer = conn
    await peer.send(
        msg(1),
        msg(2),
        msg(1),  # at-least-once: delivered again
        receipt(3),
        receipt(2),
        {"op": "typing", "from": "bob", "to": "alice", "active": True},
        {"op": "contact_request", "from": "carol"},
        {"op": "error", "code": "bad_json", "message": "that was not JSON"},
        {"op": "reconnect", "after_ms": 500},
        {"op": "future_op", "x": 1},
        {"op": "ok", "rid": 12345},  # a reply nobody waits for: dropped
    )
    await peer.send_raw(b"  \r\n")  # blank lines are ignored
    await peer.send(msg(4, body="last"))
    await peer.close()
    events = [event async for event in client.events()]
    assert events == [
        Msg(1, 1001, "bob", "alice", None, "hi", TS, "b-1"),
        Msg(2, 1002, "bob", "alice", None, "hi", TS, "b-2"),
        Receipt(3, "bob", 1001, TS),
        Typing("bob", "alice", None, True),
        ContactRequest("carol"),
        ErrorEvent("bad_json", "that was not JSON", None),
        Reconnect(500),
        Unknown({"op": "future_op", "x": 1}),
        Msg(4, 1004, "bob", "alice", None, "last", TS, "b-4"),
        ServerClosed("the server closed the connection"),
    ]
    assert client.last_seq == 4
    assert client.closed
    # The stream stays ended, for every later reader.
    assert [event async for event in client.events()] == []
    with pytest.raises(ConnectionLost):
        await client.next_event(timeout=1)


async def test_next_event_times_out(conn: tuple[Client, Peer]) -> None:
    client, _ = conn
    with pytest.raises(Timeout) as info:
        await client.next_event(timeout=0.05)
    assert isinstance(info.value, TimeoutError)


async def test_ack(conn: tuple[Client, Peer]) -> None:
    client, peer = conn
    await peer.send(msg(1), msg(2))
    for seq in (1, 2):
        event = await client.next_event(1)
        assert isinstance(event, Msg)
        assert event.seq == seq
    task = asyncio.create_task(client.ack(client.last_seq))
    request = await peer.recv()
    assert request == {"op": "ack", "seq": 2, "rid": request["rid"]}
    await peer.reply(request, {"op": "ok"})
    await task


async def test_unread_events_are_bounded(server: FakeServer) -> None:
    client, peer = await connect(server, max_events=2)
    try:
        await peer.send(msg(1), msg(2), msg(3))
        events = [event async for event in client.events()]
        assert [type(e) for e in events] == [Msg, Msg, ServerClosed]
        assert isinstance(events[-1], ServerClosed)
        assert "not consumed" in events[-1].reason
    finally:
        await peer.close()
        await client.close()


async def test_keep_events_false_discards_events_but_tracks_seq(server: FakeServer) -> None:
    client, peer = await connect(server, keep_events=False)
    try:
        task = asyncio.create_task(client.ping())
        request = await peer.recv()
        await peer.send(msg(1), msg(2))
        await peer.reply(request, {"op": "pong"})
        await task
        assert client.last_seq == 2
        with pytest.raises(ClientError, match="keep_events"):
            await client.next_event()
    finally:
        await peer.close()
        await client.close()


# --- connection loss --------------------------------------------------------------------


async def test_connection_closed_mid_request_raises_connection_lost(
    conn: tuple[Client, Peer],
) -> None:
    client, peer = conn
    task = asyncio.create_task(client.rooms())
    await peer.recv()
    await peer.close()
    with pytest.raises(ConnectionLost, match="closed the connection"):
        await task
    assert isinstance(task.exception(), ConnectionError)
    with pytest.raises(ConnectionLost):
        await client.ping()  # fails at once: no more requests on a dead connection
    assert client.close_reason == "the server closed the connection"


async def test_fatal_error_is_an_event_and_the_close_reason(conn: tuple[Client, Peer]) -> None:
    client, peer = conn
    task = asyncio.create_task(client.ping())
    await peer.recv()
    await peer.send({"op": "error", "code": "session_replaced", "message": "logged in elsewhere"})
    await peer.close()
    with pytest.raises(ConnectionLost, match="session_replaced"):
        await task
    assert [event async for event in client.events()] == [
        ErrorEvent("session_replaced", "logged in elsewhere", None),
        ServerClosed("session_replaced: logged in elsewhere"),
    ]


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"x" * 2000 + b"\n", "over 1024 bytes"),
        (b"{not json\n", "not JSON"),
        (b"[1, 2]\n", "'op'"),
    ],
    ids=["too-long", "not-json", "not-an-object"],
)
async def test_unreadable_server_frame_drops_the_connection(
    server: FakeServer, garbage: bytes, reason: str
) -> None:
    client, peer = await connect(server, max_line_bytes=1024)
    try:
        task = asyncio.create_task(client.ping())
        await peer.recv()
        await peer.send_raw(garbage)
        with pytest.raises(ConnectionLost, match=reason):
            await task
        events = [event async for event in client.events()]
        assert len(events) == 1
        assert isinstance(events[0], ServerClosed)
        assert reason in events[0].reason
    finally:
        await peer.close()
        await client.close()


async def test_connect_failure_raises_connection_lost() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionLost, match="cannot connect"):
        await Client.connect("127.0.0.1", port, timeout=2.0)


async def test_close_says_bye_and_ends_the_events_quietly(server: FakeServer) -> None:
    client, peer = await connect(server)
    async with client:
        closing = asyncio.create_task(client.close())
        request = await peer.recv()
        assert request == {"op": "bye", "rid": request["rid"]}
        await peer.reply(request, {"op": "ok"})
        await peer.close()
        await closing
    assert client.closed
    assert [event async for event in client.events()] == []  # no ServerClosed: we closed
    await client.close()  # idempotent


# --- the building blocks of ResilientClient ---------------------------------------------


async def test_resume_request_and_bad_token(conn: tuple[Client, Peer]) -> None:
    client, peer = conn
    task = asyncio.create_task(client.resume("alice", "laptop", "q8ZkP3m0vT1xLr6cYb2aWn4e", 5))
    request = await peer.recv()
    assert request == {
        "op": "resume",
        "user": "alice",
        "device": "laptop",
        "token": "q8ZkP3m0vT1xLr6cYb2aWn4e",
        "last_seq": 5,
        "rid": request["rid"],
    }
    await peer.reply(request, {**WELCOME, "resume_token": "rotated-token-0123456789"})
    welcome = await task
    assert (welcome.worker, client.resume_token, client.user) == (
        "w1",
        "rotated-token-0123456789",
        "alice",
    )
    task2 = asyncio.create_task(client.resume("alice", "laptop", "q8ZkP3m0vT1xLr6cYb2aWn4e", 5))
    await peer.reply(await peer.recv(), {"op": "error", "code": "bad_token", "message": "no"})
    with pytest.raises(ServerError, match="bad_token"):
        await task2


async def test_on_event_gets_every_event_and_can_drop_the_connection(
    server: FakeServer,
) -> None:
    seen: list[Event] = []

    def on_event(event: Event) -> str | None:
        seen.append(event)
        return "seen enough" if isinstance(event, Msg) and event.seq == 2 else None

    client = await Client.connect("127.0.0.1", server.port, on_event=on_event)
    peer = await server.accept()
    try:
        await peer.send(msg(1), msg(1), {"op": "typing", "from": "bob", "active": True}, msg(2))
        await peer.send(msg(3))
        await asyncio.wait_for(client.wait_closed(), 2)
        assert [getattr(e, "seq", None) for e in seen] == [1, 1, None, 2]  # no dedupe here
        assert client.close_reason == "seen enough"
        with pytest.raises(ClientError, match="on_event"):
            await client.next_event()
    finally:
        await peer.close()
        await client.close()


async def test_abort_drops_the_connection_without_bye(conn: tuple[Client, Peer]) -> None:
    client, peer = conn
    task = asyncio.create_task(client.ping())
    await peer.recv()
    client.abort("giving up")
    with pytest.raises(ConnectionLost, match="giving up"):
        await task
    await client.wait_closed()
    assert client.close_reason == "giving up"
    assert await peer.reader.readline() == b""  # EOF, and no bye before it
    assert [event async for event in client.events()] == [ServerClosed("giving up")]


# --- the commands -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir")

    add_commands(sub, common)
    return parser


def test_add_commands_registers_send_and_chat(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["send", "--user", "alice", "--room", "12", "hello there"])
    assert (args.func, args.user, args.room, args.to, args.body) == (
        cmd_send,
        "alice",
        12,
        None,
        "hello there",
    )
    assert (args.host, args.port, args.state_dir) == ("127.0.0.1", None, None)
    assert args.device.startswith("cli-")
    args = parser.parse_args(["chat", "--user", "bob", "--register", "--device", "phone"])
    assert (args.register, args.device, args.to, args.room) == (True, "phone", None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["send", "--user", "alice", "--to", "bob", "--room", "1", "x"])
    assert "not allowed with argument" in capsys.readouterr().err


async def serve_login(peer: Peer) -> None:
    hello = await peer.recv()
    assert hello["op"] == "hello"
    await peer.reply(hello, WELCOME)


async def test_send_message_prints_the_id(server: FakeServer) -> None:
    login = Login(host="127.0.0.1", port=server.port, user="alice", device="d", password="pw")
    assert "pw" not in repr(login)
    printed: list[str] = []
    task = asyncio.create_task(
        send_message(login, "hi bob", to="bob", room=None, cmid="c-9", out=printed.append)
    )
    peer = await server.accept()
    await serve_login(peer)
    await peer.send(msg(1))  # replayed inbox: a one-shot send ignores it
    request = await peer.recv()
    assert (request["op"], request["cmid"], request["to"]) == ("send", "c-9", "bob")
    await peer.reply(request, {"op": "sent", "cmid": "c-9", "id": 1001, "ts": TS})
    bye = await peer.recv()
    assert bye["op"] == "bye"
    await peer.reply(bye, {"op": "ok"})
    await peer.close()
    assert await task == 0
    assert printed == [f"sent id=1001 ts={TS}"]


async def test_send_command_reports_a_server_error(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    port = str(server.port)
    argv = ["send", "--user", "alice", "--password", "pw", "--port", port, "--to", "bob", "hi"]
    args = build_parser().parse_args(argv)
    # The command runs its own event loop: give it a thread while this loop serves it.
    command = asyncio.create_task(asyncio.to_thread(args.func, args))
    peer = await server.accept()
    await serve_login(peer)
    request = await peer.recv()
    await peer.reply(request, {"op": "error", "code": "forbidden", "message": "not a contact"})
    bye = await peer.recv()
    await peer.reply(bye, {"op": "ok"})
    await peer.close()
    assert await command == 1
    assert capsys.readouterr().err == "switchboard: error: forbidden: not a contact\n"


async def test_chat_shows_events_runs_commands_acks_and_exits_on_eof(
    server: FakeServer,
) -> None:
    client, peer = await connect(server)
    requests: list[Frame] = []
    acked = asyncio.Event()

    async def serve() -> None:
        while True:
            request = await peer.recv()
            requests.append(request)
            op = request["op"]
            if op == "send":
                reply = {"op": "sent", "cmid": request["cmid"], "id": 2001, "ts": TS}
            elif op == "history":
                reply = {
                    "op": "history",
                    "messages": [
                        {"id": 2, "from": "bob", "to": "alice", "body": "new", "ts": TS},
                        {"id": 1, "from": "alice", "to": "bob", "body": "old", "ts": TS},
                    ],
                    "more": False,
                }
            elif op == "contact_add":
                reply = {"op": "error", "code": "not_found", "message": "no such user"}
            else:
                reply = {"op": "ok"}
            await peer.reply(request, reply)
            if op == "ack" and request["seq"] == 2:
                acked.set()
            if op == "bye":
                await peer.close()
                return

    async def typed() -> AsyncIterator[str]:
        for line in ["/to bob", "hello bob", "", "/add nobody", "/frobnicate", "/history"]:
            yield line + "\n"
        await asyncio.wait_for(acked.wait(), 5)  # the two inbox entries are shown and acked

    printed: list[str] = []
    server_task = asyncio.create_task(serve())
    await peer.send(msg(1, body="hi alice"), receipt(2))
    code = await Chat(client, out=printed.append).run(typed())
    await server_task
    assert code == 0
    assert f"[{TS}] bob -> alice: hi alice" in printed
    assert f"[{TS}] * bob read message 1001" in printed
    # Events may be shown between command outputs; commands' own lines keep their order.
    own = [line for line in printed if not line.startswith(f"[{TS}] bob -> alice: hi")]
    own = [line for line in own if "read message" not in line]
    assert own == [
        "* talking to bob",
        f"* sent id=2001 ts={TS}",
        "! not_found: no such user",
        "! unknown command /frobnicate; /help lists them",
        f"[{TS}] alice -> bob: old",  # history, oldest first
        f"[{TS}] bob -> alice: new",
    ]
    ops = [r["op"] for r in requests]
    assert ops[-1] == "bye"
    assert ops.count("send") == 1
    assert [r["seq"] for r in requests if r["op"] == "ack"][-1] == 2
    assert client.closed


async def test_chat_exits_with_1_when_the_server_closes(server: FakeServer) -> None:
    client, peer = await connect(server)
    never = asyncio.Event()

    async def typed() -> AsyncIterator[str]:
        await never.wait()
        yield "unreachable"

    printed: list[str] = []
    await peer.send({"op": "error", "code": "shutting_down", "message": "restarting"})
    await peer.close()
    code = await Chat(client, to="bob", out=printed.append).run(typed())
    assert code == 1
    assert printed == [
        "! shutting_down: restarting",
        "* connection closed: shutting_down: restarting",
    ]


async def test_chat_pings_while_the_user_says_nothing(server: FakeServer) -> None:
    """A quiet chat must not be closed for idle_timeout: it pings every keepalive_s."""
    client, peer = await connect(server)
    pinged = asyncio.Event()

    async def serve() -> None:
        while True:
            request = await peer.recv()
            if request["op"] == "ping":
                await peer.reply(request, {"op": "pong"})
                pinged.set()
            else:
                await peer.reply(request, {"op": "ok"})
            if request["op"] == "bye":
                await peer.close()
                return

    async def typed() -> AsyncIterator[str]:
        await asyncio.wait_for(pinged.wait(), 5)  # the user types nothing meanwhile
        return
        yield ""

    server_task = asyncio.create_task(serve())
    code = await Chat(client, to="bob", out=[].append, keepalive_s=0.05).run(typed())
    await server_task
    assert code == 0 and pinged.is_set()


async def test_stdin_lines_reads_a_pipe_without_blocking_the_loop() -> None:
    read_fd, write_fd = os.pipe()
    try:
        lines = stdin_lines(read_fd)

        async def next_line() -> str:
            return await anext(lines)

        first = asyncio.create_task(next_line())
        await asyncio.sleep(0.05)
        assert not first.done()  # waiting for input does not block the loop
        os.write(write_fd, "hé\nsecond\npart".encode())
        assert await first == "hé"
        os.close(write_fd)
        write_fd = -1
        assert [line async for line in lines] == ["second", "part"]
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)


async def test_send_retries_take_from_the_clients_budget(conn: tuple[Client, Peer]) -> None:
    client, peer = conn
    before = client.retry_budget.tokens
    task = asyncio.create_task(client.send("hi", to="bob", cmid="c-1"))
    first = await peer.recv()
    await peer.reply(
        first, {"op": "error", "code": "overloaded", "message": "busy", "retry_after": 0.05}
    )
    second = await peer.recv()
    await peer.reply(second, {"op": "sent", "cmid": "c-1", "id": 1, "ts": TS})
    assert (await task).id == 1
    assert client.retry_budget.tokens == pytest.approx(before - 1, abs=0.1)


@pytest.mark.parametrize(
    ("asked", "idle", "interval"), [(None, None, None), (2.0, 2, 1), (9, 9, 4)]
)
async def test_tcp_keepalive_is_off_unless_asked(
    server: FakeServer, asked: float | None, idle: int | None, interval: int | None
) -> None:
    """A client that only receives learns of a dead balancer from a keepalive probe
    (docs/protocol.md, "A dead balancer, seen from the client")."""
    client, peer = await connect(server, tcp_keepalive_s=asked)
    sock = client.extra_info("socket")
    assert isinstance(sock, socket.socket | asyncio.trsock.TransportSocket)
    on = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    if asked is None:
        assert not on
    else:
        assert on
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == interval
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        # Data unacknowledged for as long as the probes take ends it too.
        user_timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        assert user_timeout == (idle + 3 * interval) * 1000
    await peer.close()
    await client.close()
