"""room_members.invited_by: who invited a user still ``invited`` (issue #20)

An invitation was only pushed to the invitee's connected sessions; an invitee
offline (or reconnecting) at that moment never learned of it. ``rooms`` now lists
pending invitations with their inviter, so the inviter is stored with the row.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 07:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("room_members", sa.Column("invited_by", sa.BigInteger(), nullable=True))
    op.create_foreign_key(
        op.f("fk_room_members_invited_by_users"), "room_members", "users", ["invited_by"], ["id"]
    )


def downgrade() -> None:
    op.drop_constraint(op.f("fk_room_members_invited_by_users"), "room_members", type_="foreignkey")
    op.drop_column("room_members", "invited_by")
