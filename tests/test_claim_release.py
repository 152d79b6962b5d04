"""Shutdown and claims: a send that never reached the provider gives its claim back at once.

A worker stopped (SIGTERM) while a send waits for its rate-limit slot has
handed nothing over: the delivery must be claimable by the next worker right
away, not after the lease. A send already handed over (the SMTP server has
the message, and has not answered) keeps its claim: only the lease may end it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aio_pika.abc import AbstractRobustConnection

from herald.mailsink import MailSink
from herald.models import Delivery
from herald.settings import Settings
from tests.conftest import eventually, smtp_url
from tests.harness import email_worker, rows
from tests.test_worker import make_envelope, publish


async def _by_recipient(settings: Settings) -> dict[str, Delivery]:
    return {d.recipient: d for d in await rows(settings, Delivery)}


async def test_a_send_waiting_for_its_rate_slot_releases_its_claim_on_shutdown(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, topology: Settings,
) -> None:
    # Given a provider capped at one email a minute and two signups
    settings = make_settings(smtp_url=smtp_url(smtp), email_rate_limit="1/min",
                             shutdown_timeout="1s")
    first, second = (make_envelope(user_id=f"u-{n}", email=f"u{n}@example.com")
                     for n in (1, 2))
    async with email_worker(settings) as worker:
        await publish(connection, settings, first)
        async with asyncio.timeout(10):
            await smtp.wait_for(1)
        await publish(connection, settings, second)
        # the second waits for its slot, claimed
        await eventually(lambda: worker.stats.get("delivered") == 1, timeout=5)

        async def second_claimed() -> bool:
            row = (await _by_recipient(settings)).get("u-2")
            return row is not None and row.status == "sending"

        await eventually(second_claimed, timeout=10)
    # When the worker was stopped meanwhile: the second's claim is released, not held
    row = (await _by_recipient(settings))["u-2"]
    assert row.status == "failed" and row.claimed_until is None
    assert row.last_error is not None and "before it reached the provider" in row.last_error
    assert smtp.received == 1


async def test_a_send_handed_over_keeps_its_claim_on_shutdown(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, topology: Settings,
) -> None:
    # Given an SMTP server that takes the message and never answers
    settings = make_settings(smtp_url=smtp_url(smtp), shutdown_timeout="1s",
                             smtp_timeout="30s")
    smtp.faults.hang_first = 1
    envelope = make_envelope()
    async with email_worker(settings):
        await publish(connection, settings, envelope)
        await eventually(lambda: smtp.received == 1, timeout=10)
    # When the worker is stopped mid-DATA: the provider may have it, so the claim stays
    row = (await _by_recipient(settings))["u-ada"]
    assert row.status == "sending" and row.claimed_until is not None
