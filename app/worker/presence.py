"""Presence: tell a user's accepted contacts, on any worker, how that user appears."""

from __future__ import annotations

import asyncpg

from app.protocol import frames
from app.store import social
from app.worker.announce import Announcer


class Presence:
    def __init__(self, pool: asyncpg.Pool, announcer: Announcer) -> None:
        self._pool = pool
        self._announcer = announcer

    async def broadcast(self, user_id: int) -> None:
        """Push this user's effective presence to every accepted contact."""
        contacts = await social.accepted_contact_ids(self._pool, user_id)
        if contacts:
            view = await social.presence_of(self._pool, user_id)
            await self._announcer.push(
                contacts,
                frames.Presence(view.username, view.state, view.text),
            )
