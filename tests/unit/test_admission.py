"""Admission control: each kind of login work waits in a queue of its own, up to a
deadline; password work is shed first when the event loop lags; retry_after follows
the queue and grows under sustained refusals."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from app.protocol import Hello, Register, Resume
from app.settings import Settings
from app.worker import metrics
from app.worker.admission import (
    ARGON2_WORK,
    CALM_S,
    MAX_LEVEL,
    STEP_S,
    Admission,
    Shed,
    Work,
)
from app.worker.errors import RequestError
from tests.unit.worker_fakes import GOOD_PASSWORD, Harness


async def hold(admission: Admission, work: Work, release: asyncio.Event) -> None:
    async with admission.slot(work):
        await release.wait()


@pytest.mark.parametrize("flooded", [Work.REGISTER, Work.LOGIN])
async def test_a_full_queue_of_one_kind_never_overloads_a_resume(flooded: Work) -> None:
    settings = Settings(
        max_concurrent_auth=1, max_auth_queue=2, max_concurrent_registers=1, max_register_queue=2
    )
    admission = Admission(settings)
    release = asyncio.Event()
    holders = [asyncio.create_task(hold(admission, flooded, release)) for _ in range(3)]
    await asyncio.sleep(0)
    assert admission.waiting(flooded) == 2
    with pytest.raises(RequestError) as refused:
        async with admission.slot(flooded):
            pass
    assert refused.value.code == "overloaded"
    assert admission.shed_of(flooded) == 1
    async with admission.slot(Work.RESUME):
        pass
    other = Work.LOGIN if flooded is Work.REGISTER else Work.REGISTER
    async with admission.slot(other):
        pass
    assert admission.overloaded == 1
    release.set()
    await asyncio.gather(*holders)


async def test_retry_after_grows_at_most_four_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sustained refusals double the ceiling at most MAX_LEVEL times: clients told to
    come back much later than a slot frees leave the queue dry."""
    now = 0.0
    admission = Admission(
        Settings(max_concurrent_auth=1, max_auth_queue=0, admission_retry_max_s=1000.0),
        clock=lambda: now,
    )
    monkeypatch.setattr("app.worker.admission.random.uniform", lambda low, high: high)
    ceilings = []
    for _ in range(6):
        ceilings.append(admission.retry_after(Work.LOGIN))
        now += STEP_S
    base = ceilings[0]
    assert ceilings == [base, 2 * base, 4 * base, 4 * base, 4 * base, 4 * base]
    assert MAX_LEVEL == 2


async def test_resume_is_not_overloaded_by_a_register_flood_on_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch, max_concurrent_registers=1, max_register_queue=4)
    gate = asyncio.Event()
    real_hash = h.passwords.hash

    async def slow_hash(password: str) -> str:
        await gate.wait()
        return await real_hash(password)

    h.passwords.hash = slow_hash  # type: ignore[method-assign]
    flood = [
        asyncio.create_task(
            h.request(h.connect(), Register(user=f"flood{i:03}", password=GOOD_PASSWORD))
        )
        for i in range(20)
    ]
    await asyncio.sleep(0.01)
    overloaded = [t.result()[0]["code"] for t in flood if t.done()]
    assert overloaded == ["overloaded"] * 15  # 1 hashing, 4 waiting
    h.store.add_user("alice")
    h.commits.resumed = None
    resume = Resume(user="alice", device="d", token="t" * 16, last_seq=0)
    answer = await h.request(h.connect(), resume)
    assert answer[0]["code"] == "bad_token"  # answered, not shed
    login = await h.request(h.connect(), Hello(user="alice", password=GOOD_PASSWORD, device="d"))
    assert login[0]["op"] == "welcome"
    gate.set()
    done = await asyncio.gather(*flood)
    assert sum(f[0]["op"] == "registered" for f in done) == 5


# ---- queue, don't bounce ----------------------------------------------------------


def tight(**changes: Any) -> Settings:
    """One slot per password kind, short waits."""
    base: dict[str, Any] = {
        "max_concurrent_auth": 1,
        "max_auth_queue": 4,
        "max_concurrent_registers": 1,
        "max_register_queue": 4,
        "admission_wait_s": 5.0,
    }
    return Settings(**(base | changes))


