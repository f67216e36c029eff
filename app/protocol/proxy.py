"""The PROXY protocol v2 header HAProxy puts in front of every client connection.

HAProxy (``send-proxy-v2``) opens each connection to a worker with a binary
header naming the client's real address; the worker reads it before the codec
sees a byte. Sans-I/O: `parse_proxy_header` takes the bytes received so far and
says "need more", "refused (why)" or "here is the header, it took N bytes".
It never raises. Spec: haproxy.org/download/2.6/doc/proxy-protocol.txt, section 2.2.

The header::

    12 bytes  signature  \\r\\n\\r\\n\\0\\r\\nQUIT\\n
    1 byte    version (high nibble, must be 2) and command (low: 0 LOCAL, 1 PROXY)
    1 byte    family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and transport (low: 1 STREAM)
    2 bytes   length of what follows, big endian
    then      source address, destination address, source port, destination port
              (12 bytes for TCP over IPv4, 36 for IPv6), then optional TLVs (skipped)

LOCAL is what a proxy sends for its own connections (health checks): no client
address, the connection's own endpoints stand. For PROXY only TCP over IPv4 or
IPv6 is accepted; everything else, the text v1 header included, is refused.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Final

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED_BYTES: Final = 16  # signature, version/command, family/transport, length
# HAProxy sends 12 (IPv4) or 36 (IPv6) bytes of addresses, plus TLVs only when told
# to (proxy-v2-options, which Switchboard does not use). The format allows 65535;
# anything past this is refused rather than buffered.
MAX_PAYLOAD_BYTES: Final = 1024

_TCP4: Final = 0x11
_TCP6: Final = 0x21
_ADDRESS_BYTES: Final = {_TCP4: 12, _TCP6: 36}


class Command(Enum):
    LOCAL = 0  # the proxy's own connection (a health check): use the socket's endpoints
    PROXY = 1  # a relayed client connection: the header names the client


class Refusal(StrEnum):
    """Why a header was refused; the value is the metric label and log field."""

    NOT_PROXY = "not_proxy_v2"  # no v2 signature: a direct connection, or PROXY v1
    BAD_VERSION = "bad_version"
    BAD_COMMAND = "bad_command"
    UNSUPPORTED_FAMILY = "unsupported_family"  # UNSPEC, UNIX, UDP, or an unknown family
    SHORT_ADDRESSES = "short_addresses"  # the length cannot hold the family's addresses
    TOO_LONG = "too_long"  # over MAX_PAYLOAD_BYTES
    UNTRUSTED_SOURCE = "untrusted_source"  # not from HAProxy's addresses (see the worker)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A valid header: ``length`` bytes of the stream were the header."""

    length: int
    command: Command
    # (host, port) of the client and of the address it connected to; None for LOCAL.
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def parse_proxy_header(data: bytes) -> ProxyHeader | Refusal | None:
    """The header at the start of ``data``; None while more bytes are needed.

    Refuses as soon as the bytes so far cannot start a valid header, so a peer
    that is not a proxy is refused on its first packet, not after 16 bytes.
    """
    head = data[: len(SIGNATURE)]
    if head != SIGNATURE[: len(head)]:
        return Refusal.NOT_PROXY
    if len(data) < FIXED_BYTES:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        return Refusal.BAD_VERSION
    if command > 1:
        return Refusal.BAD_COMMAND
    family = data[13]
    (payload,) = struct.unpack_from("!H", data, 14)
    if payload > MAX_PAYLOAD_BYTES:
        return Refusal.TOO_LONG
    length = FIXED_BYTES + payload
    if command == Command.LOCAL.value:
        # The family and any addresses are to be ignored (the spec says "must").
        return ProxyHeader(length, Command.LOCAL) if len(data) >= length else None
    needed = _ADDRESS_BYTES.get(family)
    if needed is None:
        return Refusal.UNSUPPORTED_FAMILY
    if payload < needed:
        return Refusal.SHORT_ADDRESSES
    if len(data) < length:
        return None
    if family == _TCP4:
        src, dst = _ipv4(data[16:20]), _ipv4(data[20:24])
        sport, dport = struct.unpack_from("!HH", data, 24)
    else:
        src, dst = _ipv6(data[16:32]), _ipv6(data[32:48])
        sport, dport = struct.unpack_from("!HH", data, 48)
    return ProxyHeader(length, Command.PROXY, (src, sport), (dst, dport))


def _ipv4(packed: bytes) -> str:
    return str(ipaddress.IPv4Address(packed))


def _ipv6(packed: bytes) -> str:
    # An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d: name it by
    # its IPv4 address, so per-address limits count it once whichever way it came.
    address = ipaddress.IPv6Address(packed)
    return str(address.ipv4_mapped or address)


def build_proxy_header(
    source: tuple[str, int] | None, destination: tuple[str, int] | None = None
) -> bytes:
    """The v2 header HAProxy would send for a client at ``source`` (None: LOCAL).

    For tests and for tools that connect to a worker directly (bench/session_memory).
    """
    if source is None:
        return SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0] if destination else str(src))
    if src.version != dst.version:
        raise ValueError("source and destination must be of one address family")
    family = _TCP4 if src.version == 4 else _TCP6
    body = (
        src.packed
        + dst.packed
        + struct.pack("!HH", source[1], destination[1] if destination else 0)
    )
    return SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def format_peer(host: str, port: int) -> str:
    """``host:port`` for IPv4, ``[host]:port`` for IPv6 (so the last ':' splits the port)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
