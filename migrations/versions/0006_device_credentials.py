"""device_credentials: long-lived, revocable device tokens (issue #15)

One row per (user, device): the SHA-256 of the device's current token, the
previous one's hash and until when it stays valid (the rotation overlap), and
when and from where it was last used. Tokens expire after
``device_token_ttl_days`` without use (computed from ``last_used_at``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "device_credentials",
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("device", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(), nullable=False),
        sa.Column("previous_token_hash", sa.LargeBinary(), nullable=True),
        sa.Column("previous_valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_used_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_addr", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_device_credentials_user_id_users")
        ),
        sa.PrimaryKeyConstraint("user_id", "device", name=op.f("pk_device_credentials")),
    )


def downgrade() -> None:
    op.drop_table("device_credentials")
