"""Smoke test of a running compose stack, from the host, through HAProxy's TLS client port.

Every connection is TLS, and verifies the stack's certificate (against ``--cafile``,
the CA the `certs` service made) and its host name; a plaintext connection to the
same port must get no answer.

Two users exchange messages without a pause while the test kills the Patroni leader's
container, then the container of the worker one of them is connected to, then starts
both again. It passes when:

- the clients (the SDK's `ResilientClient`) reconnect and resume by themselves;
- every message whose send was acknowledged is received by the other user exactly
  once, in inbox order, and nothing is received that was never sent;
- a new leader takes over, and the killed node and worker come back and HAProxy
  sees them UP again.

Run by scripts/compose-test.sh, which passes the compose command line (a JSON list in
COMPOSE_CMD) and the published ports. Exit status 0 = pass, 1 = fail.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import itertools
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.client import ResilientClient
from app.client.errors import ClientError
from app.client.events import Disconnected, Msg, Resumed

T0 = time.monotonic()


def say(line: str) -> None:
    print(f"[smoke +{time.monotonic() - T0:6.1f}s] {line}", flush=True)


class Failed(Exception):
    pass


# --- the stack: compose, docker and HAProxy's stats page -----------------------------------


@dataclass
class Stack:
    compose: list[str]
    project: str
    stats_url: str

    def run(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise Failed(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def compose_run(self, *args: str, timeout: float = 120) -> str:
        return self.run(*self.compose, *args, timeout=timeout)

    def container(self, service: str, number: int) -> str:
        out = self.run(
            "docker",
            "ps",
            "-a",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--filter",
            f"label=com.docker.compose.container-number={number}",
        ).split()
        if len(out) != 1:
            raise Failed(f"expected one container for {service} #{number}, found {out}")
        return out[0]

    def servers(self) -> dict[str, dict[str, str]]:
        """backend -> {server: status} from HAProxy's stats page."""
        with urllib.request.urlopen(self.stats_url.rstrip("/") + "/;csv", timeout=3) as r:
            text = r.read().decode()
        out: dict[str, dict[str, str]] = {}
        for row in csv.DictReader(io.StringIO(text.lstrip("# "))):
            if row["svname"] in ("FRONTEND", "BACKEND"):
                continue
            out.setdefault(row["pxname"], {})[row["svname"]] = row["status"]
        return out

    def up(self, backend: str) -> list[str]:
        try:
            servers = self.servers().get(backend, {})
        except OSError:
            return []
        return sorted(name for name, status in servers.items() if status.startswith("UP"))


async def wait_for(what: str, check, timeout: float, interval: float = 0.25):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


# --- the two users ----------------------------------------------------------------------


@dataclass
class Peer:
    user: str
    password: str
    to: str
    client: ResilientClient | None = None
    worker: str = ""
    acked: dict[int, str] = field(default_factory=dict)  # message id -> cmid
    ack_times: list[float] = field(default_factory=list)
    unknown: set[str] = field(default_factory=set)  # cmids whose send raised
    received: list[Msg] = field(default_factory=list)
    resumed_at: list[float] = field(default_factory=list)
    disconnects: int = 0
    sent_count: int = 0

    async def start(self, host: str, port: int, cafile: str) -> None:
        # Every reconnect and resume goes over TLS too, verified the same way.
        self.client = await ResilientClient.connect(host, port, tls=True, cafile=cafile)
        await self.client.register(self.user, self.password)
        welcome = await self.client.login(self.user, self.password, "smoke")
        self.worker = welcome.worker

    async def send_loop(self, stop: asyncio.Event, interval: float) -> None:
        assert self.client is not None
        n = 0
        while not stop.is_set():
            n += 1
            cmid = f"{self.user}-{n}"
            try:
                sent = await self.client.send(f"{self.user} #{n}", to=self.to, cmid=cmid)
            except ClientError as exc:
                self.unknown.add(cmid)
                say(f"{self.user}: send {cmid} failed: {type(exc).__name__}: {exc}")
                await asyncio.sleep(interval)
                continue
            self.acked[sent.id] = cmid
            self.ack_times.append(time.monotonic())
            self.sent_count = n
            await asyncio.sleep(interval)

    async def receive_loop(self) -> None:
        assert self.client is not None
        async for event in self.client.events():
            if isinstance(event, Msg):
                self.received.append(event)
                if len(self.received) % 25 == 0:
                    asyncio.get_running_loop().create_task(self._ack(event.seq))
            elif isinstance(event, Disconnected):
                self.disconnects += 1
                say(f"{self.user}: disconnected ({event.reason})")
            elif isinstance(event, Resumed):
                self.worker = event.worker
                self.resumed_at.append(time.monotonic())
                how = "fallback login" if event.fallback_login else "resumed"
                say(f"{self.user}: {how} on worker {event.worker} after seq {event.seq}")

    async def _ack(self, seq: int) -> None:
        assert self.client is not None
        try:
            await self.client.ack(seq)
        except ClientError as exc:
            say(f"{self.user}: ack {seq} failed: {exc}")

    def acks_since(self, moment: float) -> int:
        return sum(1 for t in self.ack_times if t > moment)


