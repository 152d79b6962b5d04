"""The in-app channel: render the event into a ``Notification`` row that the inbox API reads.

The database is the provider: no rate limiter, no fallback chain, and the
channel is never "down" in the provider sense (a database outage is a
``TransientError`` and goes through the retry ladder like any other).

Every recipient's notification goes through the decision engine as a
desktop device (:func:`consumers.decisions.decide_for`): a "no" is still a
row (``delivered=False``, with the trail and the reason), so the inbox can
answer "why was I not notified". A delivered row is announced on the live
exchange so every API process can push it to the user's open inbox pages.
"""

from __future__ import annotations

import json
import logging
from contextlib import suppress
from typing import Any

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import col, select

from consumers.decide import DeviceKind
from consumers.decisions import Outcome, decide_for
from consumers.deliveries import DeliveryStore
from consumers.policy import Policy
from consumers.preferences import PreferenceStore
from consumers.templates import Renderer
from consumers.units import distinct_users, recipient_of
from herald.db import is_outage
from herald.errors import DatabaseUnavailable, DeliveryFailure, PermanentError, TransientError
from herald.metrics import DELIVERIES
from herald.models import Notification, as_utc, utcnow
from topology.envelope import Envelope, Recipient
from topology.live import LiveHub, notification_key

log = logging.getLogger("herald.in_app")
CHANNEL = "in_app"
#: What ``Delivery.provider`` records for an in-app notification: the row is the delivery.
PROVIDER = "db"


