"""Poisoned input (review H1, L7; docs/security.md "Poisoned input"), against a real cluster.

An attacker sends what the server cannot store or should not show; bystanders on
the same workers, batched into the same group commits, must not notice.

The codec now refuses U+0000, so to poison a group commit these tests plant a
value the codec accepts and PostgreSQL refuses, in PostgreSQL itself (no hook in
the server): a CHECK constraint on ``messages`` (SQLSTATE 23514) and a trigger
that raises the very error a NUL caused (22021, character_not_in_repertoire),
each for one marker body only, and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

from app.cluster.launcher import LocalCluster
from tests.integration.helpers import (
    PASSWORD,
    contacts_on_two_workers,
    db,
    new_user,
    only_worker,
    register,
)
from tests.linechat import LineClient

USERS_PER_WORKER = 10
SENDS_EACH = 20
REFUSED = "the server cannot store this message; do not resend it unchanged"


@contextlib.asynccontextmanager
async def planted_poison(cluster: LocalCluster) -> AsyncIterator[tuple[str, str]]:
    """Two bodies the codec accepts and PostgreSQL refuses: (CHECK, trigger)."""
    tag = uuid.uuid4().hex[:12]
    check_body, trigger_body = f"poison-check-{tag}", f"poison-nul-{tag}"
    name = f"test_poison_{tag}"
    async with db(cluster) as conn:
        # NOT VALID: existing rows are not scanned; every new row is checked.
        await conn.execute(
            f"ALTER TABLE messages ADD CONSTRAINT {name} CHECK (body <> '{check_body}') NOT VALID"
        )
        await conn.execute(
            f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.body = '{trigger_body}' THEN
                    RAISE EXCEPTION 'planted by tests/hostile/test_poison.py'
                        USING ERRCODE = 'character_not_in_repertoire';
                END IF;
                RETURN NEW;
            END $$"""
        )
        await conn.execute(
            f"CREATE TRIGGER {name} BEFORE INSERT ON messages"
            f" FOR EACH ROW EXECUTE FUNCTION {name}()"
        )
        try:
            yield check_body, trigger_body
        finally:
            await conn.execute(f"DROP TRIGGER {name} ON messages")
            await conn.execute(f"DROP FUNCTION {name}()")
            await conn.execute(f"ALTER TABLE messages DROP CONSTRAINT {name}")


def worker_log_since(cluster: LocalCluster, since: str) -> list[dict[str, Any]]:
    """Every worker's log records at or after ``since`` (an ISO timestamp, as logged)."""
    records = []
    for worker in cluster.settings.worker_ids():
        for line in cluster.log_tail(worker, 20_000):
            with contextlib.suppress(orjson.JSONDecodeError):
                record = orjson.loads(line)
                if isinstance(record, dict) and str(record.get("ts", "")) >= since:
                    records.append(record)
    return records


def now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


async def log_in_on(
    cluster: LocalCluster, worker: str, users: list[tuple[str, str]]
) -> list[LineClient]:
    """Log (user, device) pairs in on one worker, concurrently (registered beforehand)."""
    s = cluster.settings
    with only_worker(cluster, worker):
        clients = await asyncio.gather(*(LineClient.connect(s.host, s.client_port) for _ in users))
        welcomes = await asyncio.gather(
            *(
                c.request({"op": "hello", "user": u, "password": PASSWORD, "device": d})
                for c, (u, d) in zip(clients, users, strict=True)
            )
        )
    assert all(w["op"] == "welcome" and w["worker"] == worker for w in welcomes), welcomes
    return list(clients)


