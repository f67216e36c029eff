"""`ResilientClient` failover against an in-process fake server (no cluster).

`FakeSwitchboard` is a real asyncio TCP server on 127.0.0.1 that keeps one
user's inbox and resume token, answers hello/resume/send/ack/ping like a worker
(replays skip this device's own messages, as app/worker/delivery.py does) and can
be told to misbehave: drop connections, send ``reconnect`` or fatal errors, refuse
tokens, swallow requests, or leave them unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from app.client import (
    ConnectionLost,
    Disconnected,
    ErrorEvent,
    Event,
    LinkState,
    Msg,
    Receipt,
    Reconnect,
    ReconnectPolicy,
    ResilienceStats,
    ResilientClient,
    Resumed,
    Sent,
    ServerClosed,
    ServerError,
    Timeout,
    Typing,
)

Frame = dict[str, Any]
TS = "2024-05-01T12:00:00.123Z"
PASSWORD = "correct horse battery"
FAST = ReconnectPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, keepalive_s=None)


class FakeConn:
    def __init__(self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.number = number
        self.reader = reader
        self.writer = writer
        self.authed = False
        self.closed = False
        self.opened_at = asyncio.get_running_loop().time()

    def write(self, *frames: Frame) -> None:
        if not self.closed:
            self.writer.write(b"".join(orjson.dumps(f) + b"\n" for f in frames))

    def reply(self, request: Frame, frame: Frame) -> None:
        self.write({**frame, "rid": request["rid"]})

    def drop(self) -> None:
        self.closed = True
        self.writer.close()


class FakeSwitchboard:
    """One user (alice, device laptop) and her inbox, served like a worker would."""

    def __init__(self) -> None:
        self.inbox: list[Frame] = []  # entry i has seq i + 1
        self.acked = 0
        self.password = PASSWORD
        self.token: str | None = None
        self.tokens_issued = 0
        # Device tokens (login_token): issued in hello's and login_token's welcomes
        # only when this is set, rotated at every use.
        self.issue_device_tokens = False
        self.device_token: str | None = None
        self.conns: list[FakeConn] = []
        self.requests: list[tuple[int, Frame]] = []  # (connection number, frame)
        self.sent: dict[str, Frame] = {}  # cmid -> the `sent` reply (idempotent)
        # Misbehaviour knobs.
        self.swallow: set[str] = set()  # the next request of these ops: no reply, then drop
        self.mute: set[str] = set()  # requests of these ops get no reply at all
        self.resume_replies: list[Frame] = []  # canned answers to the next resumes
        self.hello_replies: list[Frame] = []  # canned answers to the next hellos
        self.send_errors: dict[str, Frame] = {}  # cmid -> error reply
        self.replay_overlap = 0  # resume also replays this many entries already seen
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()

    # --- running ---------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection (the whole server is down)."""
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            conn.drop()
        if self._handlers:
            await asyncio.wait(self._handlers)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = FakeConn(len(self.conns) + 1, reader, writer)
        self.conns.append(conn)
        await self._notify()
        try:
            while line := await reader.readline():
                frame: Frame = orjson.loads(line)
                self.requests.append((conn.number, frame))
                self._answer(conn, frame)
                await self._notify()
        except OSError:
            pass
        finally:
            conn.drop()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._handlers.discard(task)
            await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    # --- the protocol ------------------------------------------------------------------

    def _answer(self, conn: FakeConn, frame: Frame) -> None:
        op = frame["op"]
        if op in self.swallow:
            self.swallow.discard(op)
            conn.drop()
            return
        if op in self.mute:
            return
        if op == "hello":
            if self.hello_replies:
                conn.reply(frame, self.hello_replies.pop(0))
            elif frame["password"] != self.password:
                conn.reply(frame, error("auth_failed", "wrong user or password"))
            else:
                self._welcome(conn, frame, replay_after=self.acked)
        elif op == "resume":
            if self.resume_replies:
                conn.reply(frame, self.resume_replies.pop(0))
            elif frame["token"] != self.token:
                conn.reply(frame, error("bad_token", "unknown or expired resume token"))
            else:
                self._welcome(conn, frame, replay_after=frame["last_seq"] - self.replay_overlap)
        elif op == "login_token":
            if frame["device_token"] != self.device_token:
                conn.reply(frame, error("auth_failed", "unknown or revoked device token"))
            else:
                self._welcome(conn, frame, replay_after=self.acked)
        elif op == "send":
            cmid = frame["cmid"]
            if cmid in self.send_errors:
                conn.reply(frame, self.send_errors[cmid])
                return
            if cmid not in self.sent:
                self.inbox.append(entry(len(self.inbox) + 1, sender="alice", cmid=cmid))
                seq = len(self.inbox)
                self.sent[cmid] = {"op": "sent", "cmid": cmid, "id": 5000 + seq, "ts": TS}
                self.sent[cmid]["seq"] = seq
            conn.reply(frame, self.sent[cmid])
        elif op == "ack":
            self.acked = max(self.acked, frame["seq"])
            conn.reply(frame, {"op": "ok"})
        elif op == "ping":
            conn.reply(frame, {"op": "pong"})
        elif op == "bye":
            conn.reply(frame, {"op": "ok"})
            conn.drop()
        elif op == "rooms":
            conn.reply(frame, {"op": "rooms", "rooms": [{"room": 12, "name": "ops"}]})
        else:
            conn.reply(frame, {"op": "ok"})

    def _welcome(self, conn: FakeConn, request: Frame, replay_after: int) -> None:
        self.tokens_issued += 1
        self.token = f"token-{self.tokens_issued:016d}"  # rotated: the previous one is dead
        welcome = {
            "op": "welcome",
            "v": 1,
            "user": "alice",
            "device": "laptop",
            "session": "s1",
            "worker": f"w{conn.number}",
            "resume_token": self.token,
            "seq": len(self.inbox),
            "acked": self.acked,
        }
        if self.issue_device_tokens and request["op"] in ("hello", "login_token"):
            self.device_token = f"device-{self.tokens_issued:016d}"
            welcome["device_token"] = self.device_token
        conn.reply(request, welcome)
        conn.authed = True
        conn.write(*self._deliverable(self.inbox[max(replay_after, 0) :]))

    @staticmethod
    def _deliverable(entries: list[Frame]) -> list[Frame]:
        # The sending device never gets its own message: it has the `sent` reply.
        return [e for e in entries if e.get("from") != "alice"]

    # --- test controls -------------------------------------------------------------------

    @property
    def live(self) -> FakeConn:
        conn = self.conns[-1]
        assert conn.authed
        assert not conn.closed
        return conn

    def add(self, count: int = 1, *, push: bool = True, **fields: Any) -> None:
        """New inbox entries (from bob unless told), written to a live connection."""
        for _ in range(count):
            self.inbox.append(entry(len(self.inbox) + 1, **fields))
            if push and self.conns and self.conns[-1].authed and not self.conns[-1].closed:
                self.conns[-1].write(*self._deliverable(self.inbox[-1:]))

    def ops(self, number: int) -> list[str]:
        return [f["op"] for n, f in self.requests if n == number]

    def frames(self, op: str) -> list[tuple[int, Frame]]:
        return [(n, f) for n, f in self.requests if f["op"] == op]


