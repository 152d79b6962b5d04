"""What happens to a failed delivery: another try after a delay, or the DLQ. Pure logic."""

from __future__ import annotations

from dataclasses import dataclass

from herald.errors import Deferred, DeliveryFailure, PermanentError
from herald.settings import Settings


@dataclass(frozen=True)
class Retry:
    """Publish to the retry tier of ``delay`` seconds; ``retries`` counts this retry."""

    delay: float
    retries: int


@dataclass(frozen=True)
class DeadLetter:
    """Park in the channel's DLQ, saying why."""

    reason: str


def plan(
    settings: Settings, retries_done: int, error: DeliveryFailure, waited: float = 0.0
) -> Retry | DeadLetter:
    """Choose the next step after ``error`` on a message already retried ``retries_done`` times.

    Permanent errors skip the ladder. A deferral (rate limit, a delivery
    another worker holds) waits at least its ``retry_after`` without using
    up a retry. Otherwise retry number ``retries_done + 1`` waits
    ``retry_delays[retries_done]`` (the last delay repeats), until
    ``max_retry`` retries are spent. ``waited`` is the time since the first
    failure: deferrals end in the DLQ once it passes ``max_defer``, so a
    provider that says "slow down" forever does not keep a message forever.
    """
    if isinstance(error, PermanentError):
        return DeadLetter(f"permanent: {error.reason}")
    if isinstance(error, Deferred) and waited > settings.max_defer:
        return DeadLetter(f"still deferred after {waited:.0f}s (HERALD_MAX_DEFER): "
                          f"{error.reason}")
    if isinstance(error, Deferred):
        wanted = error.retry_after or settings.retry_delay(1)
        tiers = settings.tier_delays() or [settings.retry_delay(1)]
        delay = next((t for t in tiers if t >= wanted), tiers[-1])
        return Retry(delay, retries_done)
    if retries_done >= settings.max_retry:
        return DeadLetter(f"retries exhausted after {retries_done} retries: {error.reason}")
    return Retry(settings.retry_delay(retries_done + 1), retries_done + 1)