async def pipeline(client: LineClient, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write every frame at once, then read until each has its reply; replies in arrival
    order (other frames go to the client's backlog)."""
    await client.send(b"".join(orjson.dumps(f) + b"\n" for f in frames))
    wanted = {f["rid"] for f in frames}
    replies = []
    while wanted:
        frame = await client._read(20.0)
        if frame.get("rid") in wanted:
            wanted.discard(frame["rid"])
            replies.append(frame)
        else:
            client.backlog.append(frame)
    return replies


async def messages_from(client: LineClient, sender: str, count: int) -> list[dict[str, Any]]:
    """The next ``count`` messages from ``sender``; other frames stay in the backlog."""
    got: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    while len(got) < count:
        frame = await client.recv(20.0)
        mine = frame["op"] == "msg" and frame["from"] == sender
        (got if mine else others).append(frame)
    client.backlog.extendleft(reversed(others))
    return got


async def test_a_poisoned_send_fails_alone_and_every_bystander_send_commits(
    cluster: LocalCluster,
) -> None:
    workers = cluster.settings.worker_ids()
    bystanders = [new_user("by") for _ in range(USERS_PER_WORKER * len(workers))]
    attacker = new_user("mallory")
    await asyncio.gather(*(register(cluster, u) for u in [*bystanders, attacker]))
    clients: dict[str, LineClient] = {}
    attacker_clients: list[LineClient] = []
    for n, worker in enumerate(workers):
        mine = bystanders[n :: len(workers)]
        pairs = [(u, "laptop") for u in mine] + [(attacker, f"dev{n}")]
        *logged_in, theirs = await log_in_on(cluster, worker, pairs)
        clients.update(zip(mine, logged_in, strict=True))
        attacker_clients.append(theirs)
    # Bystander i writes to bystander i+1, so every recipient is on another worker.
    recipient = {u: bystanders[(i + 1) % len(bystanders)] for i, u in enumerate(bystanders)}

    def bystander_frames(user: str) -> list[dict[str, Any]]:
        return [
            {
                "op": "send",
                "cmid": f"{user}-{k}",
                "to": recipient[user],
                "body": f"{user} #{k}",
                "rid": k,
            }
            for k in range(SENDS_EACH)
        ]

    async with planted_poison(cluster) as (check_body, trigger_body):
        # The attacker alternates good and poisoned bodies, on one connection per worker.
        poisons = [check_body, trigger_body]
        attacker_frames = [
            [
                {
                    "op": "send",
                    "cmid": f"m{n}-{k}",
                    "to": bystanders[0],
                    "rid": k,
                    "body": poisons[k // 2 % 2] if k % 2 else f"fine #{k}",
                }
                for k in range(SENDS_EACH)
            ]
            for n in range(len(workers))
        ]
        since = now_iso()
        results = await asyncio.gather(
            *(pipeline(clients[u], bystander_frames(u)) for u in bystanders),
            *(pipeline(c, f) for c, f in zip(attacker_clients, attacker_frames, strict=True)),
        )
    bystander_replies, attacker_replies = results[: len(bystanders)], results[len(bystanders) :]

    # Every bystander send got `sent`, in the order sent.
    for user, replies in zip(bystanders, bystander_replies, strict=True):
        assert [r["op"] for r in replies] == ["sent"] * SENDS_EACH, (user, replies)
        assert [r["cmid"] for r in replies] == [f"{user}-{k}" for k in range(SENDS_EACH)]
    # The attacker: the good half `sent`, each poisoned one the documented bad_field.
    for replies in attacker_replies:
        by_rid = {r["rid"]: r for r in replies}
        for k in range(SENDS_EACH):
            if k % 2:
                assert by_rid[k] == {
                    "op": "error",
                    "code": "bad_field",
                    "message": REFUSED,
                    "rid": k,
                }, by_rid[k]
            else:
                assert by_rid[k]["op"] == "sent", by_rid[k]
        assert [r["rid"] for r in replies if r["op"] == "sent"] == list(range(0, SENDS_EACH, 2))
    # Every bystander message arrived, in order, exactly once.
    for user in bystanders:
        got = await messages_from(clients[recipient[user]], user, SENDS_EACH)
        assert [m["body"] for m in got] == [f"{user} #{k}" for k in range(SENDS_EACH)]
        assert [m["seq"] for m in got] == sorted({m["seq"] for m in got})
    # bystanders[0] got the attacker's good messages only.
    from_attacker = await messages_from(clients[bystanders[0]], attacker, SENDS_EACH // 2 * 3)
    assert not {m["body"] for m in from_attacker} & set(poisons)

    # The attacker's connections stay usable, and nothing was stored for the poison.
    for c in attacker_clients:
        assert (await c.request({"op": "ping"}))["op"] == "pong"
    async with db(cluster) as conn:
        stored = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE body = ANY($1::text[])", poisons
        )
    assert stored == 0

    # The workers logged each poisoned item once, as a warning, and no traceback.
    records = worker_log_since(cluster, since)
    rejected = [r for r in records if r.get("event") == "batch_item_rejected"]
    assert len(rejected) == SENDS_EACH // 2 * len(workers), rejected
    assert {r["level"] for r in rejected} == {"warning"}
    assert {r["sqlstate"] for r in rejected} == {"23514", "22021"}
    # At least one was isolated from a batch it shared (else this proved nothing).
    assert max(r["batch_size"] for r in rejected) > 1, rejected
    failures = {"batch_error", "batch_failed", "request_crashed"}
    assert not [r for r in records if "exc" in r or r.get("event") in failures], records

    for c in [*clients.values(), *attacker_clients]:
        await c.close()


async def test_nul_and_disguising_characters_get_bad_field_and_the_connection_goes_on(
    cluster: LocalCluster,
) -> None:
    # Contacts, so the bystander would see the attacker's presence text.
    attacker, bystander, a, b, _ = await contacts_on_two_workers(cluster)
    since = now_iso()

    refused = [
        ({"op": "room_create", "name": "ops\x00room"}, "name"),
        ({"op": "room_create", "name": "admin\u202etxt.exe"}, "name"),  # bidi override
        ({"op": "room_create", "name": "sup\u200bport"}, "name"),  # zero-width space
        ({"op": "presence", "state": "away", "text": "back\x00soon"}, "text"),
        ({"op": "presence", "state": "away", "text": "\u2066admin\u2069"}, "text"),
        ({"op": "send", "cmid": "p1", "to": bystander, "body": "hi\x00there"}, "body"),
        ({"op": "send", "cmid": "p2", "to": bystander, "body": "hi\x1b[2Jthere"}, "body"),
        ({"op": "password", "old": PASSWORD, "new": "a-new-password\x00"}, "new"),
    ]
    for frame, field in refused:
        reply = await a.request(frame)
        assert reply["code"] == "bad_field", (frame, reply)
        assert reply["message"].startswith(f"field '{field}' must be "), reply
        assert (await a.request({"op": "ping"}))["op"] == "pong"  # still usable

    # Nothing of it took effect, and the bystander saw none of it.
    assert (await a.request({"op": "rooms"}))["rooms"] == []
    # What is allowed still works: a bidi mark in a body (right-to-left text needs it).
    sent = await a.request({"op": "send", "cmid": "ok1", "to": bystander, "body": "שלום\u200f!"})
    assert sent["op"] == "sent", sent
    seen = [*b.backlog]
    b.backlog.clear()
    while not seen or seen[-1]["op"] != "msg":
        seen.append(await b.recv())
    assert (seen[-1]["from"], seen[-1]["body"]) == (attacker, "שלום\u200f!")
    assert not [f for f in seen if f["op"] == "presence" and f["state"] == "away"], seen
    # The bystander carries on normally.
    assert (await b.request({"op": "send", "cmid": "b1", "to": attacker, "body": "hi"}))[
        "op"
    ] == "sent"
    assert (await a.recv_until("msg"))["body"] == "hi"

    records = worker_log_since(cluster, since)
    assert not [r for r in records if "exc" in r or r.get("event") == "request_crashed"], records
    await a.close()
    await b.close()
