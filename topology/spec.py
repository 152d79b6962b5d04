"""The declarative topology: every exchange, queue, binding and argument herald uses.

One source of names (like dramatiq's ``dq_name``/``xq_name``): producers and
consumers ask this module for names and never spell them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from herald.settings import Settings, format_duration

CHANNELS: tuple[str, ...] = ("email", "in_app", "push", "sms")

#: routing key → channels it reaches (the seed's table, ARCHITECTURE.md).
#: SMS on login is opt-in per user; the queue gets the event, the decision
#: engine says no unless the user asked for it.
ROUTES: dict[str, tuple[str, ...]] = {
    "user.signup": ("email",),
    "user.login": ("email", "in_app", "sms"),
    "user.post": ("in_app", "push"),
    "user.send_req": ("push",),
}
EVENT_TYPES: tuple[str, ...] = tuple(ROUTES)

#: Header names the worker writes; the DLQ tools read them.
H_ATTEMPT = "x-herald-retries"
H_LAST_ERROR = "x-herald-last-error"
H_FIRST_FAILURE = "x-herald-first-failure"
H_ROUTING_KEY = "x-herald-routing-key"
H_REASON = "x-herald-reason"
H_ATTEMPTS_TOTAL = "x-herald-attempts"
#: Deliveries of this message (and of the copies it was deferred through) that ended
#: without an outcome: the worker died or was stopped mid-way. Counted against
#: ``HERALD_DELIVERY_LIMIT`` together with the broker's own ``x-delivery-count``.
H_DELIVERIES = "x-herald-deliveries"
#: The one unit a message is about: a recipient's user id (push: ``<user_id>/<device_id>``).
#: Absent on envelopes as producers publish them; the worker splits those.
H_UNIT = "x-herald-unit"


@dataclass(frozen=True)
class ExchangeSpec:
    """An exchange to declare."""

    name: str
    type: str  # "topic" | "direct"


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue and the arguments it must have."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BindingSpec:
    """``queue`` receives from ``exchange`` what is published with ``routing_key``."""

    exchange: str
    queue: str
    routing_key: str


class Names:
    """Every name under one prefix. ``Names("herald").work("email")`` → ``herald.email``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @property
    def events(self) -> str:
        """The topic exchange producers publish to."""
        return f"{self.prefix}.events"

    @property
    def retry(self) -> str:
        """The direct exchange of the retry tiers."""
        return f"{self.prefix}.retry"

    @property
    def live(self) -> str:
        """The topic exchange of live updates: inbox items to API processes, cache invalidations
        to workers. Transient traffic: only exclusive, auto-delete queues bind to it."""
        return f"{self.prefix}.live"

    @property
    def dlx(self) -> str:
        """The direct exchange of the dead-letter queues."""
        return f"{self.prefix}.dlx"

    def work(self, channel: str) -> str:
        """The channel's work queue."""
        return f"{self.prefix}.{channel}"

    def retry_queue(self, channel: str, delay: float) -> str:
        """The channel's delay tier that holds messages for ``delay`` seconds, then hands
        them to :meth:`due`."""
        return f"{self.prefix}.{channel}.delay.{format_duration(delay)}"

    def retry_key(self, channel: str, delay: float) -> str:
        """Routing key on the retry exchange for that tier."""
        return f"{channel}.delay.{format_duration(delay)}"

    def due(self, channel: str) -> str:
        """Where messages come back from the delay tiers: consumed beside the work queue
        with room of its own, so a retry never waits behind new work."""
        return f"{self.prefix}.{channel}.due"

    def legacy_retry_queue(self, channel: str, delay: float) -> str:
        """A tier of herald before the due queues (``<channel>.retry.<delay>``, classic,
        back into the work queue); ``herald topology migrate`` retires them."""
        return f"{self.prefix}.{channel}.retry.{format_duration(delay)}"

    def legacy_retry_key(self, channel: str, delay: float) -> str:
        """The routing key that fed a legacy tier."""
        return f"{channel}.{format_duration(delay)}"

    def dlq(self, channel: str) -> str:
        """The channel's dead-letter queue."""
        return f"{self.prefix}.{channel}.dlq"


@dataclass(frozen=True)
class Topology:
    """All objects for one prefix, in declaration order."""

    names: Names
    exchanges: list[ExchangeSpec]
    queues: list[QueueSpec]
    bindings: list[BindingSpec]


def channels_for(routing_key: str) -> tuple[str, ...]:
    """Channels that a routing key reaches (empty when unknown)."""
    return ROUTES.get(routing_key, ())


def build(settings: Settings) -> Topology:
    """The full topology for ``settings`` (prefix, retry delays, delivery limit)."""
    n = Names(settings.prefix)
    exchanges = [
        ExchangeSpec(n.events, "topic"),
        ExchangeSpec(n.retry, "direct"),
        ExchangeSpec(n.dlx, "direct"),
        ExchangeSpec(n.live, "topic"),
    ]
    queues: list[QueueSpec] = []
    bindings: list[BindingSpec] = []
    for channel in CHANNELS:
        # Quorum work queue: a message that keeps killing its worker is
        # dead-lettered after delivery_limit deliveries instead of looping;
        # at-least-once dead-lettering needs reject-publish overflow. The due
        # queue, where retries come back, is the same kind of queue.
        for name in (n.work(channel), n.due(channel)):
            queues.append(QueueSpec(name, {
                "x-queue-type": "quorum",
                "x-delivery-limit": settings.delivery_limit,
                "x-dead-letter-exchange": n.dlx,
                "x-dead-letter-routing-key": channel,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }))
        # Classic, not quorum: the DLQ tools browse by fetching and returning
        # messages, which a quorum queue counts against its delivery limit
        # (RabbitMQ 4 sets one by default) and would eventually drop.
        queues.append(QueueSpec(n.dlq(channel), {"x-queue-type": "classic"}))
        bindings.append(BindingSpec(n.dlx, n.dlq(channel), channel))
        for key, targets in ROUTES.items():
            if channel in targets:
                bindings.append(BindingSpec(n.events, n.work(channel), key))
        for delay in settings.tier_delays():
            # Classic queue with one fixed TTL: classic queues expire only at the
            # head, so mixing TTLs in one queue would stall short ones. Classic,
            # not quorum: a quorum queue is a Raft cluster of its own, and with ten
            # tiers per channel that is forty of them per environment (the test
            # suite's broker stalled under that). Expired messages go through the
            # default exchange straight to this channel's due queue, never through
            # the topic exchange (which would fan the event out to every channel
            # again) and never behind new work in the work queue.
            queues.append(QueueSpec(n.retry_queue(channel, delay), {
                "x-queue-type": "classic",
                "x-message-ttl": round(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": n.due(channel),
            }))
            bindings.append(BindingSpec(n.retry, n.retry_queue(channel, delay),
                                        n.retry_key(channel, delay)))
    return Topology(n, exchanges, queues, bindings)
