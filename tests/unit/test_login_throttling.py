"""Login throttling, registration limits, password changes and admission, without a database.

The real Login, Throttle and Admission run over worker_fakes' FakeStore, whose
throttle counters follow the rules of app/store/throttle.py's statements on a
fake clock (tests/integration/test_throttle_store.py checks the statements
themselves against PostgreSQL). Clients are told apart by their address, as
workers will once HAProxy sends the PROXY protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from app.protocol import Hello, PasswordChange, Ping, Register
from app.settings import Settings, SettingsError
from app.store.throttle import Backoff, address_key, client_host, is_shared
from tests.unit.worker_fakes import GOOD_PASSWORD, FakePeer, Harness

ATTACKER = "203.0.113.9:41000"
VICTIM = "198.51.100.20:52000"
WRONG = "not the password at all"


@pytest.fixture
def h(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch)


async def hello(h: Harness, peer: FakePeer, user: str, password: str) -> dict[str, Any]:
    frames = await h.request(peer, Hello(user=user, password=password, device="d"))
    assert len(frames) == 1, frames
    return frames[0]


def code(frame: dict[str, Any]) -> str:
    return str(frame["code"]) if frame["op"] == "error" else str(frame["op"])


# ---- per (user, address): backoff, never a lockout -----------------------------------


async def test_an_attacker_cannot_lock_a_user_out_from_another_address(h: Harness) -> None:
    h.store.add_user("bob")
    attacker = h.connect(ATTACKER)
    answers = [code(await hello(h, attacker, "bob", WRONG)) for _ in range(20)]
    free = h.settings.login_free_failures
    assert answers == ["auth_failed"] * free + ["rate_limited"] * (20 - free)
    # bob, from his own address, with his password: in at once.
    assert code(await hello(h, h.connect(VICTIM), "bob", GOOD_PASSWORD)) == "welcome"
    # ... and that did not reset the attacker's wait.
    assert code(await hello(h, h.connect(ATTACKER), "bob", GOOD_PASSWORD)) == "rate_limited"


async def test_the_wait_doubles_after_the_free_failures_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch, login_backoff_max_s=16.0)
    h.store.add_user("bob")
    peer = h.connect(ATTACKER)
    for _ in range(h.settings.login_free_failures):
        assert code(await hello(h, peer, "bob", WRONG)) == "auth_failed"
    waits = []
    for _ in range(7):
        refused = await hello(h, peer, "bob", WRONG)
        assert code(refused) == "rate_limited"
        waits.append(refused["retry_after"])
        h.clock.advance(refused["retry_after"])
        assert code(await hello(h, peer, "bob", WRONG)) == "auth_failed"
    assert waits == [1, 2, 4, 8, 16, 16, 16]


async def test_refused_attempts_are_not_checked_and_do_not_extend_the_wait(
    h: Harness,
) -> None:
    h.store.add_user("bob")
    peer = h.connect(ATTACKER)
    for _ in range(h.settings.login_free_failures + 1):
        h.clock.advance(10)  # each admitted attempt after its wait
        await hello(h, peer, "bob", WRONG)
    checked = h.passwords.verified
    first = await hello(h, peer, "bob", WRONG)
    for _ in range(50):
        await hello(h, peer, "bob", WRONG)
    last = await hello(h, peer, "bob", GOOD_PASSWORD)
    assert (code(first), code(last)) == ("rate_limited", "rate_limited")
    assert first["retry_after"] == last["retry_after"] == 2
    assert h.passwords.verified == checked
    h.clock.advance(2)
    assert code(await hello(h, peer, "bob", GOOD_PASSWORD)) == "welcome"


async def test_the_right_password_starts_the_pair_afresh(h: Harness) -> None:
    h.store.add_user("bob")
    peer = h.connect(VICTIM)
    free = h.settings.login_free_failures
    for _ in range(free):
        await hello(h, peer, "bob", WRONG)
    refused = await hello(h, peer, "bob", GOOD_PASSWORD)
    assert code(refused) == "rate_limited"
    h.clock.advance(refused["retry_after"])
    assert code(await hello(h, peer, "bob", GOOD_PASSWORD)) == "welcome"
    again = h.connect(VICTIM)
    answers = [code(await hello(h, again, "bob", WRONG)) for _ in range(free + 1)]
    assert answers == ["auth_failed"] * free + ["rate_limited"]


async def test_a_pair_is_forgotten_after_a_quiet_while(h: Harness) -> None:
    h.store.add_user("bob")
    peer = h.connect(VICTIM)
    for _ in range(h.settings.login_free_failures):
        await hello(h, peer, "bob", WRONG)
    h.clock.advance(1 + h.settings.login_backoff_forget_s + 1)
    await hello(h, peer, "bob", WRONG)
    assert h.store.throttle["login|bob|198.51.100.20"].attempts == 1


# ---- per address, across users --------------------------------------------------------


async def test_credential_stuffing_from_one_address_meets_its_budget(h: Harness) -> None:
    h.store.add_user("bob")
    budget = h.settings.max_login_failures_per_addr
    attacker = h.connect(ATTACKER)
    answers = [code(await hello(h, attacker, f"user{i:03}", WRONG)) for i in range(budget + 1)]
    assert answers == ["auth_failed"] * budget + ["rate_limited"]
    # Even a right password waits there, until the window ends...
    refused = await hello(h, h.connect(ATTACKER), "bob", GOOD_PASSWORD)
    assert code(refused) == "rate_limited"
    assert refused["retry_after"] == int(h.settings.login_failure_window_s)
    # ... while every other address goes on as usual.
    assert code(await hello(h, h.connect(VICTIM), "bob", GOOD_PASSWORD)) == "welcome"
    h.clock.advance(h.settings.login_failure_window_s)
    assert code(await hello(h, h.connect(ATTACKER), "bob", GOOD_PASSWORD)) == "welcome"


async def test_a_shared_address_has_no_budget_but_pairs_still_back_off(h: Harness) -> None:
    """Workers see HAProxy's 127.0.0.1 until the PROXY protocol: a budget there
    would be everybody's, the lockout C2 was about."""
    h.store.add_user("bob")
    proxy = h.connect("127.0.0.1:40001")
    budget = h.settings.max_login_failures_per_addr
    answers = {code(await hello(h, proxy, f"user{i:03}", WRONG)) for i in range(budget + 10)}
    assert answers == {"auth_failed"}
    assert not any(key.startswith("login-addr|") for key in h.store.throttle)
    assert code(await hello(h, h.connect("127.0.0.1:40002"), "bob", GOOD_PASSWORD)) == "welcome"
    free = h.settings.login_free_failures
    answers_for_bob = [code(await hello(h, proxy, "bob", WRONG)) for _ in range(free + 1)]
    assert answers_for_bob == ["auth_failed"] * free + ["rate_limited"]


