"""Asyncio client SDK of the Switchboard v1 wire protocol, and the `chat`/`send` commands.

It talks to the server only through the protocol (docs/protocol.md); it shares
no internals with the worker.
"""

from app.client.errors import ClientError, ConnectionLost, ProtocolError, ServerError, Timeout
from app.client.events import (
    Contact,
    ContactRequest,
    ErrorEvent,
    Event,
    HistoryMessage,
    HistoryPage,
    Msg,
    Presence,
    Receipt,
    Reconnect,
    Sent,
    ServerClosed,
    Typing,
    Unknown,
    Welcome,
)
from app.client.sdk import Client, new_cmid

__all__ = [
    "Client",
    "ClientError",
    "ConnectionLost",
    "Contact",
    "ContactRequest",
    "ErrorEvent",
    "Event",
    "HistoryMessage",
    "HistoryPage",
    "Msg",
    "Presence",
    "ProtocolError",
    "Receipt",
    "Reconnect",
    "Sent",
    "ServerClosed",
    "ServerError",
    "Timeout",
    "Typing",
    "Unknown",
    "Welcome",
    "new_cmid",
]
