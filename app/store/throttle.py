"""Counters that throttle password attempts and registrations (table ``auth_throttle``).

Two kinds of counter, one row per key:

- **backoff**, per (name, client address), key ``login|alice|203.0.113.5``: the
  first ``free`` attempts go through at once, each further one only after a wait
  that doubles (``base_s``, 2·``base_s``, ... up to ``max_s``). A right password
  deletes the row; after ``forget_s`` without an attempt it starts afresh.
- **budget**, per client address, key ``login-addr|203.0.113.5``: at most
  ``limit`` attempts per fixed window; a right password gives its attempt back.

An attempt that fails on the server's side (the database, the hash pool) is
not the client's failure: `Throttle.password_void` and `register_void` take it
back, so a storm of ``internal`` errors never locks anyone out.

An attempt is counted *before* the password is checked, by the statement that
lets it through or refuses it (``INSERT ... ON CONFLICT DO UPDATE ... WHERE``:
a refused attempt updates nothing and returns no row). Parallel attempts queue
on the row lock, so none of them can read "nothing counted yet" (no
check-then-act race), and a refused attempt neither counts nor extends a wait.

Addresses are keyed as IPv4 addresses or IPv6 /64 networks (one subscriber's
usual allocation). Addresses that stand for many clients (``shared_client_addrs``:
a proxy, a NAT) have no budget: it would be everyone's at once. Counters whose
wait or window ended long ago are deleted every ``PRUNE_EVERY_S`` by whichever
process counts an attempt then.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.logs import get_logger
from app.settings import IPNetwork, Settings
from app.store.errors import DB_ERRORS

log = get_logger("throttle")

# How often a process that counts attempts deletes the rows nobody needs any more.
PRUNE_EVERY_S = 600.0


@dataclass(frozen=True, slots=True)
class Backoff:
    free: int
    base_s: float
    max_s: float
    forget_s: float

    def delay_s(self, attempts: int) -> float:
        """The wait after ``attempts`` counted attempts (what the statement computes)."""
        if attempts < self.free:
            return 0.0
        return float(min(self.max_s, self.base_s * 2 ** min(attempts - self.free, 30)))


@dataclass(frozen=True, slots=True)
class Budget:
    limit: int
    window_s: float


@dataclass(frozen=True, slots=True)
class Admitted:
    """An attempt let through and counted: the keys to settle once it is checked."""

    pair_key: str
    addr_key: str | None


@dataclass(frozen=True, slots=True)
class Refused:
    """Not let through (and not checked): retry after this many whole seconds."""

    retry_after: int
    by: str  # "user" (the pair's backoff) or "address" (the address's budget)


def _delay(attempts: str) -> str:
    """SQL for Backoff.delay_s; $2 free, $3 base_s, $4 max_s."""
    return (
        f"make_interval(secs => CASE WHEN {attempts} < $2::int THEN 0"
        f" ELSE least($4::float8, $3::float8 * 2 ^ least({attempts} - $2::int, 30)) END)"
    )


# Counters are written without waiting for the synchronous standby (as pushes are,
# social.push): a failover may forget the last few attempts' counts, which costs
# an attacker's backoff a few seconds, while every login would otherwise wait for
# replication two more times. set_config(..., true) lasts until the implicit
# transaction of the statement commits.
_ASYNC_COMMIT = "(SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"

# clock_timestamp(), not now(): now() is when the statement's transaction began, and
# an attempt that waited on a parallel attempt's row lock began before that one
# wrote its times. Compared with its own start it would find the other's "no wait"
# (next_attempt_at = the other's now()) still in the future and refuse a free attempt.
_NOW = "clock_timestamp()"
_RESTART = f"t.next_attempt_at < {_NOW} - make_interval(secs => $5::float8)"
_COUNT_BACKOFF = f"""
INSERT INTO auth_throttle AS t (key, attempts, first_attempt_at, next_attempt_at)
SELECT $1, 1, {_NOW}, {_NOW} + {_delay("1")} FROM {_ASYNC_COMMIT}
ON CONFLICT (key) DO UPDATE SET
    attempts = CASE WHEN {_RESTART} THEN 1 ELSE t.attempts + 1 END,
    first_attempt_at = CASE WHEN {_RESTART} THEN {_NOW} ELSE t.first_attempt_at END,
    next_attempt_at = {_NOW} + {_delay(f"CASE WHEN {_RESTART} THEN 1 ELSE t.attempts + 1 END")}
WHERE t.next_attempt_at <= {_NOW}
RETURNING attempts
"""

_NEW_WINDOW = f"t.next_attempt_at <= {_NOW}"
_WINDOW = "make_interval(secs => $3::float8)"
_COUNT_BUDGET = f"""
INSERT INTO auth_throttle AS t (key, attempts, first_attempt_at, next_attempt_at)
SELECT $1, 1, {_NOW}, {_NOW} + {_WINDOW} FROM {_ASYNC_COMMIT}
ON CONFLICT (key) DO UPDATE SET
    attempts = CASE WHEN {_NEW_WINDOW} THEN 1 ELSE t.attempts + 1 END,
    first_attempt_at = CASE WHEN {_NEW_WINDOW} THEN {_NOW} ELSE t.first_attempt_at END,
    next_attempt_at = CASE WHEN {_NEW_WINDOW} THEN {_NOW} + {_WINDOW} ELSE t.next_attempt_at END
