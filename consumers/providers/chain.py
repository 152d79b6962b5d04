"""A channel's providers in order, each behind its own circuit breaker (purgatory).

``send`` tries the providers in turn: a provider-level transient failure
(connection, timeout, 5xx, auth), a rate-limit answer or an open circuit
moves on to the next one; a permanent failure (the message itself is bad) or
a recipient-level one (``RecipientError``: this address is greylisted, that
mailbox is full) stops at once, since the next provider would get the same
answer about that address. When every provider's circuit is open the channel
is down: ``ChannelDown`` (a deferral, so no retry is spent) and
``unavailable_for`` tell the worker to stop consuming until a breaker's
cooldown ends and a probe may go out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Generic, TypeVar

from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from consumers.providers.base import Provider
from consumers.ratelimit import RateLimiter
from consumers.slots import wanted_inflight
from herald.errors import (
    ChannelDown,
    Deferred,
    DeliveryFailure,
    PermanentError,
    RateLimited,
    RecipientError,
    TransientError,
)
from herald.metrics import SEND_SECONDS

log = logging.getLogger("herald.providers")
M = TypeVar("M")


class ProviderChain(Generic[M]):
    """Sends through the first provider that takes the message.

    Breakers count provider-level transient failures only (a rate limit, a bad
    message or one recipient's temporary refusal says nothing about the
    provider's health, and counts as an answer from a working provider);
    ``threshold`` in a row opens one for ``cooldown`` seconds, after which the
    next send is its probe.
    """

    def __init__(self, channel: str, providers: list[Provider[M]], limiter: RateLimiter,
                 threshold: int = 5, cooldown: float = 30.0) -> None:
        if not providers:
            raise ValueError("a provider chain needs at least one provider")
        self.channel = channel
        self.providers = providers
        self.limiter = limiter
        self.cooldown = cooldown
        #: The first provider's answer time (handed over → accepted), smoothed; None
        #: before the first send.
        self.latency: float | None = None
        self._breakers = AsyncCircuitBreakerFactory(
            default_threshold=threshold, default_ttl=cooldown,
            exclude=[PermanentError, Deferred, RecipientError])

    @property
    def names(self) -> list[str]:
        """Provider names in the order they are tried."""
        return [p.name for p in self.providers]

    async def send(self, message: M, handover: asyncio.Event | None = None) -> str:
        """Deliver ``message``; return the name of the provider that accepted it.

        ``handover`` is set once a provider is about to be handed the message
        (its rate-limit slot taken: the next bytes go to the provider); until
        then a cancelled send certainly reached nobody.

        Raises ``PermanentError`` and ``RecipientError`` at once (no failover);
        otherwise the last provider's error, or ``ChannelDown`` when every
        circuit is open.
        """
        failures: list[DeliveryFailure] = []
        for provider in self.providers:
            breaker = await self._breakers.get_breaker(provider.name)

            handed_at: list[float] = []

            async def gate(name: str = provider.name, handed_at: list[float] = handed_at
                           ) -> None:
                await self.limiter.acquire(name)
                handed_at.append(time.monotonic())
                if handover is not None:
                    handover.set()

            try:
                async with breaker:
                    with SEND_SECONDS.labels(self.channel, provider.name).time():
                        await provider.send(message, gate)
                if handed_at and provider is self.providers[0]:
                    self._observe(time.monotonic() - handed_at[0])
                return provider.name
            except OpenedState:
                continue
            except RecipientError:
                raise  # about this address, not the provider: another would refuse it too
            except RateLimited as exc:
                await self.limiter.pause(provider.name, exc.retry_after or 1.0)
                failures.append(exc)
            except TransientError as exc:
                failures.append(exc)
                if len(self.providers) > 1:
                    log.warning("%s failed (%s); trying the next provider", provider.name,
                                exc.reason)
        wait = await self.unavailable_for()
        if wait > 0:
            reasons = "; ".join(f.reason for f in failures) or "all circuits open"
            raise ChannelDown(f"every {self.channel} provider is down ({reasons})",
                              retry_after=wait)
        if not failures:  # a breaker half-opened between the loop and the check
            raise TransientError(f"no {self.channel} provider took the message")
        # a rate limit only if every provider said so; otherwise a real failure
        real = [f for f in failures if not isinstance(f, RateLimited)]
        raise real[-1] if real else failures[-1]

    def _observe(self, seconds: float) -> None:
        # An exponentially weighted mean: follows a provider that slows down within a
        # few dozen messages without jumping at one slow answer.
        self.latency = seconds if self.latency is None else 0.9 * self.latency + 0.1 * seconds

    def wanted_inflight(self, floor: int, ceiling: int) -> int:
        """Messages to have in flight to keep the first provider at its cap (see
        :mod:`consumers.slots`)."""
        return wanted_inflight(self.limiter.per_second(self.providers[0].name), self.latency,
                               floor, ceiling)

    async def unavailable_for(self) -> float:
        """0 when some provider may be tried now; else seconds until the first cooldown ends."""
        now = time.time()
        waits: list[float] = []
        for provider in self.providers:
            context = (await self._breakers.get_breaker(provider.name)).context
            if context.state != "opened" or context.opened_at is None:
                return 0.0
            waits.append(context.opened_at + context.ttl - now)
        return max(min(waits), 0.0)

    async def aclose(self) -> None:
        """Close every provider that holds connections (HTTP pools), and the limiter."""
        await self.limiter.aclose()
        for provider in self.providers:
            close = getattr(provider, "aclose", None)
            if close is not None:
                await close()

    async def states(self) -> dict[str, str]:
        """Each provider's breaker state: closed, opened or half-opened."""
        return {p.name: (await self._breakers.get_breaker(p.name)).context.state
                for p in self.providers}
