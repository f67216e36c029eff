"""The PROXY protocol v2 parser (app/protocol/proxy.py): bytes only, no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.protocol.proxy import (
    FIXED_BYTES,
    MAX_PAYLOAD_BYTES,
    SIGNATURE,
    Command,
    ProxyHeader,
    Refusal,
    build_proxy_header,
    format_peer,
    parse_proxy_header,
)
from app.store.throttle import address_key, client_host

FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# What HAProxy 2.6 (send-proxy-v2) wrote for a client at 127.0.0.1:41242 that had
# connected to 127.0.0.1:29900, captured from a real HAProxy.
HAPROXY_TCP4 = b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c\x7f\x00\x00\x01\x7f\x00\x00\x01\xa1\x1at\xcc"


def header(command: int, family: int, payload: bytes, version: int = 2) -> bytes:
    return (
        SIGNATURE
        + bytes([version << 4 | command, family])
        + struct.pack("!H", len(payload))
        + payload
    )


def tcp6_payload(src: str, dst: str, sport: int, dport: int) -> bytes:
    import ipaddress

    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


# ---- valid headers -----------------------------------------------------------------


def test_haproxys_own_bytes() -> None:
    parsed = parse_proxy_header(HAPROXY_TCP4 + b'{"op":"ping"}\n')
    assert parsed == ProxyHeader(
        length=28,
        command=Command.PROXY,
        source=("127.0.0.1", 41242),
        destination=("127.0.0.1", 29900),
    )


def test_the_client_bytes_after_the_header_are_left_alone() -> None:
    data = HAPROXY_TCP4 + b'{"op":"ping"}\n'
    parsed = parse_proxy_header(data)
    assert isinstance(parsed, ProxyHeader)
    assert data[parsed.length :] == b'{"op":"ping"}\n'


def test_tcp6() -> None:
    payload = tcp6_payload("2001:db8::7", "2001:db8::1", 40000, 5222)
    parsed = parse_proxy_header(header(1, 0x21, payload))
    assert isinstance(parsed, ProxyHeader)
    assert parsed.source == ("2001:db8::7", 40000)
    assert parsed.destination == ("2001:db8::1", 5222)


def test_an_ipv4_mapped_client_is_named_by_its_ipv4_address() -> None:
    payload = tcp6_payload("::ffff:198.51.100.4", "::ffff:192.0.2.1", 40000, 5222)
    parsed = parse_proxy_header(header(1, 0x21, payload))
    assert isinstance(parsed, ProxyHeader)
    assert parsed.source == ("198.51.100.4", 40000)


def test_tlvs_after_the_addresses_are_skipped() -> None:
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"  # PP2_TYPE_NOOP
    data = header(1, 0x11, HAPROXY_TCP4[16:] + tlv) + b"rest"
    parsed = parse_proxy_header(data)
    assert isinstance(parsed, ProxyHeader)
    assert parsed.source == ("127.0.0.1", 41242)
    assert data[parsed.length :] == b"rest"


@pytest.mark.parametrize("family", [0x00, 0x11, 0x31, 0x99])
def test_local_ignores_family_and_addresses(family: int) -> None:
    data = header(0, family, b"\x01" * 7) + b"x"
    assert parse_proxy_header(data) == ProxyHeader(length=23, command=Command.LOCAL)


def test_build_proxy_header_round_trips() -> None:
    for source, destination in (
        (("203.0.113.9", 1), ("192.0.2.1", 5222)),
        (("2001:db8::9", 65535), ("2001:db8::1", 5222)),
    ):
        parsed = parse_proxy_header(build_proxy_header(source, destination))
        assert isinstance(parsed, ProxyHeader)
        assert (parsed.command, parsed.source, parsed.destination) == (
            Command.PROXY,
            source,
            destination,
        )
    assert parse_proxy_header(build_proxy_header(None)) == ProxyHeader(16, Command.LOCAL)


# ---- incomplete headers --------------------------------------------------------------


def test_every_prefix_of_a_valid_header_asks_for_more() -> None:
    for cut in range(len(HAPROXY_TCP4)):
        assert parse_proxy_header(HAPROXY_TCP4[:cut]) is None, cut


def test_a_local_header_waits_for_its_payload() -> None:
    data = header(0, 0x00, b"\x00" * 10)
    assert parse_proxy_header(data[:-1]) is None
    assert isinstance(parse_proxy_header(data), ProxyHeader)


# ---- refused headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"op":"ping"}\n',  # a client talking to the worker directly
        b"\n",  # a blank line
        b"PROXY TCP4 198.51.100.1 192.0.2.1 40000 5222\r\n",  # PROXY v1: not accepted
        b"GET / HTTP/1.1\r\n",
        b"\r\n\r\n\x00\r\nQUIX",  # the signature goes wrong late
    ],
)
def test_no_signature_is_refused_on_the_first_wrong_byte(data: bytes) -> None:
    assert parse_proxy_header(data) is Refusal.NOT_PROXY
    wrong = next(i for i in range(len(data)) if data[i] != SIGNATURE[i])
    assert parse_proxy_header(data[: wrong + 1]) is Refusal.NOT_PROXY
    assert parse_proxy_header(data[:wrong]) is None


@pytest.mark.parametrize(
    ("data", "refusal"),
    [
        (header(1, 0x11, HAPROXY_TCP4[16:], version=1), Refusal.BAD_VERSION),
        (header(1, 0x11, HAPROXY_TCP4[16:], version=3), Refusal.BAD_VERSION),
        (header(2, 0x11, HAPROXY_TCP4[16:]), Refusal.BAD_COMMAND),
        (header(0xF, 0x11, HAPROXY_TCP4[16:]), Refusal.BAD_COMMAND),
        (header(1, 0x00, b""), Refusal.UNSUPPORTED_FAMILY),  # PROXY over UNSPEC
        (header(1, 0x12, HAPROXY_TCP4[16:]), Refusal.UNSUPPORTED_FAMILY),  # UDP over IPv4
        (header(1, 0x31, b"\x00" * 216), Refusal.UNSUPPORTED_FAMILY),  # a unix socket
        (header(1, 0x11, HAPROXY_TCP4[16:24]), Refusal.SHORT_ADDRESSES),
        (header(1, 0x21, HAPROXY_TCP4[16:]), Refusal.SHORT_ADDRESSES),  # IPv6 in 12 bytes
        (header(1, 0x11, b"\x00" * (MAX_PAYLOAD_BYTES + 1)), Refusal.TOO_LONG),
        (header(0, 0x00, b"\x00" * 65535), Refusal.TOO_LONG),
    ],
)
def test_malformed_headers_are_refused(data: bytes, refusal: Refusal) -> None:
    assert parse_proxy_header(data) is refusal


def test_refused_before_the_payload_arrives() -> None:
    """A header announcing too much, or addresses of no use, is refused at 16 bytes."""
    too_long = header(1, 0x11, b"\x00" * (MAX_PAYLOAD_BYTES + 1))
    assert parse_proxy_header(too_long[:FIXED_BYTES]) is Refusal.TOO_LONG
    unix = header(1, 0x31, b"\x00" * 216)
    assert parse_proxy_header(unix[:FIXED_BYTES]) is Refusal.UNSUPPORTED_FAMILY


# ---- properties ----------------------------------------------------------------------

addresses4 = st.ip_addresses(v=4).map(str)
addresses6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)


@FUZZ
@given(st.binary(max_size=200))
def test_never_raises_on_any_bytes(data: bytes) -> None:
    parsed = parse_proxy_header(data)
    assert parsed is None or isinstance(parsed, Refusal | ProxyHeader)
    if isinstance(parsed, ProxyHeader):
        assert FIXED_BYTES <= parsed.length <= min(len(data), FIXED_BYTES + MAX_PAYLOAD_BYTES)


@FUZZ
@given(
    st.binary(max_size=60).map(lambda tail: SIGNATURE + tail),
    st.integers(0, 80),
)
def test_never_raises_past_the_signature(data: bytes, cut: int) -> None:
    """Random version, command, family, length and addresses behind a real signature."""
    for end in (cut, len(data)):
        parsed = parse_proxy_header(data[:end])
        assert parsed is None or isinstance(parsed, Refusal | ProxyHeader)


@FUZZ
@given(
    st.one_of(st.binary(max_size=120), st.binary(max_size=120).map(lambda b: SIGNATURE + b)),
    st.binary(max_size=40),
)
def test_a_verdict_never_changes_as_more_bytes_arrive(data: bytes, more: bytes) -> None:
    first = parse_proxy_header(data)
    if first is not None:
        assert parse_proxy_header(data + more) == first


@FUZZ
@given(
    st.one_of(
        st.tuples(addresses4, ports, addresses4, ports),
        st.tuples(addresses6, ports, addresses6, ports),
    ),
    st.binary(max_size=50),
    st.integers(1, 40),
)
def test_valid_headers_in_any_chunks(
    addrs: tuple[str, int, str, int], rest: bytes, chunk: int
) -> None:
    src, sport, dst, dport = addrs
    data = build_proxy_header((src, sport), (dst, dport)) + rest
    buffered = b""
    for start in range(0, len(data), chunk):
        buffered += data[start : start + chunk]
        parsed = parse_proxy_header(buffered)
        if parsed is not None:
            break
    assert isinstance(parsed, ProxyHeader)
    assert parsed.source == (src, sport)
    assert parsed.destination == (dst, dport)
    assert buffered[parsed.length :] + data[len(buffered) :] == rest


# ---- addresses as strings ------------------------------------------------------------


def test_format_peer() -> None:
    assert format_peer("198.51.100.4", 40000) == "198.51.100.4:40000"
    assert format_peer("2001:db8::7", 40000) == "[2001:db8::7]:40000"


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("198.51.100.4:40000", "198.51.100.4"),
        ("[2001:db8:1:2:3:4:5:6]:40000", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2::9]:1", "2001:db8:1:2::/64"),
        ("?", "?"),  # a connection that never named its client
        ("[not an address]:1", "[not an address]"),
    ],
)
def test_address_key_is_the_ipv4_address_or_the_ipv6_64(peer: str, key: str) -> None:
    """The login throttle keys what format_peer writes: IPv4 as is, IPv6 by /64."""
    assert address_key(client_host(peer)) == key
