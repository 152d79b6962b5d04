"""Delivery records: the idempotency key (event, channel, recipient) and its outcome."""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import and_, col, func, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.db import session_factory
from herald.errors import DeliveryInProgress
from herald.models import Delivery


class Claim(enum.Enum):
    """Result of :meth:`DeliveryStore.claim`."""

    GO = "go"  #: this worker owns the delivery now: send it
    ALREADY_SENT = "already_sent"  #: a previous attempt sent it: ack and skip
    SETTLED = "settled"  #: decided before without sending (cancelled, throttled, held)


#: Outcomes a redelivery or a replay must not undo. ``dead`` and ``failed`` are
#: not here: replaying a dead letter is meant to try again.
FINAL = ("sent", "cancelled", "suppressed", "held", "digesting", "digested")


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime:
    # SQLite hands back naive datetimes even for timezone-aware columns.
    if value is None:
        return datetime.min.replace(tzinfo=UTC)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class DeliveryStore:
    """Claims and records deliveries so that a redelivered message never sends twice."""

    def __init__(self, engine: AsyncEngine, lease: float) -> None:
        self.sessions: async_sessionmaker[AsyncSession] = session_factory(engine)
        self.lease = timedelta(seconds=lease)

    async def claim(self, event_id: str, event_type: str, channel: str, recipient: str) -> Claim:
        """Take the delivery for this worker for ``lease`` seconds.

        Returns ``ALREADY_SENT`` when it was sent before. Raises
        ``DeliveryInProgress`` (retry after the lease) when another worker
        holds an unexpired claim: at most one sender at a time per key.
        """
        now = _now()
        async with self.sessions() as session:
            session.add(Delivery(event_id=event_id, event_type=event_type, channel=channel,
                                 recipient=recipient, status="sending", attempts=1,
                                 claimed_until=now + self.lease, updated_at=now))
            try:
                await session.commit()
                return Claim.GO
            except IntegrityError:
                await session.rollback()
            key = (col(Delivery.event_id) == event_id, col(Delivery.channel) == channel,
                   col(Delivery.recipient) == recipient)
            result = await session.exec(
                update(Delivery).where(*key, col(Delivery.status).not_in(FINAL),
                                       or_(col(Delivery.status) != "sending",
                                           col(Delivery.claimed_until) < now))
                .values(status="sending", claimed_until=now + self.lease,
                        attempts=col(Delivery.attempts) + 1, updated_at=now))
            await session.commit()
            if result.rowcount == 1:
                return Claim.GO
            row = (await session.exec(select(Delivery).where(*key))).one()
        if row.status == "sent":
            return Claim.ALREADY_SENT
        if row.status in FINAL:
            return Claim.SETTLED
        wait = (_aware(row.claimed_until) - now).total_seconds()
        raise DeliveryInProgress("another worker is sending this delivery",
                                 retry_after=max(wait, 0.1))

    async def _set(self, event_id: str, channel: str, recipient: str, **values: object) -> None:
        async with self.sessions() as session:
            # Never undo a send: a worker whose lease ran out may report late.
            await session.exec(
                update(Delivery).where(col(Delivery.event_id) == event_id,
                                       col(Delivery.channel) == channel,
                                       col(Delivery.recipient) == recipient,
                                       col(Delivery.status) != "sent")
                .values(updated_at=_now(), **values))
            await session.commit()

    async def sent(self, event_id: str, channel: str, recipient: str, provider: str,
                   trail: str | None = None) -> None:
        """Record success (the claim ends), with the decision trail that allowed it."""
        values: dict[str, object] = {"trail": trail} if trail is not None else {}
        await self._set(event_id, channel, recipient, status="sent", provider=provider,
                        sent_at=_now(), claimed_until=None, last_error=None, **values)

    async def wait(self, event_id: str, channel: str, recipient: str, reason: str,
                   trail: str | None = None) -> None:
        """Release the claim of a delivery that is not due yet (``waiting``; claimable again)."""
        await self._set(event_id, channel, recipient, status="waiting", claimed_until=None,
                        last_error=reason[:2000], trail=trail)

    async def failed(self, event_id: str, channel: str, recipient: str, error: str) -> None:
        """Record a failed attempt and release the claim so a retry can take it."""
        await self._set(event_id, channel, recipient, status="failed", claimed_until=None,
                        last_error=error[:2000])

    async def dead(self, event_id: str, channel: str, reason: str) -> None:
        """Mark the event's unsettled deliveries on ``channel`` as dead-lettered.

        Decided outcomes (sent, suppressed, held, ...) stay as they are. A
        delivery that failed gets the DLQ reason (its own failure); the others
        a neutral one, never another recipient's provider error.
        """
        unsettled = (col(Delivery.event_id) == event_id, col(Delivery.channel) == channel,
                     col(Delivery.status).not_in(FINAL))
        async with self.sessions() as session:
            await session.exec(
                update(Delivery).where(*unsettled, col(Delivery.status) == "failed")
                .values(status="dead", claimed_until=None, updated_at=_now(),
                        last_error=reason[:2000]))
            await session.exec(
                update(Delivery).where(*unsettled, col(Delivery.status) != "dead")
                .values(status="dead", claimed_until=None, updated_at=_now(),
                        last_error=f"not delivered: the event went to the {channel} DLQ "
                                   f"({reason.split(':')[0]})"))
            await session.commit()

    async def settle(self, event_id: str, channel: str, recipient: str, status: str,
                     reason: str, summary: str | None = None,
                     address: str | None = None, trail: str | None = None) -> None:
        """End the claim without sending: ``cancelled``, ``suppressed`` or ``held``."""
        await self._set(event_id, channel, recipient, status=status, claimed_until=None,
                        last_error=reason[:2000], summary=summary, address=address,
                        trail=trail)

    async def sent_since(self, channel: str, recipient: str, since: datetime) -> int:
        """How many notifications ``recipient`` was sent on ``channel`` since ``since``."""
        async with self.sessions() as session:
            result = await session.exec(
                select(func.count()).select_from(Delivery).where(
                    col(Delivery.channel) == channel, col(Delivery.recipient) == recipient,
                    col(Delivery.status) == "sent", col(Delivery.sent_at) >= since))
            return int(result.one())

    async def held_recipients(self, channel: str) -> list[str]:
        """Recipients with deliveries waiting for a digest (or a digest that died mid-way)."""
        now = _now()
        async with self.sessions() as session:
            result = await session.exec(
                select(Delivery.recipient).where(
                    col(Delivery.channel) == channel,
                    or_(col(Delivery.status) == "held",
                        and_(col(Delivery.status) == "digesting",
                             col(Delivery.claimed_until) < now))).distinct())
            return list(result.all())

    async def take_held(self, channel: str, recipient: str, token: str) -> list[Delivery]:
        """Claim ``recipient``'s held deliveries for one digest (``token`` marks them ours)."""
        now = _now()
        async with self.sessions() as session:
            await session.exec(
                update(Delivery).where(
                    col(Delivery.channel) == channel, col(Delivery.recipient) == recipient,
                    or_(col(Delivery.status) == "held",
                        and_(col(Delivery.status) == "digesting",
                             col(Delivery.claimed_until) < now)))
                .values(status="digesting", provider=token, claimed_until=now + self.lease,
                        updated_at=now))
            await session.commit()
            rows = await session.exec(select(Delivery).where(
                col(Delivery.status) == "digesting", col(Delivery.provider) == token)
                .order_by(col(Delivery.created_at)))
            return list(rows.all())

    async def finish_digest(self, token: str, provider: str | None) -> None:
        """Mark the digest's deliveries ``digested`` (sent), or back to ``held`` if None."""
        values: dict[str, object] = (
            {"status": "digested", "provider": provider, "sent_at": _now()} if provider
            else {"status": "held", "provider": None})
        async with self.sessions() as session:
            await session.exec(
                update(Delivery).where(col(Delivery.status) == "digesting",
                                       col(Delivery.provider) == token)
                .values(claimed_until=None, updated_at=_now(), **values))
            await session.commit()

    async def get(self, event_id: str, channel: str, recipient: str) -> Delivery | None:
        """The record for that key, if any."""
        async with self.sessions() as session:
            return (await session.exec(select(Delivery).where(
                col(Delivery.event_id) == event_id, col(Delivery.channel) == channel,
                col(Delivery.recipient) == recipient))).first()
