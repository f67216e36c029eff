"""Admission control: logins, registrations and resumes each wait in a queue of their own."""

from __future__ import annotations

import asyncio

import pytest

from app.protocol import Hello, Register, Resume
from app.settings import Settings
from app.worker.admission import Admission, Work
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
    assert admission.overloaded_by_work[flooded] == 1
    async with admission.slot(Work.RESUME):
        pass
    other = Work.LOGIN if flooded is Work.REGISTER else Work.REGISTER
    async with admission.slot(other):
        pass
    assert admission.overloaded == 1
    release.set()
    await asyncio.gather(*holders)


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