def verify(sender: Peer, receiver: Peer) -> list[str]:
    problems = []
    ids = [m.id for m in receiver.received if m.sender == sender.user]
    counts = Counter(ids)
    dupes = {i: c for i, c in counts.items() if c > 1}
    if dupes:
        problems.append(f"{sender.user}->{receiver.user}: received more than once: {dupes}")
    lost = sorted(set(sender.acked) - set(counts))
    if lost:
        problems.append(
            f"{sender.user}->{receiver.user}: {len(lost)} acknowledged message(s) never "
            f"received: ids {lost[:20]}"
        )
    known_cmids = set(sender.acked.values()) | sender.unknown
    strangers = [
        m.id for m in receiver.received if m.sender == sender.user and m.cmid not in known_cmids
    ]
    if strangers:
        problems.append(
            f"{sender.user}->{receiver.user}: received messages never sent: {strangers[:20]}"
        )
    seqs = [m.seq for m in receiver.received]
    if any(b <= a for a, b in itertools.pairwise(seqs)):
        problems.append(f"{receiver.user}: inbox seqs not strictly increasing")
    return problems


def max_gap(times: list[float], after: float) -> float:
    relevant = [t for t in times if t > after - 5]
    return max((b - a for a, b in itertools.pairwise(relevant)), default=0.0)


