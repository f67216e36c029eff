"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 13:47:42.540630
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "login_failures",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_login_failures")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("disabled", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("presence_state", sa.Text(), server_default="online", nullable=False),
        sa.Column("status_text", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "presence_state in ('online', 'away', 'dnd')", name=op.f("ck_users_presence_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="active", nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state in ('active', 'draining', 'stopped', 'dead')", name=op.f("ck_workers_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_table(
        "contacts",
        sa.Column("owner_id", sa.BigInteger(), nullable=False),
        sa.Column("contact_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column(
            "since", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.CheckConstraint(
            "status in ('pending_out', 'pending_in', 'accepted')", name=op.f("ck_contacts_status")
        ),
        sa.ForeignKeyConstraint(
            ["contact_id"], ["users.id"], name=op.f("fk_contacts_contact_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_contacts_owner_id_users")
        ),
        sa.PrimaryKeyConstraint("owner_id", "contact_id", name=op.f("pk_contacts")),
    )
    op.create_index("ix_contacts_contact", "contacts", ["contact_id"], unique=False)
    op.create_table(
        "devices",
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("device", sa.Text(), nullable=False),
        sa.Column("acked_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_devices_user_id_users")),
        sa.PrimaryKeyConstraint("user_id", "device", name=op.f("pk_devices")),
    )
    op.create_table(
        "inbox_counters",
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_inbox_counters_user_id_users")
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_inbox_counters")),
    )
    op.create_table(
        "rooms",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("created_by", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_rooms_created_by_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rooms")),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("device", sa.Text(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=False),
        sa.Column("remote_addr", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="active", nullable=False),
        sa.Column("epoch", sa.Integer(), server_default="1", nullable=False),
        sa.Column("resume_token_hash", sa.LargeBinary(), nullable=True),
        sa.Column(
            "connected_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("detached_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_reason", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state in ('active', 'detached', 'closed')", name=op.f("ck_sessions_state")
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_sessions_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
    )
    op.create_index(
        "ix_sessions_live_user",
        "sessions",
        ["user_id"],
        unique=False,
        postgresql_where=sa.text("state <> 'closed'"),
    )
    op.create_index(
        "ix_sessions_live_worker",
        "sessions",
        ["worker_id"],
        unique=False,
        postgresql_where=sa.text("state <> 'closed'"),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("sender_id", sa.BigInteger(), nullable=False),
        sa.Column("cmid", sa.Text(), nullable=False),
        sa.Column("sender_device", sa.Text(), nullable=False),
        sa.Column("recipient_id", sa.BigInteger(), nullable=True),
        sa.Column("room_id", sa.BigInteger(), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(recipient_id is null) <> (room_id is null)", name=op.f("ck_messages_one_target")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("sender_id", "cmid", name=op.f("uq_messages_sender_id_cmid")),
    )
    op.create_index(
        "ix_messages_pair",
        "messages",
        [
            sa.literal_column("least(sender_id, recipient_id)"),
            sa.literal_column("greatest(sender_id, recipient_id)"),
            sa.literal_column("id DESC"),
        ],
        unique=False,
        postgresql_where=sa.text("recipient_id is not null"),
    )
    op.create_index(
        "ix_messages_room",
        "messages",
        ["room_id", sa.literal_column("id DESC")],
        unique=False,
        postgresql_where=sa.text("room_id is not null"),
    )
    op.create_table(
        "room_members",
        sa.Column("room_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column(
            "since", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.CheckConstraint("status in ('invited', 'member')", name=op.f("ck_room_members_status")),
        sa.ForeignKeyConstraint(
            ["room_id"], ["rooms.id"], name=op.f("fk_room_members_room_id_rooms")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_room_members_user_id_users")
        ),
        sa.PrimaryKeyConstraint("room_id", "user_id", name=op.f("pk_room_members")),
    )
    op.create_index("ix_room_members_user", "room_members", ["user_id"], unique=False)
    op.create_table(
        "inbox",
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("actor_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("user_id", "seq", name=op.f("pk_inbox")),
    )
    op.create_table(
        "receipts",
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("reader_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "read_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["message_id"], ["messages.id"], name=op.f("fk_receipts_message_id_messages")
        ),
        sa.ForeignKeyConstraint(
            ["reader_id"], ["users.id"], name=op.f("fk_receipts_reader_id_users")
        ),
        sa.PrimaryKeyConstraint("message_id", "reader_id", name=op.f("pk_receipts")),
    )


def downgrade() -> None:

    op.drop_table("receipts")
    op.drop_table("inbox")
    op.drop_index("ix_room_members_user", table_name="room_members")
    op.drop_table("room_members")
    op.drop_index(
        "ix_messages_room", table_name="messages", postgresql_where=sa.text("room_id is not null")
    )
    op.drop_index(
        "ix_messages_pair",
        table_name="messages",
        postgresql_where=sa.text("recipient_id is not null"),
    )
    op.drop_table("messages")
    op.drop_index(
        "ix_sessions_live_worker",
        table_name="sessions",
        postgresql_where=sa.text("state <> 'closed'"),
    )
    op.drop_index(
        "ix_sessions_live_user",
        table_name="sessions",
        postgresql_where=sa.text("state <> 'closed'"),
    )
    op.drop_table("sessions")
    op.drop_table("rooms")
    op.drop_table("inbox_counters")
    op.drop_table("devices")
    op.drop_index("ix_contacts_contact", table_name="contacts")
    op.drop_table("contacts")
    op.drop_table("workers")
    op.drop_table("users")
    op.drop_table("login_failures")
