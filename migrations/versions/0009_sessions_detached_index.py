"""sessions: a partial index on ``detached_at`` of detached sessions (issue #16)

Every worker's reaper, every second, closes the detached sessions whose resume grace
has run out (``sessions.reap``). Without an index for ``state = 'detached'`` that was
a sequential scan of every session row: 19.8 ms at 200,000 live sessions, times 17
workers a second, about a third of a core of PostgreSQL while the cluster only held
its sessions (docs/benchmarks.md, At 200,000 sessions). Only detached rows enter this
index, and ``detached_at`` changes only with ``state``, which other partial indexes
already name, so it costs no HOT updates.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 21:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_sessions_detached_at",
        "sessions",
        ["detached_at"],
        unique=False,
        postgresql_where=sa.text("state = 'detached'"),
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_detached_at", table_name="sessions")