def entry(seq: int, *, sender: str = "bob", cmid: str | None = None) -> Frame:
    return {
        "op": "msg",
        "seq": seq,
        "id": 5000 + seq,
        "from": sender,
        "to": "bob" if sender == "alice" else "alice",
        "body": f"m{seq}",
        "ts": TS,
        "cmid": cmid or f"c-{seq}",
    }


def error(code: str, message: str, retry_after: float | None = None) -> Frame:
    frame: Frame = {"op": "error", "code": code, "message": message}
    if retry_after is not None:
        frame["retry_after"] = retry_after
    return frame


def inbox_msg(seq: int) -> Msg:
    return Msg(seq, 5000 + seq, "bob", "alice", None, f"m{seq}", TS, f"c-{seq}")


@pytest.fixture
async def server() -> AsyncIterator[FakeSwitchboard]:
    fake = FakeSwitchboard()
    await fake.start()
    yield fake
    await fake.stop()


@contextlib.asynccontextmanager
async def logged_in(
    server: FakeSwitchboard, policy: ReconnectPolicy = FAST, **kwargs: Any
) -> AsyncIterator[ResilientClient]:
    client = await ResilientClient.connect(
        "127.0.0.1", server.port, policy=policy, timeout=2.0, **kwargs
    )
    try:
        await client.login("alice", PASSWORD, "laptop")
        yield client
    finally:
        await client.close()


