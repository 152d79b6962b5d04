"""Request and response models of the API (apart from table rows and the wire envelope)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from herald.validation import MAX_EMAIL, email_address, storable_json
from producer.social_schemas import Handle, Locale, Phone, TimeZone, strip_name
from topology.envelope import Actor, CancelKey, EventType, Recipient
from topology.spec import EVENT_TYPES

#: The largest value of a PostgreSQL INTEGER (``herald.models``: ``Notification.id``,
#: ``Delivery.id``...). A bigger id in a query is a 500 there (asyncpg cannot bind it),
#: so every integer path and query parameter (ids, ``before``, ``after``...) is bounded
#: by it: ``Path(ge=1, le=MAX_DB_INT)``, a 422 naming the parameter.
MAX_DB_INT = 2_147_483_647


def _account_email(value: str) -> str:
    # Lowercased: one account per address whatever the case it is typed in.
    return email_address(value).lower()


#: An account's address: what the email worker can deliver to (:func:`email_address`:
#: ASCII local part, the domain in ASCII form), lowercased.
AccountEmail = Annotated[str, Field(max_length=320, examples=["ada@example.com"], description=(
    f"At most {MAX_EMAIL} characters; ASCII before the @ (herald mails without SMTPUTF8); "
    "an internationalised domain is stored in its ASCII (IDNA) form.")),
    AfterValidator(_account_email)]


class SignupIn(BaseModel):
    """``POST /signup`` body."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [
            {"email": "ada@example.com", "password": "correct horse battery", "name": "Ada"},
            {"email": "ada@example.com", "password": "correct horse battery", "name": "Ada",
             "handle": "ada", "phone": "+44 20 7946 0958", "locale": "en-GB",
             "timezone": "Europe/London"},
        ]
    })

    email: AccountEmail
    password: str = Field(min_length=8, max_length=1024)
    name: str = Field(min_length=1, max_length=200)
    handle: Handle | None = Field(
        default=None, description="Default: from the email's local part, made unique.")
    phone: Phone | None = None
    locale: Locale = "en"
    timezone: TimeZone = "UTC"

    _name = field_validator("name")(strip_name)


class LoginIn(BaseModel):
    """``POST /login`` body."""

    model_config = ConfigDict(extra="forbid")

    email: AccountEmail
    password: str = Field(min_length=1, max_length=1024)


class UserPublic(BaseModel):
    """A user as the API shows them to themselves (no password hash)."""

    id: str
    email: str
    name: str
    handle: str | None = None
    phone: str | None = Field(default=None, description="E.164; shown to its owner only.")
    locale: str = "en"
    timezone: str = "UTC"


class EventAccepted(BaseModel):
    """What a route that raised an event answers."""

    user: UserPublic
    event_id: str


class LoginAccepted(EventAccepted):
    """What ``POST /login`` answers: the login event and a bearer token for the user's routes."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "user": {"id": "0b5d3c1e-8f0a-4e8e-9a57-3f1b2c4d5e6f", "email": "ada@example.com",
                 "name": "Ada"},
        "event_id": "5b0f7a1e-0c59-4b8a-9d0e-2f4f1f0a9c11",
        "access_token": "q5Hc0m1vJ9…", "token_type": "bearer", "expires_in": 86400}]})

    access_token: str = Field(description="Send as `Authorization: Bearer <access_token>`.")
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the scheme, not a secret
    expires_in: int = Field(description="Seconds the token is valid for (HERALD_TOKEN_TTL).")


class NotificationItem(BaseModel):
    """One in-app notification as the inbox shows it."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 42, "event_id": "5b0f7a1e-0c59-4b8a-9d0e-2f4f1f0a9c11", "event_type": "user.login",
        "title": "New sign-in", "body": "You signed in from Firefox on Linux.", "read": False,
        "created_at": "2025-05-01T12:30:00Z"}]})

    id: int
    event_id: str
    event_type: str
    title: str
    body: str
    read: bool
    created_at: datetime


class NotificationPage(BaseModel):
    """``GET /me/notifications``: newest first; pass ``next_before`` as ``before`` for more."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "items": [{"id": 42, "event_id": "5b0f7a1e-0c59-4b8a-9d0e-2f4f1f0a9c11",
                   "event_type": "user.login", "title": "New sign-in",
                   "body": "You signed in from Firefox on Linux.", "read": False,
                   "created_at": "2025-05-01T12:30:00Z"}],
        "unread_count": 3, "next_before": 42}]})

    items: list[NotificationItem]
    unread_count: int = Field(description="Unread delivered notifications (ignores filters).")
    next_before: int | None = Field(
        description="The `before` of the next page; null on the last page.")


class MarkedRead(BaseModel):
    """``POST /me/notifications/read-all``: how many notifications this call marked read."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"marked": 3}]})

    marked: int


