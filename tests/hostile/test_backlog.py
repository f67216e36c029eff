"""A large backlog over a slow link arrives whole (review M2, L6; docs/protocol.md
"Slow links"), against a real cluster.

2,000 messages of 16 KiB (32 MiB) wait in an offline user's inbox. The user logs
in on a socket with a 16 KiB receive buffer and reads at a throttled pace: every
message arrives, in order, on that one connection, and no worker counts a slow
reader. Before, the replay wrote 500 entries (8 MiB) in one go, past the 4 MiB
hard cap, and the connection was aborted at once, again at every reconnect.
`history` replies are capped in bytes and page on with `more`.
"""

from __future__ import annotations

import asyncio
import socket
import time

import orjson

from app.cluster.health import http_json
from app.cluster.launcher import LocalCluster
from tests.hostile.bystander import bystander_is_unaffected
from tests.integration.helpers import PASSWORD, login, new_user, register
from tests.linechat import LineClient

MESSAGES, SENDERS, BODY_CHARS = 2000, 8, 16384
# The reader's pace: slower than loopback by far, fast enough for a test (~12 s).
READ_CHUNK, READ_PAUSE_S = 16384, 0.005


def slow_readers(cluster: LocalCluster) -> int:
    total = 0
    for wid in cluster.settings.worker_ids():
        _, report = http_json(
            f"http://{cluster.settings.host}:{cluster.settings.worker_health_port(wid)}/health"
        )
        total += int(report["slow_readers"])
    return total


async def fill_inbox(cluster: LocalCluster, user: str) -> list[str]:
    senders = [new_user("bulk") for _ in range(SENDERS)]
    clients = [(await login(cluster, s))[0] for s in senders]
    per_sender = MESSAGES // SENDERS
    body = "b" * BODY_CHARS

    async def blast(client: LineClient, tag: int) -> None:
        for i in range(per_sender):  # within the frame burst: no rate_limited
            await client.send({"op": "send", "to": user, "cmid": f"{tag}-{i}", "body": body})
        for _ in range(per_sender):
            assert (await client.recv_until("sent", 60))["op"] == "sent"

    await asyncio.gather(*(blast(c, n) for n, c in enumerate(clients)))
    for c in clients:
        await c.close()
    return senders


async def slow_client(cluster: LocalCluster) -> LineClient:
    """A connection whose receive buffer is 16 KiB (set before connecting, so the
    window stays small)."""
    s = cluster.settings
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (s.host, s.client_port))
    reader, writer = await asyncio.open_connection(
        sock=sock, limit=1 << 20
    )  # a history reply is up to 512 KiB
    return LineClient(reader, writer)


async def test_a_throttled_reader_receives_a_backlog_of_2000_large_messages(
    cluster: LocalCluster,
) -> None:
    user = new_user("offline")
    await register(cluster, user)
    senders = await fill_inbox(cluster, user)
    dropped_before = slow_readers(cluster)

    client = await slow_client(cluster)
    try:
        await client.send({"op": "hello", "user": user, "password": PASSWORD, "device": "phone"})
        welcome = await client.recv()
        assert welcome["op"] == "welcome" and welcome["seq"] == MESSAGES, welcome
        started = time.monotonic()
        seqs: list[int] = []
        reader = client.reader
        while len(seqs) < MESSAGES:
            line = await asyncio.wait_for(reader.readline(), 60)
            assert line.endswith(b"\n"), f"connection closed after {len(seqs)} messages"
            frame = orjson.loads(line)
            if frame["op"] == "msg":
                seqs.append(frame["seq"])
            await asyncio.sleep(READ_PAUSE_S)  # about 3 MiB/s
        elapsed = time.monotonic() - started
        assert seqs == list(range(1, MESSAGES + 1))
        assert slow_readers(cluster) == dropped_before, "the reader was dropped on the way"
        assert (await client.request({"op": "ping"}))["op"] == "pong"  # the same connection

        # history: at most max_history_reply_bytes a reply, the rest by paging.
        page = await client.request({"op": "history", "with": senders[0], "limit": 100})
        assert page["more"] is True
        assert 0 < len(page["messages"]) < 100, len(page["messages"])
        seen = len(page["messages"])
        while page["more"]:
            before = min(m["id"] for m in page["messages"])
            page = await client.request(
                {"op": "history", "with": senders[0], "limit": 100, "before": before}
            )
            seen += len(page["messages"])
        assert seen == MESSAGES // SENDERS
    finally:
        await client.close()
    await bystander_is_unaffected(cluster)
    print(f"backlog of {MESSAGES} x {BODY_CHARS} chars read in {elapsed:.1f} s")
