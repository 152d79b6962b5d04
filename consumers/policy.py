"""Per-recipient rules applied before sending: cancellation and anti-spam throttling.

A "no" is recorded on the delivery with a reason a person can read; it is
never a silent drop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from consumers.deliveries import Claim, DeliveryStore
from herald.cancellations import is_cancelled
from herald.metrics import DELIVERIES
from herald.settings import Rate, format_duration
from topology.envelope import Envelope

log = logging.getLogger("herald.policy")


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

    def __init__(self, store: DeliveryStore, limit: Rate | None, digests: bool = True) -> None:
        self.store = store
        self.limit = limit
        #: Whether this channel sends digests (email); elsewhere "digest" events are suppressed.
        self.digests = digests

    async def check(self, envelope: Envelope, channel: str, recipient: str) -> Verdict | None:
        """None to send now; otherwise what to record instead (the rules without a claim)."""
        cancelled = bool(envelope.cancel_key) and await is_cancelled(
            self.store.sessions, envelope.cancel_key or "")
        recent = 0
        if not cancelled and not envelope.critical and self.limit is not None:
            since = datetime.now(UTC) - timedelta(seconds=self.limit.period)
            recent = await self.store.sent_since(channel, recipient, since)
        return self._verdict(envelope, channel, cancelled, recent)

    async def admit(self, envelope: Envelope, channel: str, recipient: str,
                    summary: Callable[[], str] | None = None,
                    address: str | None = None) -> bool:
        """Claim the delivery and apply the rules; True when the caller should send it now.

        False when it was settled before (a redelivery or replay), or when a
        rule said no: then the outcome and its reason are recorded here.
        ``summary`` (the subject line) is only computed for a delivery held
        for a digest. The claim, the cancellation and the throttle count are
        one database round trip (:meth:`DeliveryStore.claim_and_check`).
        """
        throttled = not envelope.critical and self.limit is not None
        since = (datetime.now(UTC) - timedelta(seconds=self.limit.period)
                 if throttled and self.limit is not None else None)
        found = await self.store.claim_and_check(envelope.id, envelope.type, channel, recipient,
                                                 envelope.cancel_key, since)
        if found.claim is not Claim.GO:
            log.info("event %s to %s on %s already settled (%s); skipped", envelope.id,
                     recipient, channel, found.claim.value)
            DELIVERIES.labels(channel, "-", "duplicate").inc()
            return False
        verdict = self._verdict(envelope, channel, found.cancelled, found.recent)
        if verdict is None:
            return True
        held = verdict.status == "held" and summary is not None
        await self.store.settle(envelope.id, channel, recipient, verdict.status, verdict.reason,
                                summary=summary() if held and summary else None,
                                address=address)
        DELIVERIES.labels(channel, "-", verdict.status).inc()
        log.info("event %s not sent on %s to %s: %s", envelope.id, channel, recipient,
                 verdict.reason)
        return False

    def _verdict(self, envelope: Envelope, channel: str, cancelled: bool,
                 recent: int) -> Verdict | None:
        if cancelled:
            return Verdict("cancelled", f"cancelled: POST /events/cancel {envelope.cancel_key!r}")
        if envelope.critical or self.limit is None or recent < self.limit.limit:
            return None
        reason = (f"throttled: {recent} {channel} notifications in the last "
                  f"{format_duration(self.limit.period)} (HERALD_RECIPIENT_LIMIT={self.limit})")
        if envelope.digest and self.digests:
            return Verdict("held", reason + "; held for the next digest")
        return Verdict("suppressed", reason)

    async def over_limit(self, channel: str, recipient: str) -> int | None:
        """The count in the current window when it has reached the limit, else None."""
        if self.limit is None:
            return None
        since = datetime.now(UTC) - timedelta(seconds=self.limit.period)
        sent = await self.store.sent_since(channel, recipient, since)
        return sent if sent >= self.limit.limit else None
