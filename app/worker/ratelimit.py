"""Per-op budgets: what one user may cost the cluster per second, op by op.

The connection's frame bucket (connection.py) bounds frames; it cannot tell a
`ping` (free) from a `presence` (a synchronously replicated commit plus a NOTIFY
to every contact). These budgets do: each costly op belongs to a class with its
own token bucket per user on this worker, shared by all the user's devices here
(and the device cap bounds how many workers' budgets one user can hold). An op
over its class's budget is answered `rate_limited` with `retry_after`, and does
nothing; the connection stays open.

    class      ops                                              default
    presence   presence                                         1/s, burst 5
    typing     typing                                           5/s, burst 10
    social     contact_add/accept/remove, room_create/invite/   1/s, burst 10
               join/leave
    query      history, contact_list, room_list, room_members   10/s, burst 20

`send`, `ack` and `read` have no class: they are group-committed (many per
statement) and bounded by ``max_inflight_sends`` and the frame bucket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

from app.protocol import (
    ContactAccept,
    ContactAdd,
    ContactList,
    ContactRemove,
    History,
    Request,
    RoomCreate,
    RoomInvite,
    RoomJoin,
    RoomLeave,
    RoomList,
    RoomMembers,
    SetPresence,
    Typing,
)
from app.settings import Settings


class OpClass(Enum):
    PRESENCE = "presence"
    TYPING = "typing"
    SOCIAL = "social"
    QUERY = "query"


OP_CLASSES: dict[type[Request], OpClass] = {
    SetPresence: OpClass.PRESENCE,
    Typing: OpClass.TYPING,
    ContactAdd: OpClass.SOCIAL,
    ContactAccept: OpClass.SOCIAL,
    ContactRemove: OpClass.SOCIAL,
    RoomCreate: OpClass.SOCIAL,
    RoomInvite: OpClass.SOCIAL,
    RoomJoin: OpClass.SOCIAL,
    RoomLeave: OpClass.SOCIAL,
    History: OpClass.QUERY,
    ContactList: OpClass.QUERY,
    RoomList: OpClass.QUERY,
    RoomMembers: OpClass.QUERY,
}


@dataclass(frozen=True, slots=True)
class Rate:
    per_s: float
    burst: float


def rates(settings: Settings) -> dict[OpClass, Rate]:
    s = settings
    return {
        OpClass.PRESENCE: Rate(s.presence_ops_per_s, s.presence_ops_burst),
        OpClass.TYPING: Rate(s.typing_ops_per_s, s.typing_ops_burst),
        OpClass.SOCIAL: Rate(s.social_ops_per_s, s.social_ops_burst),
        OpClass.QUERY: Rate(s.query_ops_per_s, s.query_ops_burst),
    }


class OpBudgets:
    """Token buckets keyed by (user, op class); a full bucket is forgotten."""

    # Forget full buckets at most this often (a full bucket is the default state).
    PRUNE_EVERY_S = 60.0

    def __init__(self, settings: Settings) -> None:
        self._rates = rates(settings)
        # (user_id, class) -> [tokens, stamped_at]
        self._buckets: dict[tuple[int, OpClass], list[float]] = {}
        self._pruned_at = 0.0

    def take(self, user_id: int, req: Request, now: float | None = None) -> float | None:
        """Spend one token of the request's class: None if it may go ahead, else
        the seconds until it may (``retry_after``)."""
        cls = OP_CLASSES.get(type(req))
        if cls is None:
            return None
        if now is None:
            now = time.monotonic()
        if now - self._pruned_at > self.PRUNE_EVERY_S:
            self._prune(now)
        rate = self._rates[cls]
        bucket = self._buckets.get((user_id, cls))
        if bucket is None:
            bucket = self._buckets[(user_id, cls)] = [rate.burst, now]
        tokens = min(rate.burst, bucket[0] + (now - bucket[1]) * rate.per_s)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return None
        bucket[0] = tokens
        return (1.0 - tokens) / rate.per_s

    def _prune(self, now: float) -> None:
        self._pruned_at = now
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self._rates[key[1]].per_s >= self._rates[key[1]].burst
        ]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