async def take(client: ResilientClient, count: int) -> list[Event]:
    return [await client.next_event(timeout=3.0) for _ in range(count)]


async def assert_no_event(client: ResilientClient, within: float = 0.1) -> None:
    with pytest.raises(Timeout):
        await client.next_event(timeout=within)


# --- resume ---------------------------------------------------------------------------------


async def test_resume_after_a_drop_replays_only_what_was_not_seen(
    server: FakeSwitchboard,
) -> None:
    server.add(2)
    server.replay_overlap = 2  # at least once: the resume replay repeats seqs 1 and 2
    async with logged_in(server) as client:
        first_token = client.resume_token
        assert await take(client, 2) == [inbox_msg(1), inbox_msg(2)]
        assert client.state is LinkState.ONLINE

        server.live.drop()  # the worker is killed
        server.add(3)  # seqs 3..5 arrive while the client is away
        disconnected, resumed, *entries = await take(client, 5)
        assert isinstance(disconnected, Disconnected)
        assert "closed the connection" in disconnected.reason
        assert resumed == Resumed("w2", 2, fallback_login=False)
        assert entries == [inbox_msg(3), inbox_msg(4), inbox_msg(5)]

        (number, resume), *_ = server.frames("resume")
        assert (number, resume) == (
            2,
            {
                "op": "resume",
                "user": "alice",
                "device": "laptop",
                "token": first_token,
                "last_seq": 2,
                "rid": resume["rid"],
            },
        )
        assert client.resume_token == server.token != first_token  # rotated
        assert (client.worker, client.last_seq, client.state) == ("w2", 5, LinkState.ONLINE)
        assert client.stats == ResilienceStats(reconnects=1, resumes=1)

        server.add(1)  # live entries keep flowing on the new connection
        assert await take(client, 1) == [inbox_msg(6)]
        await assert_no_event(client)


async def test_reconnect_frame_closes_without_bye_and_waits_after_ms(
    server: FakeSwitchboard,
) -> None:
    async with logged_in(server) as client:
        asked_at = asyncio.get_running_loop().time()
        server.live.write({"op": "reconnect", "after_ms": 150})
        assert await take(client, 3) == [
            Reconnect(150),
            Disconnected("the server asked to reconnect in 150 ms"),
            Resumed("w2", 0, fallback_login=False),
        ]
        assert server.conns[1].opened_at - asked_at >= 0.15
        assert server.ops(1) == ["hello"]  # closed at once, no bye: the session stays resumable
        assert server.ops(2) == ["resume"]
        assert client.stats == ResilienceStats(reconnects=1, resumes=1)


async def test_shutting_down_reconnects_and_resumes(server: FakeSwitchboard) -> None:
    async with logged_in(server) as client:
        server.live.write(error("shutting_down", "worker draining"))
        server.live.drop()
        assert await take(client, 3) == [
            ErrorEvent("shutting_down", "worker draining", None),
            Disconnected("shutting_down: worker draining"),
            Resumed("w2", 0, fallback_login=False),
        ]
        assert client.stats.resumes == 1


