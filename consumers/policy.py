"""Per-recipient rules applied before sending: cancellation and anti-spam throttling.

A "no" is recorded on the delivery with a reason a person can read; it is
never a silent drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from consumers.deliveries import DeliveryStore
from herald.cancellations import is_cancelled
from herald.settings import Rate, format_duration
from topology.envelope import Envelope


@dataclass(frozen=True)
class Verdict:
    """Why a delivery is not sent now: ``cancelled``, ``suppressed`` or ``held``."""

    status: str
    reason: str


class Policy:
    """Cancellation by key, then at most ``limit`` notifications per recipient and channel.

    The count is of deliveries recorded as sent in the database, so every
    worker process sees the same number. ``critical`` events skip the
    throttle (not a cancellation: that is an explicit instruction).
    """

    def __init__(self, store: DeliveryStore, limit: Rate | None) -> None:
        self.store = store
        self.limit = limit

    async def check(self, envelope: Envelope, channel: str, recipient: str) -> Verdict | None:
        """None to send now; otherwise what to record instead."""
        if envelope.cancel_key and await is_cancelled(self.store.sessions, envelope.cancel_key):
            return Verdict("cancelled", f"cancelled: POST /events/cancel {envelope.cancel_key!r}")
        if envelope.critical or self.limit is None:
            return None
        sent = await self.over_limit(channel, recipient)
        if sent is None:
            return None
        reason = (f"throttled: {sent} {channel} notifications in the last "
                  f"{format_duration(self.limit.period)} (HERALD_RECIPIENT_LIMIT={self.limit})")
        if envelope.digest:
            return Verdict("held", reason + "; held for the next digest")
        return Verdict("suppressed", reason)

    async def over_limit(self, channel: str, recipient: str) -> int | None:
        """The count in the current window when it has reached the limit, else None."""
        if self.limit is None:
            return None
        since = datetime.now(UTC) - timedelta(seconds=self.limit.period)
        sent = await self.store.sent_since(channel, recipient, since)
        return sent if sent >= self.limit.limit else None
