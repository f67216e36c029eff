"""Control planes without a cluster (docs/security.md, "Control planes"): derived keys,
the worker admin endpoint, Patroni's and etcd's rendered configs (local and compose),
and the reporting gate's file.
"""

from __future__ import annotations

import hmac
import json
import socket
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest

from app.cluster import etcd, patroni, reporting_gate
from app.cluster.layout import Layout, load_or_create_secrets
from app.secrets import (
    PATRONI_REST_USER,
    SECRET_NAMES,
    derive_key,
    read_secrets,
    worker_admin_token,
)
from app.settings import Settings
from app.store.social import push_key
from app.worker import health
from app.worker.drain import Drain
from app.worker.edge import bind_early
from app.worker.registry import Registry
from app.worker.states import WorkerState
from tests.compose_images import compose_image_module
from tests.unit.worker_fakes import NO_POOL, WORKER_ID, FakeEvents, FakeStore, status_in

ROOT = Path(__file__).resolve().parents[2]


def fresh(tmp_path: Path, **overrides: Any) -> tuple[Settings, Layout, dict[str, str]]:
    settings = Settings(state_dir=tmp_path / "state", **overrides)
    layout = Layout.for_settings(settings)
    layout.ensure()
    return settings, layout, load_or_create_secrets(layout)


# ---- secrets and derived keys ------------------------------------------------------------


def test_an_old_state_dir_gets_the_patroni_secret_on_the_next_up(tmp_path: Path) -> None:
    settings, layout, _ = fresh(tmp_path)
    old = {name: f"kept-{name}" for name in SECRET_NAMES if name != "patroni"}
    layout.secrets_file.write_text(json.dumps(old))
    created = load_or_create_secrets(layout)
    assert {k: created[k] for k in old} == old  # the others are kept
    assert len(created["patroni"]) >= 32
    assert read_secrets(settings) == created


def test_keys_derived_under_different_labels_are_unrelated() -> None:
    secret = "the-admin-secret"
    token = worker_admin_token(secret)
    assert token != secret and secret not in token
    assert token == worker_admin_token(secret)  # stable: dashboard and workers agree
    assert token != worker_admin_token(secret + "x")
    assert bytes.fromhex(token) != push_key(secret)
    assert derive_key(secret, "a") != derive_key(secret, "b")
    # HKDF-Expand's first block: HMAC(secret, label || 0x01).
    expected = hmac.new(secret.encode(), b"a\x01", "sha256").digest()
    assert derive_key(secret, "a") == expected


# ---- the worker admin endpoint (L1) ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_worker_admin_endpoint_wants_the_derived_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _, secrets = fresh(tmp_path, worker_id=WORKER_ID, worker_health_base_port=free_port())
    status = status_in(WorkerState.SERVING)
    registry = Registry(FakeStore().require_user_id, FakeStore().usernames)
    drain = Drain(settings, NO_POOL, status, registry, FakeEvents())
    sources = health.Sources(
        status=status,
        registry=registry,
        healthy=lambda: True,
        lease_age_s=lambda: 0.0,
        loop_lag_s=lambda: 0.0,
        shedding=lambda: "",
        agent_weight=lambda: 100,
        listening=lambda: True,
        messages_stored=lambda: 0,
        batches=lambda: 0,
        delivered=lambda: 0,
        resumes=lambda: 0,
        token_logins=lambda: 0,
        token_login_batches=lambda: 0,
        password_logins=lambda: 0,
        password_login_batches=lambda: 0,
        overloaded=lambda: 0,
        queues=dict,
        shed=dict,
        events_dropped=lambda: 0,
    )
    compared: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(health.hmac, "compare_digest", spy)
    sock = bind_early(settings.host, settings.worker_health_port(WORKER_ID))
    runner = await health.start_http(settings, sources, drain, sock)
    url = f"http://127.0.0.1:{settings.worker_health_port(WORKER_ID)}/admin/undrain"
    token = worker_admin_token(secrets["admin"])
    try:
        async with aiohttp.ClientSession() as http:
            for offered in ("", "wrong", secrets["admin"], token[:-1], token + "0", "é"):
                async with http.post(url, headers={"X-Switchboard-Admin": offered}) as r:
                    assert r.status == 403, offered
            async with http.post(url) as r:  # no header at all
                assert r.status == 403
            async with http.post(url, headers={"X-Switchboard-Admin": token}) as r:
                assert r.status == 200
                assert (await r.json())["state"] == WorkerState.SERVING.value
    finally:
        await runner.cleanup()
    # Every check went through the constant-time comparison, against the derived token.
    assert len(compared) == 8
    assert all(expected == token.encode() for _, expected in compared)


# ---- Patroni and etcd configs (M5, M6) ---------------------------------------------------


def test_patroni_config_protects_unsafe_methods_and_gates_reporting(tmp_path: Path) -> None:
    settings, layout, secrets = fresh(tmp_path)
    config = json.loads(patroni.node_config(settings, layout, "n2", secrets))
    auth = {"username": PATRONI_REST_USER, "password": secrets["patroni"]}
    assert config["restapi"]["authentication"] == auth
    assert config["ctl"]["authentication"] == auth  # patronictl switchover etc.
    assert config["etcd3"]["hosts"] == f"127.0.0.1:{settings.etcd_client_port}"
    gate = patroni.gate_file(layout.node_dir("n2"))
    hba = config["postgresql"]["pg_hba"]
    reject = f"host all @{gate} 127.0.0.1/32 reject"
    assert reject in hba
    assert hba.index(reject) < hba.index("host all all 127.0.0.1/32 scram-sha-256")
    callbacks = config["postgresql"]["callbacks"]
    assert set(callbacks) == {"on_start", "on_restart", "on_role_change"}
    for command in callbacks.values():
        assert str(patroni.GATE_SCRIPT) in command and str(gate) in command
        assert str(settings.pg_port("n2")) in command