class InAppChannel:
    """Writes one inbox notification per (event, recipient), however often the message comes.

    Templates ``templates/in_app/<event>.title.j2`` and ``.body.j2`` are
    rendered as plain text (the text environment: no autoescape). That is
    safe only because the inbox shows them as text; a client that renders
    them as HTML must escape them itself.
    """

    name = CHANNEL

    def __init__(self, renderer: Renderer, store: DeliveryStore,
                 policy: Policy | None = None, prefs: PreferenceStore | None = None,
                 live: LiveHub | None = None) -> None:
        self.renderer = renderer
        self.store = store
        self.policy = policy or Policy(store, None, digests=False)
        self.prefs = prefs or PreferenceStore(store.sessions, ttl=30, activity_window=600,
                                              mobile_push_threshold=120)
        self.live = live

    async def unavailable_for(self) -> float:
        """Always 0: there is no provider to wait for."""
        return 0.0

    async def aclose(self) -> None:
        """Close the live hub (the engine belongs to whoever built the store)."""
        if self.live is not None:
            await self.live.aclose()

    async def tick(self) -> None:
        """No periodic work: in-app notifications are not digested."""

    async def dead_lettered(self, envelope: Envelope, unit: str | None, reason: str) -> None:
        """Record the DLQ reason on that recipient (None: every one not yet notified)."""
        await self.store.dead(envelope.id, CHANNEL, reason, recipient=unit,
                              event_type=envelope.type)

    async def units(self, envelope: Envelope) -> list[str]:
        """One unit per recipient."""
        return distinct_users(envelope)

    async def deliver(self, envelope: Envelope, unit: str) -> None:
        """Notify that recipient unless notified before; raise after recording a failure.

        Idempotent: a settled delivery is skipped, and the unique
        (event_id, user_id) on ``notifications`` keeps a redelivery that
        raced past the claim from inserting a second row. A database that is
        unreachable raises ``DatabaseUnavailable`` (the worker pauses, no retry
        is spent); other database errors ``TransientError``; a missing or
        broken template ``PermanentError``.
        """
        recipient = recipient_of(envelope, unit)
        if recipient is None:
            raise PermanentError(f"unit {unit!r} is not a recipient of this event")
        try:
            await self._notify(envelope, recipient)
        except DeliveryFailure:
            raise
        except (SQLAlchemyError, OSError) as exc:
            if is_outage(exc):
                raise DatabaseUnavailable(f"database: {type(exc).__name__}") from exc
            raise TransientError(f"database: {type(exc).__name__}: {exc}"[:500]) from None

    async def _notify(self, envelope: Envelope, recipient: Recipient) -> None:
        key = (envelope.id, CHANNEL, recipient.user_id)
        # A "held" (digest) verdict is recorded like the others, but nothing digests
        # in-app notifications: the inbox is already the digest.
        if not await self.policy.admit(envelope, CHANNEL, recipient.user_id):
            return
        try:
            outcome = await decide_for(self.prefs, envelope, recipient.user_id,
                                       DeviceKind.DESKTOP, utcnow(), dnd_for_events=False)
            context = self._context(envelope, recipient)
            title = " ".join(self.renderer.render(CHANNEL, envelope.type, "title",
                                                  context).split())
            body = self.renderer.render(CHANNEL, envelope.type, "body", context)
            row = await self._insert(Notification(
                event_id=envelope.id, event_type=envelope.type, user_id=recipient.user_id,
                title=title, body=body, delivered=outcome.notify, trail=outcome.trail_json(),
                reason=outcome.reason))
        except DeliveryFailure as exc:
            DELIVERIES.labels(CHANNEL, "-", "failed").inc()
            await self.store.failed(*key, exc.reason)
            raise
        except (SQLAlchemyError, OSError) as exc:
            if is_outage(exc):
                raise DatabaseUnavailable(f"database: {type(exc).__name__}") from exc
            DELIVERIES.labels(CHANNEL, "-", "failed").inc()
            reason = f"database: {type(exc).__name__}: {exc}"[:500]
            with suppress(SQLAlchemyError, OSError):  # else the lease runs out; a retry takes it
                await self.store.failed(*key, reason)
            raise TransientError(reason) from None
        if row is None:
            # A redelivery that raced past the claim: the stored row is the decision
            # (deciding again now could contradict what the inbox shows).
            stored = await self._stored(envelope.id, recipient.user_id)
            if stored is not None:
                outcome = Outcome(stored.delivered, stored.reason, tuple(
                    step for step in _loads(stored.trail) if isinstance(step, dict)))
        await self._record(envelope, recipient, outcome, row)

    async def _stored(self, event_id: str, user_id: str) -> Notification | None:
        async with self.store.sessions() as session:
            return (await session.exec(select(Notification).where(
                col(Notification.event_id) == event_id,
                col(Notification.user_id) == user_id))).first()

    async def _record(self, envelope: Envelope, recipient: Recipient, outcome: Outcome,
                      row: Notification | None) -> None:
        key = (envelope.id, CHANNEL, recipient.user_id)
        if not outcome.notify:
            await self.store.settle(*key, "suppressed", outcome.reason, trail=outcome.trail_json())
            DELIVERIES.labels(CHANNEL, "-", "suppressed").inc()
            log.info("event %s (%s) not shown to %s: %s", envelope.id, envelope.type,
                     recipient.user_id, outcome.reason)
            return
        await self.store.sent(*key, PROVIDER, trail=outcome.trail_json())
        DELIVERIES.labels(CHANNEL, PROVIDER, "sent").inc()
        log.info("event %s (%s) notified in-app to %s", envelope.id, envelope.type,
                 recipient.user_id)
        if row is not None and self.live is not None:
            await self.live.publish(notification_key(recipient.user_id), item_json(row))

    async def _insert(self, row: Notification) -> Notification | None:
        """Insert ``row`` and return it with its id; None when (event_id, user_id) was stored."""
        async with self.store.sessions() as session:
            session.add(row)
            try:
                await session.commit()
            except IntegrityError:
                await session.rollback()
                log.info("event %s: notification for %s already stored", row.event_id,
                         row.user_id)
                return None
            await session.refresh(row)
            return row

    @staticmethod
    def _context(envelope: Envelope, recipient: Recipient) -> dict[str, Any]:
        return {"event": envelope, "recipient": recipient, "data": envelope.data,
                "actor": envelope.actor, "occurred_at": envelope.occurred_at}


def item_json(row: Notification) -> dict[str, Any]:
    """The inbox item as ``GET /me/notifications`` shows it (what the live stream carries)."""
    return {"id": row.id, "event_id": row.event_id, "event_type": row.event_type,
            "title": row.title, "body": row.body, "read": row.read_at is not None,
            "created_at": as_utc(row.created_at).isoformat()}


def _loads(text: str) -> list[Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []
