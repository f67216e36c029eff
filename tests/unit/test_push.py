"""``sb_push`` payloads (app/protocol/push.py): encoded, signed, verified, admitted once
while fresh (PushWindow), and read back."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.protocol.frames import ContactRequest, Presence, RoomInvite, Typing
from app.protocol.push import CatchUp, Forward, Kicked, Push, Replaced, parse_push
from app.store.social import PushWindow, SignedPush, push_key, sign_push, verify_push
from tests.unit.worker_fakes import FakeClock

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
    signed = verify_push(sign_push(payload, KEY), KEY)
    assert signed is not None
    assert parse_push(signed.event) == payload


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
    assert sign_push(payload, KEY).split("|", 3)[3] == orjson.dumps(legacy).decode()


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


def test_the_signature_covers_the_time_and_the_nonce() -> None:
    signed = sign_push(CatchUp("x"), KEY, signed_at_ms=1_700_000_000_000, nonce="ab" * 8)
    mac, at, nonce, body = signed.split("|", 3)
    assert (at, nonce, body) == ("1700000000000", "ab" * 8, '{"catch_up":"x"}')
    assert verify_push(signed, KEY) == SignedPush(
        1_700_000_000_000, int("ab" * 8, 16), {"catch_up": "x"}
    )
    for tampered in (
        f"{mac}|1700000099000|{nonce}|{body}",  # moved in time
        f"{mac}|{at}|{'cd' * 8}|{body}",  # another nonce, to replay it
        f"{mac}|{body}",  # the format before nonces
    ):
        assert verify_push(tampered, KEY) is None


def test_two_signatures_of_one_payload_differ() -> None:
    first, second = (verify_push(sign_push(CatchUp("x"), KEY), KEY) for _ in range(2))
    assert first is not None and second is not None
    assert first.nonce != second.nonce


# ---- freshness and replays --------------------------------------------------------------

MAX_AGE_S = 30.0


def signed_at(clock: FakeClock, offset_s: float = 0.0, nonce: str = "01" * 8) -> SignedPush:
    """A push signed ``offset_s`` from the clock's now, as the listener receives it."""
    payload = sign_push(
        CatchUp("x"), KEY, signed_at_ms=int((clock() + offset_s) * 1000), nonce=nonce
    )
    signed = verify_push(payload, KEY)
    assert signed is not None
    return signed


def test_a_fresh_push_is_admitted_once() -> None:
    clock = FakeClock(1_700_000_000.0)
    window = PushWindow(MAX_AGE_S, clock)
    push = signed_at(clock, -1.0)
    assert window.refuses(push) is None
    clock.advance(5)
    assert window.refuses(push) == "replayed"
    assert window.refuses(signed_at(clock, -1.0, nonce="02" * 8)) is None  # another push


@pytest.mark.parametrize("offset_s", [-MAX_AGE_S - 1, MAX_AGE_S + 1])
def test_a_push_signed_outside_the_window_is_stale(offset_s: float) -> None:
    clock = FakeClock(1_700_000_000.0)
    window = PushWindow(MAX_AGE_S, clock)
    assert window.refuses(signed_at(clock, offset_s)) == "stale"
    assert len(window) == 0


@pytest.mark.parametrize("offset_s", [-MAX_AGE_S + 1, MAX_AGE_S - 1])
def test_clock_skew_within_the_window_is_tolerated(offset_s: float) -> None:
    clock = FakeClock(1_700_000_000.0)
    assert PushWindow(MAX_AGE_S, clock).refuses(signed_at(clock, offset_s)) is None


def test_a_push_replayed_after_the_window_is_stale_and_forgotten() -> None:
    clock = FakeClock(1_700_000_000.0)
    window = PushWindow(MAX_AGE_S, clock)
    captured = signed_at(clock)
    assert window.refuses(captured) is None
    clock.advance(MAX_AGE_S + 1)
    assert window.refuses(captured) == "stale"
    assert len(window) == 0  # nothing kept past the window: memory is the window's pushes


def test_the_window_remembers_only_its_own_pushes() -> None:
    clock = FakeClock(1_700_000_000.0)
    window = PushWindow(MAX_AGE_S, clock)
    for i in range(100):
        assert window.refuses(signed_at(clock, nonce=f"{i:016x}")) is None
        clock.advance(1)
    assert 29 <= len(window) <= 31