def test_new_wal_segments_are_not_zero_filled(tmp_path: Path) -> None:
    """Zero-filling each new segment on all three nodes at once stalled commits
    every ~6 s under load (docs/benchmarks.md, the periodic stalls)."""
    settings, layout, secrets = fresh(tmp_path)
    config = json.loads(patroni.node_config(settings, layout, "n1", secrets))
    assert config["bootstrap"]["dcs"]["postgresql"]["parameters"]["wal_init_zero"] == "off"


def test_etcd_binds_loopback_whatever_host_says(tmp_path: Path) -> None:
    settings, layout, secrets = fresh(tmp_path, host="192.0.2.2")
    args = etcd.argv(settings, layout)
    urls = [a.split("=", 1)[1] for a in args if a.startswith("--listen-")]
    assert len(urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
    assert not any("192.0.2.2" in a for a in args)
    config = json.loads(patroni.node_config(settings, layout, "n1", secrets))
    assert config["etcd3"]["hosts"] == f"127.0.0.1:{settings.etcd_client_port}"


# ---- the reporting gate's file -----------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "refused"),
    [
        ("replica", reporting_gate.NOBODY),
        ("primary", "reporting"),
        ("standby_leader", "reporting"),
        ("demoted", "reporting"),
        ("uninitialized", "reporting"),
        ("anything else", "reporting"),
    ],
)
def test_only_a_replica_opens_the_gate(tmp_path: Path, role: str, refused: str) -> None:
    gate = patroni.close_gate(tmp_path)
    assert gate.read_text() == "reporting\n"  # closed before PostgreSQL starts
    reporting_gate.write_gate(gate, role)
    assert gate.read_text() == refused + "\n"  # never empty: that would break pg_hba
    assert gate.stat().st_mode & 0o077 == 0


def test_the_gate_script_ignores_on_stop(tmp_path: Path) -> None:
    gate = patroni.close_gate(tmp_path)
    args = ["gate", str(gate), str(tmp_path), "1", "on_stop", "replica", "switchboard"]
    assert reporting_gate.main(args) == 0
    assert gate.read_text() == "reporting\n"


# ---- compose -----------------------------------------------------------------------------


def compose_entrypoint() -> ModuleType:
    return compose_image_module("entrypoint")


def test_compose_nodes_keep_rest_auth_and_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entrypoint = compose_entrypoint()
    assert set(entrypoint.SECRET_NAMES) == set(SECRET_NAMES)
    monkeypatch.setenv("SWITCHBOARD_STATE_DIR", str(tmp_path / "run"))
    for name in SECRET_NAMES:
        monkeypatch.setenv(f"SWITCHBOARD_SECRET_{name.upper()}", f"secret-{name}")
    config = entrypoint.node_config("n3")
    auth = {"username": PATRONI_REST_USER, "password": "secret-patroni"}
    assert config["restapi"]["authentication"] == auth
    assert config["ctl"]["authentication"] == auth
    assert config["etcd3"]["hosts"] == "etcd:2379"
    gate = patroni.gate_file(entrypoint.NODE_ROOT / "db" / "n3")
    hba = config["postgresql"]["pg_hba"]
    reject = f"host all @{gate} samenet reject"
    assert reject in hba and hba.index(reject) < hba.index("host all all samenet scram-sha-256")
    assert str(gate) in config["postgresql"]["callbacks"]["on_role_change"]


def test_compose_requires_the_patroni_secret_on_nodes_and_dashboard() -> None:
    compose = (ROOT / "compose" / "compose.yaml").read_text()
    assert compose.count("SWITCHBOARD_SECRET_PATRONI: ${SWITCHBOARD_SECRET_PATRONI:?") == 2
    assert "PATRONI" in (ROOT / "compose" / "gen-env.sh").read_text()


@pytest.mark.parametrize("wid", ["w1", "w3", "w12"])
def test_every_compose_worker_listens_on_the_ports_haproxy_routes_to(wid: str) -> None:
    # HAProxy's server-template sends every slot to the same ports of a `worker` address
    # (compose/images/haproxy_render.py); a port left to wN's arithmetic (7301 + N - 1)
    # once made wss:// answer 503 from w2 on.
    from app.settings import Settings

    entrypoint = compose_entrypoint()
    env = {"SWITCHBOARD_WORKER_ID": wid}
    entrypoint.worker_env(env)
    settings = Settings.load(env=env)
    render = compose_image_module("haproxy_render")
    assert (
        settings.worker_port(wid),
        settings.worker_health_port(wid),
        settings.worker_agent_port(wid),
        settings.worker_ws_port(wid),
    ) == (
        render.WORKER_PORT,
        render.WORKER_HEALTH_PORT,
        render.WORKER_AGENT_PORT,
        render.WORKER_WS_PORT,
    )
