#!/usr/bin/env python3
"""sb-tls-reload: hand HAProxy the certificate now in its PEM file, without a restart.

Run in the haproxy container after the `certs` service renewed or replaced the files
(`docker compose run --rm certs && docker compose exec haproxy sb-tls-reload`). It
sends the runtime API's ``set ssl cert`` and ``commit ssl cert`` over the admin socket,
as `switchboard tls reload` does for the local cluster: open TLS connections keep
their sessions, new handshakes get the new certificate. Standard library only (this
image has no application code). Exit status 0 = taken, 1 = refused or unreachable.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

SOCKET = "/run/haproxy/admin.sock"
PEM = Path("/etc/switchboard/tls/haproxy.pem")


def command(line: str, timeout: float = 5.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(SOCKET)
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def main() -> int:
    # The payload ends at the first empty line: a PEM has none inside.
    payload = "\n".join(line for line in PEM.read_text().splitlines() if line.strip())
    try:
        reply = command(f"set ssl cert {PEM} <<\n{payload}\n")
        if "Transaction" not in reply:
            print(f"sb-tls-reload: set ssl cert: {reply.strip()}", file=sys.stderr)
            return 1
        reply = command(f"commit ssl cert {PEM}")
        if "Success!" not in reply:
            command(f"abort ssl cert {PEM}")
            print(f"sb-tls-reload: commit ssl cert: {reply.strip()}", file=sys.stderr)
            return 1
    except OSError as exc:
        print(f"sb-tls-reload: HAProxy's runtime API at {SOCKET}: {exc}", file=sys.stderr)
        return 1
    print(f"sb-tls-reload: HAProxy serves the certificate in {PEM}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