async def test_bad_token_falls_back_to_hello_and_drops_entries_already_seen(
    server: FakeSwitchboard,
) -> None:
    server.add(3)
    async with logged_in(server) as client:
        assert await take(client, 3) == [inbox_msg(1), inbox_msg(2), inbox_msg(3)]
        server.token = "revoked-revoked-revoked"  # e.g. expired while away
        server.live.drop()
        server.add(1)
        # hello replays after the device's acked position (0): seqs 1..3 come again.
        assert await take(client, 3) == [
            Disconnected("the server closed the connection"),
            Resumed("w2", 3, fallback_login=True),
            inbox_msg(4),
        ]
        await assert_no_event(client)
        assert server.ops(2) == ["resume", "hello"]
        assert server.frames("hello")[-1][1]["password"] == PASSWORD
        assert client.stats == ResilienceStats(reconnects=1, fallback_logins=1)
        assert client.resume_token == server.token

        server.live.drop()  # the token of that hello works for the next resume
        assert await take(client, 2) == [
            Disconnected("the server closed the connection"),
            Resumed("w3", 4, fallback_login=False),
        ]


async def test_overloaded_resume_waits_retry_after_and_internal_backs_off(
    server: FakeSwitchboard,
) -> None:
    async with logged_in(server) as client:
        server.resume_replies = [
            error("overloaded", "too many logins in progress", retry_after=0.2),
            error("internal", "oops"),
        ]
        server.live.drop()
        assert await take(client, 2) == [
            Disconnected("the server closed the connection"),
            Resumed("w4", 0, fallback_login=False),
        ]
        refused_at = server.conns[1].opened_at
        assert server.conns[2].opened_at - refused_at >= 0.2
        assert [n for n, _ in server.frames("resume")] == [2, 3, 4]
        assert client.stats == ResilienceStats(reconnects=3, resumes=1)


async def test_reconnects_while_the_server_is_down(server: FakeSwitchboard) -> None:
    async with logged_in(server) as client:
        port = server.port
        await server.stop()  # connections refused for a while
        assert isinstance(await client.next_event(timeout=3), Disconnected)
        await asyncio.sleep(0.3)
        assert client.state is LinkState.CONNECTING
        await server.start(port)
        assert await client.next_event(timeout=3) == Resumed("w2", 0, fallback_login=False)
        await client.ping()
        assert client.stats.reconnects == 1  # refused attempts are not reconnects


async def test_connection_lost_before_login_is_reopened(server: FakeSwitchboard) -> None:
    client = await ResilientClient.connect("127.0.0.1", server.port, policy=FAST, timeout=2.0)
    try:
        await server.wait_for(lambda: len(server.conns) == 1)
        server.conns[0].drop()
        assert await client.next_event(timeout=3) == Disconnected(
            "the server closed the connection"
        )
        await server.wait_for(lambda: len(server.conns) == 2)
        welcome = await client.login("alice", PASSWORD, "laptop")
        assert welcome.worker == "w2"
        assert client.state is LinkState.ONLINE
        assert server.ops(2) == ["hello"]
    finally:
        await client.close()


# --- sends --------------------------------------------------------------------------------


async def test_unanswered_send_is_resent_with_the_same_cmid(server: FakeSwitchboard) -> None:
    async with logged_in(server) as client:
        server.swallow.add("send")  # no reply, then the connection drops
        sending = asyncio.create_task(client.send("hi bob", to="bob"))
        sent = await sending
        (first_conn, first), (second_conn, second) = server.frames("send")
        assert (first_conn, second_conn) == (1, 2)
        assert second["cmid"] == first["cmid"] == sent.cmid
        assert {**second, "rid": 0} == {**first, "rid": 0}
        assert sent == Sent(first["cmid"], 5001, TS, 1)
        assert len(server.inbox) == 1  # stored once
        assert client.stats == ResilienceStats(reconnects=1, resumes=1, resent_sends=1)
        # Seq 1 is this device's own message: seq 2 follows it without a gap.
        server.add(1)
        assert await take(client, 3) == [
            Disconnected("the server closed the connection"),
            Resumed("w2", 0, fallback_login=False),
            inbox_msg(2),
        ]
        assert client.last_seq == 2
        assert client.stats.gaps == 0