async def test_an_ipv6_attacker_cannot_rotate_addresses_within_a_64(h: Harness) -> None:
    h.store.add_user("bob")
    free = h.settings.login_free_failures
    answers = [
        code(await hello(h, h.connect(f"2001:db8:1:2::{i:x}:443"), "bob", WRONG))
        for i in range(1, free + 3)
    ]
    assert answers == ["auth_failed"] * free + ["rate_limited"] * 2
    other_64 = h.connect("2001:db8:1:3::1:443")
    assert code(await hello(h, other_64, "bob", GOOD_PASSWORD)) == "welcome"


@pytest.mark.parametrize(
    ("peer", "host", "key"),
    [
        ("203.0.113.9:41000", "203.0.113.9", "203.0.113.9"),
        ("2001:db8::7:5222", "2001:db8::7", "2001:db8::/64"),
        ("::ffff:198.51.100.1:80", "::ffff:198.51.100.1", "198.51.100.1"),
        ("?", "?", "?"),
    ],
)
def test_addresses_are_keyed_by_ip_or_ipv6_64(peer: str, host: str, key: str) -> None:
    assert client_host(peer) == host
    assert address_key(host) == key


def test_shared_addresses_are_addresses_or_networks() -> None:
    networks = Settings(shared_client_addrs="127.0.0.1, 10.0.0.0/8,::1").shared_client_networks()
    assert is_shared("10.1.2.3", networks) and is_shared("::ffff:127.0.0.1", networks)
    assert not is_shared("127.0.0.2", networks) and not is_shared("not-an-ip", networks)
    with pytest.raises(SettingsError, match="shared_client_addrs"):
        Settings(shared_client_addrs="127.0.0.1,localhost")