async def test_a_request_waits_its_turn_instead_of_being_bounced() -> None:
    admission = Admission(tight())
    release = asyncio.Event()
    holder = asyncio.create_task(hold(admission, Work.LOGIN, release))
    await asyncio.sleep(0)
    order: list[int] = []

    async def queued(n: int) -> None:
        async with admission.slot(Work.LOGIN):
            order.append(n)

    waiters = [asyncio.create_task(queued(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    assert admission.waiting(Work.LOGIN) == 3 and order == []
    release.set()
    await asyncio.gather(holder, *waiters)
    assert order == [0, 1, 2]  # first come, first served
    assert admission.overloaded == 0
    assert admission.running(Work.LOGIN) == 0


async def test_past_the_deadline_a_waiter_is_told_overloaded() -> None:
    admission = Admission(tight(admission_wait_s=0.05))
    release = asyncio.Event()
    holder = asyncio.create_task(hold(admission, Work.REGISTER, release))
    await asyncio.sleep(0)
    with pytest.raises(RequestError) as refused:
        async with admission.slot(Work.REGISTER):
            pass
    assert refused.value.code == "overloaded"
    assert admission.shed[Work.REGISTER, Shed.DEADLINE] == 1
    assert admission.waiting(Work.REGISTER) == 0
    release.set()
    await holder
    async with admission.slot(Work.REGISTER):  # the slot it never got is free
        assert admission.running(Work.REGISTER) == 1


async def test_a_waiter_that_goes_away_leaves_the_queue_and_its_slot() -> None:
    admission = Admission(tight())
    release = asyncio.Event()
    holder = asyncio.create_task(hold(admission, Work.LOGIN, release))
    await asyncio.sleep(0)
    gone = asyncio.create_task(hold(admission, Work.LOGIN, asyncio.Event()))
    await asyncio.sleep(0)
    assert admission.waiting(Work.LOGIN) == 1
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert admission.waiting(Work.LOGIN) == 0
    # Granted and cancelled in the same breath: the slot goes to the next in line.
    granted_then_gone = asyncio.create_task(hold(admission, Work.LOGIN, asyncio.Event()))
    next_one = asyncio.create_task(hold(admission, Work.LOGIN, release))
    await asyncio.sleep(0)
    release.set()
    await asyncio.sleep(0)
    granted_then_gone.cancel()
    await asyncio.gather(holder, granted_then_gone, next_one, return_exceptions=True)
    assert admission.running(Work.LOGIN) == 0 and admission.waiting(Work.LOGIN) == 0


# ---- shedding by priority ----------------------------------------------------------


async def test_a_lagging_loop_sheds_password_work_first() -> None:
    lag = 0.0
    admission = Admission(
        # A slot is held FIRST_HOLD_S (50 ms) until measured: one more in line would
        # wait 100 ms, past this admission_wait_s.
        tight(
            max_concurrent_auth=4,
            max_concurrent_resumes=4,
            admission_shed_lag_s=1.0,
            admission_wait_s=0.08,
        ),
        loop_lag_s=lambda: lag,
    )
    lag = 2.0
    release = asyncio.Event()
    first = asyncio.create_task(hold(admission, Work.LOGIN, release))
    await asyncio.sleep(0)
    assert admission.running(Work.LOGIN) == 1  # one hash at a time, not 4
    second = asyncio.create_task(hold(admission, Work.REGISTER, release))  # none runs: it does
    await asyncio.sleep(0)
    # One more of each waits (50 ms to go) ...
    queued = [asyncio.create_task(hold(admission, w, release)) for w in ARGON2_WORK]
    await asyncio.sleep(0)
    for work in ARGON2_WORK:
        assert (admission.running(work), admission.waiting(work)) == (1, 1)
        with pytest.raises(RequestError) as refused:  # ... the next would wait in vain
            async with admission.slot(work):
                pass
        assert admission.shed[work, Shed.LAGGING] == 1
        assert refused.value.extra["retry_after"] >= 0.5
    # Resumes and token logins are admitted as usual, several at once.
    cheap = [asyncio.create_task(hold(admission, w, release)) for w in [Work.RESUME] * 3]
    cheap.append(asyncio.create_task(hold(admission, Work.TOKEN, release)))
    await asyncio.sleep(0)
    assert admission.running(Work.RESUME) == 3 and admission.running(Work.TOKEN) == 1
    assert admission.shed_counts() == {"resume": 0, "token": 0, "login": 1, "register": 1}
    await asyncio.sleep(0.1)  # the queued ones' deadline passes behind `first` and `second`
    release.set()
    await asyncio.gather(first, second, *cheap)
    for task in queued:  # they waited admission_wait_s in vain
        with pytest.raises(RequestError):
            await task
    lag = 0.0
    logins = [asyncio.create_task(hold(admission, Work.LOGIN, asyncio.Event())) for _ in range(4)]
    await asyncio.sleep(0)
    assert admission.running(Work.LOGIN) == 4  # back to its slots once the lag is gone
    for task in logins:
        task.cancel()
    await asyncio.gather(*logins, return_exceptions=True)


# ---- retry_after ------------------------------------------------------------------------


async def test_retry_after_follows_the_queue_grows_under_sustained_refusals_and_is_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = 100.0
    admission = Admission(
        tight(max_auth_queue=2, admission_retry_min_s=0.5, admission_retry_max_s=30.0),
        clock=lambda: now,
    )
    monkeypatch.setattr("app.worker.admission.random.uniform", lambda a, b: b)  # the ceiling
    # Measure a slot held 2 s (the moving average starts at FIRST_HOLD_S).
    for _ in range(40):
        async with admission.slot(Work.LOGIN):
            now += 2.0
    release = asyncio.Event()
    holders = [asyncio.create_task(hold(admission, Work.LOGIN, release)) for _ in range(3)]
    await asyncio.sleep(0)
    assert admission.waiting(Work.LOGIN) == 2

    async def refused() -> float:
        with pytest.raises(RequestError) as info:
            async with admission.slot(Work.LOGIN):
                pass
        return float(info.value.extra["retry_after"])

    # Two waiting ahead, one slot held ~2 s each: a slot in ~6 s, drawn from 0.5..12 s.
    assert await refused() == pytest.approx(12.0, abs=0.2)
    assert await refused() == pytest.approx(12.0, abs=0.2)  # within the same second: no doubling
    now += STEP_S
    assert await refused() == pytest.approx(24.0, abs=0.4)  # refusals go on: doubled
    now += STEP_S
    assert await refused() == 30.0  # capped at admission_retry_max_s (48 s otherwise)
    now += CALM_S
    assert await refused() == pytest.approx(12.0, abs=0.2)  # calm again: from the start
    release.set()
    await asyncio.gather(*holders)


async def test_retry_after_is_jittered_between_the_minimum_and_the_ceiling() -> None:
    admission = Admission(tight(admission_retry_min_s=0.5, admission_retry_max_s=30.0))
    waits = {admission.retry_after(Work.RESUME) for _ in range(200)}
    assert len(waits) > 20  # an idle queue: uniform in 0.5..1 s
    assert all(0.5 <= w <= 1.0 for w in waits)


async def test_a_client_answered_overloaded_is_told_to_wait_not_timed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refusal moves its login deadline (timeouts.py) past the retry_after it got."""
    h = Harness(monkeypatch, max_concurrent_registers=1, max_register_queue=1)
    release = asyncio.Event()
    holders = [asyncio.create_task(hold(h.admission, Work.REGISTER, release)) for _ in range(2)]
    await asyncio.sleep(0)
    peer = h.connect()
    before = time.monotonic()
    refused = await h.request(peer, Register(user="dave", password=GOOD_PASSWORD))
    assert refused[0]["code"] == "overloaded"
    assert peer.login_wait_until >= before + refused[0]["retry_after"]
    release.set()
    await asyncio.gather(*holders)


async def test_health_and_metrics_show_queues_and_sheds(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, max_concurrent_registers=1, max_register_queue=1)
    release = asyncio.Event()
    holders = [asyncio.create_task(hold(h.admission, Work.REGISTER, release)) for _ in range(2)]
    await asyncio.sleep(0)
    refused = await h.request(h.connect(), Register(user="carol", password=GOOD_PASSWORD))
    assert refused[0]["code"] == "overloaded"
    assert h.admission.queues() == {"resume": 0, "token": 0, "login": 0, "register": 1}
    assert h.admission.shed_counts()["register"] == 1
    report = {"state": "serving", "queues": h.admission.queues()}
    metrics.attach(lambda: report, None)  # type: ignore[arg-type]
    text = metrics.render()[0].decode()
    assert 'switchboard_admission_waiting{work="register"} 1.0' in text
    assert 'switchboard_admission_shed_total{reason="queue_full",work="register"}' in text
    release.set()
    await asyncio.gather(*holders)
