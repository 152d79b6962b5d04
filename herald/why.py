""""Why was I (not) notified?": every recorded decision for an event, per channel and device.

Reads what the workers stored: the delivery records (one per event, channel
and recipient; for push one per device, ``<user_id>/<device_id>``) with their
status, reason and decision trail. Used by ``herald why`` and
``GET /me/events/{event_id}/why``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.models import Delivery, as_utc

#: Status → what it means for the person asking.
MEANING: dict[str, str] = {
    "sent": "delivered", "suppressed": "not delivered (decided)",
    "cancelled": "not delivered (cancelled)", "held": "held for a digest",
    "digesting": "being digested", "digested": "delivered in a digest",
    "waiting": "waiting (mobile push threshold)", "sending": "being delivered",
    "failed": "failed, will be retried", "dead": "failed for good (in the DLQ)"}


@dataclass(frozen=True)
class ChannelDecision:
    """One delivery record, as a person reads it."""

    channel: str
    user_id: str
    device_id: str | None
    status: str
    meaning: str
    reason: str
    provider: str | None
    attempts: int
    updated_at: datetime
    trail: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (timestamps as ISO 8601)."""
        out = asdict(self)
        out["updated_at"] = self.updated_at.isoformat()
        return out


def _trail(text: str | None) -> list[dict[str, Any]]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return [s for s in value if isinstance(s, dict)] if isinstance(value, list) else []


def _reason(row: Delivery) -> str:
    if row.status == "sent":
        return f"sent via {row.provider}" if row.provider else "sent"
    return row.last_error or MEANING.get(row.status, row.status)


async def explain(sessions: async_sessionmaker[AsyncSession], event_id: str,
                  user_id: str | None = None) -> list[ChannelDecision]:
    """Every decision recorded for ``event_id`` (only ``user_id``'s when given), by channel."""
    query = select(Delivery).where(col(Delivery.event_id) == event_id)
    if user_id is not None:
        query = query.where(or_(col(Delivery.recipient) == user_id,
                                col(Delivery.recipient).startswith(f"{user_id}/", autoescape=True)))
    async with sessions() as session:
        rows = (await session.exec(query.order_by(col(Delivery.channel),
                                                  col(Delivery.recipient)))).all()
    decisions: list[ChannelDecision] = []
    for row in rows:
        user, _, device = row.recipient.partition("/")
        decisions.append(ChannelDecision(
            channel=row.channel, user_id=user, device_id=device or None, status=row.status,
            meaning=MEANING.get(row.status, row.status), reason=_reason(row),
            provider=row.provider, attempts=row.attempts,
            updated_at=as_utc(row.updated_at), trail=_trail(row.trail)))
    return decisions
