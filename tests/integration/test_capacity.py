"""The client port holds more connections than one HAProxy process can.

One HAProxy process proxies at most ``haproxy.MAXCONN`` (9,000) connections
under this machine's 20,000 open-files limit, two descriptors each. The
cluster runs ``haproxy_processes`` of them on the client port together
(SO_REUSEPORT): 12,000 clients, each answered by a worker, must all get in,
and the kernel must have spread them over every process.
"""

from __future__ import annotations

import asyncio
import resource

import orjson

from app.cluster import haproxy
from app.cluster.launcher import LocalCluster

CLIENTS = 12_000


async def test_more_clients_than_one_haproxy_process_holds(cluster: LocalCluster) -> None:
    s = cluster.settings
    assert s.haproxy_processes >= 2
    assert haproxy.MAXCONN < CLIENTS <= s.haproxy_processes * haproxy.MAXCONN * 0.7
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < CLIENTS + 1000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, CLIENTS + 2000), hard))
    gate = asyncio.Semaphore(500)
    streams: list[asyncio.StreamWriter] = []

    async def client(i: int) -> bool:
        async with gate:
            reader, writer = await asyncio.open_connection(s.host, s.client_port)
            streams.append(writer)
            writer.write(orjson.dumps({"op": "ping", "rid": i}) + b"\n")
            reply = orjson.loads(await asyncio.wait_for(reader.readline(), 30))
            return bool(reply == {"op": "pong", "rid": i})

    try:
        answered = await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        assert sum(answered) == CLIENTS
        # Every connection is still open, and each HAProxy process carries a share.
        per_process = []
        for path in cluster.layout.haproxy_sockets():
            stat = haproxy.runtime_command(cluster.layout, "show stat", stats_socket=path)
            front = next(line for line in stat.splitlines() if line.startswith("clients,FRONTEND"))
            per_process.append(int(front.split(",")[4]))  # scur
        assert len(per_process) == s.haproxy_processes
        assert sum(per_process) >= CLIENTS
        assert all(0 < n <= haproxy.MAXCONN for n in per_process), per_process
        held = sum(
            x.sessions for x in haproxy.server_states(cluster.layout) if x.backend == "workers"
        )
        assert held >= CLIENTS
    finally:
        for writer in streams:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in streams), return_exceptions=True)
