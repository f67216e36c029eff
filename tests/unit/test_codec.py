"""Byte-level tests of the v1 codec (app.protocol)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from app.protocol import (
    DECODER_CODES,
    FATAL_CODES,
    OPS,
    PRE_AUTH_OPS,
    Ack,
    Bye,
    ContactAccept,
    ContactAdd,
    ContactList,
    ContactRemove,
    Decoder,
    ErrorCode,
    FrameError,
    Hello,
    History,
    Limits,
    LoginToken,
    PasswordChange,
    Ping,
    PresenceState,
    Read,
    Register,
    Request,
    Resume,
    RoomCreate,
    RoomInvite,
    RoomJoin,
    RoomLeave,
    RoomList,
    RoomMembers,
    Send,
    SetPresence,
    Typing,
    encode,
    encode_error,
    error_frame,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
TOKEN = "t" * 32


def decode(data: bytes, limits: Limits | None = None) -> list[Request | FrameError]:
    return Decoder(limits or Limits()).receive_data(data)


def one(data: bytes) -> Request | FrameError:
    items = decode(data)
    assert len(items) == 1, items
    return items[0]


def err(data: bytes) -> FrameError:
    item = one(data)
    assert isinstance(item, FrameError), item
    return item


# --- framing ---------------------------------------------------------------

PING = b'{"op":"ping"}\n'


def test_frame_fed_one_byte_at_a_time() -> None:
    frame = b'{"op":"send","cmid":"c1","body":"h\xc3\xa9llo","to":"bob","rid":7}\n'
    dec = Decoder()
    items: list[Request | FrameError] = []
    for i in range(len(frame)):
        got = dec.receive_data(frame[i : i + 1])
        if i < len(frame) - 1:
            assert got == []
        items += got
    assert items == [Send(cmid="c1", body="héllo", to="bob", rid=7)]
    assert dec.pending_bytes == 0


def test_multiple_frames_in_one_feed_keep_order() -> None:
    data = b'{"op":"ping","rid":1}\n{"op":"ack","seq":3}\n{"op":"bye"}\n{"op":"pi'
    dec = Decoder()
    assert dec.receive_data(data) == [Ping(rid=1), Ack(seq=3), Bye()]
    assert dec.pending_bytes == len(b'{"op":"pi')
    assert dec.receive_data(b'ng"}\n') == [Ping()]


def test_crlf_is_tolerated() -> None:
    assert decode(b'{"op":"ping"}\r\n{"op":"bye"}\r\n') == [Ping(), Bye()]


def test_crlf_split_between_feeds() -> None:
    dec = Decoder()
    assert dec.receive_data(b'{"op":"ping"}\r') == []
    assert dec.receive_data(b"\n") == [Ping()]


def test_blank_lines_are_ignored_and_not_errors() -> None:
    dec = Decoder(Limits(max_errors_per_connection=0))
    assert dec.receive_data(b"\n\r\n   \n\t\r\n" + PING + b"\n") == [Ping()]
    assert not dec.closed and dec.error_count == 0


def test_empty_feed() -> None:
    assert decode(b"") == []


def test_unknown_fields_are_ignored() -> None:
    assert one(b'{"op":"ack","seq":1,"future":{"x":[1,2]},"rid":"a"}\n') == Ack(1, rid="a")


def test_null_optional_field_is_absent() -> None:
    assert one(b'{"op":"presence","state":"away","text":null,"rid":null}\n') == SetPresence(
        PresenceState.AWAY
    )


# --- oversize ----------------------------------------------------------------


def test_pending_buffer_over_limit_is_fatal_and_closes() -> None:
    dec = Decoder(Limits(max_frame_bytes=100))
    assert dec.receive_data(b"x" * 100) == []  # exactly at the limit is fine so far
    items = dec.receive_data(b"x")
    assert len(items) == 1 and isinstance(items[0], FrameError)
    assert items[0].code is ErrorCode.FRAME_TOO_LARGE and items[0].fatal
    assert items[0].message == "frame exceeds 100 bytes"
    assert dec.closed and dec.pending_bytes == 0
    assert dec.receive_data(b"\n" + PING) == []


def test_complete_line_over_limit_is_fatal() -> None:
    dec = Decoder(Limits(max_frame_bytes=100))
    big = b'{"op":"send","cmid":"c","to":"bob","body":"' + b"a" * 100 + b'"}\n'
    items = dec.receive_data(PING + big + PING)
    assert items[0] == Ping()
    assert isinstance(items[1], FrameError)
    assert items[1].code is ErrorCode.FRAME_TOO_LARGE and items[1].fatal
    assert len(items) == 2 and dec.closed


def test_line_exactly_at_limit_is_accepted() -> None:
    frame = b'{"op":"ping","rid":"' + b"r" * 10 + b'"}'
    dec = Decoder(Limits(max_frame_bytes=len(frame)))
    assert dec.receive_data(frame + b"\n") == [Ping(rid="r" * 10)]
    assert not dec.closed


def test_oversize_frame_bytes_is_fatal_code() -> None:
    assert ErrorCode.FRAME_TOO_LARGE in FATAL_CODES and ErrorCode.FRAME_TOO_LARGE.fatal


# --- per-line errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"not json", ErrorCode.BAD_JSON),
        (b'{"op":"ping"', ErrorCode.BAD_JSON),
        (b'{"op":"\xff\xfe"}', ErrorCode.BAD_JSON),
        (b"\xef\xbb\xbf{}", ErrorCode.BAD_JSON),
        (b"NaN", ErrorCode.BAD_JSON),
        (b"[1,2]", ErrorCode.BAD_FRAME),
        (b'"ping"', ErrorCode.BAD_FRAME),
        (b"42", ErrorCode.BAD_FRAME),
        (b"null", ErrorCode.BAD_FRAME),
        (b"{}", ErrorCode.BAD_FRAME),
        (b'{"op":1}', ErrorCode.BAD_FRAME),
        (b'{"op":null}', ErrorCode.BAD_FRAME),
        (b'{"op":"launch_missiles"}', ErrorCode.UNKNOWN_OP),
        (b'{"op":"PING"}', ErrorCode.UNKNOWN_OP),
        (b'{"op":"ack"}', ErrorCode.BAD_FIELD),
        (
            b'{"op":"hello","user":"alice","password":"pw","device":"d","v":2}',
            ErrorCode.UNSUPPORTED_VERSION,
        ),
    ],
)
def test_error_codes(line: bytes, code: ErrorCode) -> None:
    e = err(line + b"\n")
    assert e.code is code and not e.fatal
    assert e.message and "line 1" not in e.message  # no orjson exception text


def test_invalid_utf8_message() -> None:
    assert err(b'{"op":"ping","x":"\xc3"}\n').message == "frame is not valid UTF-8"
    assert err(b"{oops}\n").message == "frame is not valid JSON"


def test_unknown_op_message_echoes_only_plain_names() -> None:
    assert err(b'{"op":"fly"}\n').message == "unknown op 'fly'"
    assert err(b'{"op":"<script>"}\n').message == "unknown op"


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"op": "ack", "seq": True}, "seq"),  # JSON booleans are not integers
        ({"op": "ack", "seq": -1}, "seq"),
        ({"op": "ack", "seq": 1.0}, "seq"),
        ({"op": "ack", "seq": "1"}, "seq"),
        ({"op": "ack", "seq": 2**53 + 1}, "seq"),
        ({"op": "read", "msg_id": 0}, "msg_id"),
        ({"op": "register", "user": "Al", "password": "x"}, "user"),
        ({"op": "register", "user": "Alice", "password": "x"}, "user"),
        ({"op": "register", "user": ".alice", "password": "x"}, "user"),
        ({"op": "register", "user": "alice\n", "password": "x"}, "user"),
        ({"op": "register", "user": "a" * 33, "password": "x"}, "user"),
        ({"op": "register", "user": "alice", "password": ""}, "password"),
        ({"op": "register", "user": "alice", "password": "p" * 1025}, "password"),
        ({"op": "register", "user": "alice"}, "password"),
        ({"op": "hello", "user": "alice", "password": "x", "device": "my phone"}, "device"),
        ({"op": "hello", "user": "alice", "password": "x", "device": "d" * 65}, "device"),
        ({"op": "hello", "user": "alice", "password": "x", "device": "d", "v": "1"}, "v"),
        (
            {"op": "resume", "user": "alice", "device": "d", "token": "short", "last_seq": 0},
            "token",
        ),
        (
            {"op": "resume", "user": "alice", "device": "d", "token": TOKEN, "last_seq": -1},
            "last_seq",
        ),
        ({"op": "send", "cmid": "", "body": "x", "to": "bob"}, "cmid"),
        ({"op": "send", "cmid": "c\u00e9", "body": "x", "to": "bob"}, "cmid"),
        ({"op": "send", "cmid": "c" * 65, "body": "x", "to": "bob"}, "cmid"),
        ({"op": "send", "cmid": "c", "body": "", "to": "bob"}, "body"),
        ({"op": "send", "cmid": "c", "body": "x" * 16385, "to": "bob"}, "body"),
        ({"op": "send", "cmid": "c", "body": 5, "to": "bob"}, "body"),
        ({"op": "send", "cmid": "c", "body": "x", "room": 0}, "room"),
        ({"op": "send", "cmid": "c", "body": "x", "room": 2**53 + 1}, "room"),
        ({"op": "presence", "state": "offline"}, "state"),
        ({"op": "presence", "state": "busy"}, "state"),
        ({"op": "presence", "state": "away", "text": "t" * 201}, "text"),
        ({"op": "room_create", "name": "   "}, "name"),
        ({"op": "room_create", "name": "n" * 65}, "name"),
        ({"op": "room_invite", "room": 1, "user": "B"}, "user"),
        ({"op": "history", "room": 1, "limit": 0}, "limit"),
        ({"op": "history", "room": 1, "limit": 101}, "limit"),
        ({"op": "history", "room": 1, "before": 0}, "before"),
        ({"op": "typing", "to": "bob", "active": 1}, "active"),
        ({"op": "password", "old": "x", "new": ""}, "new"),
        ({"op": "ping", "rid": "r" * 65}, "rid"),
        ({"op": "ping", "rid": -1}, "rid"),
        ({"op": "ping", "rid": 2**53}, "rid"),
        ({"op": "ping", "rid": True}, "rid"),
        ({"op": "ping", "rid": [1]}, "rid"),
    ],
)
def test_bad_field_names_the_field(frame: dict[str, object], field: str) -> None:
    e = err(encode(frame))
    assert e.code is ErrorCode.BAD_FIELD
    assert f"field '{field}' must be " in e.message


def test_bad_field_message_example() -> None:
    e = err(b'{"op":"send","cmid":"c","to":"bob"}\n')
    assert e.message == (
        "field 'body' must be a string of 1..16384 characters"
        " with no control character other than tab and newline"
    )


@pytest.mark.parametrize(
    "frame",
    [
        {"op": "send", "cmid": "c", "body": "x"},
        {"op": "send", "cmid": "c", "body": "x", "to": "bob", "room": 1},
        {"op": "history"},
        {"op": "history", "with": "bob", "room": 1},
        {"op": "typing"},
        {"op": "typing", "to": "bob", "room": 1},
    ],
)
def test_exactly_one_target(frame: dict[str, object]) -> None:
    e = err(encode(frame))
    assert e.code is ErrorCode.BAD_FIELD and "exactly one of" in e.message


def test_limits_apply_to_body_and_status() -> None:
    limits = Limits(max_body_chars=3, max_status_chars=2)
    body = decode(encode({"op": "send", "cmid": "c", "body": "abcd", "to": "bob"}), limits)
    assert isinstance(body[0], FrameError) and "1..3" in body[0].message
    status = decode(encode({"op": "presence", "state": "dnd", "text": "abc"}), limits)
    assert isinstance(status[0], FrameError) and "0..2" in status[0].message


# --- rid echo ------------------------------------------------------------------


@pytest.mark.parametrize("rid", ["abc", "", 0, 2**53 - 1, "r" * 64])
def test_errors_echo_a_valid_rid(rid: str | int) -> None:
    cases: list[dict[str, object]] = [
        {"op": 5, "rid": rid},
        {"rid": rid},
        {"op": "nope", "rid": rid},
        {"op": "ack", "rid": rid},
        {"op": "hello", "user": "alice", "password": "x", "device": "d", "v": 9, "rid": rid},
    ]
    for frame in cases:
        assert err(encode(frame)).rid == rid


def test_invalid_rid_is_not_echoed() -> None:
    e = err(b'{"op":"ping","rid":{"a":1}}\n')
    assert e.code is ErrorCode.BAD_FIELD and e.rid is None


# --- error budget ----------------------------------------------------------------


def test_too_many_errors_is_fatal_and_closes() -> None:
    dec = Decoder()
    out = dec.receive_data(b"junk\n" * 20)
    assert len(out) == 20 and all(isinstance(i, FrameError) for i in out)
    assert not dec.closed
    assert dec.receive_data(PING) == [Ping()]  # good frames don't reset or count
    out = dec.receive_data(b"junk\n" + PING + b"junk\n")
    assert [i.code for i in out if isinstance(i, FrameError)] == [
        ErrorCode.BAD_JSON,
        ErrorCode.TOO_MANY_ERRORS,
    ]
    assert isinstance(out[-1], FrameError) and out[-1].fatal
    assert len(out) == 2 and dec.closed  # the ping after the fatal error is dropped
    assert dec.receive_data(PING) == []


def test_error_budget_is_configurable() -> None:
    dec = Decoder(Limits(max_errors_per_connection=0))
    out = dec.receive_data(b"{}\n" + PING)
    assert [type(i) for i in out] == [FrameError, FrameError]
    assert isinstance(out[1], FrameError) and out[1].code is ErrorCode.TOO_MANY_ERRORS
    assert dec.closed


def test_decoder_codes_are_documented_subset() -> None:
    assert {ErrorCode.FRAME_TOO_LARGE, ErrorCode.TOO_MANY_ERRORS} <= DECODER_CODES
    assert {
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.TOO_MANY_ERRORS,
        ErrorCode.FLOOD,
        ErrorCode.SESSION_REPLACED,
        ErrorCode.KICKED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.AUTH_TIMEOUT,
        ErrorCode.IDLE_TIMEOUT,
    } == FATAL_CODES


# --- every op ------------------------------------------------------------------

OP_CASES: list[tuple[dict[str, object], Request]] = [
    (
        {"op": "hello", "user": "alice", "password": "pw", "device": "phone:1", "v": 1, "rid": 1},
        Hello("alice", "pw", "phone:1", 1, rid=1),
    ),
    (
        {"op": "hello", "user": "a_b.c-d", "password": "pw", "device": "d"},
        Hello("a_b.c-d", "pw", "d"),
    ),
    ({"op": "register", "user": "bob", "password": "x", "rid": "r"}, Register("bob", "x", "r")),
    (
        {"op": "resume", "user": "bob", "device": "pc", "token": TOKEN, "last_seq": 0},
        Resume("bob", "pc", TOKEN, 0),
    ),
    ({"op": "send", "cmid": "c 1!", "body": "hi", "to": "bob"}, Send("c 1!", "hi", to="bob")),
    ({"op": "send", "cmid": "c", "body": "hi", "room": 2**53}, Send("c", "hi", room=2**53)),
    ({"op": "ack", "seq": 0}, Ack(0)),
    ({"op": "presence", "state": "dnd", "text": ""}, SetPresence(PresenceState.DND, "")),
    ({"op": "presence", "state": "online"}, SetPresence(PresenceState.ONLINE)),
    ({"op": "contact_add", "user": "bob"}, ContactAdd("bob")),
    ({"op": "contact_accept", "user": "bob"}, ContactAccept("bob")),
    ({"op": "contact_remove", "user": "bob"}, ContactRemove("bob")),
    ({"op": "contacts"}, ContactList()),
    ({"op": "room_create", "name": "  general  "}, RoomCreate("general")),
    ({"op": "room_invite", "room": 3, "user": "bob"}, RoomInvite(3, "bob")),
    ({"op": "room_join", "room": 3}, RoomJoin(3)),
    ({"op": "room_leave", "room": 3}, RoomLeave(3)),
    ({"op": "room_members", "room": 3}, RoomMembers(3)),
    ({"op": "rooms"}, RoomList()),
    ({"op": "history", "with": "bob"}, History(with_user="bob", limit=50)),
    ({"op": "history", "room": 2, "before": 10, "limit": 100}, History(None, 2, 10, 100)),
    ({"op": "typing", "to": "bob"}, Typing(to="bob", active=True)),
    ({"op": "typing", "room": 4, "active": False}, Typing(room=4, active=False)),
    ({"op": "read", "msg_id": 1}, Read(1)),
    ({"op": "password", "old": "a", "new": "b"}, PasswordChange("a", "b")),
    ({"op": "ping"}, Ping()),
    ({"op": "bye", "rid": 9}, Bye(rid=9)),
    ({"op": "bye", "forget": True}, Bye(forget=True)),
    (
        {"op": "login_token", "user": "bob", "device": "pc", "device_token": TOKEN, "rid": 3},
        LoginToken("bob", "pc", TOKEN, rid=3),
    ),
]


@pytest.mark.parametrize(("frame", "expected"), OP_CASES)
def test_every_op_parses(frame: dict[str, object], expected: Request) -> None:
    item = one(encode(frame))
    assert item == expected
    assert type(item) is OPS[str(frame["op"])]


def test_cases_cover_every_op() -> None:
    assert {str(f["op"]) for f, _ in OP_CASES} == set(OPS)
    assert {cls.op for cls in OPS.values()} == set(OPS)


def test_history_default_limit_follows_limits() -> None:
    limits = Limits(default_history_limit=7)
    assert decode(b'{"op":"history","room":1}\n', limits) == [History(room=1, limit=7)]


def test_pre_auth_ops() -> None:
    assert frozenset({Hello, Register, Resume, LoginToken, Ping, Bye}) == PRE_AUTH_OPS


def test_secrets_are_not_in_repr() -> None:
    assert "hunter2" not in repr(Hello("alice", "hunter2", "d"))
    assert "hunter2" not in repr(PasswordChange("hunter2", "hunter2"))
    assert TOKEN not in repr(Resume("a", "d", TOKEN, 0))


# --- encoding --------------------------------------------------------------------


def test_encode_is_one_line_and_round_trips() -> None:
    frame = {"op": "msg", "seq": 1, "id": 5, "from": "alice", "body": 'a\nb\u2028"c"', "ts": "x"}
    data = encode(frame)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert orjson.loads(data) == frame


@pytest.mark.parametrize(("frame", "expected"), OP_CASES)
def test_encode_decode_round_trip(frame: dict[str, object], expected: Request) -> None:
    assert decode(encode(frame)) == [expected]


def test_encode_accepts_any_mapping_and_enums() -> None:
    from types import MappingProxyType

    data = encode(MappingProxyType({"op": "presence", "state": PresenceState.AWAY}))
    assert data == b'{"op":"presence","state":"away"}\n'


def test_error_frame() -> None:
    assert orjson.loads(error_frame(ErrorCode.NOT_FOUND, "no such room")) == {
        "op": "error",
        "code": "not_found",
        "message": "no such room",
    }
    assert orjson.loads(error_frame(ErrorCode.RATE_LIMITED, "slow down", 3, retry_after=2)) == {
        "op": "error",
        "code": "rate_limited",
        "message": "slow down",
        "rid": 3,
        "retry_after": 2,
    }


def test_encode_error_echoes_rid() -> None:
    e = err(b'{"op":"nope","rid":"q"}\n')
    assert orjson.loads(encode_error(e)) == {
        "op": "error",
        "code": "unknown_op",
        "message": "unknown op 'nope'",
        "rid": "q",
    }


# --- limits & docs ---------------------------------------------------------------


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        Limits(max_frame_bytes=0)
    with pytest.raises(ValueError):
        Limits(default_history_limit=101)


def test_doc_lists_every_error_code_and_limit() -> None:
    doc = DOC.read_text(encoding="utf-8")
    for code in ErrorCode:
        assert f"`{code.value}`" in doc, code
    for name in Limits.__dataclass_fields__:
        assert f"SWITCHBOARD_{name.upper()}" in doc, name
    for op in OPS:
        assert f"`{op}`" in doc, op


def test_receive_message_takes_one_whole_frame_per_message() -> None:
    """Message-framed transports (WebSocket): no newline splitting, the same limits."""
    d = Decoder(Limits(max_frame_bytes=1024, max_errors_per_connection=2))
    (ping,) = d.receive_message(b'{\n "op": "ping",\r\n "rid": 1\n}')
    assert isinstance(ping, Ping) and ping.rid == 1
    assert d.receive_message(b" \n\t") == []  # blank: ignored, not an error
    (bad,) = d.receive_message(b'{"op":"ping","x":"a\nb"}')  # a raw newline in a string
    assert isinstance(bad, FrameError) and bad.code is ErrorCode.BAD_JSON
    (binary,) = d.reject(ErrorCode.BAD_FRAME, "binary")
    assert isinstance(binary, FrameError) and not binary.fatal
    _third, over = d.reject(ErrorCode.BAD_FRAME, "binary")
    assert isinstance(over, FrameError) and over.code is ErrorCode.TOO_MANY_ERRORS
    assert d.closed and d.receive_message(b'{"op":"ping"}') == []


def test_receive_message_over_the_limit_is_fatal() -> None:
    d = Decoder(Limits(max_frame_bytes=1024))
    (error,) = d.receive_message(b"x" * 1025)
    assert isinstance(error, FrameError)
    assert (error.code, error.fatal) == (ErrorCode.FRAME_TOO_LARGE, True)
    assert d.closed