async def test_send_made_while_reconnecting_goes_out_after_the_resume(
    server: FakeSwitchboard,
) -> None:
    async with logged_in(server) as client:
        server.live.write({"op": "reconnect", "after_ms": 200})
        assert (await take(client, 2))[0] == Reconnect(200)
        assert client.state is LinkState.CONNECTING
        sent = await client.send("written later", room=12, cmid="offline-1")
        assert sent.cmid == "offline-1"
        assert [n for n, _ in server.frames("send")] == [2]
        assert server.ops(2) == ["resume", "send"]
        assert client.stats.resent_sends == 0  # it was never written before


async def test_send_raises_on_permanent_errors_and_after_its_timeout(
    server: FakeSwitchboard,
) -> None:
    async with logged_in(server) as client:
        server.send_errors["c-bad"] = error("forbidden", "not a contact")
        with pytest.raises(ServerError, match="forbidden"):
            await client.send("hi", to="mallory", cmid="c-bad")

        server.mute.add("send")  # a send that stays unanswered, like a stuck DB
        with pytest.raises(Timeout, match="c-slow"):
            await client.send("hi", to="bob", cmid="c-slow", timeout=0.2)
        server.mute.clear()
        server.live.drop()
        assert await take(client, 2) == [
            Disconnected("the server closed the connection"),
            Resumed("w2", 0, fallback_login=False),
        ]
        await client.ping()
        assert [f["cmid"] for _, f in server.frames("send")] == ["c-bad", "c-slow"]


async def test_a_send_the_database_refused_is_not_retried(server: FakeSwitchboard) -> None:
    # The server's answer to a poisoned send (docs/protocol.md, bad_field): final.
    async with logged_in(server) as client:
        refused = error("bad_field", "the server cannot store this message; do not resend it")
        server.send_errors["c-poison"] = refused
        with pytest.raises(ServerError, match="bad_field") as info:
            await client.send("hi", to="bob", cmid="c-poison")
        assert not info.value.retryable
        await client.ping()
        assert [f["cmid"] for _, f in server.frames("send")] == ["c-poison"]  # sent once


async def test_retryable_send_error_is_retried_on_the_same_connection(
    server: FakeSwitchboard,
) -> None:
    async with logged_in(server) as client:
        server.send_errors["c-1"] = error("rate_limited", "slow down", retry_after=0.05)
        sending = asyncio.create_task(client.send("hi", to="bob", cmid="c-1"))
        await server.wait_for(lambda: len(server.frames("send")) == 2)
        del server.send_errors["c-1"]
        assert (await sending).cmid == "c-1"
        assert {n for n, _ in server.frames("send")} == {1}
        assert client.stats.reconnects == 0


async def test_concurrent_sends_with_one_cmid_share_the_reply(server: FakeSwitchboard) -> None:
    async with logged_in(server) as client:
        server.mute.add("send")
        first = asyncio.create_task(client.send("hi", to="bob", cmid="c-1"))
        await server.wait_for(lambda: len(server.frames("send")) == 1)
        second = asyncio.create_task(client.send("hi", to="bob", cmid="c-1"))
        await asyncio.sleep(0.05)
        server.mute.clear()
        server.live.drop()
        assert await first == await second == Sent("c-1", 5001, TS, 1)
        assert [n for n, _ in server.frames("send")] == [1, 2]


# --- inbox order and dedupe -----------------------------------------------------------------


async def test_gap_on_a_live_connection_resumes_from_last_seq(server: FakeSwitchboard) -> None:
    async with logged_in(server) as client:
        server.add(1)
        assert await take(client, 1) == [inbox_msg(1)]
        server.add(1, push=False)  # seq 2 is lost on the way...
        server.add(1)  # ... and seq 3 arrives
        assert await take(client, 4) == [
            Disconnected("inbox gap: expected seq 2, got 3"),
            Resumed("w2", 1, fallback_login=False),
            inbox_msg(2),
            inbox_msg(3),
        ]
        assert client.stats == ResilienceStats(reconnects=1, resumes=1, gaps=1)
        assert server.frames("resume")[0][1]["last_seq"] == 1


