"""Delivery records: the idempotency key (event, channel, recipient) and its outcome."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import literal, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import and_, col, func, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.db import is_outage, session_factory
from herald.errors import DeliveryInProgress
from herald.models import Cancellation, Delivery

log = logging.getLogger("herald.deliveries")


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


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What :meth:`DeliveryStore.claim_and_check` found."""

    claim: Claim
    #: The event's ``cancel_key`` has been cancelled (only asked when claimed).
    cancelled: bool = False
    #: Deliveries sent to the recipient on the channel in the window asked about.
    recent: int = 0


_DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]
_RECENT = _DELIVERIES.alias("recent")
_CANCELLATIONS = Cancellation.__table__  # type: ignore[attr-defined]


def _insert_for(dialect: str) -> Any:
    """The dialect's ``insert`` (both have ``on_conflict_do_update`` and ``returning``)."""
    return pg_insert if dialect == "postgresql" else sqlite_insert


class DeliveryStore:
    """Claims and records deliveries so that a redelivered message never sends twice."""

    def __init__(self, engine: AsyncEngine, lease: float) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        self.sessions: async_sessionmaker[AsyncSession] = session_factory(engine)
        self.lease = timedelta(seconds=lease)

    async def claim(self, event_id: str, event_type: str, channel: str, recipient: str) -> Claim:
        """Take the delivery for this worker for ``lease`` seconds.

        Returns ``ALREADY_SENT`` when it was sent before. Raises
        ``DeliveryInProgress`` (retry after the lease) when another worker
        holds an unexpired claim: at most one sender at a time per key.
        """
        return (await self.claim_and_check(event_id, event_type, channel, recipient)).claim

    async def claim_and_check(self, event_id: str, event_type: str, channel: str,
                              recipient: str, cancel_key: str | None = None,
                              sent_since: datetime | None = None) -> ClaimResult:
        """:meth:`claim`, and in the same statement whether ``cancel_key`` was cancelled
        and how many deliveries ``recipient`` was sent on ``channel`` since ``sent_since``.

        One round trip on the hot path (the profile put two ORM transactions per
        message at a third of the email worker's time): ``INSERT … ON CONFLICT
        DO UPDATE … WHERE <claimable> RETURNING``, with the two questions as
        scalar subqueries. Only when the row exists and is not claimable does a
        second read say why.
        """
        now = _now()
        table = _DELIVERIES
        cancelled = (select(func.count()).select_from(_CANCELLATIONS)
                     .where(_CANCELLATIONS.c.key == cancel_key).scalar_subquery()
                     if cancel_key else literal(0))
        recent = (select(func.count()).select_from(_RECENT).where(
            _RECENT.c.channel == channel, _RECENT.c.recipient == recipient,
            _RECENT.c.status == "sent", _RECENT.c.sent_at >= sent_since).scalar_subquery()
            if sent_since is not None else literal(0))
        insert = _insert_for(self._dialect)
        statement = insert(table).values(
            event_id=event_id, event_type=event_type, channel=channel, recipient=recipient,
            status="sending", attempts=1, claimed_until=now + self.lease, created_at=now,
            updated_at=now)
        statement = statement.on_conflict_do_update(
            index_elements=["event_id", "channel", "recipient"],
            set_={"status": "sending", "claimed_until": now + self.lease,
                  "attempts": table.c.attempts + 1, "updated_at": now},
            where=and_(table.c.status.not_in(FINAL),
                       or_(table.c.status != "sending", table.c.claimed_until < now)),
        ).returning(table.c.status, cancelled.label("cancelled"), recent.label("recent"))
        async with self.engine.begin() as conn:
            row = (await conn.execute(statement)).first()
            if row is not None:
                return ClaimResult(Claim.GO, bool(row.cancelled), int(row.recent))
            found = (await conn.execute(
                select(table.c.status, table.c.claimed_until).where(
                    table.c.event_id == event_id, table.c.channel == channel,
                    table.c.recipient == recipient))).one()
        if found.status == "sent":
            return ClaimResult(Claim.ALREADY_SENT)
        if found.status in FINAL:
            return ClaimResult(Claim.SETTLED)
        wait = (_aware(found.claimed_until) - now).total_seconds()
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
        """Record success (the claim ends), with the decision trail that allowed it.

        The provider has the message: this record must not be lost, or a retry
        would send it again. While the database is unreachable it is retried
        (backoff up to 5 s) until it is written; the message stays unacked
        meanwhile. Only a worker stopped before the database returns leaves the
        send unrecorded (the duplicate window the README states).
        """
        values: dict[str, object] = {"trail": trail} if trail is not None else {}
        delay = 0.2
        warned = False
        while True:
            try:
                await self._set(event_id, channel, recipient, status="sent", provider=provider,
                                sent_at=_now(), claimed_until=None, last_error=None, **values)
                if warned:
                    log.warning("database is back: the send of %s on %s is recorded",
                                event_id, channel)
                return
            except Exception as exc:
                if not is_outage(exc):
                    raise
                if not warned:
                    log.warning("database unreachable while recording the send of %s on %s; "
                                "holding the record until it answers", event_id, channel)
                    warned = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def wait(self, event_id: str, channel: str, recipient: str, reason: str,
                   trail: str | None = None) -> None:
        """Release the claim of a delivery that is not due yet (``waiting``; claimable again)."""
        await self._set(event_id, channel, recipient, status="waiting", claimed_until=None,
                        last_error=reason[:2000], trail=trail)

    async def failed(self, event_id: str, channel: str, recipient: str, error: str) -> None:
        """Record a failed attempt and release the claim so a retry can take it."""
        await self._set(event_id, channel, recipient, status="failed", claimed_until=None,
                        last_error=error[:2000])

    async def dead(self, event_id: str, channel: str, reason: str,
                   recipient: str | None = None, event_type: str = "") -> None:
        """Mark ``recipient``'s delivery (None: every unsettled one of the event on
        ``channel``) as dead-lettered.

        Decided outcomes (sent, suppressed, held, ...) stay as they are. The
        unit that failed gets the DLQ reason (its own failure); when a whole
        envelope went to the DLQ the others get a neutral one, never another
        recipient's provider error. A unit with no row yet (it failed before it
        was claimed: a bad template, a missing recipient) gets one, so that
        ``/why`` can say what happened.
        """
        now = _now()
        unsettled = (col(Delivery.event_id) == event_id, col(Delivery.channel) == channel,
                     col(Delivery.status).not_in(FINAL))
        async with self.sessions() as session:
            if recipient is not None:
                result = await session.exec(
                    update(Delivery).where(*unsettled, col(Delivery.recipient) == recipient)
                    .values(status="dead", claimed_until=None, updated_at=now,
                            last_error=reason[:2000]))
                await session.commit()
                if result.rowcount:
                    return
                exists = (await session.exec(select(Delivery.status).where(
                    col(Delivery.event_id) == event_id, col(Delivery.channel) == channel,
                    col(Delivery.recipient) == recipient))).first()
                if exists is None:
                    session.add(Delivery(event_id=event_id, event_type=event_type, channel=channel,
                                         recipient=recipient, status="dead", attempts=0,
                                         last_error=reason[:2000], updated_at=now))
                    with suppress(IntegrityError):
                        await session.commit()
                return
            await session.exec(
                update(Delivery).where(*unsettled, col(Delivery.status) == "failed")
                .values(status="dead", claimed_until=None, updated_at=now,
                        last_error=reason[:2000]))
            await session.exec(
                update(Delivery).where(*unsettled, col(Delivery.status) != "dead")
                .values(status="dead", claimed_until=None, updated_at=now,
                        last_error=f"not delivered: the event went to the {channel} DLQ "
                                   f"({reason.split(':')[0]})"))
            await session.commit()

    async def release(self, event_id: str, channel: str, recipient: str, reason: str) -> None:
        """End this worker's claim at once (the send never reached the provider), so a
        retry need not wait for the lease to run out."""
        await self._set(event_id, channel, recipient, status="failed", claimed_until=None,
                        last_error=reason[:2000])

    @asynccontextmanager
    async def released_if_cancelled(self, key: tuple[str, str, str],
                                    handover: asyncio.Event) -> AsyncIterator[None]:
        """Around a provider call: cancelled (shutdown) before ``handover`` was set, the
        message reached nobody, so the claim is released at once instead of holding
        the delivery for the rest of its lease. Cancelled after it, the claim is kept
        (the provider may have it; the lease decides)."""
        try:
            yield
        except asyncio.CancelledError:
            if not handover.is_set():
                with suppress(Exception):
                    await asyncio.wait_for(self.release(
                        *key, "interrupted by a shutdown before it reached the provider; "
                              "will be retried"), 2)
            raise

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
