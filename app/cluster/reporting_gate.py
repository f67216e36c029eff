"""Patroni callback: a node admits the ``reporting`` role only while it is a replica.

pg_hba cannot tell a primary from a replica, and roles replicate from the primary,
so the rule is per node and follows the node's role. Every node's pg_hba has, before
the rule that admits everyone by password::

    host all @<node_dir>/reporting_gate 127.0.0.1/32 reject

This script, run by Patroni on start, restart and every role change with
``ACTION ROLE SCOPE`` appended, writes the file: ``reporting`` unless the node is a
replica, else a name no role can have (``pg_`` is reserved, and the file must not be
empty: an empty @file drops the field and breaks the line). It then reloads
PostgreSQL's config and, off a replica, ends the role's open sessions.

Fail-closed: the launcher writes ``reporting`` into the file before PostgreSQL first
starts, so a node whose callback never ran refuses the role. Run as a script by the
DB user with the venv's Python (psycopg is Patroni's own dependency); it imports
nothing from ``app``, so it works from any source tree.

    python reporting_gate.py GATE_FILE SOCKET_DIR PORT ACTION ROLE SCOPE
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REFUSED_ROLE = "reporting"
# A role name nobody can create (CREATE ROLE refuses the reserved pg_ prefix).
NOBODY = "pg_switchboard_nobody"
CONNECT_ATTEMPTS = 40  # x 0.25 s: PostgreSQL may still be starting


def refused_roles(role: str) -> str:
    """What the gate file holds for a node in Patroni role ``role``."""
    return NOBODY if role == "replica" else REFUSED_ROLE


def write_gate(path: Path, role: str) -> None:
    """Replace the gate file atomically: PostgreSQL may read it at any reload."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(refused_roles(role) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def apply(socket_dir: str, port: str, closed: bool) -> None:
    """Reload pg_hba; with the gate closed, end the reporting role's sessions too."""
    import psycopg

    for attempt in range(CONNECT_ATTEMPTS):
        try:
            conn = psycopg.connect(
                host=socket_dir, port=port, user="postgres", dbname="postgres", autocommit=True
            )
            break
        except psycopg.OperationalError:
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
            time.sleep(0.25)
    with conn:
        conn.execute("SELECT pg_reload_conf()")
        if closed:
            # The postmaster reloads asynchronously: end sessions again once it has.
            for _ in range(2):
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (REFUSED_ROLE,),
                )
                time.sleep(0.2)


def main(argv: list[str]) -> int:
    if len(argv) < 6:
        print(__doc__, file=sys.stderr)
        return 2
    gate, socket_dir, port, action, role = argv[1:6]
    if action == "on_stop":
        return 0
    write_gate(Path(gate), role)
    closed = refused_roles(role) == REFUSED_ROLE
    apply(socket_dir, port, closed)
    state = "closed" if closed else "open"
    print(f"reporting gate {state}: {action} as {role}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
