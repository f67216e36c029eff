"""auth_throttle replaces login_failures

Failed logins were fixed-window counters per user name and per address, read
before the password check and written after it. ``auth_throttle`` counts each
attempt before the check, in the statement that admits or refuses it, with
exponential backoff per (user, address) and budgets per address
(app/store/throttle.py). The old counters are short-lived and are not carried
over.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auth_throttle",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_auth_throttle")),
    )
    op.create_index(
        "ix_auth_throttle_next_attempt_at", "auth_throttle", ["next_attempt_at"], unique=False
    )
    op.drop_table("login_failures")


def downgrade() -> None:
    op.create_table(
        "login_failures",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_login_failures")),
    )
    op.drop_index("ix_auth_throttle_next_attempt_at", table_name="auth_throttle")
    op.drop_table("auth_throttle")
