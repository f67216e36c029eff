from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.cluster.launcher import LocalCluster
from tests.cluster_fixture import make_settings, running_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """One real cluster for the whole run: etcd, 3 Patroni nodes, HAProxy, 3 workers."""
    with running_cluster(make_settings(workers=3)) as c:
        yield c
