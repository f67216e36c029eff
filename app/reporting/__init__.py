"""SQL reporting: the documented ``reporting`` schema, read on a replica.

``catalog`` names the reports and the views behind them, ``queries`` runs
one on the replica port as the read-only ``reporting`` role (and refreshes the
materialized views on the primary), ``render`` prints rows as a table, CSV or
JSON, and ``cli`` is ``switchboard report``. The views themselves are
migrations (``migrations/versions/0003_*``); docs/reporting.md describes them.
"""
