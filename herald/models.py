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


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (SQLite hands timestamps back naive)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


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
    #: sending | sent | failed | dead | cancelled | suppressed | held | digesting | digested
    status: str = Field(max_length=20)
    provider: str | None = Field(default=None, max_length=50)
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    claimed_until: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    sent_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    #: For a delivery held for a digest: its subject line and where the digest goes.
    summary: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    address: str | None = Field(default=None, max_length=320)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class IdempotencyKey(SQLModel, table=True):
    """The answer given to a request that carried an ``Idempotency-Key``, for replay.

    Written in the same transaction as what the request changed, so a key is
    stored if and only if its effect is.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("route", "key"),)

    id: int | None = Field(default=None, primary_key=True)
    route: str = Field(max_length=100)
    key: str = Field(max_length=255)
    request_hash: str = Field(max_length=64)
    status_code: int
    response_body: str = Field(sa_column=Column(Text, nullable=False))
    response_headers: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class Cancellation(SQLModel, table=True):
    """A ``cancel_key`` whose pending notifications must not be sent any more."""

    __tablename__ = "cancellations"

    key: str = Field(primary_key=True, max_length=200)
    cancelled_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    request_count: int = 1


class Notification(SQLModel, table=True):
    """An in-app notification: what the inbox shows, and why it was (not) delivered."""

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("event_id", "user_id"),)

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(max_length=36, index=True)
    event_type: str = Field(max_length=100)
    user_id: str = Field(max_length=100, index=True)
    title: str = Field(sa_column=Column(Text, nullable=False))
    body: str = Field(sa_column=Column(Text, nullable=False))
    #: True when shown in the inbox; False when the decision engine said no.
    delivered: bool = True
    #: The decision trail as JSON (a list of {node, label, answer}), for "why".
    trail: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    reason: str = Field(default="", sa_column=Column(Text, nullable=False))
    read_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class ApiToken(SQLModel, table=True):
    """A bearer token issued by ``POST /login``; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    token_hash: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(max_length=36, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    expires_at: datetime = Field(sa_column=_ts())
