"""``switchboard report``: list the reports, run one on a replica, refresh the views.

switchboard report                              # what there is
switchboard report messages-hourly --since 24h  # a table; --format csv|json
switchboard report --refresh peak-sessions      # refresh on the primary, then run
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from app.reporting.catalog import BY_NAME, REPORTS, Report
from app.reporting.queries import ReportError, refresh, run_report
from app.reporting.render import FORMATS, render
from app.settings import Settings, SettingsError

Out = Callable[[str], None]

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``report`` on the ``switchboard`` sub-command parser."""
    help_ = "SQL reports on a replica (no NAME: list them)"
    p = sub.add_parser(
        "report",
        help=help_,
        description=help_ + "; see docs/reporting.md",
        epilog="reports: " + ", ".join(r.name for r in REPORTS),
    )
    common(p)
    p.add_argument("name", nargs="?", metavar="NAME", help="the report to run")
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="from: an ISO date or time (UTC unless it has an offset) or an age (90m, 36h, 7d)",
    )
    p.add_argument("--until", metavar="WHEN", help="up to (not including), like --since")
    p.add_argument("--format", choices=FORMATS, default="table", help="output (default table)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N rows")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="first refresh the materialized views on the primary, then wait for the replica",
    )
    p.set_defaults(func=cmd_report)


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``2026-11-26``, ``2026-11-26T14:00``, ``...+02:00`` or an age before now: ``36h``."""
    age = _AGE.match(text.strip())
    if age:
        delta = timedelta(**{_UNITS[age.group(2)]: float(age.group(1))})
        return (now or datetime.now(UTC)) - delta
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReportError(f"cannot read {text!r} as a time (2026-11-26T14:00, 36h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def list_reports() -> str:
    width = max(len(r.name) for r in REPORTS)
    lines = [f"{'NAME'.ljust(width)}  WHAT (view in schema reporting)"]
    for r in REPORTS:
        lines.append(f"{r.name.ljust(width)}  {r.description} ({r.view})")
    lines.append("\nswitchboard report NAME [--since WHEN] [--until WHEN] [--format FORMAT]")
    return "\n".join(lines)


def _err(message: str) -> None:
    print(f"switchboard: error: {message}", file=sys.stderr, flush=True)


def cmd_report(args: argparse.Namespace, out: Out = print) -> int:
    try:
        settings = Settings.load(
            config_file=getattr(args, "config", None), state_dir=getattr(args, "state_dir", None)
        )
    except SettingsError as exc:
        _err(str(exc))
        return 1
    if args.name is None and not args.refresh:
        out(list_reports())
        return 0
    report = BY_NAME.get(args.name) if args.name else None
    if args.name and report is None:
        _err(f"no report {args.name!r}; one of: {', '.join(BY_NAME)}")
        return 2
    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
        return asyncio.run(_run(settings, args, report, since, until, out))
    except ReportError as exc:
        _err(str(exc))
        return 1
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        _err(f"database: {type(exc).__name__}: {exc}".splitlines()[0])
        return 1


async def _run(
    settings: Settings,
    args: argparse.Namespace,
    report: Report | None,
    since: datetime | None,
    until: datetime | None,
    out: Out,
) -> int:
    lsn = None
    if args.refresh:
        done = await refresh(settings)
        total = sum(seconds for _, seconds in done.timings)
        # On stderr: stdout stays one clean CSV or JSON document.
        print(
            f"refreshed {len(done.timings)} materialized views on the primary in {total:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        lsn = done.lsn
    if report is None:
        return 0
    result = await run_report(
        settings,
        report,
        since=since,
        until=until,
        limit=args.limit,
        after_lsn=lsn,
    )
    out(render(result, args.format))
    return 0