def test_the_backoff_schedule() -> None:
    policy = Backoff(free=3, base_s=0.5, max_s=3.0, forget_s=60)
    assert [policy.delay_s(n) for n in range(1, 8)] == [0, 0, 0.5, 1, 2, 3, 3]


# ---- password changes ---------------------------------------------------------------


async def test_wrong_old_passwords_are_throttled_like_logins(h: Harness) -> None:
    peer = await h.log_in("alice")
    new = "a much better password"
    free = h.settings.login_free_failures
    answers = []
    for _ in range(free + 1):
        frames = await h.request(peer, PasswordChange(old=WRONG, new=new))
        answers.append(code(frames[0]))
    assert answers == ["auth_failed"] * free + ["rate_limited"]
    refused = (await h.request(peer, PasswordChange(old=GOOD_PASSWORD, new=new)))[0]
    assert code(refused) == "rate_limited"
    h.clock.advance(refused["retry_after"])
    assert code((await h.request(peer, PasswordChange(old=GOOD_PASSWORD, new=new)))[0]) == "ok"
    assert not peer.closed


async def test_a_password_change_ends_the_other_sessions_and_their_tokens(h: Harness) -> None:
    alice = h.store.add_user("alice")
    a = await h.log_in("alice", "laptop")
    b = await h.log_in("alice", "phone")
    c = await h.log_in("alice", "tablet")
    await h.lose(c)  # detached: resumable with its token until now
    assert a.session is not None and b.session is not None and c.session is not None
    mine, phone, tablet = a.session.session_id, b.session.session_id, c.session.session_id
    frames = await h.request(a, PasswordChange(old=GOOD_PASSWORD, new="new password, long", rid=9))
    assert frames == [{"op": "ok", "rid": 9}]
    assert h.store.called("change_password") == [(alice.id, mine)]
    assert h.store.kicked == [([(alice.id, phone), (alice.id, tablet)], "password_changed")]
    for sid in (phone, tablet):
        row = h.store.sessions[sid]
        assert (row.state, row.reason, row.token_hash) == ("closed", "password_changed", None)
    assert h.store.sessions[mine].state == "active"
    assert h.store.sessions[mine].token_hash is not None
    assert await h.request(a, Ping(rid=1)) == [{"op": "pong", "rid": 1}]


async def test_a_login_checked_before_a_password_change_opens_no_session(h: Harness) -> None:
    """The change commits between this login's check and its session: the session
    is refused (the change ended every other session; this one must not outlive it)."""
    alice = h.store.add_user("alice")
    verify = h.passwords.verify

    async def verify_then_change(password_hash: str | None, password: str) -> bool:
        ok = await verify(password_hash, password)
        h.store.users["alice"] = dataclasses.replace(alice, password_hash="hash:changed!")
        return ok

    h.passwords.verify = verify_then_change  # type: ignore[method-assign]
    peer = h.connect(VICTIM)
    assert code(await hello(h, peer, "alice", GOOD_PASSWORD)) == "auth_failed"
    assert not [row for row in h.store.sessions.values() if row.user_id == alice.id]


# ---- registrations ----------------------------------------------------------------------


