"""The edge of a worker: who may connect, and the client address each connection carries.

Only HAProxy connects to a worker: a connection from an address outside
`Settings.proxy_networks` is refused at once, and so is one whose first bytes
are not a valid PROXY protocol v2 header (app/protocol/proxy.py). Refused means
closed without a word, counted in ``switchboard_proxy_refused{reason}`` and
logged (``proxy_refused``, at most one line per REFUSAL_LOG_S, with the count
since the last one, so a port scan cannot flood the log).

TCP keepalive is set on the listening socket, and every accepted socket inherits
it (Linux copies the options at accept), so a vanished peer is noticed within
idle + interval x count seconds at no cost per connection.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import resource
import socket
import time
from typing import Any, Final

from app.logs import get_logger
from app.protocol.proxy import Refusal
from app.settings import IPNetwork, Settings
from app.worker import metrics

log = get_logger("edge")

REFUSAL_LOG_S: Final = 10.0
# Distinct source addresses whose verdict is remembered (HAProxy has a few; anyone
# else is refused anyway, just without the cache).
TRUST_CACHE_ENTRIES: Final = 1024


class Edge:
    """Trust decisions and refusals, shared by every connection of a worker."""

    def __init__(self, settings: Settings) -> None:
        self._networks = settings.proxy_networks()
        self._verdicts: dict[str, bool] = {}
        self._logged_at = float("-inf")
        self._unlogged = 0

    def trusted(self, host: str) -> bool:
        """Whether a socket peer at ``host`` may open client connections (is HAProxy)."""
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = _inside(host, self._networks)
            if len(self._verdicts) < TRUST_CACHE_ENTRIES:
                self._verdicts[host] = verdict
        return verdict

    def refused(self, reason: Refusal, peer: str) -> None:
        metrics.PROXY_REFUSED.labels(reason.value).inc()
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_S:
            log.warning("proxy_refused", reason=reason.value, peer=peer, refused=self._unlogged)
            self._logged_at, self._unlogged = now, 0


def keepalive_options(settings: Settings) -> list[tuple[int, int, int]]:
    """(level, option, value) for TCP keepalive and TCP_USER_TIMEOUT, where the OS has them."""
    tcp = socket.IPPROTO_TCP
    wanted = [
        (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
        (tcp, "TCP_KEEPIDLE", settings.tcp_keepalive_idle_s),
        (tcp, "TCP_KEEPINTVL", settings.tcp_keepalive_interval_s),
        (tcp, "TCP_KEEPCNT", settings.tcp_keepalive_count),
        # Data sent but not acknowledged for this long drops the connection too
        # (keepalive probes are sent only while nothing is outstanding).
        (tcp, "TCP_USER_TIMEOUT", settings.tcp_user_timeout_s() * 1000),
    ]
    return [
        (level, getattr(socket, name), value)
        for level, name, value in wanted
        if hasattr(socket, name)
    ]


def bind_early(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, not yet listening (a connect is refused until
    it listens), on the highest free descriptor below the open-files limit.

    When a worker is killed, the kernel releases its descriptors highest first
    (measured here, Linux 6.18: a listener on fd 19,000 refused connects after 12 ms, one
    on a low fd after 36 ms, with 5,000 connections between them). A listener opened
    after the database pools had a descriptor below the clients' and kept completing
    handshakes for ~1.2 s of a kill -9 on a busy box, while its clients' connections
    closed: HAProxy's leastconn, seeing the dying worker's clients gone, sent it the
    reconnect storm, and up to its backlog (4,096) of connections were accepted by
    the kernel and then reset. At the top, the listeners close first, while the
    clients' connections are still counted, and a connect after that is refused and
    redispatched (docs/benchmarks.md, 12-07).
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
        return _to_top(sock)
    except OSError:
        sock.close()
        raise


def _to_top(sock: socket.socket) -> socket.socket:
    """``sock`` moved to the highest free descriptor (below 65,536: a higher one would
    only grow the descriptor table; a worker holds at most ~20,000 clients)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = min(soft, 65_536) - 1
    for fd in range(top, max(top - 64, sock.fileno()), -1):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:  # free
            break
    else:
        return sock
    os.dup2(sock.fileno(), fd, inheritable=False)
    moved = socket.socket(fileno=fd)
    sock.close()
    return moved


def tune_listener(sock: Any, settings: Settings) -> None:
    """Set keepalive on a listening socket (a socket, or asyncio's/uvloop's wrapper of one)."""
    for level, option, value in keepalive_options(settings):
        sock.setsockopt(level, option, value)


def _inside(host: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # no IPv6 zone (fe80::1%eth0)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener's IPv4 peer
    return any(address in network for network in networks)
