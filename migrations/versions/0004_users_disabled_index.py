"""a partial index of disabled users, for the workers' session recheck

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 17:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_users_disabled", "users", ["id"], postgresql_where=sa.text("disabled"))


def downgrade() -> None:
    op.drop_index("ix_users_disabled", table_name="users", postgresql_where=sa.text("disabled"))
