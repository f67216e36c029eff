"""Presence, contacts and rooms on the wire.

What a change tells others (presence, a contact request, an invitation) is
pushed in the background after the reply: the reply is the request's one
answer, and a failed push must not add a second.
"""

from __future__ import annotations

import asyncpg

from app.protocol import (
    ContactAccept,
    ContactAdd,
    ContactList,
    ContactRemove,
    RoomCreate,
    RoomInvite,
    RoomJoin,
    RoomLeave,
    RoomList,
    RoomMembers,
    SetPresence,
    frames,
)
from app.store import social
from app.store.errors import NotFound
from app.worker.announce import Announcer
from app.worker.presence import Presence
from app.worker.registry import Registry
from app.worker.states import Peer, active_session

OK = frames.Ok()


class Contacts:
    def __init__(
        self, pool: asyncpg.Pool, registry: Registry, announcer: Announcer, presence: Presence
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._announcer = announcer
        self._presence = presence

    async def set_presence(self, conn: Peer, req: SetPresence) -> None:
        session = active_session(conn)
        await social.set_presence(self._pool, session.user_id, req.state.value, req.text)
        conn.write(OK.encode(req.rid))
        self._registry.spawn(self._presence.broadcast(session.user_id))

    async def contact_add(self, conn: Peer, req: ContactAdd) -> None:
        session = active_session(conn)
        other = await self._registry.user_id(req.user)
        status = await social.contact_add(self._pool, session.user_id, other)
        conn.write(OK.encode(req.rid))
        if status == "accepted":
            self._registry.spawn(self._presence.broadcast(session.user_id))
            self._registry.spawn(self._presence.broadcast(other))
        else:
            self._registry.spawn(
                self._announcer.push([other], frames.ContactRequest(session.username))
            )

    async def contact_accept(self, conn: Peer, req: ContactAccept) -> None:
        session = active_session(conn)
        other = await self._registry.user_id(req.user)
        await social.contact_accept(self._pool, session.user_id, other)
        conn.write(OK.encode(req.rid))
        self._registry.spawn(self._presence.broadcast(session.user_id))
        self._registry.spawn(self._presence.broadcast(other))

    async def contact_remove(self, conn: Peer, req: ContactRemove) -> None:
        session = active_session(conn)
        other = await self._registry.user_id(req.user)
        if not await social.contact_remove(self._pool, session.user_id, other):
            raise NotFound("not a contact")
        conn.write(OK.encode(req.rid))

    async def contact_list(self, conn: Peer, req: ContactList) -> None:
        session = active_session(conn)
        contacts = await social.contact_list(self._pool, session.user_id)
        items = [frames.Contact(c.username, c.status, c.state, c.text) for c in contacts]
        conn.write(frames.Contacts(items).encode(req.rid))

    # ---- rooms -------------------------------------------------------------
    async def room_create(self, conn: Peer, req: RoomCreate) -> None:
        session = active_session(conn)
        room = await social.room_create(self._pool, session.user_id, req.name)
        conn.write(frames.Room(room, req.name).encode(req.rid))

    async def room_invite(self, conn: Peer, req: RoomInvite) -> None:
        session = active_session(conn)
        invitee = await self._registry.user_id(req.user)
        name = await social.room_invite(self._pool, req.room, session.user_id, invitee)
        conn.write(OK.encode(req.rid))
        self._registry.spawn(
            self._announcer.push(
                [invitee],
                frames.RoomInvite(req.room, name, session.username),
            )
        )

    async def room_join(self, conn: Peer, req: RoomJoin) -> None:
        session = active_session(conn)
        name = await social.room_join(self._pool, req.room, session.user_id)
        conn.write(frames.Room(req.room, name).encode(req.rid))

    async def room_leave(self, conn: Peer, req: RoomLeave) -> None:
        session = active_session(conn)
        await social.room_leave(self._pool, req.room, session.user_id)
        conn.write(OK.encode(req.rid))

    async def room_members(self, conn: Peer, req: RoomMembers) -> None:
        session = active_session(conn)
        members = await social.room_members(self._pool, req.room, session.user_id)
        conn.write(frames.Members(req.room, members).encode(req.rid))

    async def room_list(self, conn: Peer, req: RoomList) -> None:
        session = active_session(conn)
        rooms = await social.rooms_of(self._pool, session.user_id)
        joined = [frames.Room(r.room, r.name) for r in rooms if r.invited_by is None]
        invites = [
            frames.RoomInvite(r.room, r.name, r.invited_by)
            for r in rooms
            if r.invited_by is not None
        ]
        conn.write(frames.Rooms(joined, invites).encode(req.rid))
