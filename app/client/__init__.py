"""Asyncio client SDK of the Switchboard v1 wire protocol, and the `chat`/`send` commands.

It talks to the server only through the protocol (docs/protocol.md); it shares
no internals with the worker. `Client` is one connection (app/client/sdk.py);
`ResilientClient` is a session that reconnects, resumes and resends across
worker restarts and failovers (app/client/resilient.py).
"""

from app.client.errors import (
    ClientError,
    ConnectionLost,
    ProtocolError,
    ServerError,
    Timeout,
    UntrustedServer,
)
from app.client.events import (
    Contact,
    ContactRequest,
    Disconnected,
    ErrorEvent,
    Event,
    HistoryMessage,
    HistoryPage,
    Msg,
    Presence,
    Receipt,
    Reconnect,
    Resumed,
    RoomInvite,
    Sent,
    ServerClosed,
    Typing,
    Unknown,
    Welcome,
)
from app.client.resilient import LinkState, ReconnectPolicy, ResilienceStats, ResilientClient
from app.client.sdk import Client, new_cmid, tls_context
from app.client.tokens import FileTokenStore, MemoryTokenStore, TokenStore

__all__ = [
    "Client",
    "ClientError",
    "ConnectionLost",
    "Contact",
    "ContactRequest",
    "Disconnected",
    "ErrorEvent",
    "Event",
    "FileTokenStore",
    "HistoryMessage",
    "HistoryPage",
    "LinkState",
    "MemoryTokenStore",
    "Msg",
    "Presence",
    "ProtocolError",
    "Receipt",
    "Reconnect",
    "ReconnectPolicy",
    "ResilienceStats",
    "ResilientClient",
    "Resumed",
    "RoomInvite",
    "Sent",
    "ServerClosed",
    "ServerError",
    "Timeout",
    "TokenStore",
    "Typing",
    "Unknown",
    "UntrustedServer",
    "Welcome",
    "new_cmid",
    "tls_context",
]
