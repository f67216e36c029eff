"""``sb_push`` payloads (app/protocol/push.py): encoded, signed, verified and read back."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.protocol.frames import ContactRequest, Presence, RoomInvite, Typing
from app.protocol.push import CatchUp, Forward, Kicked, Push, Replaced, parse_push
from app.store.social import push_key, sign_push, verify_push

KEY = push_key("test admin secret")

PAYLOADS: list[Push] = [
    Forward([1, 2], Presence("bob", "away", None)),
    Forward([3], Typing("bob", None, 12, True)),
    Forward([], ContactRequest("carol")),
    Forward([4], RoomInvite(12, "ops", "alice")),
    Replaced([(1, 10, None), (2, 20, 3)]),
    Replaced([]),
    CatchUp("uncertain commit: w1"),
    Kicked([(1, 10)], "kicked"),
    Kicked([(1, 10), (1, 11)], "disabled"),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=repr)
def test_round_trip_through_the_signature(payload: Push) -> None:
    event = verify_push(sign_push(payload, KEY), KEY)
    assert event is not None
    assert parse_push(event) == payload


# The dicts the worker and the dashboard pushed before these classes (app at ff75d8c).
LEGACY: list[tuple[Push, dict[str, Any]]] = [
    (
        Forward([1, 2], Presence("bob", "away", None)),
        {"to": [1, 2], "f": {"op": "presence", "user": "bob", "state": "away", "text": None}},
    ),
    (
        Forward([3], Typing("bob", "alice", None, False)),
        {"to": [3], "f": {"op": "typing", "from": "bob", "active": False, "to": "alice"}},
    ),
    (
        Forward([4], ContactRequest("carol")),
        {"to": [4], "f": {"op": "contact_request", "from": "carol"}},
    ),
    (
        Forward([5], RoomInvite(7, "ops", "alice")),
        {"to": [5], "f": {"op": "room_invite", "room": 7, "name": "ops", "from": "alice"}},
    ),
    (Replaced([(1, 10, None), (2, 20, 3)]), {"replaced": [(1, 10, None), (2, 20, 3)]}),
    (CatchUp("uncertain commit: w1"), {"catch_up": "uncertain commit: w1"}),
    (Kicked([(1, 10)], "disabled"), {"kicked": [[1, 10]], "reason": "disabled"}),
]


@pytest.mark.parametrize(("payload", "legacy"), LEGACY, ids=repr)
def test_same_bytes_as_the_legacy_dicts(payload: Push, legacy: dict[str, Any]) -> None:
    assert payload.encode() == orjson.dumps(legacy)
    assert sign_push(payload, KEY).partition("|")[2] == orjson.dumps(legacy).decode()


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"to": [1]},
        {"f": {"op": "contact_request", "from": "c"}},
        {"to": ["1"], "f": {"op": "contact_request", "from": "c"}},
        {"to": [True], "f": {"op": "contact_request", "from": "c"}},
        {"to": 1, "f": {"op": "contact_request", "from": "c"}},
        {"to": [1], "f": "contact_request"},
        {"to": [1], "f": {"op": "contact_request"}},
        {"to": [1], "f": {"op": "future_op"}},
        {"to": [1], "f": {"from": "c"}},
        {"replaced": [[1, 2]]},
        {"replaced": [[1, 2, 3, 4]]},
        {"replaced": [[1, "2", None]]},
        {"replaced": [[1, 2, True]]},
        {"replaced": [None]},
        {"replaced": "1:2"},
        {"replaced": None},
        {"catch_up": 5},
        {"catch_up": None},
        {"kicked": [[1]]},
        {"kicked": [[1, 2, 3]]},
        {"kicked": [[1, None]]},
        {"kicked": [[1, 2]], "reason": 5},
        {"kicked": {"1": 2}},
    ],
)
def test_malformed_payloads_read_as_none(event: dict[str, Any]) -> None:
    assert parse_push(event) is None


def test_defaults_and_precedence() -> None:
    assert parse_push({"kicked": [[1, 2]]}) == Kicked([(1, 2)], "kicked")
    assert parse_push({"replaced": [], "catch_up": "x", "to": [1]}) == Replaced([])
    assert parse_push({"catch_up": "x", "kicked": [[1, 2]]}) == CatchUp("x")


def test_unsigned_or_tampered_payloads_are_refused() -> None:
    signed = sign_push(CatchUp("x"), KEY)
    assert verify_push(signed, push_key("another secret")) is None
    assert verify_push(signed.replace('"x"', '"y"'), KEY) is None
    assert verify_push('{"catch_up":"x"}', KEY) is None
