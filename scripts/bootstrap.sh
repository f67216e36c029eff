#!/usr/bin/env bash
# Installs what Switchboard needs and is missing: Debian packages and the venv.
# Idempotent and quiet when everything is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SWITCHBOARD_VENV:-$ROOT/.venv}"
PY=/usr/bin/python3

if [ ! -r /etc/os-release ] || ! grep -qiE '^(ID|ID_LIKE)=.*debian' /etc/os-release; then
    echo "switchboard: unsupported OS: 'make up' and 'make test' need Debian 12 (bookworm) or a derivative with apt." >&2
    exit 2
fi

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
[ -x "$PY" ] || need+=(python3)
"$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
# Many hosts (`up --hosts`, make multihost-test): namespaces, VRRP, partitions.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v keepalived >/dev/null 2>&1 || need+=(keepalived)
command -v nft >/dev/null 2>&1 || need+=(nftables)

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "switchboard: missing Debian packages (${need[*]}); run as root or install them: apt-get install ${need[*]}" >&2
        exit 2
    fi
    echo "==> installing Debian packages: ${need[*]}"
    # PostgreSQL's package would otherwise create and start a default cluster we never use.
    mkdir -p /etc/postgresql-common
    if [ ! -f /etc/postgresql-common/createcluster.conf ]; then
        echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The browser tests (tests/browser) drive Debian's Chromium through Playwright, whose own
# browser download cannot work here, and make it trust the cluster's CA with certutil
# (libnss3-tools). Only test runs need them: `bootstrap.sh --tests`, or CI.
if { [ "${1:-}" = "--tests" ] || [ -n "${CI:-}" ]; } && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/certutil ]; }; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "switchboard: the browser tests need Debian's chromium and libnss3-tools; run as root or: apt-get install chromium libnss3-tools" >&2
        exit 2
    fi
    echo "==> installing Debian packages: chromium libnss3-tools (browser tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 chromium libnss3-tools >/dev/null
fi

stamp="$VENV/.switchboard-installed"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "==> preparing the venv at $VENV"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e "$ROOT[dev,bench]"
    touch "$stamp"
fi