async def test_a_gap_that_comes_back_after_resuming_is_accepted(
    server: FakeSwitchboard,
) -> None:
    async with logged_in(server) as client:
        server.add(1)
        # Seq 2: a message this device sent from another process; never delivered here.
        server.add(1, sender="alice")
        server.add(1)
        assert await take(client, 4) == [
            inbox_msg(1),
            Disconnected("inbox gap: expected seq 2, got 3"),
            Resumed("w2", 1, fallback_login=False),
            inbox_msg(3),
        ]
        server.add(1)
        assert await take(client, 1) == [inbox_msg(4)]
        assert client.stats == ResilienceStats(reconnects=1, resumes=1, gaps=1)


async def test_gap_waits_for_an_unanswered_send_that_explains_it(
    server: FakeSwitchboard,
) -> None:
    async with logged_in(server) as client:
        server.mute.add("send")
        sending = asyncio.create_task(client.send("mine", to="bob", cmid="c-own"))
        await server.wait_for(lambda: len(server.frames("send")) == 1)
        server.mute.clear()
        # The message is committed as seq 1, and seq 2 is pushed before the `sent` reply.
        own = entry(1, sender="alice", cmid="c-own")
        server.inbox.append(own)
        server.sent["c-own"] = {"op": "sent", "cmid": "c-own", "id": 5001, "ts": TS, "seq": 1}
        server.add(1)
        await assert_no_event(client)  # held: the pending send may own seq 1
        (_, request), *_ = server.frames("send")
        server.live.reply(request, server.sent["c-own"])
        assert await sending == Sent("c-own", 5001, TS, 1)
        assert await take(client, 1) == [inbox_msg(2)]
        assert client.stats == ResilienceStats()


async def test_receipts_and_ephemeral_events_keep_their_order(server: FakeSwitchboard) -> None:
    async with logged_in(server) as client:
        server.add(1)
        server.live.write(
            {"op": "typing", "from": "bob", "to": "alice", "active": True},
            {"op": "receipt", "seq": 2, "by": "bob", "msg_id": 5001, "ts": TS},
            {"op": "receipt", "seq": 2, "by": "bob", "msg_id": 5001, "ts": TS},
        )
        assert await take(client, 3) == [
            inbox_msg(1),
            Typing("bob", "alice", None, True),
            Receipt(2, "bob", 5001, TS),
        ]
        await assert_no_event(client)


async def test_unread_events_pause_the_session_until_the_app_catches_up(
    server: FakeSwitchboard,
) -> None:
    async with logged_in(server, max_events=4) as client:
        server.add(6)  # more than max_events unread: the link is dropped
        await server.wait_for(lambda: server.conns[0].closed)
        await asyncio.sleep(0.2)
        assert len(server.conns) == 1  # no reconnect while the queue is full
        events = await take(client, 7)
        assert events[:4] == [inbox_msg(1), inbox_msg(2), inbox_msg(3), inbox_msg(4)]
        assert isinstance(events[4], Disconnected)
        assert "not consumed" in events[4].reason
        assert events[5:] == [Resumed("w2", 4, fallback_login=False), inbox_msg(5)]
        assert await take(client, 1) == [inbox_msg(6)]


# --- acks ---------------------------------------------------------------------------------


async def test_acks_are_reapplied_after_a_resume_and_never_move_backwards(
    server: FakeSwitchboard,
) -> None:
    server.add(3)
    async with logged_in(server) as client:
        await take(client, 3)
        server.swallow.add("ack")  # the ack is lost with the connection
        await client.ack(3)
        assert server.acked == 3
        assert {f["seq"] for n, f in server.frames("ack") if n == 2} == {3}

        acks = len(server.frames("ack"))
        await client.ack(2)  # behind: nothing to send
        await client.ack(3)
        assert len(server.frames("ack")) == acks

        server.live.drop()  # the server already has 3: no re-ack needed
        assert await take(client, 4) == [
            Disconnected("the server closed the connection"),
            Resumed("w2", 3, fallback_login=False),
            Disconnected("the server closed the connection"),
            Resumed("w3", 3, fallback_login=False),
        ]
        await client.ping()
        assert server.ops(3) == ["resume", "ping"]


