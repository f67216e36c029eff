"""Sans-I/O codec for the Switchboard v1 wire protocol (see docs/protocol.md).

Bytes in, typed requests out (`Decoder`); server frames out as bytes, each
defined once in `app.protocol.frames` (``frames.Msg(...).encode()``), where a
client also reads them (`parse_server_frame`). The frame classes are not
re-exported here: ``Typing`` and ``RoomInvite`` name requests too.
No sockets, no asyncio, no database: pure data transformation.
"""

from app.protocol.codec import Decoder, encode, encode_error, error_frame, parse_frame
from app.protocol.errors import DECODER_CODES, FATAL_CODES, BadServerFrame, ErrorCode, FrameError
from app.protocol.frames import ServerFrame, encode_msg, encode_sent, parse_server_frame
from app.protocol.limits import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits
from app.protocol.requests import (
    CLIENT_PRESENCE_STATES,
    OPS,
    PRE_AUTH_OPS,
    Ack,
    Bye,
    ContactAccept,
    ContactAdd,
    ContactList,
    ContactRemove,
    Hello,
    History,
    LoginToken,
    PasswordChange,
    Ping,
    PresenceState,
    Read,
    Register,
    Request,
    Resume,
    Rid,
    RoomCreate,
    RoomInvite,
    RoomJoin,
    RoomLeave,
    RoomList,
    RoomMembers,
    Send,
    SetPresence,
    Typing,
)
from app.protocol.timefmt import rfc3339

__all__ = [
    "CLIENT_PRESENCE_STATES",
    "DECODER_CODES",
    "DEFAULT_LIMITS",
    "FATAL_CODES",
    "OPS",
    "PRE_AUTH_OPS",
    "PROTOCOL_VERSION",
    "Ack",
    "BadServerFrame",
    "Bye",
    "ContactAccept",
    "ContactAdd",
    "ContactList",
    "ContactRemove",
    "Decoder",
    "ErrorCode",
    "FrameError",
    "Hello",
    "History",
    "Limits",
    "LoginToken",
    "PasswordChange",
    "Ping",
    "PresenceState",
    "Read",
    "Register",
    "Request",
    "Resume",
    "Rid",
    "RoomCreate",
    "RoomInvite",
    "RoomJoin",
    "RoomLeave",
    "RoomList",
    "RoomMembers",
    "Send",
    "ServerFrame",
    "SetPresence",
    "Typing",
    "encode",
    "encode_error",
    "encode_msg",
    "encode_sent",
    "error_frame",
    "parse_frame",
    "parse_server_frame",
    "rfc3339",
]
