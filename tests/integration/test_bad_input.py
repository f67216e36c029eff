"""Bad input gets a documented error at a bounded cost; the worker and other clients carry on."""

from __future__ import annotations

import asyncio

from app.cluster.health import http_json
from app.cluster.launcher import LocalCluster
from tests.integration.helpers import db, login, new_user
from tests.linechat import LineClient


def _worker_pid_and_health(cluster: LocalCluster, worker: str) -> tuple[int | None, int]:
    record = cluster._record(worker)
    s = cluster.settings
    code, _ = http_json(f"http://{s.host}:{s.worker_health_port(worker)}/health")
    return (record.pid if record else None), code


async def _raw(cluster: LocalCluster) -> LineClient:
    return await LineClient.connect(cluster.settings.host, cluster.settings.client_port)


async def test_malformed_frames_get_errors_and_the_connection_stays_usable(
    cluster: LocalCluster,
) -> None:
    c = await _raw(cluster)
    await c.send(b"{not json\n")
    assert (await c.recv())["code"] == "bad_json"
    await c.send(b"[1, 2, 3]\n")
    assert (await c.recv())["code"] == "bad_frame"
    await c.send(b'{"op": "teleport", "rid": 5}\n')
    assert await c.recv() == {
        "op": "error",
        "code": "unknown_op",
        "message": "unknown op 'teleport'",
        "rid": 5,
    }
    await c.send(b'{"op": "hello", "user": 42, "password": "x", "device": "d"}\n')
    error = await c.recv()
    assert error["code"] == "bad_field" and "'user'" in error["message"]
    await c.send(b"\x00\xff\xfe garbage \x80\n")
    assert (await c.recv())["code"] == "bad_json"
    reply = await c.request({"op": "send", "to": "bob", "cmid": "1", "body": "x"})
    assert reply["code"] == "not_authenticated"
    assert (await c.request({"op": "ping"}))["op"] == "pong"
    await c.close()


async def test_wrong_field_types_and_lengths_after_login(cluster: LocalCluster) -> None:
    c, _ = await login(cluster, new_user())
    cases = [
        {"op": "send", "to": "bob", "cmid": "1", "body": ""},
        {"op": "send", "to": "bob", "room": 1, "cmid": "1", "body": "x"},
        {"op": "send", "to": "bob", "cmid": "x" * 65, "body": "x"},
        {"op": "send", "to": "bob", "cmid": "1", "body": "x" * 16385},
        {"op": "ack", "seq": -1},
        {"op": "ack", "seq": True},
        {"op": "presence", "state": "offline"},
        {"op": "history", "with": "bob", "limit": 1000},
    ]
    for frame in cases:
        reply = await c.request(frame)
        assert reply["code"] == "bad_field", (frame, reply)
    assert (await c.request({"op": "send", "to": "nobody_here", "cmid": "1", "body": "x"}))[
        "code"
    ] == "not_found"
    assert (await c.request({"op": "hello", "user": "abc", "password": "x", "device": "d"}))[
        "code"
    ] == "already_authenticated"
    await c.close()


async def test_oversize_frame_is_fatal_and_nothing_is_stored(cluster: LocalCluster) -> None:
    c, welcome = await login(cluster, new_user())
    limit = cluster.settings.max_frame_bytes
    await c.send(b'{"op":"send","to":"x","cmid":"big","body":"' + b"a" * limit + b'"}\n')
    error = await c.recv()
    assert error["code"] == "frame_too_large"
    assert await c.closed()
    await c.close()
    pid, health = _worker_pid_and_health(cluster, welcome["worker"])
    assert pid is not None and health == 200


async def test_repeated_abuse_closes_the_connection(cluster: LocalCluster) -> None:
    c = await _raw(cluster)
    await c.send(b"nope\n" * (cluster.settings.max_errors_per_connection + 1))
    codes = []
    while True:
        try:
            codes.append((await c.recv())["code"])
        except ConnectionError:
            break
    assert codes[-1] == "too_many_errors"
    assert set(codes[:-1]) == {"bad_json"}
    await c.close()


