"""`switchboard up --capacity N` (app/cluster/capacity.py) and the worker's session limit
(app/worker/capacity.py)."""

from __future__ import annotations

import math

import pytest

from app.cluster import capacity, haproxy
from app.cluster.capacity import CapacityError, Machine, plan
from app.protocol import ErrorCode
from app.settings import Settings, SettingsError
from app.worker.capacity import SessionCap
from app.worker.errors import RequestError
from app.worker.registry import Registry

BOX = Machine(cores=2, memory_available=24 * 2**30, open_files=20_000)


@pytest.mark.parametrize("sessions", [1, 1_000, 20_000, 100_000, 200_000])
def test_a_plan_holds_its_sessions_even_after_a_worker_dies(sessions: int) -> None:
    chosen = plan(sessions, BOX, Settings())
    assert chosen.haproxy_processes * haproxy.MAXCONN >= sessions
    assert chosen.haproxy_processes * capacity.CLIENTS_PER_HAPROXY >= sessions
    # The survivors of one worker's death hold every session within their limit ...
    assert (chosen.workers - 1) * chosen.worker_max_sessions >= sessions
    # ... which a worker's open-files limit allows.
    assert chosen.worker_max_sessions <= BOX.open_files - capacity.WORKER_SPARE_FDS
    assert chosen.workers >= Settings().workers
    assert chosen.memory_needed <= BOX.memory_available
    Settings().replace(**chosen.overrides())  # valid settings


def test_the_figures_of_100k_and_200k() -> None:
    at_100k = plan(100_000, BOX, Settings())
    assert (at_100k.workers, at_100k.worker_max_sessions) == (9, 12_500)
    assert at_100k.haproxy_processes == math.ceil(100_000 / capacity.CLIENTS_PER_HAPROXY)
    at_200k = plan(200_000, BOX, Settings())
    assert (at_200k.workers, at_200k.worker_max_sessions) == (17, 12_500)
    text = at_200k.explain()
    assert text.startswith("capacity 200,000 sessions: 17 workers")
    assert "memory, estimated" in text and "per-address caps" in text


def test_many_workers_share_the_database_connections() -> None:
    chosen = plan(300_000, BOX, Settings())
    per_worker = chosen.db_pool_max + Settings().batch_writers
    per_worker += capacity.WORKER_EXTRA_DB_CONNECTIONS
    assert chosen.workers * per_worker <= capacity.DB_CONNECTIONS_FOR_WORKERS
    assert any(line.startswith("db_pool_max") for line in chosen.reasons)


def test_a_plan_the_machine_cannot_hold_is_refused() -> None:
    small = Machine(cores=2, memory_available=2 * 2**30, open_files=20_000)
    with pytest.raises(CapacityError, match="need about"):
        plan(200_000, small, Settings())
    with pytest.raises(CapacityError):
        plan(0, BOX, Settings())


def test_a_low_open_files_limit_means_more_workers() -> None:
    tight = Machine(cores=2, memory_available=24 * 2**30, open_files=4_096)
    chosen = plan(20_000, tight, Settings())
    assert chosen.worker_max_sessions <= 4_096 - capacity.WORKER_SPARE_FDS
    assert (chosen.workers - 1) * chosen.worker_max_sessions >= 20_000


def test_worker_max_sessions_is_not_negative() -> None:
    with pytest.raises(SettingsError):
        Settings(worker_max_sessions=-1)


class _Peer:
    def __init__(self, user_id: int) -> None:
        from app.worker.states import Session

        self.session = Session(
            session_id=user_id, user_id=user_id, username=f"u{user_id}", device="d", epoch=1
        )


async def _nobody(_: object) -> dict[int, str]:
    return {}


def _registry() -> Registry:
    async def no_id(_: str) -> int:
        return 0

    return Registry(no_id, _nobody)


def test_a_full_worker_refuses_new_logins_with_overloaded() -> None:
    registry = _registry()
    cap = SessionCap(Settings(worker_max_sessions=2), registry)
    peers = [_Peer(1), _Peer(2)]
    cap.admit_login()
    registry.attach(peers[0])  # type: ignore[arg-type]
    registry.attach(peers[0])  # twice: still one session
    assert (registry.sessions, cap.headroom()) == (1, 1)
    registry.attach(peers[1])  # type: ignore[arg-type]
    with pytest.raises(RequestError) as refused:
        cap.admit_login()
    assert refused.value.code is ErrorCode.OVERLOADED and refused.value.extra["retry_after"]
    assert (cap.refused, cap.headroom()) == (1, 0)
    registry.detach(peers[1])  # type: ignore[arg-type]
    registry.detach(peers[1])  # type: ignore[arg-type]
    assert registry.sessions == 1
    cap.admit_login()


def test_no_limit_by_default() -> None:
    registry = _registry()
    cap = SessionCap(Settings(), registry)
    registry.attach(_Peer(1))  # type: ignore[arg-type]
    cap.admit_login()
    assert cap.headroom() is None
