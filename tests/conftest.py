from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from app.cluster.launcher import LocalCluster
from tests.cluster_fixture import make_settings, running_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """One real cluster for the whole run: etcd, 3 Patroni nodes, HAProxy, 3 workers."""
    with running_cluster(make_settings(workers=3)) as c:
        yield c


@pytest_asyncio.fixture(scope="session", loop_scope="session", autouse=True)
async def no_task_outlives_the_run() -> AsyncIterator[None]:
    """At the end of the run, every task a test left on the session's loop is cancelled
    and must end within a few seconds; one that does not is named, so a test that
    leaks a task which ignores cancellation fails loudly instead of hanging the run."""
    yield
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for task in left:
        task.cancel()
    if left:
        _, stuck = await asyncio.wait(left, timeout=10)
        if stuck:
            names = "; ".join(f"{t.get_name()}: {t.get_coro()!r}" for t in stuck)
            # Printed at once: the loop's own teardown would then wait for them forever.
            print(f"\ntasks ignored cancellation: {names}", file=sys.__stderr__, flush=True)
            for task in stuck:
                task.print_stack(file=sys.__stderr__)
            pytest.fail(f"tasks ignored cancellation at the end of the run: {names}")
