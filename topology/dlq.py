"""Dead-letter queue operations: look without consuming, replay, purge."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from herald.amqp import connect as amqp_connect
from topology.messages import build_message
from topology.spec import (
    H_ATTEMPT,
    H_ATTEMPTS_TOTAL,
    H_DELIVERIES,
    H_FIRST_FAILURE,
    H_LAST_ERROR,
    H_REASON,
    H_ROUTING_KEY,
    Names,
)

#: Headers a replay drops, so the message starts a fresh retry ladder.
_RESET = (H_ATTEMPT, H_ATTEMPTS_TOTAL, H_DELIVERIES, H_REASON, H_LAST_ERROR, "x-death",
          "x-delivery-count",
          "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
          "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")


@dataclass(frozen=True)
class DeadMessage:
    """One message in a DLQ, as an operator reads it."""

    id: str
    event_type: str
    routing_key: str
    attempts: int
    reason: str
    last_error: str
    first_failure: str | None
    age_seconds: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def describe(message: AbstractIncomingMessage, now: datetime | None = None) -> DeadMessage:
    """Read herald's headers, or the broker's ``x-death`` when the broker dead-lettered it."""
    headers: dict[str, Any] = dict(message.headers or {})
    deaths = headers.get("x-death") or []
    death: dict[str, Any] = dict(deaths[0]) if isinstance(deaths, list) and deaths else {}
    reason = _text(headers.get(H_REASON))
    if not reason:
        broker_reason = _text(headers.get("x-first-death-reason") or death.get("reason"))
        reason = f"broker: {broker_reason or 'unknown'}"
        if broker_reason == "delivery_limit":
            reason += " (the message was delivered too often without an ack: a crashing worker?)"
    attempts = int(headers.get(H_ATTEMPTS_TOTAL) or headers.get("x-delivery-count") or 0)
    first = _text(headers.get(H_FIRST_FAILURE)) or None
    if first is None and isinstance(death.get("time"), datetime):
        first = death["time"].isoformat()
    age = None
    if first:
        try:
            started = datetime.fromisoformat(first)
            if started.tzinfo is None:
                started = started.replace(tzinfo=UTC)
            age = round(((now or datetime.now(UTC)) - started).total_seconds(), 3)
        except ValueError:
            age = None
    return DeadMessage(
        id=message.message_id or "",
        event_type=message.type or "",
        routing_key=_text(headers.get(H_ROUTING_KEY)) or _text(
            (death.get("routing-keys") or [""])[0]),
        attempts=attempts,
        reason=reason,
        last_error=_text(headers.get(H_LAST_ERROR)),
        first_failure=first,
        age_seconds=age,
    )


async def browse(connection: AbstractRobustConnection, names: Names, channel: str,
                 limit: int = 1000) -> list[DeadMessage]:
    """Up to ``limit`` messages from the channel's DLQ, oldest first, without consuming them.

    Messages are fetched unacknowledged and returned to the queue, in order,
    when the browsing channel closes.
    """
    ch = await connection.channel()
    try:
        queue = await ch.get_queue(names.dlq(channel))
        found: list[DeadMessage] = []
        while len(found) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            found.append(describe(message))
        return found
    finally:
        await ch.close()


def of_event(message_id: str, event_id: str) -> bool:
    """True when a DLQ entry belongs to ``event_id``: the whole envelope (id = the event id)
    or one of its units (``<event>:<channel>:<unit>``)."""
    return message_id == event_id or message_id.startswith(f"{event_id}:")


async def replay(connection: AbstractRobustConnection, names: Names, channel: str,
                 ids: set[str] | None = None, events: set[str] | None = None) -> list[str]:
    """Move DLQ messages back to the work queue: all of them, or those whose id is in
    ``ids``, or every entry of the events in ``events`` (see :func:`of_event`).

    Each is published with a broker confirm before it is removed from the DLQ,
    with its retry and crash counts reset. Returns the ids replayed.
    """
    ch = await connection.channel(publisher_confirms=True, on_return_raises=True)
    replayed: list[str] = []
    try:
        dlq = await ch.get_queue(names.dlq(channel))
        work = names.work(channel)
        await ch.get_queue(work)  # fail early, clearly, if the work queue is missing
        while True:
            message = await dlq.get(no_ack=False, fail=False)
            if message is None:
                break
            mid = message.message_id or ""
            wanted = ((ids is None and events is None) or (ids is not None and mid in ids)
                      or (events is not None and any(of_event(mid, e) for e in events)))
            if not wanted:
                continue  # left unacked: back in the DLQ, in order, when we close
            headers = {k: v for k, v in (message.headers or {}).items() if k not in _RESET}
            headers["x-herald-replayed-at"] = datetime.now(UTC).isoformat()
            await ch.default_exchange.publish(
                build_message(message.body, message.message_id or "", message.type or "",
                              headers),
                routing_key=work, mandatory=True, timeout=10)
            await message.ack()
            replayed.append(message.message_id or "")
        return replayed
    finally:
        await ch.close()


async def purge(connection: AbstractRobustConnection, names: Names, channel: str) -> int:
    """Delete every message in the channel's DLQ; return how many there were."""
    ch = await connection.channel()
    try:
        queue = await ch.get_queue(names.dlq(channel))
        result = await queue.purge()
        return int(result.message_count or 0)
    finally:
        await ch.close()


async def connect(url: str) -> AbstractRobustConnection:
    """A connection for the operator tools: each broker of ``url`` tried once, then the
    last one's error raised (an operator command says so at once instead of waiting)."""
    return await amqp_connect(url, name="herald cli", wait=False)
