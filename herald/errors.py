"""Every exception herald raises on purpose, under one root.

Translate only at the edges: the API maps these to HTTP statuses, the worker
maps them to ack / retry tier / dead-letter queue.
"""

from __future__ import annotations


class HeraldError(Exception):
    """Raised for any error herald itself signals (the root of this module)."""


class ConfigError(HeraldError):
    """Raised when a setting is missing or invalid; the message names the variable."""


class TopologyError(HeraldError):
    """Raised when the broker's exchanges or queues do not match the topology spec."""


class TopologyMismatch(TopologyError):
    """Raised when an existing queue was declared with other arguments than the spec's."""

    def __init__(self, queue: str, differences: dict[str, tuple[object, object]]) -> None:
        self.queue = queue
        self.differences = differences
        parts = ", ".join(
            f"{arg}: broker has {have!r}, spec wants {want!r}"
            for arg, (have, want) in sorted(differences.items())
        )
        super().__init__(
            f"queue {queue!r} exists with other arguments ({parts}); "
            f"delete it (after draining) or align the settings, then declare again"
        )


class DeliveryFailure(HeraldError):
    """Raised when a notification could not be delivered (base of the control-flow errors)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TransientError(DeliveryFailure):
    """Raised when a delivery failed in a way a later attempt may fix (4xx SMTP, timeouts)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class RecipientError(TransientError):
    """Raised when one address or token is refused for now (SMTP 450/451/452, greylisting).

    Retried on the ladder like any transient failure, but it says nothing
    about the provider's health: it never counts toward a circuit breaker and
    never fails over to the next provider.
    """


class Deferred(TransientError):
    """Raised when a delivery must wait but has not failed: it does not use a retry."""


class RateLimited(Deferred):
    """Raised when a provider says "slow down" (429, SMTP 421/451 rate text)."""


class PermanentError(DeliveryFailure):
    """Raised when retrying cannot help (5xx SMTP, malformed message, unknown template)."""


class ChannelDown(Deferred):
    """Raised when every provider of a channel has its circuit open: the worker pauses."""


class DeliveryInProgress(Deferred):
    """Raised when another worker holds the claim on the same delivery key right now."""


class DeadToken(PermanentError):
    """Raised when a push service says a device token is gone (FCM UNREGISTERED, APNs 410)."""


class DatabaseUnavailable(HeraldError):
    """Raised when the database cannot be reached (connection refused, lost, or shut down).

    Not a delivery failure: the API answers 503 with ``Retry-After`` and the
    workers stop consuming until the database is back, spending no retries.
    """
