"""The attacks of issue #14, repeated by hand against a cluster, each followed by a bystander.

Each attack prints what the attacker got; then a bystander (a fresh user, from
its own loopback address) registers, logs in, sends to a friend and receives a
reply, and the time that took is printed. "unaffected" means every step of the
bystander got its normal reply within 2 s.

    python -m bench.attacks                      # a fresh 3-worker cluster of its own
    python -m bench.attacks --port 5222          # a running cluster (make up)

Attackers connect from 127.0.0.9 (or 127.0.3.x), bystanders from 127.0.0.7: the
cluster sees each as its own client address (HAProxy's PROXY header). Accounts
are registered from 127.0.0.1. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from bench._common import Target, add_target_args, cluster_target

PASSWORD = "attack-demo-password-0123"
ATTACKER, BYSTANDER = "127.0.0.9", "127.0.0.7"
# Accounts are made from the machine's own address, which has no per-address
# registration budget (shared_client_addrs): set-up, not part of any attack.
SETUP = "127.0.0.1"
NORMAL_S = 2.0
_rids = itertools.count(1)


class Line:
    """A plain line client: requests with integer rids, every other frame kept."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.other: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, t: Target, source: str) -> Line:
        reader, writer = await asyncio.open_connection(
            t.host, t.client_port, local_addr=(source, 0), limit=1 << 22
        )
        return cls(reader, writer)

    async def send(self, frame: dict[str, Any] | bytes) -> None:
        self.writer.write(frame if isinstance(frame, bytes) else orjson.dumps(frame) + b"\n")
        await self.writer.drain()

    async def recv(self, timeout: float = 10.0) -> dict[str, Any] | None:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        return orjson.loads(line) if line.endswith(b"\n") else None

    async def request(self, frame: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        rid = next(_rids)
        await self.send({**frame, "rid": rid})
        while True:
            reply = await self.recv(timeout)
            if reply is None:
                return {"op": "closed"}
            if reply.get("rid") == rid:
                return reply
            self.other.append(reply)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def outcome(reply: dict[str, Any]) -> str:
    return str(reply["code"]) if reply["op"] == "error" else str(reply["op"])


async def register(t: Target, user: str, source: str = SETUP) -> None:
    c = await Line.open(t, source)
    for _ in range(50):
        reply = await c.request({"op": "register", "user": user, "password": PASSWORD})
        if outcome(reply) != "overloaded":
            break
        await asyncio.sleep(reply.get("retry_after", 1))
    await c.close()
    assert outcome(reply) in ("registered", "user_exists"), reply


async def hello(c: Line, user: str, password: str = PASSWORD, device: str = "d") -> dict[str, Any]:
    return await c.request({"op": "hello", "user": user, "password": password, "device": device})


async def bystander(t: Target) -> str:
    """A new user logs in from its own address and exchanges a message with a friend."""
    me, friend = name("bystander"), name("friend")
    started = time.monotonic()
    await register(t, me)
    await register(t, friend)
    a, b = await Line.open(t, BYSTANDER), await Line.open(t, BYSTANDER)
    try:
        steps = [
            outcome(await hello(a, me)),
            outcome(await hello(b, friend)),
            outcome(await a.request({"op": "send", "to": friend, "cmid": "c1", "body": "hi"})),
        ]
        got = b.other.pop(0) if b.other else await b.recv()
        steps.append(str(got["op"]) if got else "closed")
    finally:
        await a.close()
        await b.close()
    took = time.monotonic() - started
    fine = steps == ["welcome", "welcome", "sent", "msg"] and took < 4 * NORMAL_S
    return f"bystander {'unaffected' if fine else 'AFFECTED'}: {' '.join(steps)} in {took:.2f} s"


# ---- the attacks --------------------------------------------------------------------


async def failed_logins_from_one_address(t: Target) -> str:
    """60 wrong hellos for made-up users from one address (the whole-cluster lockout)."""
    c = await Line.open(t, ATTACKER)
    got = Counter(
        [outcome(await hello(c, name("nobody"), "wrong password here")) for _ in range(60)]
    )
    await c.close()
    return f"attacker: {dict(got)}"


async def targeted_lockout(t: Target) -> str:
    """10 wrong passwords for a named user from an attacker; then that user logs in."""
    victim = name("victim")
    await register(t, victim)
    c = await Line.open(t, "127.0.3.1")
    got = Counter([outcome(await hello(c, victim, "not the password")) for _ in range(10)])
    await c.close()
    v = await Line.open(t, BYSTANDER)
    own = outcome(await hello(v, victim))
    await v.close()
    return f"attacker: {dict(got)}; the victim from its own address: {own}"


async def poisoned_send(t: Target) -> str:
    """30 users each pipeline 20 sends; one body holds U+0000."""
    users = [name("sender") for _ in range(30)]
    target = name("sink")
    await asyncio.gather(*(register(t, u) for u in [*users, target]))
    clients = [await Line.open(t, BYSTANDER) for _ in users]
    for c, u in zip(clients, users, strict=True):
        assert outcome(await hello(c, u)) == "welcome"

    async def pipeline(i: int, c: Line) -> list[str]:
        for j in range(20):
            body = "poison \u0000" if (i, j) == (0, 7) else f"m{j}"
            await c.send({"op": "send", "to": target, "cmid": f"c{j}", "body": body, "rid": j})
        replies: list[str] = []
        while len(replies) < 20:
            reply = await c.recv()
            if reply is not None and "rid" in reply:
                replies.append(outcome(reply))
        return replies

    results = await asyncio.gather(*(pipeline(i, c) for i, c in enumerate(clients)))
    for c in clients:
        await c.close()
    return f"600 pipelined sends: {dict(Counter(r for rs in results for r in rs))}"


async def silent_connections(t: Target, auth_timeout_s: float) -> str:
    """2,000 connections that never log in (from the machine's own address, which has
    no per-address cap), and one slowloris line."""
    conns = [await Line.open(t, "127.0.0.1") for _ in range(2000)]
    slow = await Line.open(t, "127.0.0.1")
    await slow.send(b'{"op":"hel')
    await asyncio.sleep(auth_timeout_s + 3)
    closed = 0
    for c in [*conns, slow]:
        try:
            frame = await c.recv(timeout=0.5)
            closed += frame is None or frame.get("code") == "auth_timeout"
        except TimeoutError:
            pass
        await c.close()
    return f"after {auth_timeout_s + 3:.0f} s, closed by the server: {closed} of 2001"


async def frame_flood(t: Target) -> str:
    """600 pipelined pings on one logged-in connection (burst 400)."""
    user = name("flooder")
    await register(t, user)
    c = await Line.open(t, "127.0.3.3")  # 127.0.0.9 spent its login budget above
    assert outcome(await hello(c, user)) == "welcome"
    await c.send(b"".join(b'{"op":"ping","rid":%d}\n' % i for i in range(600)))
    got: Counter[str] = Counter()
    for _ in range(600):
        reply = await c.recv()
        got[outcome(reply) if reply else "closed"] += 1
    await asyncio.sleep(2)
    still = outcome(await c.request({"op": "ping"}))
    await c.close()
    return f"600 pings: {dict(got)}; a ping 2 s later: {still}"


async def register_flood(t: Target) -> str:
    """40 registrations from one address, while a logged-in user resumes."""
    user = name("resumer")
    await register(t, user)
    r = await Line.open(t, BYSTANDER)
    welcome = await hello(r, user)
    await r.close()
    conns = [await Line.open(t, "127.0.3.2") for _ in range(40)]
    flood = asyncio.gather(
        *(c.request({"op": "register", "user": name("spam"), "password": PASSWORD}) for c in conns)
    )
    r = await Line.open(t, BYSTANDER)
    started = time.monotonic()
    resumed = await r.request(
        {
            "op": "resume",
            "user": user,
            "device": "d",
            "token": welcome["resume_token"],
            "last_seq": welcome["seq"],
        }
    )
    took = time.monotonic() - started
    got = Counter(outcome(reply) for reply in await flood)
    for c in [*conns, r]:
        await c.close()
    return f"40 registers: {dict(got)}; a resume meanwhile: {outcome(resumed)} in {took:.2f} s"


async def main_async(t: Target, auth_timeout_s: float) -> int:
    attacks: list[tuple[str, Callable[[], Awaitable[str]]]] = [
        ("60 failed logins from one address", lambda: failed_logins_from_one_address(t)),
        ("targeted lockout of one user", lambda: targeted_lockout(t)),
        ("a NUL in one of 600 pipelined sends", lambda: poisoned_send(t)),
        ("2,000 connections that never log in", lambda: silent_connections(t, auth_timeout_s)),
        ("a frame flood", lambda: frame_flood(t)),
        ("a register flood during a resume", lambda: register_flood(t)),
    ]
    affected = 0
    for title, attack in attacks:
        print(f"- {title}", flush=True)
        print(f"    {await attack()}", flush=True)
        verdict = await bystander(t)
        affected += "AFFECTED" in verdict
        print(f"    {verdict}", flush=True)
    print("every bystander unaffected" if not affected else f"{affected} bystanders AFFECTED")
    return 1 if affected else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--auth-timeout", type=float, default=10.0, help="the cluster's auth_timeout_s"
    )
    add_target_args(parser, "HAProxy client port of a running cluster")
    args = parser.parse_args(argv)
    # Our own cluster keeps its deadlines (cluster_target lifts them for benchmarks).
    overrides = {"auth_timeout_s": args.auth_timeout, "idle_timeout_s": 90.0}
    with cluster_target(args, 3, **overrides) as target:
        code = asyncio.run(main_async(target, args.auth_timeout))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
