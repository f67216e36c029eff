"""Random request sequences, valid and not, through a real worker: only documented replies.

A hypothesis state machine drives one client connection through HAProxy to the
session's cluster: logins right and wrong, registrations, sends, acks, reads,
presence, typing, contacts, rooms, history, and frames the decoder must refuse
(bad JSON, unknown ops, missing or poisoned fields). After every step it checks
what docs/protocol.md promises:

- every request gets exactly one reply (the frame carrying its ``rid``), whose
  ``op`` is the documented reply of that request or ``error``;
- every ``error`` has a documented ``code``; a refused frame without a ``rid``
  gets a decoder error;
- the connection is closed by the server only right after a fatal code;
- frames that answer no request are documented server-initiated frames.

The client is a blocking socket, so the machine runs without an event loop.
"""

from __future__ import annotations

import itertools
import socket
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from app.cluster.launcher import LocalCluster
from app.protocol import DECODER_CODES, FATAL_CODES, ErrorCode
from tests.integration.helpers import PASSWORD, new_user

pytestmark = pytest.mark.integration

CODES = {code.value for code in ErrorCode}
FATAL = {code.value for code in FATAL_CODES}
DECODER = {code.value for code in DECODER_CODES}
PUSHED = {"msg", "receipt", "presence", "typing", "contact_request", "room_invite", "reconnect"}
# The documented reply of each request (docs/protocol.md, Requests).
REPLY = {
    "hello": "welcome",
    "register": "registered",
    "resume": "welcome",
    "send": "sent",
    "ack": "ok",
    "presence": "ok",
    "contact_add": "ok",
    "contact_accept": "ok",
    "contact_remove": "ok",
    "contacts": "contacts",
    "room_create": "room",
    "room_invite": "ok",
    "room_join": "room",
    "room_leave": "ok",
    "room_members": "members",
    "rooms": "rooms",
    "history": "history",
    "typing": "ok",
    "read": "ok",
    "password": "ok",
    "ping": "pong",
    "bye": "ok",
}
TIMEOUT_S = 15.0

text = st.text(max_size=12)
poison = st.sampled_from(["a\x00b", "a\rb", "x\x1by"])  # bodies allow bidi marks


