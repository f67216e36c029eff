#!/usr/bin/env bash
# Fill a wheelhouse with the application's runtime dependencies, so that the images
# build with no access to PyPI (pip install --no-index inside the build).
#   compose/wheelhouse.sh [DIR]    default compose/wheels
# Runs on a Debian 12 / Python 3.11 x86_64 host with PyPI access (wheels must match the
# images' CPython 3.11 and glibc). Uses the versions installed in the project's venv
# (.venv, or $SWITCHBOARD_VENV) as constraints when there is one, so the images run what
# the tests ran.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
out="${1:-$HERE/wheels}"
VENV="${SWITCHBOARD_VENV:-$ROOT/.venv}"
if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY=/usr/bin/python3; fi
ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$ver" != "3.11" ]; then
    echo "wheelhouse: $PY is Python $ver; the images run Python 3.11 (Debian 12)" >&2
    exit 2
fi
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" - "$ROOT/pyproject.toml" > "$tmp/requirements.txt" <<'PY'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
PY
: > "$tmp/constraints.txt"
if [ -x "$VENV/bin/pip" ]; then
    "$VENV/bin/pip" freeze --exclude-editable 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' > "$tmp/constraints.txt" || true
fi
"$PY" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$out" \
    -c "$tmp/constraints.txt" -r "$tmp/requirements.txt"
echo "wheelhouse: $(ls "$out"/*.whl | wc -l) wheels in $out"
