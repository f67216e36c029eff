"""Exceptions raised by the Switchboard client SDK.

One tree, rooted in `ClientError`::

    ClientError
    ├── ServerError      the server answered a request with an ``error`` frame (remote)
    ├── ProtocolError    the server sent something v1 does not allow (local detection)
    ├── ConnectionLost   the connection could not be opened, or closed (also a ConnectionError)
    │   └── UntrustedServer  TLS could not verify the server: certificate or host name
    └── Timeout          no reply or event in time (also a TimeoutError)

Branch on `ServerError.code` (a wire error code), never on the message text.
"""

from __future__ import annotations

from app.protocol import FATAL_CODES, ErrorCode

# Codes after which a request may be sent again unchanged; a `send` is safe to
# repeat because the server deduplicates on its cmid. Unknown codes count as
# `internal`, as the protocol asks.
RETRYABLE_CODES = frozenset({ErrorCode.INTERNAL, ErrorCode.OVERLOADED, ErrorCode.RATE_LIMITED})
_KNOWN_CODES = frozenset(code.value for code in ErrorCode)


class ClientError(Exception):
    """Base class of every exception the client SDK raises on purpose."""


class ServerError(ClientError):
    """The server replied ``error`` to a request."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def fatal(self) -> bool:
        """Whether the server closes the connection after this error."""
        return self.code in FATAL_CODES

    @property
    def retryable(self) -> bool:
        """Whether repeating the same request later may succeed."""
        return self.code in RETRYABLE_CODES or self.code not in _KNOWN_CODES


class ProtocolError(ClientError):
    """The server sent a frame that breaks the v1 protocol (e.g. a reply of the wrong kind)."""


class ConnectionLost(ClientError, ConnectionError):
    """The connection could not be opened or is closed; pending requests fail with this."""


class UntrustedServer(ConnectionLost):
    """The TLS handshake failed verification: the server's certificate is not signed by
    a CA the client trusts, has expired, or does not name the host the client dialled.
    Its ``__cause__`` is the `ssl.SSLCertVerificationError`."""


class Timeout(ClientError, TimeoutError):
    """No reply (or event) arrived within the allotted time."""
