"""The event envelope: the one wire format between producer and consumers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from herald.validation import display_name, email_address, one_line, storable_json
from topology.spec import EVENT_TYPES

ENVELOPE_VERSION = 1
CONTENT_TYPE = "application/json"

#: A key that groups notifications one ``POST /events/cancel`` can call off.
CancelKey = Annotated[str, StringConstraints(min_length=1, max_length=200,
                                             pattern=r"^[A-Za-z0-9._:\-]+$")]


def _known_event_type(value: str) -> str:
    if value not in EVENT_TYPES:
        raise ValueError(f"unknown event type {value!r}; known: {', '.join(EVENT_TYPES)}")
    return value


#: One of the routing keys herald knows (``topology.spec.ROUTES``).
EventType = Annotated[str, AfterValidator(_known_event_type)]

# The checks below are the ones the workers build messages by (herald.validation): an
# envelope that parses can be addressed and stored, and the API answers 422 up front
# instead of a worker dead-lettering the event later.

#: A display name (:func:`herald.validation.display_name`): one line, no ``<>``, <= 200.
Name = Annotated[str, AfterValidator(display_name)]
#: An address plain SMTP can deliver to (:func:`herald.validation.email_address`).
EmailAddress = Annotated[str, AfterValidator(email_address)]
#: Text without control characters (ids, phone numbers, locales): storable and loggable.
OneLine = Annotated[str, AfterValidator(one_line)]


class Actor(BaseModel):
    """Who caused the event (a user id, or a service name for integrations)."""

    model_config = ConfigDict(extra="forbid")

    id: OneLine
    name: Name | None = None


class Recipient(BaseModel):
    """Someone the event may notify, with the contact details the channels need."""

    model_config = ConfigDict(extra="forbid")

    #: At most 63 characters and no "/" (a push delivery is keyed "<user_id>/<device_id>").
    user_id: OneLine = Field(min_length=1, max_length=63, pattern=r"^[^/\s]+$")
    #: ASCII local part; the domain in its ASCII (IDNA) form.
    email: EmailAddress | None = None
    name: Name | None = None
    phone: OneLine | None = None
    locale: OneLine = "en"


class Envelope(BaseModel):
    """An event as it travels on the broker (JSON body, ``message_id`` = ``id``)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    type: EventType
    occurred_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    actor: Actor
    recipients: list[Recipient] = Field(min_length=1)
    data: dict[str, Any] = Field(default_factory=dict)
    #: Bypasses do-not-disturb and per-recipient throttling (security alerts).
    critical: bool = False
    #: Notifications of this event are dropped once the key is cancelled.
    cancel_key: CancelKey | None = None
    #: When throttled, hold the notification for a digest rather than drop it.
    digest: bool = False
    version: int = ENVELOPE_VERSION

    #: No NUL or unpaired surrogate anywhere (keys too): the database could not store it.
    _storable = field_validator("data")(storable_json)

    @field_validator("version")
    @classmethod
    def _supported_version(cls, value: int) -> int:
        if value != ENVELOPE_VERSION:
            raise ValueError(f"unsupported envelope version {value} (this herald reads 1)")
        return value

    def to_json(self) -> bytes:
        """The body published on the broker."""
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, body: bytes) -> Envelope:
        """Parse a message body; raises ``pydantic.ValidationError`` when malformed."""
        return cls.model_validate_json(body)
