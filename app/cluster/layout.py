"""Where a local cluster keeps its files inside the state directory."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from app.secrets import SECRET_NAMES, secrets_file
from app.settings import Settings


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path
    etcd_data: Path

    @classmethod
    def for_settings(cls, settings: Settings) -> Layout:
        root = settings.state_dir.resolve()
        # etcd's data lives on tmpfs; a hash of the state dir keeps clusters apart.
        digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
        return cls(root=root, etcd_data=settings.etcd_tmpfs_dir / f"switchboard-etcd-{digest}")

    def etcd_data_of(self, member: str) -> Path:
        """An etcd member's data dir: etcd_data itself for the one member of one host."""
        return self.etcd_data if member == "etcd" else self.etcd_data / member

    def keepalived_cfg(self, name: str) -> Path:
        return self.root / f"{name}.conf"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def secrets_file(self) -> Path:
        return secrets_file(self.root)

    @property
    def haproxy_cfg(self) -> Path:
        return self.root / "haproxy.cfg"

    def haproxy_cfg_of(self, name: str) -> Path:
        """The config of HAProxy process ``name``: haproxy.cfg, haproxy2.cfg, ..."""
        return self.root / f"{name}.cfg"

    @property
    def haproxy_socket(self) -> Path:
        return self.run / "haproxy.sock"

    def haproxy_socket_of(self, name: str) -> Path:
        """The runtime API socket of HAProxy process ``name`` (haproxy, haproxy2, ...)."""
        return self.run / f"{name}.sock"

    def haproxy_sockets(self) -> list[Path]:
        """The runtime API sockets of the running HAProxy processes, the first one first."""
        return sorted(self.run.glob("haproxy*.sock"), key=lambda p: (len(p.name), p.name))

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def haproxy_pem(self) -> Path:
        """The certificate chain and key HAProxy serves (app/cluster/tls.py writes it)."""
        return self.tls_dir / "haproxy.pem"

    def node_dir(self, node: str) -> Path:
        return self.root / "db" / node

    def node_data(self, node: str) -> Path:
        return self.node_dir(node) / "data"

    def patroni_cfg(self, node: str) -> Path:
        return self.node_dir(node) / "patroni.yml"

    def pidfile(self, component: str) -> Path:
        return self.run / f"{component}.pid"

    def logfile(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    # The supervisor's files (app/cluster/runstate.py says what each holds).
    @property
    def cluster_file(self) -> Path:
        return self.run / "cluster.json"

    @property
    def restarts_file(self) -> Path:
        return self.run / "restarts.json"

    @property
    def supervisor_lock(self) -> Path:
        return self.run / "supervisor.lock"

    def hold_file(self, component: str) -> Path:
        return self.run / f"{component}.hold"

    def ensure(self) -> None:
        for path in (self.root, self.run, self.logs, self.root / "db"):
            path.mkdir(parents=True, exist_ok=True)
            # The unprivileged DB user must traverse into its node directories.
            path.chmod(0o755 if path != self.run else 0o700)


def load_or_create_secrets(layout: Layout) -> dict[str, str]:
    """Generated passwords, kept in the state dir with mode 0600."""
    path = layout.secrets_file
    existing: dict[str, str] = {}
    if path.exists():
        existing = json.loads(path.read_text())
    missing = [name for name in SECRET_NAMES if name not in existing]
    if missing:
        existing.update({name: secrets.token_urlsafe(24) for name in missing})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(existing, fh, indent=2)
    path.chmod(0o600)
    return existing
