"""The worker's session limit (``worker_max_sessions``): a worker that holds that many
sessions refuses new logins with ``overloaded``, before any password is hashed.

Only new logins (``hello``, ``login_token``) count against it. A ``resume`` is a
session the cluster already holds, usually moving over from a worker that died:
refusing it would strand the session, so the limit leaves room for it instead
(``switchboard up --capacity`` sizes it so the others hold one worker's share more).
The limit is checked when a login starts: the logins already admitted may take a
worker past it by at most its admission queue.
"""

from __future__ import annotations

import random

from app.protocol import ErrorCode
from app.settings import Settings
from app.worker.errors import RequestError
from app.worker.registry import Registry


class SessionCap:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.max_sessions = settings.worker_max_sessions
        self._registry = registry
        self.refused = 0  # new logins refused at the limit (also counted as overloaded)

    def headroom(self) -> int | None:
        """Sessions this worker may still take; None without a limit."""
        if not self.max_sessions:
            return None
        return self.max_sessions - self._registry.sessions

    def admit_login(self) -> None:
        """`RequestError` overloaded when this worker holds worker_max_sessions sessions."""
        if self.max_sessions and self._registry.sessions >= self.max_sessions:
            self.refused += 1
            raise RequestError(
                ErrorCode.OVERLOADED,
                f"this worker holds its {self.max_sessions} sessions; retry later",
                retry_after=round(random.uniform(1.0, 3.0), 2),
            )