async def test_an_ack_lost_in_a_crash_is_reapplied_by_the_resume(
    server: FakeSwitchboard,
) -> None:
    server.add(2)
    async with logged_in(server) as client:
        await take(client, 2)
        server.mute.add("ack")  # the ack never gets an answer...
        acking = asyncio.create_task(client.ack(2))
        await server.wait_for(lambda: len(server.frames("ack")) == 1)
        acking.cancel()  # ... and the application stops waiting for it
        with contextlib.suppress(asyncio.CancelledError):
            await acking
        server.mute.clear()
        server.live.drop()
        assert (await take(client, 2))[1] == Resumed("w2", 2, fallback_login=False)
        await server.wait_for(lambda: server.acked == 2)
        assert server.ops(2) == ["resume", "ack"]


async def test_first_login_starts_after_the_devices_acked_position(
    server: FakeSwitchboard,
) -> None:
    server.add(4)
    server.acked = 2  # processed by this device in an earlier run
    async with logged_in(server) as client:
        assert await take(client, 2) == [inbox_msg(3), inbox_msg(4)]
        assert client.last_seq == 4
        assert client.stats == ResilienceStats()  # no gap, no reconnect


# --- the end --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("session_replaced", "logged in elsewhere"),
        ("kicked", "an administrator closed this session"),
    ],
)
async def test_replaced_or_kicked_ends_the_session_without_reconnecting(
    server: FakeSwitchboard, code: str, message: str
) -> None:
    async with logged_in(server) as client:
        server.mute.add("send")
        sending = asyncio.create_task(client.send("hi", to="bob"))
        await server.wait_for(lambda: len(server.frames("send")) == 1)
        server.live.write(error(code, message))
        server.live.drop()
        assert [event async for event in client.events()] == [
            ErrorEvent(code, message, None),
            ServerClosed(f"{code}: {message}"),
        ]
        with pytest.raises(ConnectionLost, match=code):
            await sending
        with pytest.raises(ConnectionLost, match=code):
            await client.ping()
        await asyncio.sleep(0.2)
        assert len(server.conns) == 1
        assert client.closed
        assert client.close_reason == f"{code}: {message}"


async def test_a_refused_fallback_login_ends_the_session(server: FakeSwitchboard) -> None:
    async with logged_in(server) as client:
        server.token = "revoked-revoked-revoked"
        server.password = "changed elsewhere"
        server.live.drop()
        events = [event async for event in client.events()]
        assert events == [
            Disconnected("the server closed the connection"),
            ServerClosed("cannot log in again: auth_failed: wrong user or password"),
        ]
        assert server.ops(2) == ["resume", "hello"]
        assert len(server.conns) == 2


async def test_close_while_reconnecting_stops_for_good(server: FakeSwitchboard) -> None:
    async with logged_in(server) as client:
        server.mute.add("send")
        sending = asyncio.create_task(client.send("hi", to="bob"))
        await server.wait_for(lambda: len(server.frames("send")) == 1)
        server.live.write({"op": "reconnect", "after_ms": 10_000})
        assert (await take(client, 2))[1] == Disconnected(
            "the server asked to reconnect in 10000 ms"
        )
        await asyncio.wait_for(client.close(), 1.0)
        with pytest.raises(ConnectionLost, match="client closed"):
            await sending
        assert [event async for event in client.events()] == []  # no ServerClosed: we closed
        assert client.state is LinkState.CLOSED
        await client.close()  # idempotent
    assert len(server.conns) == 1


async def test_close_says_bye(server: FakeSwitchboard) -> None:
    async with logged_in(server):
        pass
    await server.wait_for(lambda: server.conns[0].closed)
    assert server.ops(1) == ["hello", "bye"]


# --- requests and keep-alive ----------------------------------------------------------------