WHERE {_NEW_WINDOW} OR t.attempts < $2::int
RETURNING attempts
"""


async def count_backoff(pool: asyncpg.Pool, key: str, policy: Backoff) -> float | None:
    """Count an attempt under ``key``'s backoff: None if it may go ahead, else the
    seconds until one may."""
    row = await pool.fetchrow(
        _COUNT_BACKOFF, key, policy.free, policy.base_s, policy.max_s, policy.forget_s
    )
    return None if row is not None else await _wait_s(pool, key, policy.base_s)


async def count_budget(pool: asyncpg.Pool, key: str, policy: Budget) -> float | None:
    """Count an attempt against ``key``'s budget: None if it may go ahead, else the
    seconds until the window ends."""
    row = await pool.fetchrow(_COUNT_BUDGET, key, policy.limit, policy.window_s)
    return None if row is not None else await _wait_s(pool, key, policy.window_s)


async def _wait_s(pool: asyncpg.Pool, key: str, otherwise: float) -> float:
    # Advisory only: the refusal is decided. The row can be missing from this
    # statement's snapshot when it was inserted by an attempt that committed
    # after the refusing statement started; then say ``otherwise``.
    wait = await pool.fetchval(
        f"SELECT extract(epoch FROM next_attempt_at - {_NOW})::float8 "
        "FROM auth_throttle WHERE key = $1",
        key,
    )
    return otherwise if wait is None else max(float(wait), 0.0)


_UNCOUNT_BACKOFF = f"""
UPDATE auth_throttle AS t SET
    attempts = t.attempts - 1,
    next_attempt_at = least(t.next_attempt_at, {_NOW} + {_delay("(t.attempts - 1)")})
FROM {_ASYNC_COMMIT}
WHERE t.key = $1 AND t.attempts > 0
"""


async def uncount_backoff(pool: asyncpg.Pool, key: str, policy: Backoff) -> None:
    """Take back one attempt counted under ``key``'s backoff (it failed on our side).

    The wait becomes no longer than the one after one attempt fewer, counted from
    now: an attempt counted meanwhile by another request keeps a wait of its own.
    """
    await pool.execute(_UNCOUNT_BACKOFF, key, policy.free, policy.base_s, policy.max_s)


async def forget(pool: asyncpg.Pool, key: str) -> None:
    """A backoff key's attempts succeeded: start afresh."""
    await pool.execute(f"DELETE FROM auth_throttle USING {_ASYNC_COMMIT} WHERE key = $1", key)


async def give_back(pool: asyncpg.Pool, key: str) -> None:
    """A budget key's attempt succeeded: it does not count (within the current window)."""
    await pool.execute(
        f"UPDATE auth_throttle SET attempts = attempts - 1 FROM {_ASYNC_COMMIT} "
        "WHERE key = $1 AND attempts > 0 AND next_attempt_at > now()",
        key,
    )


# Many right passwords at once (a batch of password logins, app/store/logins.py): the
# rows locked in key order first, so two batches sharing keys cannot deadlock; an
# address in the batch k times gets k attempts back.
_SETTLE_RIGHTS = f"""
WITH locked AS MATERIALIZED (
    SELECT key FROM auth_throttle WHERE key = ANY($1::text[]) OR key = ANY($2::text[])
    ORDER BY key FOR UPDATE
),
forgotten AS (
    DELETE FROM auth_throttle t USING locked l WHERE t.key = l.key AND t.key = ANY($1::text[])
),
given AS (
    UPDATE auth_throttle t SET attempts = greatest(t.attempts - g.n, 0)
    FROM (SELECT key, count(*)::int AS n FROM unnest($2::text[]) AS key GROUP BY key) g
    WHERE t.key = g.key AND t.key IN (SELECT key FROM locked)
      AND t.attempts > 0 AND t.next_attempt_at > now()
)
SELECT {_ASYNC_COMMIT}
"""


async def settle_rights(
    conn: asyncpg.Connection | asyncpg.Pool, pair_keys: list[str], addr_keys: list[str]
) -> None:
    """Many attempts' passwords were right: forget each pair (`forget`) and give each
    address its attempts back (`give_back`), in one statement."""
    await conn.execute(_SETTLE_RIGHTS, pair_keys, addr_keys)


async def prune(pool: asyncpg.Pool, older_than_s: float) -> int:
    """Delete counters whose wait or window ended more than ``older_than_s`` ago."""
    status = await pool.execute(
        "DELETE FROM auth_throttle WHERE next_attempt_at < now() - make_interval(secs => $1)",
        older_than_s,
    )
    return int(status.split()[-1])


# ---- addresses -------------------------------------------------------------------


