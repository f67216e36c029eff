#!/usr/bin/python3
"""Container health checks, standard library only.

sb-healthcheck URL                 healthy when GET URL answers 200
sb-healthcheck haproxy STATS_URL   healthy when HAProxy's pg_primary backend is UP
                                   (the database primary is reachable through it)
"""

import csv
import io
import sys
import urllib.error
import urllib.request


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError as exc:
        return 0, str(exc)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "haproxy":
        status, body = get(argv[1].rstrip("/") + "/;csv")
        if status != 200:
            print(f"stats page: {status} {body[:200]}")
            return 1
        for row in csv.DictReader(io.StringIO(body.lstrip("# "))):
            if row.get("pxname") == "pg_primary" and row.get("svname") == "BACKEND":
                print(f"pg_primary {row.get('status')}")
                return 0 if row.get("status") == "UP" else 1
        print("no pg_primary backend")
        return 1
    if len(argv) == 1:
        status, body = get(argv[0])
        print(f"{status} {body[:300]}")
        return 0 if status == 200 else 1
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
