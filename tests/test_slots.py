"""In flight = rate x latency: a slow provider still runs at its cap."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aio_pika.abc import AbstractRobustConnection

from consumers.slots import Slots, wanted_inflight
from herald.mailsink import MailSink
from herald.settings import Settings
from tests.conftest import eventually, smtp_url
from tests.harness import email_worker
from tests.test_worker import make_envelope, publish


@pytest.mark.parametrize(("rate", "latency", "expected"), [
    (None, 2.0, 10),      # no cap: the configured concurrency
    (25.0, None, 10),     # no answer seen yet
    (25.0, 2.0, 64),      # the design notes' provider: 25/s, 2 s an email → 50 (+25%, +1)
    (25.0, 0.01, 10),     # a fast provider needs no more than the floor
    (1000.0, 5.0, 200),   # bounded by HERALD_MAX_CONCURRENCY
])
def test_wanted_inflight(rate: float | None, latency: float | None, expected: int) -> None:
    assert wanted_inflight(rate, latency, floor=10, ceiling=200) == expected


async def test_slots_grow_and_shrink_while_in_use() -> None:
    slots = Slots(1)
    inside = 0
    most = 0
    release = asyncio.Event()

    async def work() -> None:
        nonlocal inside, most
        async with slots:
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(work()) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert inside == 1
    await slots.resize(3)
    await asyncio.sleep(0.05)
    assert inside == 3
    await slots.resize(2)  # holders keep their slot; newcomers wait for the smaller size
    release.set()
    await asyncio.gather(*tasks)
    assert most == 3 and slots.used == 0


async def test_a_slow_provider_gets_enough_messages_in_flight_to_reach_its_cap(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, topology: Settings,
) -> None:
    # Given a provider capped at 20/s that takes 1 s per email, and concurrency 2
    settings = make_settings(smtp_url=smtp_url(smtp), email_rate_limit="20/s",
                             concurrency=2, prefetch=2)
    smtp.faults.hang_first, smtp.faults.hang_seconds = 100_000, 1.0
    async with email_worker(settings) as worker:
        for n in range(60):
            await publish(connection, settings,
                          make_envelope(user_id=f"u-{n}", email=f"u{n}@example.com"))
        # Then, once it has seen the provider's answers, it keeps ~rate x latency in flight
        await eventually(lambda: worker._slots.size >= 20, timeout=30)
        async with asyncio.timeout(60):
            await smtp.wait_for(60)
    assert worker._slots.size <= settings.max_concurrency
