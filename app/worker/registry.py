"""Who is connected to this worker: connections, sessions by user, and user names.

The registry is the worker's only in-memory index of its clients. It is never
the truth about a session (PostgreSQL is); it only says which local connection
to write to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from app.logs import get_logger
from app.worker.states import Peer

log = get_logger("worker")

# Usernames never change owner, so they are cached without invalidation; past this
# many entries the cache is simply emptied (a bounded, rarely paid miss).
NAME_CACHE_ENTRIES = 100_000


class Registry:
    def __init__(
        self,
        find_user_id: Callable[[str], Awaitable[int]],
        find_usernames: Callable[[list[int]], Awaitable[dict[int, str]]],
    ) -> None:
        self._find_user_id = find_user_id
        self._find_usernames = find_usernames
        self.connections: set[Peer] = set()
        self.by_user: dict[int, set[Peer]] = {}
        self._user_ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        # len() of every set in by_user, kept as they change: `sessions` is read on
        # every login (worker_max_sessions), and summing 12,000 sets each time is not free.
        self._attached = 0
        self._background: set[asyncio.Task[None]] = set()

    # ---- connections and sessions ------------------------------------------
    def add(self, peer: Peer) -> None:
        self.connections.add(peer)

    def discard(self, peer: Peer) -> None:
        self.connections.discard(peer)

    def attach(self, peer: Peer) -> None:
        """``peer`` holds an ACTIVE session: frames for its user go to it too."""
        session = peer.session
        assert session is not None
        peers = self.by_user.setdefault(session.user_id, set())
        if peer not in peers:
            peers.add(peer)
            self._attached += 1
        if session.user_id not in self._names:
            self.remember_name(session.user_id, session.username)

    def detach(self, peer: Peer) -> None:
        if peer.session is None:
            return
        peers = self.by_user.get(peer.session.user_id)
        if peers is not None:
            if peer in peers:
                peers.discard(peer)
                self._attached -= 1
            if not peers:
                del self.by_user[peer.session.user_id]

    def holding(self, user_id: int, session_id: int) -> list[Peer]:
        """The local connections holding this session (at most one, normally)."""
        return [
            peer
            for peer in self.by_user.get(user_id, ())
            if peer.session is not None and peer.session.session_id == session_id
        ]

    @property
    def sessions(self) -> int:
        return self._attached

    # ---- names ---------------------------------------------------------------
    async def user_id(self, username: str) -> int:
        """The id of a user (NotFound if there is none)."""
        cached = self._user_ids.get(username)
        if cached is not None:
            return cached
        user_id = await self._find_user_id(username)
        self.remember_name(user_id, username)
        return user_id

    def cached_user_id(self, username: str) -> int | None:
        return self._user_ids.get(username)

    def remember_name(self, user_id: int, username: str) -> None:
        if len(self._user_ids) >= NAME_CACHE_ENTRIES:
            self._user_ids.clear()
        if len(self._names) >= NAME_CACHE_ENTRIES:
            self._names.clear()
        self._user_ids[username] = user_id
        self._names[user_id] = username

    @property
    def cached_names(self) -> dict[int, str]:
        """Names already known (for the hot path; `usernames` fetches the rest)."""
        return self._names

    async def usernames(self, ids: Iterable[int]) -> dict[int, str]:
        """Names for user ids, from the cache and, for the rest, the database."""
        names = self._names
        missing = [i for i in ids if i not in names]
        if missing:
            if len(names) + len(missing) > NAME_CACHE_ENTRIES:
                names.clear()
            names.update(await self._find_usernames(missing))
        return names

    # ---- fire-and-forget tasks -------------------------------------------------
    def keep(self, task: asyncio.Task[None]) -> None:
        """Hold a fire-and-forget task until it ends, and log it if it fails."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(log_task_error)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, held and logged as `keep` does."""
        self.keep(asyncio.get_running_loop().create_task(work))


def log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background_task_failed", error=type(task.exception()).__name__)
