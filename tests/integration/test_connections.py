"""20,000 logged-in sessions from several generator processes and source addresses,
then kill -9 of the worker holding the most: every session it held resumes with its
resume token elsewhere, and PostgreSQL keeps no session on the dead worker.

bench/connections.py's run at a smaller size, on a cluster of its own sized by
`switchboard up --capacity 20000` (app/cluster/capacity.py). The sessions log in with
device tokens (`login_token`) made in the database, which keeps the set-up within
the test's time on 2 cores (20,000 password logins take ~2 minutes here); what is
tested is the resume storm. The generator processes (bench/_sessions.py) are
stopped, and killed if they do not stop, whatever happens; they also die with this
process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse

import pytest

from app.cluster.capacity import Machine, plan
from bench._sessions import cluster_overrides
from bench.connections import Cluster, report, run
from tests.cluster_fixture import cluster_processes, make_settings, running_cluster

SESSIONS = 20_000

pytestmark = pytest.mark.integration


@pytest.mark.timeout(290)
def test_every_session_of_a_killed_worker_resumes_with_its_token() -> None:
    # Not supervised: the killed worker stays dead, so "no session left on it" means
    # every one moved (with supervision it comes back in ~1 s and takes its share of
    # the storm; tests/chaos/test_supervision.py covers that).
    base = make_settings(**cluster_overrides(), supervise=False)
    chosen = plan(SESSIONS, Machine.this(), base)
    settings = base.replace(**chosen.overrides())
    assert settings.haproxy_processes >= 3 and settings.worker_max_sessions
    args = argparse.Namespace(
        sessions=SESSIONS,
        procs=3,
        setup="sql",
        login="token",
        inflight=200,
        login_timeout=150.0,
        resume_timeout=60.0,
        generator_nice=0,
    )
    try:
        with running_cluster(settings) as cluster:
            result = run(args, Cluster(settings, cluster.layout.root))
            print(report(result))
    finally:
        assert cluster_processes(settings) == []

    assert result.logins == SESSIONS
    assert len(result.rows_before) == settings.workers
    assert result.victim_sessions >= SESSIONS // settings.workers - 500
    # Every session of the dead worker came back with its resume token ...
    assert result.fallback_logins == 0
    assert result.resumes >= result.victim_sessions
    assert result.unresumed == 0
    # ... and none of their rows is left on it.
    assert result.victim not in result.rows_after
    assert sum(active for active, _ in result.rows_after.values()) == SESSIONS
