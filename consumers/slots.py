"""In-flight work sized to the provider: rate * latency, so a slow provider still runs at its cap.

With a fixed concurrency of 10 and a provider that takes 2 s per email, a
worker sends at most 5 emails a second however high the provider's cap
(25/s in the design notes). Little's law gives what is needed: in flight =
rate * latency. The provider chain measures the latency (from handing a
message over to the provider's answer, rate-limit waits excluded), the
channel knows the cap, and the worker resizes its slots and its prefetch to
fit, between ``HERALD_CONCURRENCY`` and ``HERALD_MAX_CONCURRENCY``.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

#: Head room over rate * latency: latency varies, and a slot freed a moment late
#: should not leave the cap unused.
HEADROOM = 1.25


def wanted_inflight(rate_per_second: float | None, latency: float | None, floor: int,
                    ceiling: int) -> int:
    """How many messages to handle at once: ``rate * latency`` with head room, within
    ``floor``…``ceiling``; ``floor`` while either figure is unknown (no cap, no sample)."""
    if not rate_per_second or latency is None or latency <= 0:
        return floor
    return max(floor, min(ceiling, math.ceil(rate_per_second * latency * HEADROOM) + 1))


class Slots:
    """A semaphore whose size can change while it is in use (``async with slots:``).

    Shrinking never interrupts work in hand: holders finish, and new ones wait
    until fewer than the new size are in use.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used < self.size)
            self.used += 1

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        async with self._changed:
            self.used -= 1
            self._changed.notify()

    async def resize(self, size: int) -> None:
        """Allow ``size`` holders from now on."""
        async with self._changed:
            self.size = size
            self._changed.notify_all()