async def test_requests_wait_for_the_next_connection(server: FakeSwitchboard) -> None:
    async with logged_in(server) as client:
        server.swallow.add("rooms")  # read-only: asked again on the next connection
        assert await client.rooms() == [(12, "ops")]
        assert [n for n, _ in server.frames("rooms")] == [1, 2]

        server.swallow.add("room_leave")  # not read-only: the outcome is unknown
        with pytest.raises(ConnectionLost):
            await client.room_leave(12)
        await client.room_leave(12)  # waits for the next connection
        assert [n for n, _ in server.frames("room_leave")] == [2, 3]


async def test_keepalive_drops_a_connection_that_stopped_answering(
    server: FakeSwitchboard,
) -> None:
    policy = ReconnectPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, keepalive_s=0.1)
    async with logged_in(server, policy) as client:
        server.mute.add("ping")
        assert await client.next_event(timeout=3) == Disconnected("no pong within 0.1 s")
        server.mute.clear()
        assert await client.next_event(timeout=3) == Resumed("w2", 0, fallback_login=False)


def test_backoff_is_full_jitter_with_a_cap() -> None:
    policy = ReconnectPolicy()
    first = [policy.backoff(0) for _ in range(200)]
    assert all(0.0 <= d <= 0.1 for d in first)
    assert max(first) > 0.05  # spread, not a constant
    assert all(0.0 <= policy.backoff(n) <= 2.0 for n in range(100))
    busy = ServerError("overloaded", "busy", retry_after=0.7)
    assert all(0.7 <= policy.retry_delay(busy, 5) <= 2.0 for _ in range(50))  # at least it
    assert policy.retry_delay(ServerError("overloaded", "busy", retry_after=999), 0) == 30.0
    assert 0.0 <= policy.retry_delay(ServerError("internal", "oops"), 0) <= 0.1


# ---- overload: retry_after, backoff, the retry budget -------------------------------------


async def test_an_overloaded_login_is_retried_after_retry_after(server: FakeSwitchboard) -> None:
    server.hello_replies = [error("overloaded", "too many logins in progress", retry_after=0.2)]
    client = await ResilientClient.connect("127.0.0.1", server.port, policy=FAST, timeout=2.0)
    try:
        started = asyncio.get_running_loop().time()
        welcome = await client.login("alice", PASSWORD, "laptop")
        assert asyncio.get_running_loop().time() - started >= 0.2
        assert welcome.worker == "w1"
        assert server.ops(1) == ["hello", "hello"]  # on the same connection
        assert client.retry_budget.tokens == pytest.approx(FAST.retry_budget_burst - 1, abs=0.1)
    finally:
        await client.close()


async def test_an_overloaded_login_past_the_timeout_raises(server: FakeSwitchboard) -> None:
    server.hello_replies = [error("overloaded", "busy", retry_after=5.0)]
    client = await ResilientClient.connect("127.0.0.1", server.port, policy=FAST, timeout=1.0)
    try:
        with pytest.raises(ServerError) as refused:
            await client.login("alice", PASSWORD, "laptop")
        assert refused.value.code == "overloaded"
        assert server.ops(1) == ["hello"]  # not repeated: it could not be in time
    finally:
        await client.close()


async def test_reconnects_beyond_the_retry_budget_wait_the_cap(server: FakeSwitchboard) -> None:
    """Every resume refused: the first reconnect and a burst of 2 retries come at their
    backoff; the next waits max_retry_after_s, whatever retry_after said."""
    policy = dataclasses.replace(
        FAST, retry_budget_burst=2, retry_budget_per_min=0.001, max_retry_after_s=0.6
    )
    async with logged_in(server, policy) as client:
        server.resume_replies = [error("overloaded", "busy", retry_after=0.01)] * 4
        server.live.drop()
        assert await take(client, 2) == [
            Disconnected("the server closed the connection"),
            Resumed("w6", 0, fallback_login=False),
        ]
        opened = [conn.opened_at for conn in server.conns[1:]]
        gaps = [b - a for a, b in itertools.pairwise(opened)]
        assert all(gap < 0.3 for gap in gaps[:2]), gaps  # the budget's two retries
        assert all(gap >= 0.6 for gap in gaps[2:]), gaps  # then the cap each time
        assert client.retry_budget.exhausted == 2
