"""Tables. One metadata for all of herald, so one ``init_db`` (later alembic) covers it.

Model families stay apart: request/response models live with the API, the
wire envelope in ``topology.envelope``; these are rows.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Timezone-aware now, the only clock rows use."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (SQLite hands timestamps back naive)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _ts(nullable: bool = False) -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=nullable)


def new_id() -> str:
    """A new random row id (UUID4 text)."""
    return str(uuid.uuid4())


class UserBase(SQLModel):
    """Fields a user shares across the API's models."""

    email: str = Field(max_length=320, unique=True, index=True)
    name: str = Field(max_length=200)


class User(UserBase, table=True):
    """An account (password stored as an argon2 hash, never in clear) and its contact details."""

    __tablename__ = "users"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    password_hash: str = Field(max_length=200)
    #: What ``@handle`` mentions match: lowercase letters, digits, ``.``, ``_``, ``-``.
    handle: str | None = Field(default=None, max_length=40, unique=True, index=True)
    #: E.164 (``+14155550100``), validated with ``phonenumbers`` before it is stored.
    phone: str | None = Field(default=None, max_length=20)
    #: BCP 47 language tag the templates are chosen by (``en``, ``fr``, ``fr-CA``).
    locale: str = Field(default="en", max_length=20)
    #: IANA zone (``Europe/Paris``): the do-not-disturb window is in this zone.
    timezone: str = Field(default="UTC", max_length=60)
    #: Presence (J5): the last ``POST /me/presence`` heartbeat.
    last_active_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class UserPreferences(SQLModel, table=True):
    """A user's global notification settings; no row means every default."""

    __tablename__ = "user_preferences"

    user_id: str = Field(primary_key=True, max_length=36, foreign_key="users.id")
    #: Daily do-not-disturb window ``HH:MM``-``HH:MM`` in the user's zone (both or neither).
    dnd_start: str | None = Field(default=None, max_length=5)
    dnd_end: str | None = Field(default=None, max_length=5)
    snooze_until: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    #: C2: a ``critical`` event may break through do-not-disturb.
    dnd_override_allowed: bool = True
    thread_everything: bool = False
    #: H1 per device kind: all | mentions | dms | highlight_words | never.
    desktop: str = Field(default="mentions", max_length=20)
    mobile: str = Field(default="mentions", max_length=20)
    #: JSON list of words (J4).
    highlight_words: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    #: ``user.login`` alerts by SMS: opt-in.
    sms_login_alerts: bool = False
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class Channel(SQLModel, table=True):
    """A conversation: a named channel, or a direct message between its members."""

    __tablename__ = "channels"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    name: str = Field(max_length=80)
    is_dm: bool = False
    created_by: str = Field(max_length=36, foreign_key="users.id")
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class ChannelMember(SQLModel, table=True):
    """``user_id`` is in ``channel_id``: posts there notify them (as their prefs decide)."""

    __tablename__ = "channel_members"

    channel_id: str = Field(primary_key=True, max_length=36, foreign_key="channels.id")
    user_id: str = Field(primary_key=True, max_length=36, foreign_key="users.id", index=True)
    joined_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class ChannelPreferences(SQLModel, table=True):
    """One member's settings for one channel; no row means every default."""

    __tablename__ = "channel_preferences"

    user_id: str = Field(primary_key=True, max_length=36, foreign_key="users.id")
    channel_id: str = Field(primary_key=True, max_length=36, foreign_key="channels.id")
    muted: bool = False
    #: D2: @channel/@everyone/@here in this channel do not notify by themselves.
    suppress_channel_mentions: bool = False
    #: F1 per device kind: nothing | everything | mentions | default.
    desktop: str = Field(default="default", max_length=20)
    mobile: str = Field(default="default", max_length=20)
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class Post(SQLModel, table=True):
    """A message in a channel; ``thread_id`` is the root post of its thread (None: top level)."""

    __tablename__ = "posts"
    __table_args__ = (Index("ix_posts_channel_created", "channel_id", "created_at"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    channel_id: str = Field(max_length=36, foreign_key="channels.id")
    author_id: str = Field(max_length=36, foreign_key="users.id")
    text: str = Field(sa_column=Column(Text, nullable=False))
    thread_id: str | None = Field(default=None, max_length=36, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class ThreadSubscription(SQLModel, table=True):
    """``user_id`` follows the thread rooted at ``thread_id`` (author and repliers are added)."""

    __tablename__ = "thread_subscriptions"

    thread_id: str = Field(primary_key=True, max_length=36, foreign_key="posts.id")
    user_id: str = Field(primary_key=True, max_length=36, foreign_key="users.id")
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class FriendRequest(SQLModel, table=True):
    """A request from one user to another: pending, accepted or declined."""

    __tablename__ = "friend_requests"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    from_user_id: str = Field(max_length=36, foreign_key="users.id", index=True)
    to_user_id: str = Field(max_length=36, foreign_key="users.id", index=True)
    status: str = Field(default="pending", max_length=20)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class Device(SQLModel, table=True):
    """Where push notifications go: ``platform`` picks the service (android: FCM, ios: APNs,
    web: Web Push); ``token`` is its registration token or, for web, the subscription JSON."""

    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("platform", "token_hash"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    user_id: str = Field(max_length=36, foreign_key="users.id", index=True)
    platform: str = Field(max_length=20)
    token: str = Field(sa_column=Column(Text, nullable=False))
    #: SHA-256 of ``token``: the unique key (tokens can be longer than an index allows).
    token_hash: str = Field(max_length=64)
    name: str | None = Field(default=None, max_length=100)
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
    #: sending | waiting | sent | failed | dead | cancelled | suppressed | held | digesting |
    #: digested
    status: str = Field(max_length=20)
    provider: str | None = Field(default=None, max_length=50)
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    claimed_until: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    sent_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    #: For a delivery held for a digest: its subject line and where the digest goes.
    summary: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    address: str | None = Field(default=None, max_length=320)
    #: The decision engine's trail as JSON (push: per device), for "why".
    trail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
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
