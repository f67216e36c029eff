"""The SDK's boundary to the protocol's frame readers (app/client/events.py)."""

from __future__ import annotations

import pytest

from app.client import ErrorEvent, Msg, ProtocolError, RoomInvite, Sent, ServerError, Unknown
from app.client.events import parse_event, read_reply, server_error
from app.protocol import frames

TS = "2024-05-01T12:00:00.123Z"


def test_the_sdk_hands_out_the_protocols_classes() -> None:
    assert Msg is frames.Msg
    assert ErrorEvent is frames.Error


def test_events_by_op() -> None:
    invite = {"op": "room_invite", "room": 12, "name": "ops", "from": "alice"}
    assert parse_event(invite) == RoomInvite(12, "ops", "alice")
    assert parse_event({"op": "future_op"}) == Unknown({"op": "future_op"})
    # A reply op where an event was expected is not an event.
    assert parse_event({"op": "pong"}) == Unknown({"op": "pong"})


def test_a_frame_that_breaks_the_protocol_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="'msg' frame: field 'seq' must be an integer"):
        parse_event(
            {"op": "msg", "seq": "1", "id": 1, "from": "b", "to": "a", "body": "", "ts": TS}
        )
    with pytest.raises(ProtocolError, match="'sent' frame: field 'id' must be an integer"):
        read_reply(Sent, {"op": "sent", "cmid": "c", "id": None, "ts": TS})


def test_errors_are_read_leniently() -> None:
    assert parse_event({"op": "error", "code": 3}) == ErrorEvent("internal", "", None)
    error = server_error({"op": "error", "code": "overloaded", "message": "busy", "retry_after": 1})
    assert isinstance(error, ServerError)
    assert (error.code, error.message, error.retry_after) == ("overloaded", "busy", 1.0)
