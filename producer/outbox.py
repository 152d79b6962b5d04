"""The transactional outbox: events are rows committed with the domain change."""

from __future__ import annotations

from sqlmodel.ext.asyncio.session import AsyncSession

from herald.metrics import EVENTS
from herald.models import OutboxEvent
from topology.envelope import Envelope


def add_event(session: AsyncSession, envelope: Envelope) -> OutboxEvent:
    """Stage ``envelope`` in the caller's transaction; the relay publishes it after commit."""
    EVENTS.labels(envelope.type).inc()
    row = OutboxEvent(id=envelope.id, routing_key=envelope.type, body=envelope.model_dump_json())
    session.add(row)
    return row
