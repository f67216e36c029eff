"""Report rows as an aligned text table, CSV or JSON (times in UTC, ISO 8601)."""

from __future__ import annotations

import csv
import io
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson

from app.reporting.queries import ReportResult

FORMATS = ("table", "csv", "json")


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def plain(value: Any) -> Any:
    """A JSON-ready value: ISO strings for times, numbers for numerics."""
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    if isinstance(value, datetime):
        # Whole seconds are enough to read; CSV and JSON keep the fraction.
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(plain(value))


def table(result: ReportResult) -> str:
    header = result.columns
    cells = [[_cell(v) for v in row] for row in result.rows]
    numeric = [
        all(isinstance(row[i], int | float | Decimal) or row[i] is None for row in result.rows)
        and any(row[i] is not None for row in result.rows)
        for i in range(len(header))
    ]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out.extend(line(c) for c in cells)
    return "\n".join(out)


def footer(result: ReportResult) -> str:
    n = len(result.rows)
    text = f"({n} row{'s' if n != 1 else ''} from replica {result.server}"
    if result.report.materialized:
        refreshed = _cell(result.refreshed_at) + " UTC" if result.refreshed_at else "never"
        text += f"; views refreshed {refreshed}, `switchboard report --refresh` updates them"
    return text + ")"


def _csv_value(value: Any) -> Any:
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return plain(value)


def as_csv(result: ReportResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(["" if v is None else _csv_value(v) for v in row])
    return buffer.getvalue().rstrip("\n")


def as_json(result: ReportResult) -> str:
    document = {
        "report": result.report.name,
        "view": f"reporting.{result.report.view}",
        "server": result.server,
        "refreshed_at": plain(result.refreshed_at) if result.report.materialized else None,
        "rows": [
            {c: plain(v) for c, v in zip(result.columns, row, strict=True)} for row in result.rows
        ],
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()


def render(result: ReportResult, fmt: str) -> str:
    if fmt == "csv":
        return as_csv(result)
    if fmt == "json":
        return as_json(result)
    return table(result) + "\n" + footer(result)
