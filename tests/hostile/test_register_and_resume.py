"""Registration floods and resume probes against a real cluster, each with a bystander.

A register flood must not make resumes wait or fail (each kind of work has its
own admission queue), and a resume must not tell anyone that an account is
disabled (docs/security.md, "Login throttling, registration, password changes").
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from app.cluster.launcher import LocalCluster
from app.secrets import read_secrets
from app.store import dashboard as dash_store
from app.store.db import create_pool
from app.store.social import push_key
from tests.hostile.bystander import (
    BYSTANDER_IP,
    attacker_ip,
    bystander_is_unaffected,
    connect_from,
    timed,
)
from tests.integration.helpers import PASSWORD, db, login, new_user, only_worker, register
from tests.linechat import LineClient

pytestmark = pytest.mark.integration


async def test_a_register_flood_never_makes_a_resume_overloaded(cluster: LocalCluster) -> None:
    """H4: 300 connections flood `register` on w2; a resume on w2 is answered at once.

    The registers are made to last, as production's argon2id cost makes them (the
    test cluster hashes cheaply): they all register a name the test holds
    uncommitted, so each one that gets a slot waits on the row lock. With one
    waiting counter for logins, registrations and resumes, as before, 300 such
    registers filled the queue of 256 and the resume got `overloaded`.
    """
    s = cluster.settings
    resumer, taken = new_user("resumer"), new_user("taken")
    await register(cluster, resumer)
    with only_worker(cluster, "w2"):
        first, welcome = await login(cluster, resumer, register_first=False)
    assert welcome["worker"] == "w2"
    await first.close()
    flooders: list[LineClient] = []
    async with db(cluster) as holder:
        hold = holder.transaction()
        await hold.start()
        await holder.execute(
            "INSERT INTO users (username, password_hash) VALUES ($1, 'held')", taken
        )
        try:
            with only_worker(cluster, "w2"):
                flooders = [await LineClient.connect(s.host, s.client_port) for _ in range(300)]
                # A round trip each, so HAProxy has chosen the server while the others rest.
                await asyncio.gather(*(f.request({"op": "ping"}) for f in flooders))
            for f in flooders:
                await f.send({"op": "register", "user": taken, "password": PASSWORD})
            replies = [asyncio.create_task(f.recv(timeout=60)) for f in flooders]
            held = s.max_concurrent_registers + s.max_register_queue
            # Every register past the slots and the register queue is refused at once...
            done: set[asyncio.Task[dict[str, Any]]] = set()
            deadline = time.monotonic() + 20
            while len(done) < len(flooders) - held and time.monotonic() < deadline:
                finished, _ = await asyncio.wait(
                    set(replies) - done, timeout=1, return_when=asyncio.FIRST_COMPLETED
                )
                done |= finished
            refused = Counter(t.result().get("code") for t in done)
            assert refused == {"overloaded": len(flooders) - held}, refused
            # ... and a resume on the same worker is answered as if nothing happened.
            with only_worker(cluster, "w2"):
                client = await LineClient.connect(s.host, s.client_port)
                resume = {
                    "op": "resume",
                    "user": resumer,
                    "device": "laptop",
                    "token": welcome["resume_token"],
                    "last_seq": 0,
                }
                reply = await timed(client, resume)
            assert (reply["op"], reply["worker"]) == ("welcome", "w2"), reply
            assert (await timed(client, {"op": "ping"}))["op"] == "pong"
            await client.close()
        finally:
            await hold.rollback()
        # The held registers go on: one takes the name, the others find it taken.
        answers = Counter((r.get("code") or r["op"]) for r in await asyncio.gather(*replies))
        assert answers == {
            "overloaded": len(flooders) - held,
            "registered": 1,
            "user_exists": held - 1,
        }, answers
    for f in flooders:
        await f.close()
    await bystander_is_unaffected(cluster)


async def test_resume_never_says_an_account_is_disabled(cluster: LocalCluster) -> None:
    """L5: a resume for a disabled account, with a made-up or its real token: bad_token."""
    victim, bystander = new_user("disabled"), new_user("resumer")
    v, welcome = await login(cluster, victim)
    await v.close()
    b, bystander_welcome = await login(cluster, bystander)
    await b.close()
    key = push_key(read_secrets(cluster.settings)["admin"])
    pool = await create_pool(cluster.settings, size=1)
    try:
        await dash_store.set_user_disabled(pool, victim, True, key)
        prober = await connect_from(cluster, attacker_ip())
        for token in ("x" * 32, welcome["resume_token"]):
            reply = await prober.request(
                {"op": "resume", "user": victim, "device": "laptop", "token": token, "last_seq": 0}
            )
            assert reply["code"] == "bad_token", reply
        ghost = {"op": "resume", "user": new_user("ghost"), "device": "d", "token": "x" * 32}
        assert (await prober.request({**ghost, "last_seq": 0}))["code"] == "bad_token"
        await prober.close()
    finally:
        await dash_store.set_user_disabled(pool, victim, False, key)
        await pool.close()
    client = await connect_from(cluster, BYSTANDER_IP)
    resume = {
        "op": "resume",
        "user": bystander,
        "device": "laptop",
        "token": bystander_welcome["resume_token"],
        "last_seq": 0,
    }
    assert (await timed(client, resume))["op"] == "welcome"
    await client.close()