def client_host(peer: str) -> str:
    """The address of ``ip:port`` (IPv6 too: ``2001:db8::1:5555``); other text as given."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def address_key(host: str) -> str:
    """IPv4 as it is, IPv6 as its /64 (IPv4-mapped IPv6 as the IPv4); other text as given."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def is_shared(host: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


# ---- the policies, from the settings -------------------------------------------------


class Throttle:
    """Password attempts by (name, address) and by address; registrations by address.

    ``scope`` names the accounts: ``login`` (client users, also the old password
    of ``password``) or ``admin`` (the dashboard's admins).
    """

    def __init__(self, pool: asyncpg.Pool, settings: Settings, scope: str = "login") -> None:
        s = settings
        self._pool = pool
        self._scope = scope
        self._shared = s.shared_client_networks()
        free = s.dashboard_login_free_failures if scope == "admin" else s.login_free_failures
        per_addr = (
            s.dashboard_login_failures_per_addr
            if scope == "admin"
            else s.max_login_failures_per_addr
        )
        self.pair = Backoff(
            free, s.login_backoff_base_s, s.login_backoff_max_s, s.login_backoff_forget_s
        )
        self.per_addr = Budget(per_addr, s.login_failure_window_s)
        self.registers = Budget(s.max_registers_per_addr, s.register_window_s)
        self._prune_horizon_s = max(
            s.login_backoff_forget_s, s.login_failure_window_s, s.register_window_s
        )
        self._next_prune = time.monotonic() + PRUNE_EVERY_S

    async def password_attempt(self, name: str, host: str) -> Admitted | Refused:
        """Count a password attempt for ``name`` from ``host``: the pair first, then
        the address, so an address's budget counts only passwords that get checked."""
        await self._maybe_prune()
        addr = address_key(host)
        pair_key = f"{self._scope}|{name}|{addr}"
        wait = await count_backoff(self._pool, pair_key, self.pair)
        if wait is not None:
            return Refused(_whole_seconds(wait), "user")
        addr_key = None
        if not is_shared(host, self._shared):
            addr_key = f"{self._scope}-addr|{addr}"
            try:
                wait = await count_budget(self._pool, addr_key, self.per_addr)
            except DB_ERRORS:
                await self._uncount(uncount_backoff(self._pool, pair_key, self.pair))
                raise
            if wait is not None:
                # Still counted for the pair: that pair is this address's own.
                return Refused(_whole_seconds(wait), "address")
        return Admitted(pair_key, addr_key)

    async def password_right(self, attempt: Admitted) -> None:
        """The attempt's password was right: forget the pair, give the address its attempt."""
        await forget(self._pool, attempt.pair_key)
        if attempt.addr_key is not None:
            await give_back(self._pool, attempt.addr_key)

    async def password_void(self, attempt: Admitted) -> None:
        """The attempt failed on our side (a database error, ...) before its password
        was judged: take it back from the pair and the address. Best effort: when the
        database fails again, the count stays (and is logged)."""
        await self._uncount(uncount_backoff(self._pool, attempt.pair_key, self.pair))
        if attempt.addr_key is not None:
            await self._uncount(give_back(self._pool, attempt.addr_key))

    async def register_void(self, host: str) -> None:
        """A counted registration failed on our side: give the address its attempt back."""
        if not is_shared(host, self._shared):
            key = f"register-addr|{address_key(host)}"
            await self._uncount(give_back(self._pool, key))

    @staticmethod
    async def _uncount(statement: Coroutine[Any, Any, None]) -> None:
        try:
            await statement
        except DB_ERRORS as exc:
            log.warning("throttle_uncount_failed", error=type(exc).__name__)

    def token_keys(self, name: str, host: str) -> tuple[str, str | None]:
        """The counters of ``login_token`` failures: per (name, address) and per address
        (None for a shared address). The login's batch statement refuses while either
        is waiting (device_tokens._FIND); only failures are counted (`token_failed`),
        so a storm of right tokens writes no counter at all."""
        addr = address_key(host)
        addr_key = None if is_shared(host, self._shared) else f"token-addr|{addr}"
        return f"token|{name}|{addr}", addr_key

    async def token_failed(self, pair_key: str, addr_key: str | None) -> None:
        """Count a refused device token against its pair's backoff and its address's budget."""
        await count_backoff(self._pool, pair_key, self.pair)
        if addr_key is not None:
            await count_budget(self._pool, addr_key, self.per_addr)

    async def register_attempt(self, host: str) -> Refused | None:
        """Count a registration from ``host``: None if it may go ahead."""
        if is_shared(host, self._shared):
            return None
        wait = await count_budget(self._pool, f"register-addr|{address_key(host)}", self.registers)
        return None if wait is None else Refused(_whole_seconds(wait), "address")

    async def _maybe_prune(self) -> None:
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY_S
            with contextlib.suppress(*DB_ERRORS):  # housekeeping: the next one will do
                await prune(self._pool, self._prune_horizon_s)


def _whole_seconds(wait_s: float) -> int:
    return max(1, math.ceil(wait_s))