class Line:
    """A blocking line client: frames out, frames in."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
        self.file = self.sock.makefile("rb")
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next frame; None once the server has closed the connection."""
        line = self.file.readline()
        if not line.endswith(b"\n"):
            self.closed = True
            return None
        frame = orjson.loads(line)
        assert isinstance(frame, dict), frame
        return frame

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class ClientMachine(RuleBasedStateMachine):
    cluster: LocalCluster  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.rids = itertools.count(1)
        self.line: Line | None = None
        self.user = new_user("st")
        self.other = new_user("sto")
        self.logged_in = False
        self.rooms: list[int] = []
        self.msg_ids: list[int] = []
        self.last_seq = 0
        self.protocol_errors = 0  # the decoder's, on this connection

    # ---- the connection -------------------------------------------------------
    @initialize()
    def start(self) -> None:
        s = self.cluster.settings
        self.line = Line(s.host, s.client_port)
        for user in (self.user, self.other):
            self._request({"op": "register", "user": user, "password": PASSWORD})

    def teardown(self) -> None:
        if self.line is not None:
            self.line.close()

    def _reconnect(self) -> None:
        assert self.line is not None
        self.line.close()
        s = self.cluster.settings
        self.line = Line(s.host, s.client_port)
        self.logged_in = False
        self.protocol_errors = 0

    def _counted(self, code: str) -> None:
        """Every decoder error counts; the first one over max_errors_per_connection is
        followed by the fatal too_many_errors (docs/protocol.md, Errors)."""
        if code not in DECODER:
            return
        self.protocol_errors += 1
        if self.protocol_errors > self.cluster.settings.max_errors_per_connection:
            assert self.line is not None
            while (frame := self.line.recv()) is not None:
                if frame.get("op") == "error" and "rid" not in frame:
                    assert frame["code"] == "too_many_errors", frame
                else:
                    self._note(frame)
            self._reconnect()

    def _note(self, frame: dict[str, Any]) -> None:
        """A frame that answers no request: documented, and remembered where useful."""
        assert frame.get("op") in PUSHED, frame
        if frame["op"] == "msg":
            self.msg_ids.append(frame["id"])
            self.last_seq = max(self.last_seq, frame["seq"])

    def _request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a request with a fresh rid; return its one reply, checked."""
        assert self.line is not None
        rid = next(self.rids)
        self.line.send(orjson.dumps({**frame, "rid": rid}) + b"\n")
        while True:
            reply = self.line.recv()
            assert reply is not None, f"closed without a reply to {frame['op']}"
            if reply.get("rid") == rid:
                break
            assert "rid" not in reply or reply["rid"] < rid, reply  # never a future rid
            self._note(reply)
        return self._check(frame["op"], reply)

    def _check(self, op: str, reply: dict[str, Any]) -> dict[str, Any]:
        if reply["op"] == "error":
            assert reply["code"] in CODES, reply
            assert isinstance(reply["message"], str), reply
            if reply["code"] in FATAL:
                assert self.line is not None
                # Fatal: whatever is left, then the end of the connection.
                while (frame := self.line.recv()) is not None:
                    self._note(frame)
                self._reconnect()
            else:
                self._counted(reply["code"])
        else:
            assert reply["op"] == REPLY[op], (op, reply)
            if reply["op"] == "welcome":
                self.logged_in = True
                self.last_seq = reply["seq"]
            elif op == "bye":
                assert self.line is not None
                while (frame := self.line.recv()) is not None:
                    self._note(frame)
                self._reconnect()
            elif reply["op"] == "room":
                self.rooms.append(reply["room"])
            elif reply["op"] == "sent":
                self.msg_ids.append(reply["id"])
        return reply

    def _raw(self, data: bytes) -> None:
        """A frame the decoder must refuse and that names no rid: one decoder error."""
        assert self.line is not None
        self.line.send(data)
        while True:
            reply = self.line.recv()
            assert reply is not None, f"closed after {data!r}"
            if reply.get("op") == "error" and "rid" not in reply:
                break
            self._note(reply)
        assert reply["code"] in DECODER, reply
        self._counted(reply["code"])

    # ---- rules ------------------------------------------------------------------
    @rule(right=st.booleans(), device=st.sampled_from(["a", "b"]))
    def hello(self, right: bool, device: str) -> None:
        password = PASSWORD if right else "not the password at all"
        self._request({"op": "hello", "user": self.user, "password": password, "device": device})

    @rule()
    def register_again(self) -> None:
        self._request({"op": "register", "user": self.user, "password": PASSWORD})

    @rule(body=text, to_self=st.booleans())
    def send(self, body: str, to_self: bool) -> None:
        to = self.user if to_self else self.other
        cmid = f"c{next(self.rids)}"
        self._request({"op": "send", "cmid": cmid, "to": to, "body": body or "x"})

    @rule(body=poison)
    def send_poison(self, body: str) -> None:
        frame = {"op": "send", "cmid": f"p{next(self.rids)}", "to": self.other, "body": body}
        reply = self._request(frame)
        assert reply["op"] == "error" and reply["code"] in ("bad_field", "not_authenticated"), reply

    @rule(room_body=text)
    def send_to_room(self, room_body: str) -> None:
        room = self.rooms[-1] if self.rooms else 1
        frame = {"op": "send", "cmid": f"r{next(self.rids)}", "room": room, "body": room_body}
        self._request({**frame, "body": room_body or "x"})

    @rule(delta=st.integers(-2, 5))
    def ack(self, delta: int) -> None:
        self._request({"op": "ack", "seq": max(0, self.last_seq + delta)})

    @rule()
    def read(self) -> None:
        self._request({"op": "read", "msg_id": self.msg_ids[-1] if self.msg_ids else 1})

    @rule(state=st.sampled_from(["online", "away", "dnd", "offline", "busy"]), words=text)
    def presence(self, state: str, words: str) -> None:
        self._request({"op": "presence", "state": state, "text": words})

    @rule(active=st.booleans())
    def typing(self, active: bool) -> None:
        self._request({"op": "typing", "to": self.other, "active": active})

    @rule(op=st.sampled_from(["contact_add", "contact_accept", "contact_remove"]))
    def contact(self, op: str) -> None:
        self._request({"op": op, "user": self.other})

    @rule(name=st.one_of(text, st.just("\u202eevil")))
    def room_create(self, name: str) -> None:
        reply = self._request({"op": "room_create", "name": name or "r"})
        if "\u202e" in name:  # a label may not hide its direction
            assert reply["op"] == "error" and reply["code"] == "bad_field", reply

    @rule(op=st.sampled_from(["room_join", "room_leave", "room_members"]))
    def room_op(self, op: str) -> None:
        self._request({"op": op, "room": self.rooms[-1] if self.rooms else 1})

    @rule()
    def room_invite(self) -> None:
        room = self.rooms[-1] if self.rooms else 1
        self._request({"op": "room_invite", "room": room, "user": self.other})

    @rule(op=st.sampled_from(["contacts", "rooms", "ping"]))
    def listing(self, op: str) -> None:
        self._request({"op": op})

    @rule(limit=st.integers(1, 100))
    def history(self, limit: int) -> None:
        self._request({"op": "history", "with": self.other, "limit": limit})

    @rule()
    def resume_with_a_bad_token(self) -> None:
        frame = {"op": "resume", "user": self.user, "device": "a", "token": "x" * 32}
        self._request({**frame, "last_seq": 0})

    @rule()
    def bye(self) -> None:
        self._request({"op": "bye"})

    @rule(
        data=st.sampled_from(
            [
                b"{not json\n",
                b"[1, 2]\n",
                b'{"op": 7}\n',
                b'{"op": "teleport"}\n',
                b'{"op": "send", "to": "x"}\n',
                b'{"op": "presence", "state": "away", "text": "a\\u0000b"}\n',
                b'{"op": "ping", "x": "\\ud800"}\n',
            ]
        )
    )
    def refused_frame(self, data: bytes) -> None:
        self._raw(data)

    @invariant()
    def connection_is_usable(self) -> None:
        if self.line is not None:
            assert not self.line.closed


def test_random_sessions_get_only_documented_replies(cluster: LocalCluster) -> None:
    ClientMachine.cluster = cluster
    run_state_machine_as_test(
        ClientMachine,
        settings=settings(
            # No shrinking: against a live cluster it costs minutes; the failing
            # sequence is printed as it ran.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            max_examples=12,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
