"""Tables. One metadata for all of herald, so one ``init_db`` (later alembic) covers it.

Model families stay apart: request/response models live with the API, the
wire envelope in ``topology.envelope``; these are rows.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Timezone-aware now, the only clock rows use."""
    return datetime.now(UTC)


def _ts(nullable: bool = False) -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=nullable)


class UserBase(SQLModel):
    """Fields a user shares across the API's models."""

    email: str = Field(max_length=320, unique=True, index=True)
    name: str = Field(max_length=200)


class User(UserBase, table=True):
    """An account (password stored as an argon2 hash, never in clear)."""

    __tablename__ = "users"

    id: str = Field(default_factory=lambda: str(uuid.uuid4()), primary_key=True, max_length=36)
    password_hash: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class OutboxEvent(SQLModel, table=True):
    """An event committed with its domain row, waiting for the relay to publish it."""

    __tablename__ = "outbox"

    id: str = Field(primary_key=True, max_length=36)
    routing_key: str = Field(max_length=100)
    body: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    published_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class Delivery(SQLModel, table=True):
    """One (event, channel, recipient): the idempotency key and the outcome."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("event_id", "channel", "recipient"),)

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(max_length=36, index=True)
    event_type: str = Field(max_length=100)
    channel: str = Field(max_length=20)
    recipient: str = Field(max_length=100)
    status: str = Field(max_length=20)  # sending | sent | failed | dead
    provider: str | None = Field(default=None, max_length=50)
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    claimed_until: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    sent_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
