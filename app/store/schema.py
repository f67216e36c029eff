"""The database schema as SQLAlchemy Core tables: the source Alembic migrations follow.

Who is logged in where: ``sessions`` (one row per connected device, naming its
worker). What must never be lost: ``messages`` (idempotent on sender + client
message id) and ``inbox`` (each recipient's gap-free sequence of deliveries),
with ``inbox_counters`` holding each user's last assigned seq and ``devices``
each device's acknowledged position.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

NOW = func.now()

workers = Table(
    "workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("pid", Integer, nullable=False),
    Column("address", Text, nullable=False),
    Column("state", Text, nullable=False, server_default="active"),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("lease_expires_at", DateTime(timezone=True), nullable=False),
    # The last renewal, and until when the worker says it sheds load (liveness.py).
    Column("renewed_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("overloaded_until", DateTime(timezone=True)),
    CheckConstraint("state in ('active', 'draining', 'stopped', 'dead')", name="state"),
)

users = Table(
    "users",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("username", Text, nullable=False, unique=True),
    Column("password_hash", Text, nullable=False),
    Column("disabled", Boolean, nullable=False, server_default=text("false")),
    Column("presence_state", Text, nullable=False, server_default="online"),
    Column("status_text", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    CheckConstraint("presence_state in ('online', 'away', 'dnd')", name="presence_state"),
    # The few disabled accounts: the workers' session recheck reads them once per query.
    Index("ix_users_disabled", "id", postgresql_where=text("disabled")),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("user_id", BigInteger, ForeignKey("users.id"), nullable=False),
    Column("device", Text, nullable=False),
    Column("worker_id", Text, nullable=False),
    Column("remote_addr", Text, nullable=False),
    Column("state", Text, nullable=False, server_default="active"),
    Column("epoch", Integer, nullable=False, server_default="1"),
    Column("resume_token_hash", LargeBinary),
    Column("connected_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("last_seen_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("detached_at", DateTime(timezone=True)),
    Column("closed_at", DateTime(timezone=True)),
    Column("close_reason", Text),
    CheckConstraint("state in ('active', 'detached', 'closed')", name="state"),
    Index("ix_sessions_live_user", "user_id", postgresql_where=text("state <> 'closed'")),
    Index("ix_sessions_live_worker", "worker_id", postgresql_where=text("state <> 'closed'")),
    # The reapers' expiry of detached sessions past their grace (migration 0009).
    Index("ix_sessions_detached_at", "detached_at", postgresql_where=text("state = 'detached'")),
)

devices = Table(
    "devices",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id"), nullable=False),
    Column("device", Text, nullable=False),
    Column("acked_seq", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    PrimaryKeyConstraint("user_id", "device"),
)

device_credentials = Table(
    "device_credentials",
    metadata,
    # A device's long-lived login token (app/store/device_tokens.py): only SHA-256
    # hashes are stored. Rotated at every use; the token it replaced stays valid
    # until previous_valid_until (a reply lost in flight does not lock the device
    # out). Expires device_token_ttl_days after last_used_at.
    Column("user_id", BigInteger, ForeignKey("users.id"), nullable=False),
    Column("device", Text, nullable=False),
    Column("token_hash", LargeBinary, nullable=False),
    Column("previous_token_hash", LargeBinary),
    Column("previous_valid_until", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("last_used_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("last_addr", Text),
    PrimaryKeyConstraint("user_id", "device"),
)

auth_throttle = Table(
    "auth_throttle",
    metadata,
    # One counter per key (app/store/throttle.py): a backoff key such as
    # "login|alice|203.0.113.5" (one user from one address) or a budget key such
    # as "login-addr|203.0.113.5" (one address, any user).
    Column("key", Text, primary_key=True),
    Column("attempts", Integer, nullable=False),
    Column("first_attempt_at", DateTime(timezone=True), nullable=False),
    # Backoff: when the next attempt is let through. Budget: when the window ends.
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Index("ix_auth_throttle_next_attempt_at", "next_attempt_at"),
)

rooms = Table(
    "rooms",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("name", Text, nullable=False),
    Column("created_by", BigInteger, ForeignKey("users.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
)

room_members = Table(
    "room_members",
    metadata,
    Column("room_id", BigInteger, ForeignKey("rooms.id"), nullable=False),
    Column("user_id", BigInteger, ForeignKey("users.id"), nullable=False),
    Column("status", Text, nullable=False),
    Column("since", DateTime(timezone=True), nullable=False, server_default=NOW),
    # Who invited a user whose status is still 'invited' (listed by `rooms`).
    Column("invited_by", BigInteger, ForeignKey("users.id")),
    PrimaryKeyConstraint("room_id", "user_id"),
    CheckConstraint("status in ('invited', 'member')", name="status"),
    Index("ix_room_members_user", "user_id"),
)

contacts = Table(
    "contacts",
    metadata,
    Column("owner_id", BigInteger, ForeignKey("users.id"), nullable=False),
    Column("contact_id", BigInteger, ForeignKey("users.id"), nullable=False),
    Column("status", Text, nullable=False),
    Column("since", DateTime(timezone=True), nullable=False, server_default=NOW),
    PrimaryKeyConstraint("owner_id", "contact_id"),
    CheckConstraint("status in ('pending_out', 'pending_in', 'accepted')", name="status"),
    Index("ix_contacts_contact", "contact_id"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", BigInteger, primary_key=True),
    # No foreign keys on the hot tables: their triggers cost a third of the
    # database's CPU per message; the application only stores ids it resolved.
    Column("sender_id", BigInteger, nullable=False),
    Column("cmid", Text, nullable=False),
    # The sending device gets `sent`, not a `msg` copy; its other devices get the copy.
    Column("sender_device", Text, nullable=False),
    Column("recipient_id", BigInteger),
    Column("room_id", BigInteger),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    # Idempotency is a constraint, not an if: a resend stores nothing new.
    UniqueConstraint("sender_id", "cmid"),
    CheckConstraint("(recipient_id is null) <> (room_id is null)", name="one_target"),
    # History of a 1:1 conversation or a room, newest first.
    Index(
        "ix_messages_pair",
        func.least(text("sender_id"), text("recipient_id")),
        func.greatest(text("sender_id"), text("recipient_id")),
        text("id DESC"),
        postgresql_where=text("recipient_id is not null"),
    ),
    Index(
        "ix_messages_room", "room_id", text("id DESC"), postgresql_where=text("room_id is not null")
    ),
)

inbox_counters = Table(
    "inbox_counters",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id"), primary_key=True),
    Column("last_seq", BigInteger, nullable=False, server_default="0"),
)

INBOX_KIND_MESSAGE = 1
INBOX_KIND_RECEIPT = 2

inbox = Table(
    "inbox",
    metadata,
    Column("user_id", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("kind", SmallInteger, nullable=False),
    Column("message_id", BigInteger, nullable=False),
    # For receipts: who read the message.
    Column("actor_id", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    PrimaryKeyConstraint("user_id", "seq"),
)

receipts = Table(
    "receipts",
    metadata,
    Column("message_id", BigInteger, ForeignKey("messages.id"), nullable=False),
    Column("reader_id", BigInteger, ForeignKey("users.id"), nullable=False),
    Column("read_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    PrimaryKeyConstraint("message_id", "reader_id"),
)


# ---- the admin dashboard ---------------------------------------------------

admins = Table(
    "admins",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("username", Text, nullable=False, unique=True),
    Column("password_hash", Text, nullable=False),
    Column("disabled", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("last_login_at", DateTime(timezone=True)),
)

admin_sessions = Table(
    "admin_sessions",
    metadata,
    # SHA-256 of the cookie value: a stolen table does not give usable cookies.
    Column("token_hash", LargeBinary, primary_key=True),
    Column("admin_id", BigInteger, ForeignKey("admins.id"), nullable=False),
    Column("csrf_token", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("last_seen_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("remote_addr", Text),
)


# ---- the events log (docs/reporting.md) -------------------------------------

# Kinds of events about the cluster itself (the failover timeline), as opposed
# to the high-volume session and message events.
CLUSTER_EVENT_KINDS = (
    "worker_started",
    "worker_draining",
    "worker_drained",
    "worker_stopped",
    "worker_died",
    "db_failover",
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger, Identity(), nullable=False),
    # When it happened, by the clock of the process that saw it.
    Column("at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("kind", Text, nullable=False),
    Column("worker_id", Text),
    Column("user_id", BigInteger),
    Column("session_id", BigInteger),
    Column("epoch", Integer),
    # message_delivered / message_acked: the inbox seq reached.
    Column("seq", BigInteger),
    Column("reason", Text),
    Column("detail", JSONB),
    PrimaryKeyConstraint("at", "id"),
    Index(
        "ix_events_cluster",
        "at",
        postgresql_where=text("kind IN (" + ", ".join(f"'{k}'" for k in CLUSTER_EVENT_KINDS) + ")"),
    ),
    # Daily partitions live in schema event_partitions (app/store/eventlog.py
    # creates and drops them); a default partition catches anything else.
    postgresql_partition_by="RANGE (at)",
)
