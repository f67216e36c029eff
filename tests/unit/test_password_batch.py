"""Password logins in group commits: what the batch refuses and in what order it opens
(logins.plan), and hellos through a real `Batcher` over the fake store: concurrent
logins share one batch, a batch that fails is not the client's failure.

The statements themselves run against the real database in
tests/integration/test_password_logins.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.protocol import Hello
from app.store.logins import LockedUser, LoggedIn, LoginRefused, PasswordLogin, Refusal, plan
from app.worker.writer import Batcher
from tests.unit.worker_fakes import GOOD_PASSWORD, Harness


def login(user_id: int, device: str = "d", password_hash: str = "h1") -> PasswordLogin:
    return PasswordLogin(user_id, device, password_hash, b"dt", b"rt", "addr", "pair", None)


# ---- logins.plan -------------------------------------------------------------------


def test_the_locked_rows_refuse_disabled_missing_and_changed_accounts() -> None:
    users = {1: LockedUser(False, "h1"), 2: LockedUser(True, "h1"), 3: LockedUser(False, "h2")}
    refused, rounds = plan([login(1), login(2), login(3), login(4)], users)
    assert [r.why if r else None for r in refused] == [
        None,
        Refusal.DISABLED,
        Refusal.PASSWORD_CHANGED,  # argon2 verified h1; the account's hash is h2 now
        Refusal.DISABLED,  # no such row (as open_session had it)
    ]
    assert rounds == [[0]]


def test_different_users_share_one_round_in_arrival_order() -> None:
    users = {u: LockedUser(False, "h1") for u in (5, 3, 9)}
    refused, rounds = plan([login(5), login(3), login(9)], users)
    assert refused == [None, None, None]
    assert rounds == [[0, 1, 2]]


def test_a_users_later_logins_go_in_later_rounds() -> None:
    """At most one login per user per statement: the device cap counts the earlier
    ones, and the same device twice is opened twice in order (the later wins)."""
    users = {1: LockedUser(False, "h1"), 2: LockedUser(False, "h1")}
    batch = [login(1, "a"), login(2), login(1, "a"), login(1, "b"), login(2)]
    refused, rounds = plan(batch, users)
    assert refused == [None] * 5
    assert rounds == [[0, 1], [2, 4], [3]]


# ---- hellos through a real batcher ---------------------------------------------------


class _Pool:
    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[object]:
        yield object()


@contextlib.asynccontextmanager
async def batched(h: Harness, budget_s: float = 5.0) -> AsyncIterator[list[int]]:
    """Send the harness's password logins through a started Batcher over the fake
    store; yields the sizes of the batches it ran."""
    sizes: list[int] = []

    async def run(conn: Any, items: list[PasswordLogin]) -> tuple[list[Any], None]:
        sizes.append(len(items))
        return await h.store.password_batch(items, h.settings.max_devices_per_user), None

    batcher: Batcher[PasswordLogin, LoggedIn | LoginRefused] = Batcher(
        _Pool(),  # type: ignore[arg-type]
        run,
        name="password_logins",
        batch_max=64,
        retry_budget_s=budget_s,
    )
    batcher.start()
    h.commits.log_in_by_password = batcher.submit  # type: ignore[method-assign]
    try:
        yield sizes
    finally:
        await batcher.stop()


@pytest.fixture
def h(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch)


async def test_concurrent_hellos_share_one_batch(h: Harness) -> None:
    names = [f"u{i}" for i in range(6)]
    for name in names:
        h.store.add_user(name)
    async with batched(h) as sizes:
        peers = [h.connect(f"198.51.100.{i}:4000") for i in range(len(names))]
        replies = await asyncio.gather(
            *(
                h.request(p, Hello(user=n, password=GOOD_PASSWORD, device="d"))
                for p, n in zip(peers, names, strict=True)
            )
        )
    assert [r[0]["op"] for r in replies] == ["welcome"] * len(names)
    assert sizes == [len(names)]
    # Every pair forgotten and every address given its attempt back, by the batch.
    assert all(row.attempts == 0 for row in h.store.throttle.values())
    assert not any(k.startswith("login|") for k in h.store.throttle)


async def test_each_login_of_a_batch_gets_its_own_refusal(h: Harness) -> None:
    h.store.add_user("ok")
    h.store.add_user("off", disabled=True)
    h.store.add_user("full")
    full_id = h.store.users["full"].id
    for i in range(h.settings.max_devices_per_user):
        await h.log_in("full", device=f"other{i}")
    async with batched(h) as sizes:
        frames = await asyncio.gather(
            *(
                h.request(h.connect(), Hello(user=u, password=GOOD_PASSWORD, device="d"))
                for u in ("ok", "off", "full")
            )
        )
    assert [f[0].get("code", f[0]["op"]) for f in frames] == [
        "welcome",
        "account_disabled",  # refused before the batch: find_user read it disabled
        "too_many_devices",
    ]
    assert sizes == [2]
    assert not any(r.user_id == full_id and r.device == "d" for r in h.store.sessions.values())


async def test_a_batch_the_database_never_took_is_not_the_clients_failure(h: Harness) -> None:
    h.store.add_user("alice")
    h.store.failing["password_batch"] = ConnectionResetError("the primary went away")
    async with batched(h, budget_s=0.01):
        frames = await h.request(
            h.connect("203.0.113.5:5555"), Hello(user="alice", password=GOOD_PASSWORD, device="d")
        )
    assert frames[0]["code"] == "internal"
    # Counted before the check, taken back after the batch failed (password_void).
    assert {k: r.attempts for k, r in h.store.throttle.items()} == {
        "login|alice|203.0.113.5": 0,
        "login-addr|203.0.113.5": 0,
    }
    assert h.store.sessions == {}
