"""Cancellation, per-recipient throttling, digests and the critical flag, on the real broker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aio_pika.abc import AbstractRobustConnection

from herald.db import init_db, make_engine, session_factory
from herald.mailsink import MailSink
from herald.models import Cancellation
from herald.settings import Settings
from tests.conftest import eventually, smtp_url
from tests.harness import email_worker
from tests.test_worker import delivery_record, make_envelope, publish


async def cancel(settings: Settings, key: str) -> None:
    """What ``POST /events/cancel`` records."""
    engine = make_engine(settings.database_url)
    try:
        await init_db(engine)
        async with session_factory(engine)() as session:
            session.add(Cancellation(key=key))
            await session.commit()
    finally:
        await engine.dispose()


def ada(**changes: object):  # type: ignore[no-untyped-def]
    return make_envelope().model_copy(update=changes)


async def test_a_cancelled_key_stops_a_delivery_waiting_in_a_retry_tier(
    database_url: str, connection: AbstractRobustConnection,
    make_settings: Callable[..., Settings], smtp: MailSink, topology: Settings,
) -> None:
    # Given an event whose first attempt fails, so it waits 400ms in a retry tier
    settings = make_settings(smtp_url=smtp_url(smtp), retry_delays="400ms")
    smtp.faults.refuse_first = 1
    envelope = ada(cancel_key="order-42:reminder")
    async with email_worker(settings) as worker:
        await publish(connection, settings, envelope)
        await eventually(lambda: worker.stats["retried"] == 1)
        # When the key is cancelled while it waits
        await cancel(settings, "order-42:reminder")
        # Then it comes back, is acked, and nothing is sent
        await eventually(lambda: worker.stats["delivered"] == 1, timeout=10)
    assert smtp.messages == [] and smtp.received == 1
    record = await delivery_record(settings, envelope)
    assert record is not None and record.status == "cancelled"
    assert record.last_error is not None and "order-42:reminder" in record.last_error


async def test_an_event_cancelled_before_it_arrives_is_not_sent(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, topology: Settings,
) -> None:
    settings = make_settings(smtp_url=smtp_url(smtp))
    await cancel(settings, "k1")
    cancelled, other = ada(cancel_key="k1"), make_envelope(user_id="bob", email="b@example.com")
    async with email_worker(settings) as worker:
        await publish(connection, settings, cancelled)
        await publish(connection, settings, other)
        await eventually(lambda: worker.stats["delivered"] == 2)
    assert [m["To"].addresses[0].addr_spec for m in smtp.messages] == ["b@example.com"]


async def test_throttle_suppresses_the_excess_with_a_reason_and_critical_bypasses_it(
    database_url: str, connection: AbstractRobustConnection,
    make_settings: Callable[..., Settings], smtp: MailSink, topology: Settings,
) -> None:
    # Given at most 2 emails per recipient per hour
    settings = make_settings(smtp_url=smtp_url(smtp), recipient_limit="2/h", concurrency=1,
                             prefetch=1)
    events = [ada(id=f"00000000-0000-0000-0000-00000000000{i}") for i in range(3)]
    critical = ada(critical=True)
    async with email_worker(settings) as worker:
        # When four events reach the same person, the last one critical
        for envelope in [*events, critical]:
            await publish(connection, settings, envelope)
        await eventually(lambda: worker.stats["delivered"] == 4)
    # Then two are sent, the third is suppressed with its reason, the critical one is sent
    assert len(smtp.messages) == 3
    third = await delivery_record(settings, events[2])
    assert third is not None and third.status == "suppressed"
    assert third.last_error == ("throttled: 2 email notifications in the last 1h "
                                "(HERALD_RECIPIENT_LIMIT=2/h)")
    assert (await delivery_record(settings, critical)).status == "sent"  # type: ignore[union-attr]


async def test_a_suppressed_delivery_stays_suppressed_when_redelivered(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, topology: Settings,
) -> None:
    settings = make_settings(smtp_url=smtp_url(smtp), recipient_limit="1/h", concurrency=1,
                             prefetch=1)
    first, second = ada(), ada()
    async with email_worker(settings) as worker:
        await publish(connection, settings, first)
        await publish(connection, settings, second)
        await eventually(lambda: worker.stats["delivered"] == 2)
        # the window is still full; a duplicate of the suppressed one arrives
        await publish(connection, settings, second)
        await eventually(lambda: worker.stats["delivered"] == 3)
    assert len(smtp.messages) == 1
    assert (await delivery_record(settings, second)).status == "suppressed"  # type: ignore[union-attr]


async def test_throttled_digest_events_are_held_then_sent_as_one_digest(
    database_url: str, connection: AbstractRobustConnection,
    make_settings: Callable[..., Settings], smtp: MailSink, topology: Settings,
) -> None:
    # Given one email per second per recipient, digests checked every 300ms
    settings = make_settings(smtp_url=smtp_url(smtp), recipient_limit="1/s",
                             digest_interval="300ms", concurrency=1, prefetch=1)
    first = ada()
    held = [ada(digest=True), make_envelope("user.login").model_copy(update={"digest": True})]
    async with email_worker(settings) as worker:
        await publish(connection, settings, first)
        await eventually(lambda: worker.stats["delivered"] == 1)
        for envelope in held:
            await publish(connection, settings, envelope)
        await eventually(lambda: worker.stats["delivered"] == 3)
        # When the window has passed, the next tick sends one digest of both
        async with asyncio.timeout(10):
            await smtp.wait_for(2)

        async def digested() -> bool:
            records = [await delivery_record(settings, e) for e in held]
            return all(r is not None and r.status == "digested" for r in records)

        await eventually(digested)
    assert len(smtp.messages) == 2
    digest = smtp.messages[1]
    assert digest["Subject"] == "2 notifications you missed"
    body = digest.get_body(("plain",)).get_content()
    assert "Welcome to herald, Ada" in body and "New sign-in to your account" in body
    for envelope in held:
        record = await delivery_record(settings, envelope)
        assert record is not None and (record.status, record.provider) == ("digested", "smtp")
