"""Provider rate caps: a moving-window limit per provider, shared through Redis if configured.

Built on the ``limits`` library (moving window, so no one-second window ever
holds more than the cap). Without ``HERALD_REDIS_URL`` the window lives in
process memory and each worker process has its own: run one worker process
per provider cap, or set Redis.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from limits import (
    RateLimitItem,
    RateLimitItemPerHour,
    RateLimitItemPerMinute,
    RateLimitItemPerSecond,
)
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from herald.settings import Rate


class RateLimiter(Protocol):
    """Waits until the provider may take one more message."""

    async def acquire(self, provider: str) -> None:
        """Return once a slot is taken for ``provider`` (may wait)."""

    async def pause(self, provider: str, seconds: float) -> None:
        """Hold every sender of ``provider`` back for ``seconds`` (a 429 / Retry-After)."""


def _item(rate: Rate) -> RateLimitItem:
    for cls, size in ((RateLimitItemPerHour, 3600), (RateLimitItemPerMinute, 60),
                      (RateLimitItemPerSecond, 1)):
        if rate.period % size == 0:
            return cls(rate.limit, int(rate.period // size))
    raise ValueError(f"unsupported rate period {rate.period}s")


class WindowRateLimiter:
    """``RateLimiter`` over ``limits``' moving window (memory, or Redis when a URL is given)."""

    def __init__(self, rates: dict[str, Rate], namespace: str, redis_url: str | None = None):
        self._items = {name: _item(rate) for name, rate in rates.items()}
        self._namespace = namespace
        self.storage: Storage
        if redis_url:
            scheme, _, rest = redis_url.partition("://")
            self.storage = RedisStorage(f"async+{scheme}://{rest}", implementation="coredis")
        else:
            self.storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self.storage)
        self._paused_until: dict[str, float] = {}

    async def acquire(self, provider: str) -> None:
        """Take a slot in ``provider``'s window; sleeps until one frees up."""
        item = self._items.get(provider)
        while True:
            hold = self._paused_until.get(provider, 0.0) - time.monotonic()
            if hold > 0:
                await asyncio.sleep(hold)
                continue
            if item is None or await self._limiter.hit(item, self._namespace, provider):
                return
            stats = await self._limiter.get_window_stats(item, self._namespace, provider)
            await asyncio.sleep(max(stats.reset_time - time.time(), 0.005))

    async def pause(self, provider: str, seconds: float) -> None:
        """Hold this process's senders of ``provider`` back for ``seconds``."""
        until = time.monotonic() + seconds
        self._paused_until[provider] = max(self._paused_until.get(provider, 0.0), until)
