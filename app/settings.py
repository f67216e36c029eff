"""One typed settings object for every Switchboard process.

Values come, later ones winning, from: the defaults below, a TOML file
(``SWITCHBOARD_CONFIG`` or ``--config``), ``SWITCHBOARD_<NAME>`` environment
variables, and explicit overrides (CLI flags, tests). Read once at start-up;
code receives the frozen object and never reads the environment itself.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeAlias

ENV_PREFIX = "SWITCHBOARD_"

# A DNS name for a certificate: labels of letters, digits and hyphens; a leading `*.`.
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(\*\.)?({_DNS_LABEL}\.)*{_DNS_LABEL}")
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
# How far HAProxy's client/server timeouts sit above idle_timeout_s (edge_timeout_s).
EDGE_TIMEOUT_MARGIN_S = 30.0
# HAProxy checks each worker's health port every HEALTH_CHECK_INTERVAL_S, from every
# process; past CHECKING_PROCESSES processes both check intervals stretch (check_scale).
HEALTH_CHECK_INTERVAL_S = 1.0
CHECKING_PROCESSES = 4


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True, slots=True)
class Settings:
    # Where the local cluster keeps pid files, logs, secrets and data.
    state_dir: Path = Path(".switchboard")
    host: str = "127.0.0.1"

    # Client-facing tier.
    workers: int = 3
    # The plaintext client port. It binds loopback only (127.0.0.1, or ::1 when the
    # public address is IPv6), for tools on the cluster host, unless
    # allow_plaintext_public: passwords and resume tokens cross it in clear text.
    client_port: int = 5222
    allow_plaintext_public: bool = False
    # The TLS client port (HAProxy terminates TLS; the same protocol inside).
    client_tls_port: int = 5223
    # The address the public client ports bind (TLS, and plaintext when allowed);
    # empty: `host`. Lets a one-machine cluster keep its workers, databases and stats
    # page on loopback and publish only the TLS port.
    public_host: str = ""
    # The server certificate and its key (PEM files) HAProxy serves on the TLS ports.
    # Both empty: the cluster makes its own CA (<state_dir>/tls/ca.pem, which clients
    # must trust) and a server certificate signed by it, for `host`, `public_host`,
    # localhost, 127.0.0.1, ::1 and tls_names (comma-separated DNS names or addresses).
    tls_cert: str = ""
    tls_key: str = ""
    tls_names: str = ""
    worker_base_port: int = 7001
    worker_health_base_port: int = 7101
    # HAProxy's agent check asks each worker "ready" or "drain" on this port.
    worker_agent_base_port: int = 7201
    # WebSocket clients (docs/protocol.md, "WebSocket transport"): the same frames, one
    # per text message, through HAProxy's `websockets` frontend: plain ws:// on
    # client_ws_port (loopback only, like client_port) and wss:// on client_wss_port
    # (TLS with the client_tls_port's certificate), to each worker's worker_ws port.
    # The web chat page is served on both, at /chat/.
    client_ws_port: int = 5280
    client_wss_port: int = 5281
    worker_ws_base_port: int = 7301
    # Browser origins (scheme://host[:port], comma-separated) allowed to open a
    # WebSocket besides the cluster's own (an Origin naming the Host the browser
    # dialled); a request without Origin is not a browser's and is allowed.
    ws_allowed_origins: str = ""
    # The worker pings each WebSocket client this often and drops one that does not
    # answer within half of it (aiohttp's heartbeat).
    ws_heartbeat_s: float = 30.0
    # Stretched past CHECKING_PROCESSES HAProxy processes: effective_agent_interval_s().
    agent_interval_s: float = 1.0
    haproxy_stats_port: int = 8404
    # HAProxy processes binding the client port together (SO_REUSEPORT). One
    # process holds ~9,000 client connections under a 20,000 open-files limit
    # (two descriptors each); the first one also serves the database ports, the
    # dashboard and the stats page.
    haproxy_processes: int = 2
    dashboard_port: int = 8080
    # Many hosts (docs/operations.md, "Many hosts"): a private IPv4 network, a /24 or
    # larger, on which `up` makes one Linux network namespace per host on a bridge of
    # the machine (hosts_prefix names them): two balancer hosts (HAProxy and
    # keepalived each, with a virtual IP on the active one), worker_hosts worker
    # hosts (the workers spread over them), one database host per db node (Patroni,
    # PostgreSQL and an etcd member each) and a client host. Each component binds its
    # host's address; clients and workers reach the tier through the virtual IP.
    # Empty: the whole tier on `host`.
    hosts_net: str = ""
    worker_hosts: int = 3
    hosts_prefix: str = "sb"

    # Database tier.
    # Where workers, the dashboard and tools reach HAProxy's database ports (a name or
    # an address); empty: `host` (one machine), the virtual IP (many hosts). Compose
    # sets it to HAProxy's service name while workers bind 0.0.0.0.
    db_host: str = ""
    db_nodes: int = 3
    db_primary_port: int = 5000
    db_replica_port: int = 5001
    pg_base_port: int = 15432
    patroni_rest_base_port: int = 8008
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    db_name: str = "switchboard"
    db_user: str = "switchboard"
    # etcd's data lives on tmpfs: on disk its fsync stalls under failover load here.
    etcd_tmpfs_dir: Path = Path("/dev/shm")
    # PostgreSQL refuses to run as root; root runs the DB tier as this user.
    run_as: str = "postgres"
    pg_bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    etcd_bin: str = "etcd"
    haproxy_bin: str = "haproxy"
    patroni_ttl: int = 20
    startup_timeout_s: float = 90.0
    # Supervision (app/cluster/supervisor.py): `up` starts a supervisor that looks at
    # every component's pid each interval and starts a dead one again. A component's
    # first restart comes at once, each further one waits backoff_base_s, doubling up
    # to backoff_max_s, after the one before; one that then stays up healthy_s starts
    # again from no backoff. supervise = false: nothing restarts by itself.
    supervise: bool = True
    # While the workers refuse password logins or registrations, HAProxy accepts new
    # client connections at about the rate the workers open sessions, and the rest
    # wait in the kernel's listen queue (app/cluster/storm_gate.py; run by the
    # supervisor). Lifted 5 s after the last refusal.
    storm_gate: bool = True
    supervise_interval_s: float = 1.0
    supervise_backoff_base_s: float = 0.5
    supervise_backoff_max_s: float = 30.0
    supervise_healthy_s: float = 60.0

    # Worker process.
    worker_id: str = ""
    db_pool_min: int = 2
    db_pool_max: int = 10
    db_connect_timeout_s: float = 2.0
    db_command_timeout_s: float = 10.0
    shutdown_grace_s: float = 10.0
    # Liveness (app/worker/liveness.py, docs/operations.md). A worker renews its lease
    # every interval from a thread of its own. The others declare it dead (and detach
    # its sessions) when its lease connection is gone and it has not renewed for
    # worker_dead_after_s (the process died), or when the lease ran out although the
    # connection is there (hung, stopped, cut off): a busy worker is never dead.
    worker_lease_s: float = 15.0
    worker_dead_after_s: float = 3.0
    lease_renew_interval_s: float = 1.0
    reaper_interval_s: float = 1.0
    # Past this much event-loop lag a worker sheds load: HAProxy's agent check gets
    # a lower weight (fewer new clients), and its lease says it is overloaded.
    shed_lag_s: float = 0.5
    # How long a detached session stays resumable with its token; while any worker
    # reports overload (clients may be waiting their turn), up to the max.
    resume_grace_s: float = 120.0
    resume_grace_max_s: float = 600.0
    # Device tokens (login_token, docs/security.md): a device's token expires after
    # this many days without use; the token a rotation replaced stays valid for
    # device_token_overlap_s (a welcome lost in flight does not lock the device out).
    device_token_ttl_days: float = 30.0
    device_token_overlap_s: float = 60.0
    # Each worker re-reads the rows of the sessions it holds this often, and at once
    # when its listener reconnects, and drops the connections whose session was
    # closed, taken over or disabled meanwhile: a kick or replacement whose NOTIFY
    # it missed (a failover) takes effect within this long. One query per interval.
    session_recheck_interval_s: float = 5.0
    # A signed push (sb_push) is acted on once, within this long of its signature
    # (either way, for clock skew); a captured one replayed later is dropped.
    push_max_age_s: float = 30.0
    # The events log (docs/reporting.md): buffered in each worker, written in
    # batches every flush interval (or at batch_max); past buffer_max (database
    # away) new events are dropped. Daily partitions older than the retention
    # are dropped by whichever worker runs the maintenance (at start, then hourly).
    events_flush_interval_s: float = 1.0
    events_batch_max: int = 5000
    events_buffer_max: int = 200_000
    events_retention_days: int = 14
    events_maintenance_interval_s: float = 3600.0
    # `switchboard report`: longest a report query may run on the replica.
    report_timeout_s: float = 30.0
    # Drain: clients are told to reconnect at random times within the spread,
    # and stragglers are cut off after the timeout.
    drain_spread_s: float = 3.0
    drain_timeout_s: float = 10.0
    max_frame_bytes: int = 65536
    max_body_chars: int = 16384
    max_errors_per_connection: int = 20
    # Per-connection flood control: a token bucket of frames. A frame beyond it is
    # answered `rate_limited` (with retry_after) and the socket is not read until a
    # token is back; only a connection that keeps sending flood_fatal_frames frames
    # beyond it (they were already in flight) is closed with the fatal `flood`.
    frames_per_s: float = 200.0
    frame_burst: int = 400
    flood_fatal_frames: int = 2000
    # Per-op budgets per user on a worker (app/worker/ratelimit.py): ops that cost a
    # commit, a NOTIFY or a query each, beyond which they are answered `rate_limited`.
    presence_ops_per_s: float = 1.0
    presence_ops_burst: int = 5
    typing_ops_per_s: float = 5.0
    typing_ops_burst: int = 10
    social_ops_per_s: float = 1.0
    social_ops_burst: int = 10
    query_ops_per_s: float = 10.0
    query_ops_burst: int = 20
    # Sessions (devices) one user may have open (active or resumable) at once; a
    # login from one more device is refused with too_many_devices.
    max_devices_per_user: int = 10
    # Requests decoded but not yet handled; past this the socket stops being read.
    max_pending_requests: int = 64
    # Past this much unsent output a connection is a slow reader: inbox pushes pause,
    # and it is dropped after slow_reader_timeout_s (or at 4x this much). It can resume.
    max_write_buffer_bytes: int = 1_048_576
    slow_reader_timeout_s: float = 30.0
    # A `history` reply holds at most this many bytes of messages (at least one
    # message); past it the reply says `more` and the client pages on.
    max_history_reply_bytes: int = 524_288
    # Group commit: messages per statement, lanes (statements in flight; a sender
    # always uses the same lane, so its messages commit in order), and how long a
    # send may stall (e.g. through a DB failover) before it fails with `internal`.
    # Acks and read receipts are group-committed the same way, one lane each.
    batch_max: int = 500
    batch_writers: int = 1
    # Under load a lane starts batches at most this often (an idle lane at once),
    # and a worker reads moved inboxes of its users at most this often.
    batch_interval_s: float = 0.02
    delivery_interval_s: float = 0.01
    send_retry_budget_s: float = 60.0
    # Sends one connection may pipeline before their `sent` replies; past this the
    # connection's further requests wait.
    max_inflight_sends: int = 32
    # Admission control (app/worker/admission.py): logins, registrations and resumes
    # each have their own slots and their own queue, so a flood of one kind never
    # makes another answer `overloaded`. Logins (and password changes) handled at
    # once per worker, and how many may wait for a slot; past that, `overloaded`
    # with retry_after.
    max_concurrent_auth: int = 16
    max_auth_queue: int = 256
    # Registrations hash a password too; fewer at once, so a register flood
    # holds at most this many places in the argon2 threads' queue ahead of logins.
    max_concurrent_registers: int = 2
    max_register_queue: int = 64
    # Resumes hash no password and share batched statements: many more at once,
    # and a queue that holds a dead worker's share of clients. When a worker holding
    # 12,500 dies, its clients are back within a second, ~1,800 at each of 7
    # survivors: with 1,024 places the rest were refused and came back when their
    # retry_after said, which doubled the CPU a resume cost and stretched the storm's
    # p99 to 10-17 s; with 4,096 they wait their turn (docs/benchmarks.md, 12-07).
    # Waiting costs a connection already open and a future.
    max_concurrent_resumes: int = 256
    max_resume_queue: int = 4096
    # A request that finds its kind's slots busy waits this long for one (queue,
    # don't bounce) before it is answered `overloaded`. Keep it below auth_timeout_s:
    # a connection not logged in by then is closed, waiting or not.
    admission_wait_s: float = 5.0
    # While the worker's event loop lags this much (the worst of the last 10-20 s),
    # password logins and registrations run one at a time, and one that would wait
    # past admission_wait_s is refused at once; resumes and token logins are
    # admitted as usual.
    admission_shed_lag_s: float = 1.0
    # retry_after of an `overloaded`: from the queue's measured drain time (at least
    # the minimum), its ceiling doubling each second while refusals go on (at most
    # the maximum), jittered uniformly between the minimum and the ceiling.
    admission_retry_min_s: float = 0.5
    admission_retry_max_s: float = 30.0
    # Sessions one worker holds at most (0: no limit). At the limit a new login
    # (hello, login_token) is answered `overloaded` with retry_after; resumes are
    # not refused (they are sessions the cluster already holds, moving over from a
    # worker that died). `switchboard up --capacity N` sets it (app/cluster/capacity.py).
    worker_max_sessions: int = 0
    # argon2id cost (OWASP's baseline: 19 MiB, 2 passes, 1 lane).
    argon2_time_cost: int = 2
    argon2_memory_kib: int = 19456
    argon2_parallelism: int = 1
    # Threads that hash passwords, per worker (at most the machine's cores): with one
    # worker per core, one each already keeps every core busy under a login storm.
    # They run at this nice value (Linux), so the event loops, which serve the live
    # sessions and renew the lease, win the CPU when both want it.
    argon2_threads: int = 1
    argon2_nice: int = 10
    min_password_chars: int = 12
    # Password throttling (app/store/throttle.py, docs/security.md). Every password
    # attempt (`hello`, the old password of `password`) is counted before it is
    # checked, per (user, client address): the first login_free_failures go through
    # at once, each further one only after a wait that doubles from
    # login_backoff_base_s up to login_backoff_max_s. A right password clears the
    # pair; so does login_backoff_forget_s without an attempt once the wait is over.
    login_free_failures: int = 5
    login_backoff_base_s: float = 1.0
    login_backoff_max_s: float = 300.0
    login_backoff_forget_s: float = 900.0
    # Per client address, whatever the user (credential stuffing): at most this
    # many password attempts that were not right per fixed window.
    max_login_failures_per_addr: int = 50
    login_failure_window_s: float = 300.0
    # `register` per client address per fixed window.
    max_registers_per_addr: int = 20
    register_window_s: float = 3600.0
    # Addresses or networks (comma-separated) that stand for many clients: the
    # per-address budgets above do not apply to them (the per-user backoff does).
    # Client addresses that many people share, where a per-address budget would be
    # everyone's: the machine's own by default (the CLI, tests and benchmarks connect
    # from it). Workers see each client's real address (HAProxy's PROXY header), so
    # add a NAT gateway's or a corporate proxy's address here if one fronts many users.
    shared_client_addrs: str = "127.0.0.1,::1"
    log_level: str = "INFO"
    # TEST HOOK, never set in production: each password verification first sleeps
    # this long, so an integration test can disable an account during a login.
    test_verify_delay_s: float = 0.0

    # The edge (docs/security.md): workers take connections only from these addresses
    # (HAProxy's), each opened by a PROXY protocol v2 header that names the client.
    # Comma-separated addresses or networks; `host` is trusted too when it names one
    # address (not 0.0.0.0 or ::).
    proxy_trusted_addrs: str = "127.0.0.0/8,::1"
    # A connection must log in (a welcome to hello or resume) within this long of
    # connecting, or it is closed with auth_timeout; pings and blank lines do not count.
    auth_timeout_s: float = 10.0
    # A logged-in connection that sends nothing, not even a ping, for this long is closed
    # with idle_timeout and its session detached (resumable). The SDK pings every 30 s.
    # HAProxy's client/server timeouts sit a little above it (edge_timeout_s).
    idle_timeout_s: float = 90.0
    # TCP keepalive on client connections (at HAProxy) and on the workers' sockets: the
    # first probe after idle seconds of silence, then one per interval; count unanswered
    # probes drop the connection. Unacknowledged data gets as long (TCP_USER_TIMEOUT).
    tcp_keepalive_idle_s: int = 60
    tcp_keepalive_interval_s: int = 10
    tcp_keepalive_count: int = 3
    # TCP keepalive from HAProxy to the workers (``srvtcpka``, and tcp-ut on each
    # server): the clients of a worker whose host died are cut within idle + interval x
    # count seconds of silence (and reconnect elsewhere). Only where a worker's host can
    # vanish: always with hosts_net, elsewhere when backend_keepalive is set. On one
    # host a dead worker's kernel closes its connections at once, and the probes cost:
    # one and its answer per idle connection per idle seconds, through the same
    # softirq as everything else. At 60,000 sessions on 2 cores, a worker's kill -9
    # with them on dropped 15,875 sessions of live workers as well (the ACKs came
    # later than the 8 s tcp-ut under the storm); 0 without (docs/benchmarks.md).
    backend_keepalive: bool = False
    backend_keepalive_idle_s: int = 5
    backend_keepalive_interval_s: int = 1
    backend_keepalive_count: int = 3
    # Per client address (an IPv6 /64), at each HAProxy process: connections open at
    # once, and new connections per conn_rate_period_s. Past either, HAProxy closes a
    # new connection at once, before it reaches a worker.
    max_conns_per_addr: int = 50
    max_conn_rate_per_addr: int = 100
    conn_rate_period_s: int = 10
    # New client connections per second the balancer accepts in all (TCP, TLS and
    # WebSocket ports; split evenly over haproxy_processes). 0: no limit. Past it,
    # new connections wait in the kernel's listen queue (clients retry their SYN)
    # instead of each costing a connection through HAProxy into a worker that answers
    # `overloaded`: a login storm queues at the door. It slows a reconnect storm just
    # as much, so set it above the rate the cluster resumes sessions at; storm_gate
    # limits only while password logins are refused (docs/operations.md, Load
    # shedding; measured in docs/benchmarks.md).
    client_accept_rate: int = 0
    # Addresses (or networks) exempt from those caps: the machine's own, where the
    # tests, the benchmarks and the CLI connect from. Other loopback addresses
    # (127.0.0.2, ...) are capped like any host.
    conn_cap_exempt_addrs: str = "127.0.0.1,::1"

    # Admin dashboard. HAProxy serves it on dashboard_port and forwards to the
    # dashboard process on dashboard_port + dashboard_app_port_offset (an offset, so
    # every cluster that moves dashboard_port moves its app port along with it).
    dashboard_app_port_offset: int = 1
    # HAProxy serves the dashboard over TLS (with HSTS) with the client ports'
    # certificate; dashboard_tls_pem (certificate + key in one file) overrides it.
    # dashboard_tls = false serves plain HTTP (a test cluster, a TLS proxy in front).
    dashboard_tls: bool = True
    dashboard_tls_pem: str = ""
    # An admin session ends after this long without a request, and after the maximum age.
    dashboard_idle_timeout_s: float = 1800.0
    dashboard_session_max_age_s: float = 43200.0
    # Admin sign-ins are throttled like client logins: failures per (admin name,
    # address) before the doubling wait (login_backoff_*), and failures per address
    # within login_failure_window_s.
    dashboard_login_free_failures: int = 5
    dashboard_login_failures_per_addr: int = 20
    # How often the live view samples the cluster, and how many samples the charts keep.
    dashboard_refresh_s: float = 1.0
    dashboard_history_points: int = 600
    dashboard_page_size: int = 50
    dashboard_db_pool_max: int = 4
    # Only the cluster launcher writes these for the processes it starts.
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise SettingsError("workers must be at least 1")
        if self.db_nodes < 1:
            raise SettingsError("db_nodes must be at least 1")
        if self.haproxy_processes < 1:
            raise SettingsError("haproxy_processes must be at least 1")
        if self.client_accept_rate < 0:
            raise SettingsError("client_accept_rate must be 0 (no limit) or positive")
        if not 0 < self.worker_dead_after_s < self.worker_lease_s:
            raise SettingsError("worker_dead_after_s must be positive and below worker_lease_s")
        if self.lease_renew_interval_s * 2 > self.worker_dead_after_s:
            raise SettingsError("lease_renew_interval_s must be at most worker_dead_after_s / 2")
        if self.resume_grace_max_s < self.resume_grace_s:
            raise SettingsError("resume_grace_max_s must be at least resume_grace_s")
        if min(self.supervise_interval_s, self.supervise_backoff_base_s) <= 0:
            raise SettingsError(
                "supervise_interval_s and supervise_backoff_base_s must be positive"
            )
        if self.supervise_backoff_max_s < self.supervise_backoff_base_s:
            raise SettingsError("supervise_backoff_max_s must be at least supervise_backoff_base_s")
        if self.session_recheck_interval_s <= 0 or self.push_max_age_s <= 0:
            raise SettingsError("session_recheck_interval_s and push_max_age_s must be positive")
        if self.worker_max_sessions < 0:
            raise SettingsError("worker_max_sessions must be 0 (no limit) or positive")
        if self.max_frame_bytes < 1024:
            raise SettingsError("max_frame_bytes must be at least 1024")
        for f in fields(self):
            if f.name.endswith("_port"):
                port = getattr(self, f.name)
                if not 1 <= port <= 65535:
                    raise SettingsError(f"{f.name} must be a TCP port, got {port}")
        if not 1 <= self.dashboard_app_port() <= 65535 or self.dashboard_app_port_offset == 0:
            raise SettingsError("dashboard_port + dashboard_app_port_offset must be another port")
        _networks("proxy_trusted_addrs", self.proxy_trusted_addrs)
        client_ports = (
            self.client_port,
            self.client_tls_port,
            self.client_ws_port,
            self.client_wss_port,
        )
        if len(set(client_ports)) != len(client_ports):
            raise SettingsError(
                "client_port, client_tls_port, client_ws_port and client_wss_port must differ"
            )
        if self.ws_heartbeat_s <= 0:
            raise SettingsError("ws_heartbeat_s must be positive")
        self.ws_origin_list()  # raises SettingsError when one is not an origin
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("tls_cert and tls_key go together: set both, or neither")
        self.tls_name_list()  # raises SettingsError when one is not a name or address
        if self.auth_timeout_s <= 0 or self.idle_timeout_s <= 0:
            raise SettingsError("auth_timeout_s and idle_timeout_s must be positive")
        if min(self.tcp_keepalive_idle_s, self.tcp_keepalive_interval_s) < 1:
            raise SettingsError("tcp_keepalive_idle_s and _interval_s must be at least 1")
        if min(self.backend_keepalive_idle_s, self.backend_keepalive_interval_s) < 1:
            raise SettingsError("backend_keepalive_idle_s and _interval_s must be at least 1")
        if not 1 <= self.tcp_keepalive_count <= 127 or not 1 <= self.backend_keepalive_count <= 127:
            raise SettingsError("tcp_keepalive_count and backend_keepalive_count must be 1..127")
        if min(self.max_conns_per_addr, self.max_conn_rate_per_addr, self.conn_rate_period_s) < 1:
            raise SettingsError(
                "max_conns_per_addr, max_conn_rate_per_addr and conn_rate_period_s must be positive"
            )
        _networks("conn_cap_exempt_addrs", self.conn_cap_exempt_addrs)
        for name in (
            "login_free_failures",
            "max_login_failures_per_addr",
            "max_registers_per_addr",
            "dashboard_login_free_failures",
            "dashboard_login_failures_per_addr",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1")
        self.shared_client_networks()  # raises SettingsError when one is not an address
        self._check_hosts()
        if self.admission_wait_s <= 0 or self.admission_shed_lag_s <= 0:
            raise SettingsError("admission_wait_s and admission_shed_lag_s must be positive")
        if not 0 < self.admission_retry_min_s <= self.admission_retry_max_s:
            raise SettingsError("admission_retry_min_s must be positive and <= _max_s")
        if self.argon2_threads < 1 or not 0 <= self.argon2_nice <= 19:
            raise SettingsError("argon2_threads must be at least 1, argon2_nice 0..19")

    @classmethod
    def load(
        cls,
        config_file: Path | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or (
            Path(env[ENV_PREFIX + "CONFIG"]) if ENV_PREFIX + "CONFIG" in env else None
        )
        if path is not None:
            try:
                with path.open("rb") as fh:
                    data = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SettingsError(f"cannot read config file {path}: {exc}") from None
            values.update(data.get("switchboard", data))
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls) if f.name != "extra"}
        for name in known:
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        unknown = set(values) - known
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """Environment that makes a child process load these same settings."""
        out: dict[str, str] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[ENV_PREFIX + f.name.upper()] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        return out

    # Derived values, kept here so no module invents its own port arithmetic.
    def worker_ids(self) -> list[str]:
        return [f"w{i}" for i in range(1, self.workers + 1)]

    def worker_port(self, worker_id: str) -> int:
        return self.worker_base_port + _index(worker_id) - 1

    def worker_health_port(self, worker_id: str) -> int:
        return self.worker_health_base_port + _index(worker_id) - 1

    def worker_health_url(self, worker_id: str, path: str = "/health") -> str:
        """A worker's health server: ``/health`` (or ``path``) at its address."""
        return f"http://{self.address_of(worker_id)}:{self.worker_health_port(worker_id)}{path}"

    def worker_agent_port(self, worker_id: str) -> int:
        return self.worker_agent_base_port + _index(worker_id) - 1

    def worker_ws_port(self, worker_id: str) -> int:
        return self.worker_ws_base_port + _index(worker_id) - 1

    def ws_origin_list(self) -> tuple[str, ...]:
        """``ws_allowed_origins`` split and checked: each ``scheme://host[:port]``."""
        origins = []
        for item in self.ws_allowed_origins.split(","):
            origin = item.strip().rstrip("/").lower()
            if not origin:
                continue
            if not re.fullmatch(r"(https?)://[a-z0-9.\-\[\]:]+", origin):
                raise SettingsError(
                    f"ws_allowed_origins: {item.strip()!r} is not scheme://host[:port]"
                )
            origins.append(origin)
        return tuple(origins)

    def dashboard_app_port(self) -> int:
        """Where the dashboard process listens; HAProxy's dashboard_port forwards here."""
        return self.dashboard_port + self.dashboard_app_port_offset

    def public_bind_host(self) -> str:
        """Where the TLS client port (and a public plaintext one) listens: on many
        hosts, the virtual IP."""
        return self.public_host or (self.vip() if self.multihost() else self.host)

    def plaintext_bind_host(self) -> str:
        """Where the plaintext client port listens: loopback, unless allowed in public."""
        public = self.public_bind_host()
        if self.allow_plaintext_public:
            return public
        try:
            address = ipaddress.ip_address(public.strip("[]"))
        except ValueError:
            return "127.0.0.1"  # a name: loopback, by the address family we know works
        if address.is_loopback:
            return public
        return "::1" if address.version == 6 else "127.0.0.1"

    def plaintext_is_public(self) -> bool:
        return self.allow_plaintext_public and not _is_loopback(self.plaintext_bind_host())

    def tls_ca_file(self) -> Path:
        """The cluster's own CA certificate (app/cluster/tls.py), which clients trust."""
        return self.state_dir.resolve() / "tls" / "ca.pem"

    def tls_name_list(self) -> tuple[str, ...]:
        """``tls_names`` split and checked: each a DNS name (``*.`` allowed) or an address."""
        names = []
        for item in self.tls_names.split(","):
            name = item.strip()
            if not name:
                continue
            if not (is_address(name) or _DNS_NAME.fullmatch(name)):
                raise SettingsError(f"tls_names: {name!r} is not a DNS name or an address")
            names.append(name)
        return tuple(names)

    def proxy_networks(self) -> tuple[IPNetwork, ...]:
        """Where a worker accepts connections from: proxy_trusted_addrs, and `host`."""
        networks = _networks("proxy_trusted_addrs", self.proxy_trusted_addrs)
        try:
            host = ipaddress.ip_address(self.host)
        except ValueError:
            return networks  # a name (compose): proxy_trusted_addrs says it all
        if host.is_unspecified:
            return networks
        balancers = tuple(
            ipaddress.ip_network(addr) for name, addr in self.hosts().items() if name[:2] == "lb"
        )
        return (*networks, ipaddress.ip_network(host), *balancers)

    def conn_cap_exempt_networks(self) -> tuple[IPNetwork, ...]:
        return _networks("conn_cap_exempt_addrs", self.conn_cap_exempt_addrs)

    def tcp_user_timeout_s(self) -> int:
        """How long sent data may stay unacknowledged: as long as keepalive takes to give up."""
        return self.tcp_keepalive_idle_s + self.tcp_keepalive_interval_s * self.tcp_keepalive_count

    def backend_keepalive_on(self) -> bool:
        """Probes and tcp-ut towards the workers: with workers on other hosts only."""
        return self.backend_keepalive or self.multihost()

    def backend_user_timeout_s(self) -> int:
        """HAProxy's TCP_USER_TIMEOUT towards the workers: as long as its probes take."""
        return (
            self.backend_keepalive_idle_s
            + self.backend_keepalive_interval_s * self.backend_keepalive_count
        )

    def edge_timeout_s(self) -> float:
        """HAProxy's client and server timeouts: a little over idle_timeout_s, so that the
        worker, which answers with idle_timeout and detaches the session, decides first."""
        return self.idle_timeout_s + EDGE_TIMEOUT_MARGIN_S

    def check_scale(self) -> float:
        """How much HAProxy's health and agent check intervals are stretched: every
        process checks every worker, so past CHECKING_PROCESSES processes the intervals
        grow with their number and a worker answers about CHECKING_PROCESSES checks of
        each kind per interval however many processes there are (the 200,000-session
        plan's 25 processes x 17 workers otherwise cost ~half a core idle)."""
        return max(1.0, self.haproxy_processes / CHECKING_PROCESSES)

    def health_check_interval_s(self) -> float:
        return HEALTH_CHECK_INTERVAL_S * self.check_scale()

    def effective_agent_interval_s(self) -> float:
        """Each HAProxy process's agent-check interval (agent_interval_s, stretched)."""
        return self.agent_interval_s * self.check_scale()

    def haproxy_names(self) -> list[str]:
        """haproxy (the full config), then haproxy2, haproxy3, ... (client port only)."""
        return ["haproxy", *(f"haproxy{i}" for i in range(2, self.haproxy_processes + 1))]

    def shared_client_networks(self) -> tuple[IPNetwork, ...]:
        """``shared_client_addrs`` parsed: each an address (a network of one) or a network."""
        networks = []
        for item in self.shared_client_addrs.split(","):
            if item.strip():
                try:
                    networks.append(ipaddress.ip_network(item.strip(), strict=False))
                except ValueError:
                    raise SettingsError(
                        f"shared_client_addrs: {item.strip()!r} is not an address or network"
                    ) from None
        return tuple(networks)

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.db_nodes + 1)]

    def etcd_names(self) -> list[str]:
        """etcd's members: one (``etcd``) on one host; one per database host on many."""
        if not self.multihost():
            return ["etcd"]
        return [f"etcd{i}" for i in range(1, self.db_nodes + 1)]

    # ---- many hosts (hosts_net) ------------------------------------------------
    def multihost(self) -> bool:
        return bool(self.hosts_net)

    def _hosts_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.hosts_net, strict=False)

    def _check_hosts(self) -> None:
        if not self.hosts_net:
            return
        try:
            net = self._hosts_network()
        except ValueError:
            raise SettingsError(f"hosts_net: {self.hosts_net!r} is not an IPv4 network") from None
        if net.prefixlen > 24 or not net.is_private:
            raise SettingsError("hosts_net must be a private IPv4 network of /24 or larger")
        if self.haproxy_processes != 2:
            raise SettingsError("with hosts_net, haproxy_processes is 2 (one per balancer host)")
        if not 1 <= self.worker_hosts <= 9 or not 1 <= self.db_nodes <= 9:
            raise SettingsError("with hosts_net, worker_hosts and db_nodes are 1..9")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", self.hosts_prefix):
            raise SettingsError("hosts_prefix is 1-6 lower-case letters and digits")

    def hosts(self) -> dict[str, str]:
        """Host name -> address on hosts_net: lb1, lb2, app1.., db1.., client ({} on one host).
        The bridge has the network's first address, the virtual IP its tenth."""
        if not self.multihost():
            return {}
        base = self._hosts_network().network_address
        out = {"lb1": base + 11, "lb2": base + 12}
        out.update({f"app{i}": base + 20 + i for i in range(1, self.worker_hosts + 1)})
        out.update({f"db{i}": base + 30 + i for i in range(1, self.db_nodes + 1)})
        out["client"] = base + 100
        return {name: str(addr) for name, addr in out.items()}

    def hosts_cidr(self) -> str:
        """hosts_net normalised (10.77.0.0/24), for pg_hba and firewall rules."""
        return str(self._hosts_network())

    def bridge_address(self) -> str:
        return str(self._hosts_network().network_address + 1)

    def hosts_prefixlen(self) -> int:
        return self._hosts_network().prefixlen

    def vip(self) -> str:
        """The balancers' virtual IP (many hosts), which clients and workers dial."""
        return str(self._hosts_network().network_address + 10)

    def host_of(self, component: str) -> str | None:
        """The host a component runs on (None: the machine itself, as on one host)."""
        if not self.multihost():
            return None
        number = int(digits) if (digits := re.sub(r"\D", "", component)) else 1
        if component.startswith(("haproxy", "keepalived")) or component == "dashboard":
            return f"lb{number}"
        if re.fullmatch(r"w\d+", component):
            return f"app{(number - 1) % self.worker_hosts + 1}"
        if re.fullmatch(r"(n|etcd)\d+", component):
            return f"db{number}"
        return None

    def host_netns(self, host: str) -> str:
        """The network namespace of a host (lb1, app2, client, ...)."""
        return f"{self.hosts_prefix}-{host}"

    def netns_of(self, component: str) -> str | None:
        host = self.host_of(component)
        return None if host is None else self.host_netns(host)

    def address_of(self, component: str) -> str:
        """Where a component listens: its host's address (many hosts), else ``host``."""
        host = self.host_of(component)
        return self.hosts()[host] if host is not None else self.host

    def db_address(self) -> str:
        """Where workers, the dashboard and tools reach HAProxy's database ports."""
        return self.db_host or (self.vip() if self.multihost() else self.host)

    def client_address(self) -> str:
        """Where the tier's own tools (chaos, benchmarks) dial the client ports."""
        return self.vip() if self.multihost() else self.host

    def pg_port(self, node: str) -> int:
        return self.pg_base_port + _index(node) - 1

    def patroni_rest_port(self, node: str) -> int:
        return self.patroni_rest_base_port + _index(node) - 1

    def all_ports(self) -> dict[str, int]:
        """Every listening port of the local cluster, named for error messages."""
        ports = {
            "client_port": self.client_port,
            "client_tls_port": self.client_tls_port,
            "client_ws_port": self.client_ws_port,
            "client_wss_port": self.client_wss_port,
            "haproxy_stats_port": self.haproxy_stats_port,
            "dashboard_port": self.dashboard_port,
            "dashboard app": self.dashboard_app_port(),
            "db_primary_port": self.db_primary_port,
            "db_replica_port": self.db_replica_port,
            "etcd_client_port": self.etcd_client_port,
            "etcd_peer_port": self.etcd_peer_port,
        }
        for node in self.node_names():
            ports[f"postgres {node}"] = self.pg_port(node)
            ports[f"patroni REST {node}"] = self.patroni_rest_port(node)
        for wid in self.worker_ids():
            ports[f"worker {wid}"] = self.worker_port(wid)
            ports[f"worker {wid} health"] = self.worker_health_port(wid)
            ports[f"worker {wid} agent"] = self.worker_agent_port(wid)
            ports[f"worker {wid} websocket"] = self.worker_ws_port(wid)
        return ports


def _networks(name: str, text: str) -> tuple[IPNetwork, ...]:
    """Comma-separated addresses or networks (a.b.c.d/n, ::1) as networks."""
    try:
        return tuple(
            ipaddress.ip_network(item.strip(), strict=False)
            for item in text.split(",")
            if item.strip()
        )
    except ValueError as exc:
        raise SettingsError(f"setting {name}: {exc}") from None


def is_address(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (not a name, not a network)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_loopback(text: str) -> bool:
    try:
        return ipaddress.ip_address(text.strip("[]")).is_loopback
    except ValueError:
        return text == "localhost"


def _index(name: str) -> int:
    return int(name.lstrip("wn"))


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if isinstance(hint, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if hint is Path:
            return Path(value)
        if hint in (int, float, str):
            return hint(value)
    except (TypeError, ValueError):
        raise SettingsError(f"setting {name}: cannot use {value!r} as {hint.__name__}") from None
    return value
