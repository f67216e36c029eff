"""Attacks on password logins (and the old password of `password`) against a real cluster.

Each test has an attacker and a bystander: the bystander must be unaffected (logs
in, sends, receives, within normal latency), and the attacker gets the documented
error codes only (docs/security.md, "Login throttling, registration, password
changes"). tests/hostile/bystander.py says how addresses are told apart.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from app.cluster.launcher import LocalCluster
from tests.hostile.bystander import (
    BYSTANDER_IP,
    WRONG,
    attacker_ip,
    bystander_is_unaffected,
    checked_at_most,
    connect_from,
    hello,
    timed,
    workers_see_client_addresses,
)
from tests.integration.helpers import PASSWORD, db, login, new_user, register
from tests.linechat import LineClient

pytestmark = pytest.mark.integration


# ---- mass failed logins, targeted lockouts, parallel guessing ---------------------------


async def test_mass_failed_logins_from_one_address_lock_nobody_else_out(
    cluster: LocalCluster,
) -> None:
    """C2: 51 failed hellos for made-up users from one address; a bystander then logs in."""
    s = cluster.settings
    attacker = await connect_from(cluster, attacker_ip())
    codes = Counter(
        [(await attacker.request(hello(new_user("ghost"), WRONG)))["code"] for _ in range(51)]
    )
    await attacker.close()
    assert set(codes) <= {"auth_failed", "rate_limited"}, codes
    recorded = await bystander_is_unaffected(cluster)
    if workers_see_client_addresses(recorded):
        # The attacker's own address met its budget; nobody else's did.
        budget = s.max_login_failures_per_addr
        assert codes == {"auth_failed": budget, "rate_limited": 51 - budget}
    else:
        # HAProxy's shared address has no budget: every guess was checked, and refused.
        assert codes == {"auth_failed": 51}


async def test_a_named_user_cannot_be_locked_out(cluster: LocalCluster) -> None:
    """M4: an attacker guessing bob's password waits longer and longer (1 s, 2 s, 4 s);
    bob, with his password, is let in (at once from an address of his own)."""
    s = cluster.settings
    free = s.login_free_failures
    bob = new_user("bob")
    await register(cluster, bob)
    attacker = await connect_from(cluster, attacker_ip())
    for _ in range(free):
        assert (await attacker.request(hello(bob, WRONG)))["code"] == "auth_failed"
    waits = []
    for _ in range(3):
        refused = await attacker.request(hello(bob, WRONG))
        assert refused["code"] == "rate_limited", refused
        waits.append(refused["retry_after"])
        await asyncio.sleep(refused["retry_after"])
        assert (await attacker.request(hello(bob, WRONG)))["code"] == "auth_failed"
    assert waits == [1, 2, 4]  # login_backoff_base_s, doubling
    await attacker.close()
    recorded = await bystander_is_unaffected(cluster)
    client = await connect_from(cluster, BYSTANDER_IP)
    reply = await timed(client, hello(bob, PASSWORD))
    if not workers_see_client_addresses(recorded):
        # bob and the attacker are one (user, address) pair to the workers: bob
        # waits at most the attacker's current wait, never a lockout.
        assert reply["code"] == "rate_limited" and reply["retry_after"] <= 8, reply
        await asyncio.sleep(reply["retry_after"])
        reply = await timed(client, hello(bob, PASSWORD))
    assert reply["op"] == "welcome", reply
    await client.close()


async def test_parallel_wrong_logins_get_no_more_than_the_free_failures(
    cluster: LocalCluster,
) -> None:
    """M4: 40 wrong hellos for one user at once, over 40 connections and every worker:
    counted before the check, so at most login_free_failures are checked."""
    s = cluster.settings
    victim = new_user("victim")
    await register(cluster, victim)
    clients = [await LineClient.connect(s.host, s.client_port) for _ in range(40)]
    started = time.monotonic()
    replies = await asyncio.gather(*(c.request(hello(victim, WRONG)) for c in clients))
    elapsed = time.monotonic() - started
    codes = Counter(reply["code"] for reply in replies)
    # All 40 come from one address (whichever the workers see): one pair.
    assert set(codes) == {"auth_failed", "rate_limited"}, codes
    assert (
        s.login_free_failures
        <= codes["auth_failed"]
        <= checked_at_most(s.login_free_failures, s.login_backoff_base_s, elapsed)
    ), (codes, elapsed)
    assert all(r["retry_after"] >= 1 for r in replies if r["code"] == "rate_limited")
    for c in clients:
        await c.close()
    await bystander_is_unaffected(cluster)


async def test_wrong_old_passwords_are_throttled(cluster: LocalCluster) -> None:
    """M3: guessing the old password from a stolen session meets the login backoff."""
    free = cluster.settings.login_free_failures
    thief, _ = await login(cluster, new_user("stolen"))
    change = {"op": "password", "old": WRONG, "new": "the thief's own password"}
    codes = [(await thief.request(change))["code"] for _ in range(free + 1)]
    assert codes == ["auth_failed"] * free + ["rate_limited"]
    # A bystander changes their own password at once.
    other, _ = await login(cluster, new_user("owner"))
    mine = {"op": "password", "old": PASSWORD, "new": PASSWORD + " v2"}
    assert (await timed(other, mine))["op"] == "ok"
    for each in (thief, other):
        await each.close()


# ---- the server's failures are not the client's (issue #21) ------------------------------


async def test_database_failures_never_count_as_failed_logins_or_registrations(
    cluster: LocalCluster,
) -> None:
    """The database fails (a serialization failure, class 40) for this test's address
    and names only, injected with triggers: the address's budget counter cannot be
    written, so every `hello` fails after its (user, address) attempt was counted; and
    every `register` fails at COMMIT (a deferred constraint trigger). All are answered
    `internal`, never `auth_failed` or `rate_limited`; once the database is well, the
    right password logs in at once and the name registers: nothing was counted."""
    s = cluster.settings
    user, newcomer = new_user("dbfail"), new_user("dbfail")
    await register(cluster, user)
    ip = attacker_ip()
    tag = newcomer  # a unique name for the injected objects
    async with db(cluster) as conn:
        await conn.execute(
            f"""
            CREATE FUNCTION {tag}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'injected by a test' USING ERRCODE = '40001'; END $$;
            CREATE TRIGGER {tag}_budget BEFORE INSERT OR UPDATE ON auth_throttle
                FOR EACH ROW WHEN (NEW.key = 'login-addr|{ip}') EXECUTE FUNCTION {tag}();
            CREATE CONSTRAINT TRIGGER {tag}_commit AFTER INSERT ON users
                DEFERRABLE INITIALLY DEFERRED
                FOR EACH ROW WHEN (NEW.username = '{newcomer}') EXECUTE FUNCTION {tag}();
            """
        )
        try:
            client = await connect_from(cluster, ip)
            answers: Counter[str] = Counter()
            for _ in range(s.login_free_failures + 3):
                answers[(await client.request(hello(user, PASSWORD)))["code"]] += 1
            register_frame = {"op": "register", "user": newcomer, "password": PASSWORD}
            for _ in range(s.max_registers_per_addr + 2):
                answers["register " + (await client.request(register_frame))["code"]] += 1
            await client.close()
        finally:
            await conn.execute(
                f"DROP TRIGGER {tag}_budget ON auth_throttle; DROP TRIGGER {tag}_commit ON users;"
                f" DROP FUNCTION {tag}();"
            )
        assert answers == {
            "internal": s.login_free_failures + 3,
            "register internal": s.max_registers_per_addr + 2,
        }, answers
        assert await conn.fetchval("SELECT count(*) FROM users WHERE username = $1", newcomer) == 0
        counted = await conn.fetchval(
            "SELECT coalesce(sum(attempts), 0) FROM auth_throttle WHERE key = ANY($1::text[])",
            [f"login|{user}|{ip}", f"register-addr|{ip}"],
        )
    assert counted == 0
    client = await connect_from(cluster, ip)
    assert (await timed(client, {"op": "register", "user": newcomer, "password": PASSWORD}))[
        "op"
    ] == "registered"
    for name in (user, newcomer):
        welcome = await timed(client, hello(name, PASSWORD, device=f"d-{name}"))
        assert welcome["op"] == "welcome", welcome
        await client.close()
        client = await connect_from(cluster, ip)
    await client.close()
