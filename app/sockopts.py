"""Socket options shared by the client SDK and the server's own connections."""

from __future__ import annotations

import socket


def tcp_keepalive(sock: object, idle_s: int, interval_s: int, probes: int) -> None:
    """Kernel keepalive probes after ``idle_s`` of silence, then every ``interval_s``;
    ``probes`` unanswered ones end the connection. Probes go only while nothing is in
    flight, so TCP_USER_TIMEOUT ends it too when data stays unacknowledged as long as
    the probes would take: a peer whose host died without a word (no FIN, no reset)
    is noticed within ``idle_s + interval_s * probes`` seconds either way. The peer's
    kernel answers a probe without waking its process: a peer that is only slow is
    never taken for dead."""
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:
        return  # no socket underneath (a test double)
    setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
    setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval_s)
    setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
    setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, (idle_s + interval_s * probes) * 1000)
