"""The worker's edge without a network: who may connect, and the PROXY header read by
the real `ClientConnection` over a fake transport and the real request path."""

from __future__ import annotations

import asyncio
import socket

import pytest

from app.protocol import Hello
from app.protocol.proxy import Refusal, build_proxy_header
from app.settings import Settings, SettingsError
from app.worker import metrics
from app.worker.connection import ClientConnection
from app.worker.edge import Edge, bind_early, tune_listener
from app.worker.states import SessionState
from tests.unit.worker_fakes import (
    GOOD_PASSWORD,
    FakeTransport,
    Harness,
    frames_of,
    real_connection,
)

HAPROXY = ("127.0.0.1", 43210)
CLIENT = ("203.0.113.9", 50000)


def refused(reason: Refusal) -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "switchboard_proxy_refused_total", {"reason": reason.value}
        )
        or 0.0
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch)


def connect(
    h: Harness, peer: tuple[str, int] | None = HAPROXY
) -> tuple[ClientConnection, FakeTransport]:
    return real_connection(h, peer)


# ---- trust ----------------------------------------------------------------------------


def test_loopback_and_the_host_are_trusted_by_default() -> None:
    edge = Edge(Settings(host="192.0.2.10"))
    assert edge.trusted("127.0.0.1")
    assert edge.trusted("127.0.0.2")
    assert edge.trusted("::1")
    assert edge.trusted("::ffff:127.0.0.1")  # a dual-stack listener's view of 127.0.0.1
    assert edge.trusted("192.0.2.10")
    assert not edge.trusted("192.0.2.11")
    assert not edge.trusted("10.0.0.1")
    assert not edge.trusted("not an address")


def test_trusted_addresses_are_a_setting() -> None:
    s = Settings(host="0.0.0.0", proxy_trusted_addrs="172.18.0.0/16, 2001:db8::/48")
    edge = Edge(s)
    assert edge.trusted("172.18.3.4")
    assert edge.trusted("2001:db8:0:1::5")
    assert not edge.trusted("127.0.0.1")  # not listed: not even loopback
    assert not edge.trusted("0.0.0.0")  # an unspecified host adds nothing


def test_a_bad_network_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="proxy_trusted_addrs"):
        Settings(proxy_trusted_addrs="127.0.0.0/8,haproxy")
    with pytest.raises(SettingsError, match="proxy_trusted_addrs"):
        Settings.load(env={"SWITCHBOARD_PROXY_TRUSTED_ADDRS": "10.0.0.0/33"})


# ---- the connection --------------------------------------------------------------------


async def test_the_header_names_the_client_whatever_the_chunks(harness: Harness) -> None:
    conn, transport = connect(harness)
    data = build_proxy_header(CLIENT, ("192.0.2.1", 5222)) + b'{"op":"ping","rid":1}\n'
    for start in range(0, len(data), 5):
        conn.data_received(data[start : start + 5])
    await settle()
    assert conn.peer == "203.0.113.9:50000"
    assert frames_of(bytes(transport.out)) == [{"op": "pong", "rid": 1}]
    assert conn in harness.registry.connections


async def test_the_client_address_is_what_the_session_and_the_limiter_see(
    harness: Harness,
) -> None:
    harness.store.add_user("alice")
    conn, transport = connect(harness)
    conn.data_received(build_proxy_header(("2001:db8:5:6::7", 40000)))
    await harness.dispatcher.handle(
        conn, Hello(user="alice", password="wrong password!", device="phone")
    )
    assert harness.store.throttle["login-addr|2001:db8:5:6::/64"].attempts == 1  # its /64
    await harness.dispatcher.handle(
        conn, Hello(user="alice", password=GOOD_PASSWORD, device="phone")
    )
    await settle()
    assert conn.state is SessionState.ACTIVE
    assert conn.peer == "[2001:db8:5:6::7]:40000"
    assert not transport.closed and not transport.aborted


async def test_a_local_header_keeps_the_sockets_address(harness: Harness) -> None:
    conn, transport = connect(harness)
    conn.data_received(build_proxy_header(None) + b'{"op":"ping"}\n')
    await settle()
    assert conn.peer == "127.0.0.1:43210"
    assert frames_of(bytes(transport.out)) == [{"op": "pong"}]


async def test_no_header_is_refused_without_a_word(harness: Harness) -> None:
    before = refused(Refusal.NOT_PROXY)
    conn, transport = connect(harness)
    conn.data_received(b'{"op":"ping","rid":1}\n')
    await settle()
    assert transport.aborted and transport.out == b""
    assert refused(Refusal.NOT_PROXY) == before + 1
    conn.data_received(b'{"op":"ping","rid":2}\n')  # whatever still arrives is dropped
    await settle()
    assert transport.out == b""
    conn.connection_lost(None)
    assert conn not in harness.registry.connections


async def test_a_malformed_header_is_refused(harness: Harness) -> None:
    before = refused(Refusal.UNSUPPORTED_FAMILY)
    conn, transport = connect(harness)
    conn.data_received(build_proxy_header(CLIENT)[:13] + b"\x31\x00\x00")  # PROXY over UNIX
    assert transport.aborted and transport.out == b""
    assert refused(Refusal.UNSUPPORTED_FAMILY) == before + 1


async def test_an_untrusted_source_is_refused_at_once(harness: Harness) -> None:
    before = refused(Refusal.UNTRUSTED_SOURCE)
    conn, transport = connect(harness, peer=("198.51.100.20", 5555))
    assert transport.aborted
    assert conn not in harness.registry.connections
    conn.data_received(build_proxy_header(CLIENT) + b'{"op":"ping"}\n')  # a forged header
    await settle()
    assert transport.out == b""
    assert conn.peer == "198.51.100.20:5555"
    assert refused(Refusal.UNTRUSTED_SOURCE) == before + 1


# ---- TCP keepalive -----------------------------------------------------------------------


def test_accepted_sockets_inherit_the_listeners_keepalive() -> None:
    s = Settings(tcp_keepalive_idle_s=61, tcp_keepalive_interval_s=7, tcp_keepalive_count=4)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        tune_listener(listener, s)
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                tcp = socket.IPPROTO_TCP
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert accepted.getsockopt(tcp, socket.TCP_KEEPIDLE) == 61
                assert accepted.getsockopt(tcp, socket.TCP_KEEPINTVL) == 7
                assert accepted.getsockopt(tcp, socket.TCP_KEEPCNT) == 4
                # Unacknowledged data gives up as late as keepalive does: 61 + 7 x 4 s.
                assert accepted.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == 89_000
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_keepalive_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="tcp_keepalive_count"):
        Settings(tcp_keepalive_count=0)
    with pytest.raises(SettingsError, match="auth_timeout_s"):
        Settings(auth_timeout_s=0)


def test_a_listener_bound_early_sits_on_the_top_descriptor_and_refuses_until_it_listens() -> None:
    """The kernel releases a killed process's descriptors highest first: the worker's
    listeners go to the top of the table, so they close before its clients' sockets
    and a dying worker stops completing handshakes at once (edge.bind_early)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    first = bind_early("127.0.0.1", 0)
    second = bind_early("127.0.0.1", 0)
    try:
        assert first.fileno() == min(soft, 65_536) - 1
        assert second.fileno() == first.fileno() - 1
        assert not first.get_inheritable()
        with pytest.raises(ConnectionRefusedError), socket.socket() as early:
            early.connect(first.getsockname())
        first.listen(8)
        with socket.create_connection(first.getsockname(), timeout=2):
            pass
    finally:
        first.close()
        second.close()
