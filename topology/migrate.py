"""Bringing a broker that runs an older herald topology to this one, losing no message.

What changed: retries used to wait in classic tiers ``<prefix>.<channel>.retry.<delay>``
that expired back into the work queue, behind all the new work there. They
now wait in tiers ``<prefix>.<channel>.delay.<delay>`` that expire into
``<prefix>.<channel>.due``, which the workers consume beside the work queue.

The new objects have new names, so ``declare`` creates them next to the old
ones without touching a single old message, and new retries go only to the
new tiers (new routing keys). An old tier keeps working until it is empty:
what waits in it still expires into the work queue, where a new worker
handles it like any message (old-format envelopes included). ``retire``
unbinds the old tiers (nothing new can arrive), waits until each is empty
(at most its TTL), then deletes it.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import dataclass

from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelClosed

from herald.settings import Settings, default_delays
from topology.spec import CHANNELS, Names


@dataclass
class LegacyTier:
    """An old retry tier found on the broker."""

    queue: str
    routing_key: str
    messages: int
    deleted: bool = False


def _candidates(settings: Settings) -> list[tuple[str, float]]:
    delays = sorted(set(settings.tier_delays()) | set(default_delays()))
    return [(channel, delay) for channel in CHANNELS for delay in delays]


async def find_legacy(connection: AbstractRobustConnection, settings: Settings
                      ) -> list[LegacyTier]:
    """The old tiers that exist under ``settings.prefix`` (with the delays configured now
    or the default ladder's), with how many messages each holds."""
    names = Names(settings.prefix)
    found: list[LegacyTier] = []
    for channel, delay in _candidates(settings):
        name = names.legacy_retry_queue(channel, delay)
        count = await _count(connection, name)
        if count is not None:
            found.append(LegacyTier(name, names.legacy_retry_key(channel, delay), count))
    return found


async def _count(connection: AbstractRobustConnection, name: str) -> int | None:
    """Messages in ``name``; None when there is no such queue (a passive declare on a
    channel of its own: a failed one closes the channel)."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    except ChannelClosed:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


async def retire(connection: AbstractRobustConnection, settings: Settings,
                 wait: float = 0.0, poll: float = 1.0) -> list[LegacyTier]:
    """Unbind every old tier, then delete each one that is (or, within ``wait`` seconds,
    becomes) empty. Returns the tiers found; those still holding messages are kept
    (run it again later: nothing is lost meanwhile, they drain into the work queue).
    """
    names = Names(settings.prefix)
    tiers = await find_legacy(connection, settings)
    channel = await connection.channel()
    try:
        retry = await channel.get_exchange(names.retry)
        for tier in tiers:
            queue = await channel.get_queue(tier.queue, ensure=False)
            await queue.unbind(retry, tier.routing_key)
    finally:
        await channel.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        for tier in tiers:
            if tier.deleted:
                continue
            count = await _count(connection, tier.queue)
            tier.messages = count or 0
            if count == 0:
                tier.deleted = await _delete_if_empty(connection, tier.queue)
            elif count is None:
                tier.deleted = True
        if all(t.deleted for t in tiers) or loop.time() >= deadline:
            return tiers
        await asyncio.sleep(poll)


async def _delete_if_empty(connection: AbstractRobustConnection, name: str) -> bool:
    channel = await connection.channel()
    try:
        await channel.queue_delete(name, if_empty=True)
        return True
    except ChannelClosed:  # a message arrived in between: next round
        return False
    finally:
        with suppress(Exception):
            if not channel.is_closed:
                await channel.close()
