"""bench/_wal.py: pg_waldump --stats=record output, read into per-message figures."""

from __future__ import annotations

from bench._wal import parse_stats

# The shape PostgreSQL 15's pg_waldump prints (columns narrowed).
SAMPLE = """\
WAL statistics between 0/3000028 and 0/3A2B3C0:
Type  N  (%)  Record size  (%)  FPI size  (%)  Combined size  (%)
----  -  ---  -----------  ---  --------  ---  -------------  ---
XLOG/FPI_FOR_HINT  12 (  0.01)  612 (  0.00)  98304 ( 12.30)  98916 (  1.21)
Transaction/COMMIT  1500 (  1.50)  51000 (  0.70)  0 (  0.00)  51000 (  0.62)
Heap/INSERT  30000 ( 30.00)  3300000 ( 45.20)  700000 ( 87.70)  4000000 ( 49.00)
Heap/LOCK  10000 ( 10.00)  540000 (  7.40)  0 (  0.00)  540000 (  6.62)
Btree/INSERT_LEAF  58488 ( 58.49)  3408388 ( 46.70)  0 (  0.00)  3408388 ( 41.78)
Heap2/PRUNE  0 (  0.00)  0 (  0.00)  0 (  0.00)  0 (  0.00)
  --------  --------  --------  --------
Total  100000  7300000 [89.47%]  798304 [9.78%]  8159304 [100%]
"""


def test_totals_and_types() -> None:
    stats = parse_stats(SAMPLE)
    assert stats.records == 100000
    assert stats.bytes == 8159304
    assert stats.fpi_bytes == 798304
    assert stats.by_type["Heap/LOCK"] == (10000, 540000)
    assert "Heap2/PRUNE" not in stats.by_type  # no records of that type


def test_lines_per_message() -> None:
    lines = parse_stats(SAMPLE).lines(10000)
    assert lines[0].startswith("WAL per delivered message: 10.0 records, 816 B (80 B of it")
    assert lines[1].split()[:2] == ["Btree/INSERT_LEAF", "5.85"]
    assert parse_stats(SAMPLE).lines(0) == ["WAL: no messages delivered in the window"]
