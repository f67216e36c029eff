"""TLS on the client port (issue #15, review item C1), against the real cluster.

HAProxy terminates TLS on client_tls_port with the cluster's generated certificate;
the plaintext client_port listens on loopback only. The last test checks that for
real from another network namespace, as a client on another host would see it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509

from app.client import Client, ResilientClient, UntrustedServer
from app.cluster import haproxy, tls
from app.cluster.launcher import LocalCluster, format_status
from app.cluster.layout import Layout
from app.settings import Settings
from tests.cluster_fixture import free_port_block
from tests.integration.helpers import PASSWORD, new_user, register
from tests.linechat import LineClient

ROOT = Path(__file__).resolve().parents[2]


def ca_file(cluster: LocalCluster) -> Path:
    return cluster.settings.tls_ca_file()


async def tls_client(cluster: LocalCluster, **options: object) -> Client:
    s = cluster.settings
    return await Client.connect(
        s.host,
        s.client_tls_port,
        tls=True,
        cafile=options.pop("cafile", ca_file(cluster)),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


def peer_serial(client: Client) -> int:
    ssl_object = client.extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def test_login_over_tls_with_the_cluster_ca(cluster: LocalCluster) -> None:
    user = new_user("tls")
    async with await tls_client(cluster) as client:
        await client.register(user, PASSWORD)
        welcome = await client.login(user, PASSWORD, "laptop")
        assert welcome.user == user
        ssl_object = client.extra_info("ssl_object")
        assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        sent = await client.send("over tls", to=user)
        assert sent.id > 0


async def test_a_client_that_does_not_trust_the_ca_fails_the_handshake(
    cluster: LocalCluster,
) -> None:
    s = cluster.settings
    # The system's CAs only: the cluster's own CA is not among them.
    with pytest.raises(UntrustedServer) as refused:
        await Client.connect(s.host, s.client_tls_port, tls=True)
    assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
    # The same with the standard library alone.
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(s.host, s.client_tls_port, ssl=ssl.create_default_context())


async def test_a_certificate_for_another_name_fails_the_handshake(cluster: LocalCluster) -> None:
    with pytest.raises(UntrustedServer) as refused:
        await tls_client(cluster, server_hostname="chat.example.org")
    cause = refused.value.__cause__
    assert isinstance(cause, ssl.SSLCertVerificationError)
    assert "hostname" in cause.verify_message.lower(), cause.verify_message


def test_old_protocol_versions_are_refused(cluster: LocalCluster) -> None:
    """TLS 1.1 offered by a client that would take it (OpenSSL's security level 0)."""
    s = cluster.settings
    argv = ["openssl", "s_client", "-connect", f"{s.host}:{s.client_tls_port}", "-tls1_1"]
    argv += ["-cipher", "DEFAULT:@SECLEVEL=0", "-CAfile", str(ca_file(cluster))]
    old = subprocess.run(argv, input="", capture_output=True, text=True, timeout=20)
    assert old.returncode != 0
    assert "no peer certificate available" in old.stdout, old.stdout
    argv[argv.index("-tls1_1")] = "-tls1_2"
    modern = subprocess.run(argv, input="", capture_output=True, text=True, timeout=20)
    assert modern.returncode == 0, modern.stdout + modern.stderr
    assert "Verify return code: 0 (ok)" in modern.stdout


async def test_plaintext_sent_to_the_tls_port_gets_no_welcome(cluster: LocalCluster) -> None:
    s = cluster.settings
    user = new_user("plain")
    await register(cluster, user)
    raw = await LineClient.connect(s.host, s.client_tls_port)
    await raw.send({"op": "hello", "user": user, "password": PASSWORD, "device": "d", "rid": 1})
    data = await asyncio.wait_for(raw.reader.read(65536), 10)
    # HAProxy answers a TLS alert at most (or nothing) and closes: never a frame.
    assert b"welcome" not in data and not data.startswith(b"{")
    assert await raw.closed(timeout=10)
    await raw.close()


async def test_a_resilient_client_resumes_over_tls(cluster: LocalCluster) -> None:
    s = cluster.settings
    user = new_user("rtls")
    await register(cluster, user)
    client = await ResilientClient.connect(
        s.host, s.client_tls_port, tls=True, cafile=ca_file(cluster), keep_events=False
    )
    async with client:
        await client.login(user, PASSWORD, "phone")
        client._link.client.abort("test: the network dropped")
        sent = await client.send("after the drop", to=user)  # waits for the resume
        assert sent.id > 0
        assert client.stats.resumes == 1
        link = client._link.client
        assert link.extra_info("ssl_object") is not None


async def test_reload_serves_a_new_certificate_and_keeps_open_connections(
    cluster: LocalCluster,
) -> None:
    user = new_user("reload")
    before = await tls_client(cluster)
    await before.register(user, PASSWORD)
    await before.login(user, PASSWORD, "old")
    old_serial = peer_serial(before)

    certs = await asyncio.to_thread(cluster.reload_tls, True)
    assert certs.serial != old_serial

    # The open connection keeps working on its old session...
    await before.ping()
    assert (await before.send("still here", to=user)).id > 0
    # ...and every new handshake, whichever HAProxy process takes it, sees the new one.
    for _ in range(3 * cluster.settings.haproxy_processes):
        async with await tls_client(cluster) as after:
            assert peer_serial(after) == certs.serial
            await after.ping()
    await before.close()


def test_status_shows_both_client_ports(cluster: LocalCluster) -> None:
    s = cluster.settings
    text = format_status(cluster.status())
    assert f"clients TLS {s.host}:{s.client_tls_port}" in text
    assert f"plaintext 127.0.0.1:{s.client_port} (loopback only)" in text


def test_the_cli_sends_over_tls_with_the_cluster_ca(cluster: LocalCluster) -> None:
    s = cluster.settings
    user = new_user("cli")
    asyncio.run(_register(s, user))
    env = {**os.environ, "SWITCHBOARD_PASSWORD": PASSWORD, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "app", "send", "--state-dir", str(s.state_dir), "--tls"]
    argv += ["--port", str(s.client_tls_port), "--user", user, "--to", user, "hello"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sent id="), done.stdout
    # Another name than the certificate's: refused, with the reason.
    argv += ["--server-name", "chat.example.org"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot verify chat.example.org" in done.stderr, done.stderr


async def _register(s: Settings, user: str) -> None:
    async with await Client.connect(s.host, s.client_port) as client:
        await client.register(user, PASSWORD)


# ---- another host, for real: a network namespace ---------------------------------------

NETNS_CLIENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from app.client import Client

    async def main(public, plain_port, tls_port, cafile, user, password):
        result = {}
        for name, host in (("plaintext_public", public), ("plaintext_loopback", "127.0.0.1")):
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, plain_port), 5
                )
                writer.close()
                result[name] = "connected"
            except OSError as exc:
                result[name] = type(exc).__name__
        async with await Client.connect(public, tls_port, tls=True, cafile=cafile) as client:
            welcome = await client.login(user, password, "netns")
            result["tls_login"] = welcome.user
        print(json.dumps(result))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]))
    """
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextmanager
def other_host() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair on a private /30 of
    10.231.0.0/16: (the namespace's name, this side's address)."""
    tag = secrets.token_hex(3)
    netns, here, there = f"sbtls-{tag}", f"sbt{tag}a", f"sbt{tag}b"
    subnet = int(tag[:2], 16)
    near, far = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", netns)
        _ip("addr", "add", f"{near}/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", netns, "addr", "add", f"{far}/30", "dev", there)
        _ip("-n", netns, "link", "set", there, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        yield netns, near
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and ip")
def test_from_another_host_only_the_tls_port_answers(cluster: LocalCluster) -> None:
    """An HAProxy like the cluster's, bound to a veth address (`public_host`) in front
    of the cluster's workers; a client in another namespace reaches it over TLS, and
    finds no plaintext port, neither at the public address nor at its own loopback."""
    s = cluster.settings
    user = new_user("far")
    asyncio.run(_register(s, user))
    base = free_port_block()
    state_dir = Path(tempfile.mkdtemp(prefix="switchboard-tls-edge-", dir="/tmp"))
    with other_host() as (netns, near):
        edge = s.replace(
            state_dir=state_dir,
            public_host=near,
            client_port=base,
            client_tls_port=base + 1,
            haproxy_stats_port=base + 2,
        )
        layout = Layout.for_settings(edge)
        # The cluster's CA signs this HAProxy's certificate, for the veth address.
        layout.tls_dir.mkdir(parents=True)
        layout.run.mkdir(parents=True)
        for name in ("ca.pem", "ca.key"):
            shutil.copy2(cluster.layout.tls_dir / name, layout.tls_dir / name)
        certs = tls.ensure_certificates(edge)
        assert near in certs.names
        config = layout.haproxy_cfg_of("haproxy2")
        # haproxy2's config: the client ports and the workers only.
        config.write_text(haproxy.render(edge, layout, "haproxy2"))
        log = (state_dir / "haproxy.log").open("wb")
        proc = subprocess.Popen(
            [s.haproxy_bin, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 10
            while not layout.haproxy_socket_of("haproxy2").exists():
                assert proc.poll() is None, (state_dir / "haproxy.log").read_text()
                assert time.monotonic() < deadline, "the edge HAProxy did not start"
                time.sleep(0.1)
            time.sleep(1.5)  # its first health checks mark the workers up
            script = [sys.executable, "-c", NETNS_CLIENT, near, str(base), str(base + 1)]
            script += [str(layout.tls_dir / "ca.pem"), user, PASSWORD]
            done = subprocess.run(
                ["ip", "netns", "exec", netns, *script],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert result == {
                "plaintext_public": "ConnectionRefusedError",
                "plaintext_loopback": "ConnectionRefusedError",
                "tls_login": user,
            }
        finally:
            proc.terminate()
            proc.wait(timeout=15)
            log.close()
            shutil.rmtree(state_dir, ignore_errors=True)
