"""Server -> client frames (app/protocol/frames.py): bytes out, and read back by a client."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, get_args

import orjson
import pytest

from app.protocol import BadServerFrame, ErrorCode, encode, encode_error, error_frame, rfc3339
from app.protocol.errors import FrameError
from app.protocol.frames import (
    EVENT_FRAMES,
    Contact,
    ContactRequest,
    Contacts,
    Error,
    HistoryMessage,
    HistoryPage,
    Members,
    Msg,
    Ok,
    Pong,
    Presence,
    Receipt,
    Reconnect,
    Registered,
    Room,
    RoomInvite,
    Rooms,
    Sent,
    ServerFrame,
    Typing,
    Welcome,
    parse_server_frame,
)

TS = "2024-05-01T12:00:00.123Z"
TOKEN = "q8ZkP3m0vT1xLr6cYb2aWn4e"

FRAMES: list[ServerFrame] = [
    Welcome("alice", "laptop", "9f2c1e", "w1", TOKEN, 7, 3),
    Registered("bob"),
    Sent("a-1", 1001, TS, 1),
    Sent("a-1", 1001, TS, None),
    Ok(),
    Pong(),
    Error(ErrorCode.RATE_LIMITED, "slow down", 1.5),
    Error("future_code", "something new"),
    Room(12, "ops"),
    Rooms([Room(12, "ops"), Room(13, "dev")]),
    Rooms([Room(12, "ops")], [RoomInvite(14, "retro", "carol")]),
    Rooms([]),
    Members(12, ["alice", "bob"]),
    Contacts(
        [Contact("bob", "accepted", "away", "brb"), Contact("carol", "pending_in", None, None)]
    ),
    HistoryPage(
        [
            HistoryMessage(1002, "bob", "alice", None, "b", TS, "x"),
            HistoryMessage(1001, "alice", None, 12, "a", TS, "y"),
        ],
        True,
    ),
    HistoryPage([], False),
    Msg(1, 1001, "alice", "bob", None, "hi bob", TS, "a-1"),
    Msg(2, 1002, "?", None, 12, "hi room", TS, "a-2"),
    Receipt(2, "bob", 1001, TS),
    Presence("bob", "offline", None),
    Presence("bob", "away", "lunch"),
    Typing("bob", "alice", None, True),
    Typing("bob", None, 12, False),
    ContactRequest("carol"),
    RoomInvite(12, "ops", "alice"),
    Reconnect(150),
]


def read(line: bytes) -> dict[str, Any]:
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    frame = orjson.loads(line)
    assert isinstance(frame, dict)
    return frame


def test_every_frame_class_is_covered() -> None:
    assert {type(f) for f in FRAMES} == set(get_args(ServerFrame))


@pytest.mark.parametrize("frame", FRAMES, ids=repr)
def test_round_trip(frame: ServerFrame) -> None:
    wire = read(frame.encode())
    assert wire["op"] == frame.op
    assert "rid" not in wire
    assert type(frame).from_frame(wire) == frame
    assert parse_server_frame(wire) == frame


@pytest.mark.parametrize("frame", [f for f in FRAMES if not isinstance(f, Error)], ids=repr)
def test_none_fields_never_sent_as_null_except_documented(frame: ServerFrame) -> None:
    wire = read(frame.encode())
    nulls = {key for key, value in wire.items() if value is None}
    assert nulls <= {"text"}  # presence's text is always there, null when unset


def test_rooms_from_a_server_without_invites_reads_as_none_pending() -> None:
    assert Rooms.from_frame({"op": "rooms", "rooms": [{"room": 1, "name": "x"}]}) == Rooms(
        [Room(1, "x")]
    )


@pytest.mark.parametrize("rid", [7, "s1", 0])
def test_replies_echo_the_rid_last(rid: int | str) -> None:
    replies = [f for f in FRAMES if isinstance(f, Error) or not isinstance(f, EVENT_FRAMES)]
    for frame in replies:
        encoded = frame.encode(rid)  # type: ignore[call-arg]
        wire = read(encoded)
        assert wire["rid"] == rid
        if not (isinstance(frame, Error) and frame.retry_after is not None):
            assert list(wire)[-1] == "rid"
        assert type(frame).from_frame(wire) == frame


# --- the same bytes as the worker's dict literals (app/worker at ff75d8c) ------------------


def legacy_msg(seq: int, id: int, sender: str, to: str | None, room: int | None) -> bytes:
    frame: dict[str, Any] = {"op": "msg", "seq": seq, "id": id, "from": sender}
    if room is not None:
        frame["room"] = room
    else:
        frame["to"] = to
    frame.update(body='hé \n "x" 😀', ts=TS, cmid="c-1")
    return encode(frame)


@pytest.mark.parametrize(
    ("seq", "id", "sender", "to", "room"),
    [(1, 1001, "alice", "bob", None), (9, 2**53, "?", None, 12), (3, 5, "a", "?", None)],
)
def test_msg_bytes_match_the_worker(
    seq: int, id: int, sender: str, to: str | None, room: int | None
) -> None:
    msg = Msg(seq, id, sender, to, room, 'hé \n "x" 😀', TS, "c-1")
    assert msg.encode() == legacy_msg(seq, id, sender, to, room)


@pytest.mark.parametrize("seq", [None, 4])
@pytest.mark.parametrize("rid", [None, 0, 17, "s1"])
def test_sent_bytes_match_the_worker(seq: int | None, rid: int | str | None) -> None:
    frame: dict[str, Any] = {"op": "sent", "cmid": "a-1", "id": 1001, "ts": TS}
    if seq is not None:
        frame["seq"] = seq
    if rid is not None:
        frame["rid"] = rid
    assert Sent("a-1", 1001, TS, seq).encode(rid) == encode(frame)


@pytest.mark.parametrize("rid", [None, 2, "r"])
def test_welcome_bytes_match_the_worker(rid: int | str | None) -> None:
    frame: dict[str, Any] = {
        "op": "welcome",
        "v": 1,
        "user": "alice",
        "device": "laptop",
        "session": "9f2c1e",
        "worker": "w1",
        "resume_token": TOKEN,
        "seq": 7,
        "acked": 3,
    }
    if rid is not None:
        frame["rid"] = rid
    welcome = Welcome("alice", "laptop", "9f2c1e", "w1", TOKEN, 7, 3)
    assert welcome.encode(rid) == encode(frame)


@pytest.mark.parametrize("rid", [None, 3, "r"])
@pytest.mark.parametrize("retry_after", [None, 2, 0.73])
def test_error_bytes_match_the_worker(rid: int | str | None, retry_after: float | None) -> None:
    extra = {} if retry_after is None else {"retry_after": retry_after}
    frame: dict[str, Any] = {"op": "error", "code": "overloaded", "message": "busy"}
    if rid is not None:
        frame["rid"] = rid
    frame.update(extra)
    legacy = encode(frame)
    assert Error(ErrorCode.OVERLOADED, "busy", retry_after).encode(rid) == legacy
    assert error_frame(ErrorCode.OVERLOADED, "busy", rid, **extra) == legacy
    if retry_after is None:
        assert encode_error(FrameError(ErrorCode.OVERLOADED, "busy", rid)) == legacy


def test_receipt_bytes_match_the_worker() -> None:
    legacy = encode({"op": "receipt", "seq": 2, "by": "bob", "msg_id": 1001, "ts": TS})
    assert Receipt(2, "bob", 1001, TS).encode() == legacy


# --- reading rejects what breaks the protocol ------------------------------------------

MSG = orjson.loads(Msg(1, 1001, "alice", "bob", None, "hi", TS, "a-1").encode())


@pytest.mark.parametrize(
    ("cls", "frame", "field"),
    [
        (Msg, {**MSG, "seq": "1"}, "seq"),
        (Msg, {**MSG, "seq": True}, "seq"),
        (Msg, {**MSG, "id": 1.0}, "id"),
        (Msg, {**MSG, "from": None}, "from"),
        (Msg, {k: v for k, v in MSG.items() if k != "body"}, "body"),
        (Msg, {**MSG, "room": 3}, "to/room"),
        (Msg, {k: v for k, v in MSG.items() if k != "to"}, "to/room"),
        (Msg, {**MSG, "to": 5}, "to"),
        (Sent, {"op": "sent", "cmid": "c", "id": 1, "ts": TS, "seq": "4"}, "seq"),
        (Welcome, {"op": "welcome", "user": "a", "device": "d", "session": 1}, "session"),
        (Registered, {"op": "registered"}, "user"),
        (Error, {"op": "error", "code": 5, "message": "m"}, "code"),
        (Error, {"op": "error", "code": "c", "message": "m", "retry_after": True}, "retry_after"),
        (Receipt, {"op": "receipt", "seq": 1, "by": "b", "msg_id": "1", "ts": TS}, "msg_id"),
        (Presence, {"op": "presence", "user": "b", "state": "away", "text": 3}, "text"),
        (Typing, {"op": "typing", "from": "b", "to": "a", "active": "yes"}, "active"),
        (Typing, {"op": "typing", "from": "b"}, "to/room"),
        (ContactRequest, {"op": "contact_request", "from": ["b"]}, "from"),
        (RoomInvite, {"op": "room_invite", "room": 1, "name": "n"}, "from"),
        (Reconnect, {"op": "reconnect", "after_ms": "soon"}, "after_ms"),
        (Room, {"op": "room", "room": "not-a-number", "name": "x"}, "room"),
        (Rooms, {"op": "rooms", "rooms": [{"room": 1}]}, "name"),
        (Rooms, {"op": "rooms", "rooms": {"room": 1, "name": "x"}}, "rooms"),
        (Rooms, {"op": "rooms", "rooms": [], "invites": [{"room": 1, "name": "x"}]}, "from"),
        (Members, {"op": "members", "room": 1, "members": ["a", 2]}, "members"),
        (Contacts, {"op": "contacts", "contacts": [{"user": "b"}]}, "status"),
        (Contacts, {"op": "contacts", "contacts": ["b"]}, "contacts"),
        (HistoryPage, {"op": "history", "messages": [{**MSG, "cmid": 1}]}, "cmid"),
        (HistoryPage, {"op": "history", "messages": [], "more": 1}, "more"),
    ],
)
def test_from_frame_rejects_wrong_types(
    cls: type[ServerFrame], frame: dict[str, Any], field: str
) -> None:
    for reader in (cls.from_frame, parse_server_frame):
        with pytest.raises(BadServerFrame) as info:
            reader(frame)
        assert (info.value.op, info.value.field) == (cls.op, field)
        assert str(info.value).startswith(f"'{cls.op}' frame: ")
        assert isinstance(info.value, ValueError)


def test_defaults_and_ignored_fields() -> None:
    assert Typing.from_frame({"op": "typing", "from": "b", "room": 4}) == Typing("b", None, 4, True)
    assert HistoryPage.from_frame({"op": "history", "messages": []}) == HistoryPage([], False)
    contact = Contacts.from_frame({"op": "contacts", "contacts": [{"user": "c", "status": "p"}]})
    assert contact == Contacts([Contact("c", "p", None, None)])
    assert Ok.from_frame({"op": "ok", "rid": 3, "future": [1]}) == Ok()
    assert Msg.from_frame({**MSG, "future": {"x": 1}}) == Msg.from_frame(MSG)
    no_cmid = {k: v for k, v in MSG.items() if k != "cmid"}
    assert Msg.from_frame(no_cmid) == Msg(1, 1001, "alice", "bob", None, "hi", TS, None)


def test_parse_server_frame_ignores_unknown_ops_and_needs_a_string_op() -> None:
    assert parse_server_frame({"op": "future_op", "x": 1}) is None
    for frame in ({}, {"op": 5}, {"op": None}):
        with pytest.raises(BadServerFrame) as info:
            parse_server_frame(frame)
        assert (info.value.op, info.value.field) == (None, "op")


def test_lenient_error_reads_anything() -> None:
    assert Error.lenient({"op": "error"}) == Error("internal", "", None)
    odd = {"op": "error", "code": 7, "message": None, "retry_after": "2"}
    assert Error.lenient(odd) == Error("internal", "", None)
    fine = {"op": "error", "code": "rate_limited", "message": "m", "retry_after": 2}
    assert Error.lenient(fine) == Error.from_frame(fine) == Error("rate_limited", "m", 2.0)


def test_welcome_hides_the_resume_token() -> None:
    assert TOKEN not in repr(Welcome("alice", "laptop", "9f2c1e", "w1", TOKEN, 7, 3))


def test_frames_are_frozen_and_slotted() -> None:
    msg = Msg(1, 1001, "alice", "bob", None, "hi", TS, "a-1")
    with pytest.raises(AttributeError):
        msg.seq = 2  # type: ignore[misc]
    assert not hasattr(msg, "__dict__")


def test_rfc3339() -> None:
    ts = dt.datetime(2026, 11, 26, 14, 46, 12, 185_999, tzinfo=dt.UTC)
    assert rfc3339(ts) == "2026-11-26T14:46:12.185Z"
    assert rfc3339(ts) == "2026-11-26T14:46:12.185Z"  # from the one-entry cache
    assert rfc3339(ts.replace(microsecond=0)) == "2026-11-26T14:46:12.000Z"


def test_every_frame_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text("utf-8")
    section = doc.split("## Server frames", 1)[1].split("\n## ", 1)[0]
    for cls in get_args(ServerFrame):
        assert f"\n| `{cls.op}` |" in section, cls.op
