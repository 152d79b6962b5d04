"""social: user contact details and preferences, channels, posts, threads, friends, devices

Existing users get ``locale`` 'en', ``timezone`` 'UTC' and ``updated_at`` =
their ``created_at``. The server defaults stay: a process still running the
previous release during a rolling upgrade inserts users without these columns.

Revision ID: 0002_social
Revises: 0001_spine
Create Date: 2026-05-20
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0002_social"
down_revision = "0001_spine"
branch_labels = None
depends_on = None

_ID = 36  # users.id, channels.id, posts.id: UUID4 text


def _ts(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(length=_ID), nullable=False)


def _fk(column: str, table: str, target: str) -> sa.ForeignKeyConstraint:
    """PostgreSQL's default name for a one-column foreign key, made explicit."""
    return sa.ForeignKeyConstraint([column], [target], name=f"{table}_{column}_fkey")


def upgrade() -> None:
    # SQLite cannot add a column whose default is CURRENT_TIMESTAMP: batch copies the table.
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("handle", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("phone", sa.String(length=20), nullable=True))
        batch.add_column(sa.Column("locale", sa.String(length=20), nullable=False,
                                   server_default="en"))
        batch.add_column(sa.Column("timezone", sa.String(length=60), nullable=False,
                                   server_default="UTC"))
        batch.add_column(_ts("last_active_at", nullable=True))
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                                   server_default=sa.text("CURRENT_TIMESTAMP")))
    op.execute("UPDATE users SET updated_at = created_at")
    op.create_index("ix_users_handle", "users", ["handle"], unique=True)

    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("trail", sa.Text(), nullable=True))

    op.create_table(
        "user_preferences",
        _id("user_id"),
        sa.Column("dnd_start", sa.String(length=5), nullable=True),
        sa.Column("dnd_end", sa.String(length=5), nullable=True),
        _ts("snooze_until", nullable=True),
        sa.Column("dnd_override_allowed", sa.Boolean(), nullable=False),
        sa.Column("thread_everything", sa.Boolean(), nullable=False),
        sa.Column("desktop", sa.String(length=20), nullable=False),
        sa.Column("mobile", sa.String(length=20), nullable=False),
        sa.Column("highlight_words", sa.Text(), nullable=False),
        sa.Column("sms_login_alerts", sa.Boolean(), nullable=False),
        _ts("updated_at"),
        _fk("user_id", "user_preferences", "users.id"),
        sa.PrimaryKeyConstraint("user_id", name="user_preferences_pkey"),
    )

    op.create_table(
        "channels",
        _id("id"),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("is_dm", sa.Boolean(), nullable=False),
        _id("created_by"),
        _ts("created_at"),
        _fk("created_by", "channels", "users.id"),
        sa.PrimaryKeyConstraint("id", name="channels_pkey"),
    )

    op.create_table(
        "channel_members",
        _id("channel_id"),
        _id("user_id"),
        _ts("joined_at"),
        _fk("channel_id", "channel_members", "channels.id"),
        _fk("user_id", "channel_members", "users.id"),
        sa.PrimaryKeyConstraint("channel_id", "user_id", name="channel_members_pkey"),
    )
    op.create_index("ix_channel_members_user_id", "channel_members", ["user_id"])

    op.create_table(
        "channel_preferences",
        _id("user_id"),
        _id("channel_id"),
        sa.Column("muted", sa.Boolean(), nullable=False),
        sa.Column("suppress_channel_mentions", sa.Boolean(), nullable=False),
        sa.Column("desktop", sa.String(length=20), nullable=False),
        sa.Column("mobile", sa.String(length=20), nullable=False),
        _ts("updated_at"),
        _fk("user_id", "channel_preferences", "users.id"),
        _fk("channel_id", "channel_preferences", "channels.id"),
        sa.PrimaryKeyConstraint("user_id", "channel_id", name="channel_preferences_pkey"),
    )

    op.create_table(
        "posts",
        _id("id"),
        _id("channel_id"),
        _id("author_id"),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("thread_id", sa.String(length=_ID), nullable=True),
        _ts("created_at"),
        _fk("channel_id", "posts", "channels.id"),
        _fk("author_id", "posts", "users.id"),
        sa.PrimaryKeyConstraint("id", name="posts_pkey"),
    )
    op.create_index("ix_posts_channel_created", "posts", ["channel_id", "created_at"])
    op.create_index("ix_posts_thread_id", "posts", ["thread_id"])

    op.create_table(
        "thread_subscriptions",
        _id("thread_id"),
        _id("user_id"),
        _ts("created_at"),
        _fk("thread_id", "thread_subscriptions", "posts.id"),
        _fk("user_id", "thread_subscriptions", "users.id"),
        sa.PrimaryKeyConstraint("thread_id", "user_id", name="thread_subscriptions_pkey"),
    )

    op.create_table(
        "friend_requests",
        _id("id"),
        _id("from_user_id"),
        _id("to_user_id"),
        sa.Column("status", sa.String(length=20), nullable=False),
        _ts("created_at"),
        _fk("from_user_id", "friend_requests", "users.id"),
        _fk("to_user_id", "friend_requests", "users.id"),
        sa.PrimaryKeyConstraint("id", name="friend_requests_pkey"),
    )
    op.create_index("ix_friend_requests_from_user_id", "friend_requests", ["from_user_id"])
    op.create_index("ix_friend_requests_to_user_id", "friend_requests", ["to_user_id"])

    op.create_table(
        "devices",
        _id("id"),
        _id("user_id"),
        sa.Column("platform", sa.String(length=20), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=True),
        _ts("created_at"),
        _fk("user_id", "devices", "users.id"),
        sa.PrimaryKeyConstraint("id", name="devices_pkey"),
        sa.UniqueConstraint("platform", "token_hash", name="devices_platform_token_hash_key"),
    )
    op.create_index("ix_devices_user_id", "devices", ["user_id"])


def downgrade() -> None:
    # Referencing tables first; indexes go with their tables.
    for table in ("devices", "friend_requests", "thread_subscriptions", "posts",
                  "channel_preferences", "channel_members", "channels", "user_preferences"):
        op.drop_table(table)
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("trail")
    op.drop_index("ix_users_handle", table_name="users")
    with op.batch_alter_table("users") as batch:
        for column in ("updated_at", "last_active_at", "timezone", "locale", "phone", "handle"):
            batch.drop_column(column)
