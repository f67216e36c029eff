"""workers.renewed_at and workers.overloaded_until: liveness that tells slow from dead (issue #21)

``renewed_at`` is when the worker last renewed its lease (a worker whose lease
connection is gone and whose last renewal is older than ``worker_dead_after_s``
is dead; one that still holds its connection gets the whole ``worker_lease_s``).
``overloaded_until`` is set by a worker's lease renewal while it sheds load;
detached sessions do not expire while any live worker reports overload.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "workers",
        sa.Column(
            "renewed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
    )
    op.add_column("workers", sa.Column("overloaded_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("workers", "overloaded_until")
    op.drop_column("workers", "renewed_at")