async def plaintext_gets_nothing(host: str, port: int) -> None:
    """A cleartext `hello` to the TLS port is a failed handshake: no frame comes back."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b'{"op":"hello","user":"nobody","password":"x","device":"d"}\n')
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(4096), 10)
        except (ConnectionError, TimeoutError):
            answer = b""
    finally:
        writer.close()
    if b"welcome" in answer or b'"op"' in answer:
        raise Failed(f"the TLS port answered cleartext with a frame: {answer[:200]!r}")
    say("TLS port: a cleartext hello got no frame back")


async def scenario(args: argparse.Namespace) -> None:
    stack = Stack(json.loads(os.environ["COMPOSE_CMD"]), args.project, args.stats_url)
    leader_before = await wait_for("a primary in HAProxy", lambda: stack.up("pg_primary"), 60)
    workers_before = await wait_for("workers UP in HAProxy", lambda: stack.up("workers"), 60)
    say(f"HAProxy: primary {leader_before}, workers UP {workers_before}")
    if len(leader_before) != 1:
        raise Failed(f"expected one primary, HAProxy routes to {leader_before}")

    tag = secrets.token_hex(3)
    alice = Peer(f"alice{tag}", secrets.token_urlsafe(16), f"bob{tag}")
    bob = Peer(f"bob{tag}", secrets.token_urlsafe(16), f"alice{tag}")
    await plaintext_gets_nothing(args.host, args.port)
    for peer in (alice, bob):
        await peer.start(args.host, args.port, args.cafile)
        say(f"{peer.user} logged in on worker {peer.worker}")

    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.send_loop(stop, args.interval)) for p in (alice, bob)] + [
        asyncio.create_task(p.receive_loop()) for p in (alice, bob)
    ]

    def delivered(a: Peer, b: Peer) -> bool:
        got = {m.id for m in b.received}
        return all(i in got for i in a.acked)

    try:
        await asyncio.sleep(3)
        if not (alice.acked and bob.acked and alice.received and bob.received):
            raise Failed("no messages flowed before the faults")
        say(f"baseline: {len(alice.acked)} + {len(bob.acked)} messages acknowledged")

        # 1. Kill the Patroni leader's container (SIGKILL: PostgreSQL and Patroni die).
        leader = leader_before[0]
        killed_at = time.monotonic()
        stack.compose_run("kill", "-s", "SIGKILL", leader)
        say(f"killed the leader's container {leader}")
        new = await wait_for(
            "a new primary",
            lambda: [s for s in stack.up("pg_primary") if s != leader],
            args.failover_timeout,
        )
        say(f"new primary {new[0]}, {time.monotonic() - killed_at:.1f} s after the kill")
        await wait_for(
            "sends to complete after the failover",
            lambda: alice.acks_since(killed_at + 1) > 5 and bob.acks_since(killed_at + 1) > 5,
            args.failover_timeout,
        )
        outage = max(max_gap(alice.ack_times, killed_at), max_gap(bob.ack_times, killed_at))
        say(f"writes flow again; longest pause between acknowledged sends {outage:.1f} s")

        # 2. Kill the container of the worker alice is connected to.
        victim = alice.worker
        number = int(victim.lstrip("w"))
        cid = stack.container("worker", number)
        resumes_before = len(alice.resumed_at)
        killed_at = time.monotonic()
        stack.run("docker", "kill", cid)
        say(f"killed worker {victim}'s container {cid[:12]} (alice's; bob is on {bob.worker})")
        await wait_for(
            "alice to resume on another worker",
            lambda: len(alice.resumed_at) > resumes_before and alice.worker != victim,
            60,
        )
        await wait_for(
            "sends to complete after the worker kill",
            lambda: alice.acks_since(killed_at + 0.5) > 5 and bob.acks_since(killed_at + 0.5) > 5,
            60,
        )
        say(f"alice resumed on {alice.worker}; messages flow both ways")

        # 3. Start both again: the old leader rejoins as a replica, the worker re-registers.
        stack.compose_run("start", leader, "worker")
        say(f"started {leader} and worker {victim} again")
        await wait_for(
            f"{leader} to rejoin as a replica",
            lambda: leader in stack.up("pg_replicas"),
            args.failover_timeout,
        )
        await wait_for(
            f"{len(workers_before)} workers UP again",
            lambda: len(stack.up("workers")) >= len(workers_before),
            60,
        )
        say(f"{leader} is a replica again; workers UP {stack.up('workers')}")
        await asyncio.sleep(2)
    finally:
        stop.set()
        await asyncio.gather(*tasks[:2], return_exceptions=True)

    # 4. Every acknowledged message must arrive exactly once.
    try:
        await wait_for(
            "every acknowledged message to be delivered",
            lambda: delivered(alice, bob) and delivered(bob, alice),
            60,
        )
    except Failed as exc:
        say(str(exc))
    for peer in (alice, bob):
        assert peer.client is not None
        await peer.client.close()
    await asyncio.gather(*tasks[2:], return_exceptions=True)
    problems = verify(alice, bob) + verify(bob, alice)
    for peer in (alice, bob):
        stats = peer.client.stats if peer.client else None
        say(
            f"{peer.user}: sent {len(peer.acked)} acknowledged ({len(peer.unknown)} failed), "
            f"received {len(peer.received)}, disconnects {peer.disconnects}, {stats}"
        )
    if problems:
        raise Failed("; ".join(problems))
    say(
        f"PASS: {len(alice.acked) + len(bob.acked)} acknowledged messages, each received "
        "exactly once, across a leader kill and a worker kill"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="the TLS client port")
    parser.add_argument("--cafile", required=True, help="the stack's CA (the certs service's)")
    parser.add_argument("--stats-url", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--failover-timeout", type=float, default=90)
    args = parser.parse_args()
    try:
        asyncio.run(asyncio.wait_for(scenario(args), 420))
    except Failed as exc:
        say(f"FAIL: {exc}")
        return 1
    except TimeoutError:
        say("FAIL: the smoke test took longer than 420 s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
