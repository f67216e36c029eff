"""The WAL a benchmark's measured window wrote, by record type (issue #19).

`WalProbe` reads the primary's WAL position at the start and at the end of the
window, then runs ``pg_waldump --stats=record`` over that range of the primary's
``pg_wal`` directory: records and bytes by resource manager and record type (for
example ``Heap/INSERT``, ``Btree/INSERT_LEAF``, ``Heap/LOCK``, full-page images). Divided
by the messages delivered in the window, that is the WAL a message costs, which every
standby receives and replays again.

The primary's data directory comes from the server itself
(``current_setting('data_directory')``), so the probe needs the cluster's settings
(a cluster the benchmark started). The segments of the window are still there when
it ends: ``wal_keep_size`` (app/cluster/patroni.py) keeps 256 MB of them.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from app.settings import Settings
from app.store.db import dsn

# "Heap/INSERT    123 ( 45.67)    8901 ( 12.34)   0 (  0.00)   8901 ( 12.34)"
_ROW = re.compile(
    r"^(?P<name>\S+)\s+(?P<n>\d+)\s+\(\s*[\d.]+\)\s+(?P<rec>\d+)\s+\(\s*[\d.]+\)\s+"
    r"(?P<fpi>\d+)\s+\(\s*[\d.]+\)\s+(?P<total>\d+)\s+\(\s*[\d.]+\)\s*$"
)
# "Total    100000    7300000 [89.47%]    798304 [9.78%]    8159304 [100%]"
_TOTAL = re.compile(
    r"^Total\s+(?P<n>\d+)\s+(?P<rec>\d+)\s+\[[\d.]+%\]\s+(?P<fpi>\d+)\s+\[[\d.]+%\]\s+"
    r"(?P<total>\d+)\s+\[[\d.]+%\]"
)


@dataclass
class WalStats:
    records: int = 0
    bytes: int = 0
    fpi_bytes: int = 0
    # record type -> (records, bytes incl. full-page images)
    by_type: dict[str, tuple[int, int]] = field(default_factory=dict)

    def lines(self, messages: int) -> list[str]:
        """The figures per delivered message, the record types that make most of them."""
        if messages <= 0:
            return ["WAL: no messages delivered in the window"]
        out = [
            f"WAL per delivered message: {self.records / messages:.1f} records, "
            f"{self.bytes / messages:,.0f} B ({self.fpi_bytes / messages:,.0f} B of it "
            f"full-page images); {self.records:,} records, {self.bytes / 1e6:.1f} MB in all"
        ]
        ranked = sorted(self.by_type.items(), key=lambda kv: -kv[1][0])
        for name, (n, size) in ranked[:12]:
            out.append(
                f"  {name:28s} {n / messages:6.2f} records/msg  {size / messages:7.0f} B/msg"
            )
        return out


def parse_stats(text: str) -> WalStats:
    """``pg_waldump --stats=record`` output -> totals and per-type rows."""
    stats = WalStats()
    for line in text.splitlines():
        total = _TOTAL.match(line.strip())
        if total is not None:
            stats.records = int(total["n"])
            stats.fpi_bytes = int(total["fpi"])
            stats.bytes = int(total["total"])
            continue
        row = _ROW.match(line.strip())
        if row is not None and int(row["n"]):
            stats.by_type[row["name"]] = (int(row["n"]), int(row["total"]))
    return stats


def _waldump() -> str:
    found = shutil.which("pg_waldump")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_waldump"), reverse=True):
        return str(candidate)
    raise SystemExit("pg_waldump not found (Debian: postgresql-<version> ships it)")


class WalProbe:
    def __init__(self, settings: Settings) -> None:
        self._dsn = dsn(settings, role="superuser")
        self._start: str | None = None
        self._data_dir: str | None = None

    async def _position(self) -> tuple[str, str]:
        conn = await asyncpg.connect(self._dsn)
        try:
            lsn = await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")
            data_dir = await conn.fetchval("SELECT current_setting('data_directory')")
        finally:
            await conn.close()
        return str(lsn), str(data_dir)

    def start(self) -> None:
        self._start, self._data_dir = asyncio.run(self._position())

    def stop(self) -> WalStats:
        """The window's WAL; raises if the primary changed in between (another data dir)."""
        if self._start is None:
            raise RuntimeError("WalProbe.stop before start")
        end, data_dir = asyncio.run(self._position())
        if data_dir != self._data_dir:
            raise SystemExit("the primary changed during the window: no WAL figures")
        done = subprocess.run(
            [
                _waldump(),
                "--stats=record",
                f"--path={Path(data_dir) / 'pg_wal'}",
                f"--start={self._start}",
                f"--end={end}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 and "Total" not in done.stdout:
            raise SystemExit(f"pg_waldump failed: {done.stderr.strip()[-500:]}")
        return parse_stats(done.stdout)