async def test_a_flood_far_beyond_the_budget_is_cut_off_while_others_carry_on(
    cluster: LocalCluster,
) -> None:
    """Frames beyond the budget get `rate_limited` and pause the socket; a client that
    keeps writing anyway has flood_fatal_frames beyond at the next read: `flood`."""
    alice, bob = new_user("alice"), new_user("bob")
    a, _ = await login(cluster, alice, worker="w1")
    b, _ = await login(cluster, bob, worker="w1")
    flooder, _ = await login(cluster, new_user("flood"), worker="w1")
    pid_before, _ = _worker_pid_and_health(cluster, "w1")

    async def conversation() -> list[int]:
        seqs = []
        for i in range(20):
            await a.request({"op": "send", "to": bob, "cmid": f"c{i}", "body": "still here"})
            seqs.append((await b.recv())["seq"])
        return seqs

    talk = asyncio.create_task(conversation())
    s = cluster.settings
    burst = b'{"op":"ping"}\n' * ((s.frame_burst + s.flood_fatal_frames) * 4)
    await flooder.send(burst)
    frames = []
    try:
        while True:
            frames.append(await flooder.recv(timeout=30))
    except ConnectionError:
        pass
    assert frames[-1]["code"] == "flood"
    # Whether it came at the first read or after a pause: the frames within the
    # budget were answered first, and nothing but rate_limited went wrong before.
    assert sum(f["op"] == "pong" for f in frames) >= s.frame_burst - 1
    assert {f["code"] for f in frames if f["op"] == "error"} <= {"rate_limited", "flood"}
    assert await talk == list(range(1, 21))
    pid_after, health = _worker_pid_and_health(cluster, "w1")
    assert pid_after == pid_before and health == 200
    for c in (a, b, flooder):
        await c.close()


async def test_a_reader_that_never_reads_is_dropped_without_hurting_others(
    cluster: LocalCluster,
) -> None:
    """A stalled reader's buffered output is bounded; its messages stay in its inbox."""
    bob = new_user("bob")
    s = cluster.settings
    stalled, _ = await login(cluster, bob, device="stalled", worker="w2")
    # Stop reading: the kernel's and HAProxy's buffers fill, then the worker's.
    stalled.writer.transport.pause_reading()
    # ~40 MB from ten senders, each within its own flood allowance: more than the
    # loopback socket buffers on the way (up to ~20 MB once autotuned) can hold.
    senders = [(await login(cluster, new_user("s"), worker="w2"))[0] for _ in range(10)]
    per_sender, body = 250, "z" * 16000
    sends = per_sender * len(senders)

    async def blast(client: LineClient, tag: int) -> None:
        for i in range(per_sender):
            await client.send({"op": "send", "to": bob, "cmid": f"s{tag}-{i}", "body": body})
        for _ in range(per_sender):
            assert (await client.recv_until("sent", 60))["op"] == "sent"

    await asyncio.gather(*(blast(c, n) for n, c in enumerate(senders)))
    await asyncio.sleep(s.slow_reader_timeout_s + 2)
    stalled.writer.transport.resume_reading()
    received = 0
    try:
        while True:
            frame = await stalled.recv(10)
            received += frame["op"] == "msg"
    except (ConnectionError, TimeoutError):
        pass
    assert received < sends  # it was cut off before everything was pushed to it
    # Nothing is lost: a fresh login of that device replays the rest of the inbox.
    again, welcome = await login(cluster, bob, device="stalled", register_first=False)
    assert welcome["seq"] == sends
    seqs = []
    while len(seqs) < sends:
        seqs.append((await again.recv(30))["seq"])
    assert seqs == list(range(1, sends + 1))
    for c in (*senders, again, stalled):
        await c.close()


async def test_a_forged_push_notification_is_ignored(cluster: LocalCluster) -> None:
    """Any role that can connect to the primary may NOTIFY (LISTEN and NOTIFY need no
    privilege). The reporting role cannot connect there any more (tests/integration/
    test_control_planes.py), so the forger here is the application role itself, whose
    password every worker holds: workers act only on signed payloads."""
    import asyncpg
    import orjson

    from app.store.db import dsn

    bob = new_user("bob")
    b, welcome = await login(cluster, bob)
    async with db(cluster) as conn:
        user_id = await conn.fetchval("SELECT id FROM users WHERE username = $1", bob)
    forged = {"replaced": [[user_id, int(welcome["session"]), None]]}
    forger = await asyncpg.connect(dsn(cluster.settings, role="app"))
    try:
        for payload in (
            orjson.dumps(forged).decode(),
            "0" * 32 + "|" + orjson.dumps(forged).decode(),
        ):
            await forger.execute("SELECT pg_notify('sb_push', $1)", payload)
    finally:
        await forger.close()
    await asyncio.sleep(0.5)
    assert (await b.request({"op": "ping"}))["op"] == "pong"
    await b.close()
