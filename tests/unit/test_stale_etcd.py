"""`up` after the state dir was removed by hand: etcd's data (on tmpfs, apart from the
state dir) would hold the old cluster's initialize key with no database behind it,
and every Patroni node would wait for ever for a leader to bootstrap."""

from __future__ import annotations

import os
from pathlib import Path

from app.cluster.launcher import LocalCluster
from app.cluster.process import RunAs
from app.settings import Settings


def _cluster(tmp_path: Path) -> LocalCluster:
    settings = Settings(state_dir=tmp_path / "state", etcd_tmpfs_dir=tmp_path / "shm")
    return LocalCluster(settings)


def _prepare(cluster: LocalCluster) -> None:
    cluster._prepare(RunAs(None, os.getuid(), os.getgid(), str(Path.home())))


def test_etcd_data_without_a_database_is_removed(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    stale = cluster.layout.etcd_data_of("etcd") / "member" / "wal"
    stale.mkdir(parents=True)
    _prepare(cluster)
    assert not stale.exists()
    assert cluster.layout.etcd_data_of("etcd").is_dir()  # made again, empty


def test_etcd_data_of_a_cluster_with_its_database_is_kept(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    kept = cluster.layout.etcd_data_of("etcd") / "member" / "wal"
    kept.mkdir(parents=True)
    node = cluster.settings.node_names()[0]
    cluster.layout.node_data(node).mkdir(parents=True)
    (cluster.layout.node_data(node) / "PG_VERSION").write_text("15\n")
    _prepare(cluster)
    assert kept.is_dir()
