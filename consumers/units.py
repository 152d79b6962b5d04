"""One unit of work per message: splitting an envelope into single-recipient messages.

An envelope may name many recipients (``POST /events`` takes up to 1 000, a
post reaches every member of a channel), and services that publish straight
to the exchange send whatever they like. A message on a channel queue is
handled as ONE unit: one recipient (one device for push), whose failure,
retry, DLQ entry and replay are its own, like a Celery task. So the first
worker that receives a message naming several units splits it, once,
visibly: it publishes one message per unit to the same work queue (through
the default exchange, never back through the topic exchange, which would fan
the event out to every channel again), waits for every publisher confirm,
then acks the original. A crash in between redelivers the original and
splits it again; the copies are deduplicated by the delivery claim, as any
redelivery is.

Why in the worker and not in the relay: the relay is not the only publisher
(any service may publish to the exchange), and for push the units are the
user's devices, which only a worker looks up.
"""

from __future__ import annotations

from typing import Any

import aio_pika

from topology.envelope import Envelope, Recipient
from topology.messages import build_message
from topology.spec import H_DELIVERIES, H_UNIT

#: Broker headers a split copy does not inherit (it is a new message).
_NOT_INHERITED = ("x-death", "x-delivery-count", H_DELIVERIES, "x-first-death-exchange",
                  "x-first-death-queue", "x-first-death-reason", "x-last-death-exchange",
                  "x-last-death-queue", "x-last-death-reason")


def unit_message_id(event_id: str, channel: str, unit: str) -> str:
    """``<event>:<channel>:<unit>``: the message id of one unit (``herald dlq replay --event``)."""
    return f"{event_id}:{channel}:{unit}"


def recipient_of(envelope: Envelope, unit: str) -> Recipient | None:
    """The recipient a unit key (``user`` or ``user/device``) is about, if the envelope has it."""
    user_id = unit.split("/", 1)[0]
    return next((r for r in envelope.recipients if r.user_id == user_id), None)


def narrowed(envelope: Envelope, recipient: Recipient) -> bytes:
    """The envelope's JSON with ``recipient`` as its only recipient."""
    return envelope.model_copy(update={"recipients": [recipient]}).to_json()


def unit_copy(envelope: Envelope, channel: str, unit: str, headers: dict[str, Any],
              event_type: str) -> aio_pika.Message:
    """The persistent message for one unit, carrying ``headers`` minus the broker's own."""
    recipient = recipient_of(envelope, unit)
    if recipient is None:  # units come from the envelope's recipients
        raise ValueError(f"unit {unit!r} names no recipient of event {envelope.id}")
    copied = {k: v for k, v in headers.items() if k not in _NOT_INHERITED}
    copied[H_UNIT] = unit
    return build_message(narrowed(envelope, recipient),
                         unit_message_id(envelope.id, channel, unit), event_type, copied)


def distinct_users(envelope: Envelope) -> list[str]:
    """Recipient ids in order, each once (an envelope may name someone twice)."""
    seen: dict[str, None] = {}
    for recipient in envelope.recipients:
        seen.setdefault(recipient.user_id, None)
    return list(seen)
