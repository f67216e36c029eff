"""The request methods, and the event iterator, `Client` and `ResilientClient` share.

Each class supplies ``_call(op, expect, fields)``: one request, its reply frame.
What differs between them (sending on one link, or surviving reconnects) lives
there; what a request looks like on the wire and how its reply is read lives here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from app.client.errors import ConnectionLost
from app.client.events import Contact, Event, Frame, HistoryPage, read_reply
from app.protocol.frames import Contacts, Members, Room, RoomInvite, Rooms


def exactly_one(what: str, to: object, room: object) -> None:
    if (to is None) == (room is None):
        raise ValueError(f"{what}: give exactly one of to=/with_user= and room=")


class Requests:
    async def _call(self, op: str, expect: str, fields: dict[str, Any]) -> Frame:
        raise NotImplementedError

    async def next_event(self, timeout: float | None = None) -> Event:
        raise NotImplementedError

    def events(self) -> AsyncIterator[Event]:
        """Server-initiated frames in arrival order (across reconnects, for
        `ResilientClient`); ends when the connection, or the session, is gone for good.

        If the application did not call `close()`, the last event is `ServerClosed`.
        """
        return self._iter_events()

    async def _iter_events(self) -> AsyncIterator[Event]:
        while True:
            try:
                event = await self.next_event()
            except ConnectionLost:
                return
            yield event

    async def set_presence(self, state: str, text: str | None = None) -> None:
        await self._call("presence", "ok", {"state": state, "text": text})

    async def contact_add(self, user: str) -> None:
        await self._call("contact_add", "ok", {"user": user})

    async def contact_accept(self, user: str) -> None:
        await self._call("contact_accept", "ok", {"user": user})

    async def contact_remove(self, user: str) -> None:
        await self._call("contact_remove", "ok", {"user": user})

    async def contacts(self) -> list[Contact]:
        return read_reply(Contacts, await self._call("contacts", "contacts", {})).contacts

    async def room_create(self, name: str) -> int:
        return read_reply(Room, await self._call("room_create", "room", {"name": name})).room

    async def room_invite(self, room: int, user: str) -> None:
        await self._call("room_invite", "ok", {"room": room, "user": user})

    async def room_join(self, room: int) -> int:
        return read_reply(Room, await self._call("room_join", "room", {"room": room})).room

    async def room_leave(self, room: int) -> None:
        await self._call("room_leave", "ok", {"room": room})

    async def room_members(self, room: int) -> list[str]:
        reply = await self._call("room_members", "members", {"room": room})
        return read_reply(Members, reply).members

    async def room_list(self) -> Rooms:
        """The rooms joined (``rooms``) and the invitations not taken up (``invites``)."""
        return read_reply(Rooms, await self._call("rooms", "rooms", {}))

    async def rooms(self) -> list[tuple[int, str]]:
        return [(r.room, r.name) for r in (await self.room_list()).rooms]

    async def room_invitations(self) -> list[RoomInvite]:
        return (await self.room_list()).invites

    async def history(
        self,
        *,
        with_user: str | None = None,
        room: int | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> HistoryPage:
        """Stored messages, newest first, with id below ``before``."""
        exactly_one("history", with_user, room)
        fields = {"with": with_user, "room": room, "before": before, "limit": limit}
        return read_reply(HistoryPage, await self._call("history", "history", fields))

    async def typing(
        self, *, to: str | None = None, room: int | None = None, active: bool = True
    ) -> None:
        exactly_one("typing", to, room)
        await self._call("typing", "ok", {"to": to, "room": room, "active": active})

    async def read(self, msg_id: int) -> None:
        """Durable read receipt for ``msg_id``; its author gets a `Receipt`."""
        await self._call("read", "ok", {"msg_id": msg_id})

    async def ping(self) -> None:
        await self._call("ping", "pong", {})
