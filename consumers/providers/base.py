"""The seams every provider implements, and the messages they carry."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Protocol, TypeAlias, TypeVar

from consumers.mime import OutgoingEmail

#: Awaited by a provider right before it hands the message over (after any
#: connection set-up), so a rate limit spaces what the provider receives, not
#: when sessions happen to start.
Gate = Callable[[], Awaitable[None]]

M_contra = TypeVar("M_contra", contravariant=True)


class Provider(Protocol[M_contra]):
    """Sends one message. Raises ``TransientError``/``RateLimited``/``PermanentError``.

    Push providers raise ``DeadToken`` (a ``PermanentError``) for a token the
    service reports as no longer valid, so the caller can forget the device.
    """

    name: str

    async def send(self, message: M_contra, gate: Gate | None = None) -> None:
        """Hand ``message`` to the provider (after awaiting ``gate``); return once accepted."""


#: What an email provider takes: what the email channel builds (``OutgoingEmail``, cheap
#: bytes) or any ``EmailMessage`` (tests, scripts and other callers).
Mail: TypeAlias = OutgoingEmail | EmailMessage
EmailProvider = Provider[Mail]


@dataclass(frozen=True, slots=True)
class SmsMessage:
    """One text message: ``to`` in E.164 (``+14155550100``), ``body`` already fitted."""

    to: str
    body: str
    #: Segments the body takes (GSM-7: 160 alone, 153 each when concatenated; UCS-2: 70/67).
    segments: int = 1
    #: Sent as the provider's client reference / status tag, for tracing in its console.
    reference: str = ""


@dataclass(frozen=True, slots=True)
class PushMessage:
    """One push notification to one device.

    ``token`` is the FCM registration token, the APNs device token (hex), or
    for Web Push the subscription JSON (``{"endpoint", "keys": {"p256dh", "auth"}}``).
    ``data`` travels as string key/values (FCM requires strings).
    """

    token: str
    title: str
    body: str
    data: Mapping[str, str] = field(default_factory=dict)
    #: Replaces an earlier push with the same key on the device (FCM collapse_key,
    #: APNs apns-collapse-id, Web Push Topic).
    collapse_key: str | None = None
    #: Seconds the push service may keep it while the device is offline.
    ttl: int = 86400
    #: ``critical`` events: high priority (FCM HIGH, APNs 10, Web Push Urgency high).
    urgent: bool = False