class NotificationWhy(BaseModel):
    """``GET /me/notifications/{id}/why``: the decision behind a notification, shown or not."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "delivered": False, "reason": "not notified: channel muted",
        "trail": [{"node": "A", "label": "Should we send a notification?", "answer": "yes"},
                  {"node": "B1", "label": "Thread message && User subscribed?",
                   "answer": "no"},
                  {"node": "B2", "label": "Channel muted?", "answer": "yes"},
                  {"node": "N1", "label": "NO", "answer": None}],
        "channels": []}]})

    delivered: bool
    reason: str
    trail: list[dict[str, Any]] = Field(
        description="The decision trail, each step as the decision engine recorded it.")
    channels: list[ChannelDecisionOut] = Field(
        default_factory=list,
        description="The same event on every channel and device (push: one per device).")


class ChannelDecisionOut(BaseModel):
    """One channel's (for push: one device's) decision and outcome for an event."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "channel": "push", "user_id": "u-42", "device_id": "d-1", "status": "suppressed",
        "meaning": "not delivered (decided)", "reason": "not notified: channel muted",
        "provider": None, "attempts": 1, "updated_at": "2025-05-01T12:30:00Z",
        "trail": [{"node": "A", "label": "Should we send a notification?", "answer": "yes"},
                  {"node": "B1", "label": "Thread message && User subscribed?",
                   "answer": "no"},
                  {"node": "B2", "label": "Channel muted?", "answer": "yes"},
                  {"node": "N1", "label": "NO", "answer": None}]}]})

    channel: str
    user_id: str
    device_id: str | None = Field(description="Push only: the device this decision is for.")
    status: str = Field(description="sent, suppressed, waiting, failed, dead, cancelled, ...")
    meaning: str
    reason: str
    provider: str | None
    attempts: int
    updated_at: datetime
    trail: list[dict[str, Any]]


class EventWhy(BaseModel):
    """``GET /me/events/{event_id}/why``: every decision about one event for the caller."""

    event_id: str
    decisions: list[ChannelDecisionOut]


#: ``data`` of ``POST /events`` serialized as compact JSON may not exceed this.
MAX_DATA_BYTES = 64 * 1024
MAX_RECIPIENTS = 1000

_EVENT_EXAMPLE: dict[str, Any] = {
    "type": "user.post",
    "actor": {"id": "billing-service", "name": "Billing"},
    "recipients": [{"user_id": "u-42", "email": "ada@example.com", "name": "Ada",
                    "locale": "en"}],
    "data": {"title": "Your invoice is ready", "url": "https://example.com/invoices/7"},
    "cancel_key": "invoice:7",
    "id": "5b0f7a1e-0c59-4b8a-9d0e-2f4f1f0a9c11",
}


class EventIn(BaseModel):
    """``POST /events`` body: an event raised by another service."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EVENT_EXAMPLE]})

    type: EventType = Field(description=f"One of: {', '.join(EVENT_TYPES)}.")
    actor: Actor
    recipients: list[Recipient] = Field(min_length=1, max_length=MAX_RECIPIENTS)
    data: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Template data, a JSON object of at most {MAX_DATA_BYTES} bytes.")
    critical: bool = False
    cancel_key: CancelKey | None = None
    digest: bool = False
    id: uuid.UUID | None = Field(
        default=None,
        description="Your id for the event; an id already accepted is answered 200, once.")

    _storable = field_validator("data")(storable_json)

    @field_validator("data")
    @classmethod
    def _small_data(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > MAX_DATA_BYTES:
            raise ValueError(f"data is {size} bytes as JSON; the limit is {MAX_DATA_BYTES} "
                             f"(64 KiB): send references, not documents")
        return value


class EventQueued(BaseModel):
    """What ``POST /events`` answers: the id the event travels under."""

    model_config = ConfigDict(json_schema_extra={
        "examples": [{"event_id": "5b0f7a1e-0c59-4b8a-9d0e-2f4f1f0a9c11"}]})

    event_id: str


class CancelIn(BaseModel):
    """``POST /events/cancel`` body."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"key": "invoice:7"}]})

    key: CancelKey


class Cancelled(BaseModel):
    """What ``POST /events/cancel`` answers (the first cancellation's time, every time)."""

    model_config = ConfigDict(json_schema_extra={
        "examples": [{"key": "invoice:7", "cancelled_at": "2025-05-01T12:30:00Z"}]})

    key: str
    cancelled_at: datetime
