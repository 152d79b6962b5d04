"""Provider rate caps: one token bucket per provider, shared through Redis if configured.

Built on ``throttled-py``'s GCRA limiter (a token bucket with a burst of 1):
grants are spaced evenly, one every ``period / limit`` seconds, so no
one-second window holds more than the cap and sends do not bunch up at the
start of a window (a moving window lets all 25 go at once; provider-side
jitter then pushes some into the next second). Without ``HERALD_REDIS_URL``
the bucket lives in process memory and each worker process has its own; with
it every process on every machine shares one bucket per provider (Redis's
clock decides, so machine clocks need not agree).
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any, Protocol

from redis.asyncio import Redis
from throttled.asyncio import MemoryStore, RateLimiterType, RedisStore, Throttled, per_duration

from herald.settings import Rate

_MAX_SLEEP = 1.0  # re-check at least this often, so a pause or a freed slot is seen


class RateLimiter(Protocol):
    """Waits until the provider may take one more message."""

    def per_second(self, provider: str) -> float | None:
        """``provider``'s cap in messages per second (None: not capped here)."""

    async def acquire(self, provider: str) -> None:
        """Return once a slot is taken for ``provider`` (may wait)."""

    async def pause(self, provider: str, seconds: float) -> None:
        """Hold every sender of ``provider`` back for ``seconds`` (a 429 / Retry-After)."""

    async def aclose(self) -> None:
        """Release connections."""


class TokenBucketLimiter:
    """``RateLimiter`` with one even-paced bucket per provider (memory, or Redis)."""

    def __init__(self, rates: dict[str, Rate], namespace: str, redis_url: str | None = None):
        self._store = RedisStore(server=redis_url) if redis_url else MemoryStore()
        store = self._store
        self._buckets = {
            name: Throttled(
                using=RateLimiterType.GCRA.value,
                quota=per_duration(timedelta(seconds=rate.period), rate.limit, burst=1),
                store=store,
                key_prefix="herald",
            )
            for name, rate in rates.items()
        }
        self._rates = dict(rates)
        self._namespace = namespace
        self._paused_until: dict[str, float] = {}
        # The provider-wide pause after a 429 is shared the same way as the bucket.
        self._redis: Redis | None = Redis.from_url(redis_url) if redis_url else None

    def _key(self, provider: str) -> str:
        # throttled-py files the bucket under "herald:v1:gcra:" + this key;
        # the 429 pause lives at "herald:<prefix>:rate:<provider>:pause".
        return f"{self._namespace}:rate:{provider}"

    def _pause_key(self, provider: str) -> str:
        return f"herald:{self._namespace}:rate:{provider}:pause"

    async def _held_for(self, provider: str) -> float:
        if self._redis is not None:
            ms = int(await self._redis.pttl(self._pause_key(provider)))
            return max(ms, 0) / 1000
        return self._paused_until.get(provider, 0.0) - time.monotonic()

    def per_second(self, provider: str) -> float | None:
        """``provider``'s cap in messages per second (None: not capped here)."""
        rate = self._rates.get(provider)
        return rate.limit / rate.period if rate is not None else None

    async def acquire(self, provider: str) -> None:
        """Take the next slot in ``provider``'s bucket; sleeps until it is due."""
        bucket = self._buckets.get(provider)
        while True:
            hold = await self._held_for(provider)
            if hold > 0:
                await asyncio.sleep(min(hold, _MAX_SLEEP))
                continue
            if bucket is None:
                return
            result = await bucket.limit(self._key(provider))
            if not result.limited:
                return
            await asyncio.sleep(min(max(result.state.retry_after, 0.001), _MAX_SLEEP))

    async def pause(self, provider: str, seconds: float) -> None:
        """Hold every sender of ``provider`` (all processes, with Redis) back for ``seconds``."""
        if seconds <= 0:
            return
        if self._redis is not None:
            await self._redis.set(self._pause_key(provider), "1",
                                  px=max(int(seconds * 1000), 1))
            return
        until = time.monotonic() + seconds
        self._paused_until[provider] = max(self._paused_until.get(provider, 0.0), until)

    async def aclose(self) -> None:
        """Close the Redis connections, if any."""
        if self._redis is not None:
            await self._redis.aclose()
        if isinstance(self._store, RedisStore):
            # throttled-py has no close(); its client is the one get_client() made,
            # on a pool it passed in (so the client's own aclose leaves it open).
            client: Any = self._store._backend.get_client()
            await client.aclose()
            await client.connection_pool.disconnect()