async def test_registrations_are_limited_per_address(h: Harness) -> None:
    limit = h.settings.max_registers_per_addr
    peer = h.connect(ATTACKER)
    answers = [
        code((await h.request(peer, Register(user=f"spam{i:03}", password=GOOD_PASSWORD)))[0])
        for i in range(limit + 1)
    ]
    assert answers == ["registered"] * limit + ["rate_limited"]
    refused = (await h.request(peer, Register(user="spam999", password=GOOD_PASSWORD)))[0]
    assert refused["retry_after"] == int(h.settings.register_window_s)
    assert "spam999" not in h.store.users
    frames = await h.request(h.connect(VICTIM), Register(user="carol", password=GOOD_PASSWORD))
    assert code(frames[0]) == "registered"
    # A shared address (HAProxy's, until the PROXY protocol) has no budget.
    shared = h.connect("127.0.0.1:40000")
    for i in range(limit + 5):
        frames = await h.request(shared, Register(user=f"many{i:03}", password=GOOD_PASSWORD))
        assert code(frames[0]) == "registered"


# ---- failures of ours are not the client's ----------------------------------------------


@pytest.mark.parametrize("failing", ["find_user", "count_budget"])
async def test_internal_errors_of_hello_never_count_as_failed_logins(
    h: Harness, failing: str
) -> None:
    """A database that fails mid-login (after the attempt was counted) answers
    `internal`, and takes the attempt back from the pair and the address."""
    h.store.add_user("bob")
    h.store.failing[failing] = ConnectionResetError("the primary went away")
    budget = h.settings.max_login_failures_per_addr
    for _ in range(budget + 5):
        assert code(await hello(h, h.connect(VICTIM), "bob", GOOD_PASSWORD)) == "internal"
    assert h.store.throttle["login|bob|198.51.100.20"].attempts == 0
    if failing == "find_user":
        assert h.store.throttle["login-addr|198.51.100.20"].attempts == 0
    del h.store.failing[failing]
    assert code(await hello(h, h.connect(VICTIM), "bob", GOOD_PASSWORD)) == "welcome"
    # Every free failure is still there.
    peer = h.connect(VICTIM)
    free = h.settings.login_free_failures
    answers = [code(await hello(h, peer, "bob", WRONG)) for _ in range(free + 1)]
    assert answers == ["auth_failed"] * free + ["rate_limited"]


async def test_a_right_password_logs_in_even_if_its_counter_cannot_be_cleared(
    h: Harness,
) -> None:
    h.store.add_user("bob")
    h.store.failing["forget"] = ConnectionResetError("the primary went away")
    assert code(await hello(h, h.connect(VICTIM), "bob", GOOD_PASSWORD)) == "welcome"


async def test_registrations_that_fail_on_our_side_give_the_address_its_attempt_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch, max_registers_per_addr=2)
    peer = h.connect(ATTACKER)
    h.store.failing["create_user"] = ConnectionResetError("the primary went away")
    for i in range(5):
        frames = await h.request(peer, Register(user=f"new{i}", password=GOOD_PASSWORD))
        assert code(frames[0]) == "internal"
    del h.store.failing["create_user"]
    answers = [
        code((await h.request(peer, Register(user=f"new{i}", password=GOOD_PASSWORD)))[0])
        for i in range(3)
    ]
    assert answers == ["registered", "registered", "rate_limited"]


async def test_a_register_whose_commit_took_effect_despite_an_error_is_registered(
    h: Harness,
) -> None:
    """The commit reached the database but its answer was lost: the account is
    found by its (salted, so unique) hash and the client told `registered`, not
    `internal` (after which its retry would have met `user_exists`)."""
    h.store.lost_commit = ConnectionResetError("cut while committing")
    frames = await h.request(h.connect(VICTIM), Register(user="dora", password=GOOD_PASSWORD))
    assert code(frames[0]) == "registered"
    h.store.lost_commit = None
    assert code(await hello(h, h.connect(VICTIM), "dora", GOOD_PASSWORD)) == "welcome"
    # Without the account, the error stands: `internal`, and the name stays free.
    h.store.failing["create_user"] = ConnectionResetError("cut before committing")
    frames = await h.request(h.connect(VICTIM), Register(user="erin", password=GOOD_PASSWORD))
    assert code(frames[0]) == "internal" and "erin" not in h.store.users
