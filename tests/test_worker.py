"""The email worker on the real broker: routing, retry ladder, DLQ, idempotency, rate limits.

Messages are injected the way the relay publishes them (an envelope to the
events exchange, routed by its type), or as raw bytes straight into the work
queue when they are meant to be malformed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import DeliveryError, PublishError

from consumers.deliveries import Claim, DeliveryStore
from herald.db import init_db, make_engine
from herald.mailsink import MailSink
from herald.models import Delivery
from herald.settings import Settings
from tests.conftest import delete_topology, eventually, smtp_url
from tests.harness import email_worker
from topology.declare import declare
from topology.dlq import DeadMessage, browse
from topology.envelope import Actor, Envelope, Recipient
from topology.messages import build_message
from topology.spec import CHANNELS, Names, build

Declare = Callable[[Settings], Awaitable[Settings]]


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture
async def declared(connection: AbstractRobustConnection) -> AsyncIterator[Declare]:
    """Declare the topology of some settings now; delete it (all its tiers) after the test."""
    done: list[Settings] = []

    async def _declare(settings: Settings) -> Settings:
        await declare(connection, build(settings))
        done.append(settings)
        return settings

    yield _declare
    for settings in done:
        await delete_topology(connection, settings)


def make_envelope(event_type: str = "user.signup", email: str = "ada@example.com",
                  user_id: str = "u-ada") -> Envelope:
    return Envelope(
        type=event_type,
        actor=Actor(id=user_id, name="Ada"),
        recipients=[Recipient(user_id=user_id, email=email, name="Ada")],
        data={"name": "Ada"},
    )


async def publish(connection: AbstractRobustConnection, settings: Settings,
                  envelope: Envelope, routing_key: str | None = None) -> None:
    """Publish like the relay: to the events exchange, confirmed and mandatory."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        exchange = await channel.get_exchange(Names(settings.prefix).events)
        await exchange.publish(
            build_message(envelope.to_json(), envelope.id, envelope.type),
            routing_key=routing_key or envelope.type, mandatory=True, timeout=10)
    finally:
        await channel.close()


async def publish_raw(connection: AbstractRobustConnection, settings: Settings, body: bytes,
                      message_id: str, channel_name: str = "email") -> None:
    """Put ``body`` as it is straight into a work queue (for malformed messages)."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        await channel.default_exchange.publish(
            build_message(body, message_id, "user.signup"),
            routing_key=Names(settings.prefix).work(channel_name), mandatory=True, timeout=10)
    finally:
        await channel.close()


async def depth(connection: AbstractRobustConnection, queue: str) -> int:
    """Messages ready in ``queue`` (passive declare)."""
    channel = await connection.channel()
    try:
        found = await channel.declare_queue(queue, passive=True)
        return int(found.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def dead_letters(connection: AbstractRobustConnection, settings: Settings,
                       count: int, timeout: float = 15) -> list[DeadMessage]:
    """Wait until the email DLQ holds ``count`` messages; return them (not consumed)."""
    names = Names(settings.prefix)

    async def enough() -> list[DeadMessage] | None:
        found = await browse(connection, names, "email")
        return found if len(found) >= count else None

    found: list[DeadMessage] = await eventually(enough, timeout=timeout, interval=0.1)
    return found


async def delivery_record(settings: Settings, envelope: Envelope) -> Delivery | None:
    engine = make_engine(settings.database_url)
    try:
        await init_db(engine)
        store = DeliveryStore(engine, lease=10)
        return await store.get(envelope.id, "email", envelope.recipients[0].user_id)
    finally:
        await engine.dispose()


# --- routing ---------------------------------------------------------------------------

# The seed's table (ARCHITECTURE.md), spelled out again on purpose: a change to
# topology.spec.ROUTES must be a deliberate change to this test too.
EXPECTED_ROUTES = {
    "user.signup": {"email"},
    "user.login": {"email", "in_app", "sms"},
    "user.post": {"in_app", "push"},
    "user.send_req": {"push"},
}


@pytest.mark.parametrize("routing_key", sorted(EXPECTED_ROUTES))
async def test_routing_table(connection: AbstractRobustConnection, topology: Settings,
                             routing_key: str) -> None:
    # Given the topology and no worker
    names = Names(topology.prefix)
    # When one event is published
    await publish(connection, topology, make_envelope(routing_key))
    # Then exactly the channels of the table hold one copy each
    expected = {c: int(c in EXPECTED_ROUTES[routing_key]) for c in CHANNELS}

    async def depths() -> dict[str, int]:
        return {c: await depth(connection, names.work(c)) for c in CHANNELS}

    async def settled() -> bool:
        return await depths() == expected

    await eventually(settled, timeout=5)
    assert await depths() == expected


async def test_unroutable_event_is_refused_by_the_broker(
    connection: AbstractRobustConnection, topology: Settings
) -> None:
    with pytest.raises((PublishError, DeliveryError)):
        await publish(connection, topology, make_envelope(), routing_key="user.unknown")


# --- retry ladder ----------------------------------------------------------------------


async def test_transient_refusals_retry_with_the_configured_spacing(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, declared: Declare,
) -> None:
    # Given a worker retrying after 300ms then 600ms, and an SMTP server that
    # answers 451 to the first two messages
    settings = await declared(make_settings(
        smtp_url=smtp_url(smtp), retry_delays="300ms,600ms", max_retry=3))
    smtp.faults.refuse_first = 2
    envelope = make_envelope()
    async with email_worker(settings) as worker:
        # When one signup event arrives
        await publish(connection, settings, envelope)
        # Then the third attempt delivers it
        async with asyncio.timeout(15):
            messages = await smtp.wait_for(1)
        await eventually(lambda: worker.stats["delivered"] == 1)
    assert len(messages) == 1
    assert smtp.received == 3 and smtp.refused == 2
    assert worker.stats == {"delivered": 1, "retried": 2, "deferred": 0, "dead_lettered": 0}
    # And the attempts were spaced by the retry delays (broker TTL, never early)
    first, second, third = smtp.attempted_at
    for gap, delay in ((second - first, 0.3), (third - second, 0.6)):
        assert delay <= gap < delay + 1.0, (gap, delay)
    record = await delivery_record(settings, envelope)
    assert record is not None
    assert (record.status, record.attempts) == ("sent", 3)
    assert await browse(connection, Names(settings.prefix), "email") == []


async def test_refused_forever_goes_to_the_dlq_after_max_retry(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, declared: Declare,
) -> None:
    # Given an SMTP server that answers 451 to everything, and max_retry=3
    settings = await declared(make_settings(smtp_url=smtp_url(smtp), max_retry=3,
                                            retry_delays="100ms,200ms"))
    smtp.faults.refuse_always = "451 4.3.0 Mailbox temporarily unavailable"
    envelope = make_envelope()
    started = datetime.now(UTC)
    async with email_worker(settings) as worker:
        # When a signup event arrives
        await publish(connection, settings, envelope)
        # Then it lands in the DLQ …
        [dead] = await dead_letters(connection, settings, 1)
        seen_dead_at = datetime.now(UTC)
        settled_received = smtp.received
        await asyncio.sleep(0.5)  # longer than any tier: no attempt is still on its way
    # … after the first attempt and exactly max_retry retries
    assert settled_received == smtp.received == settings.max_retry + 1
    assert worker.stats == {"delivered": 0, "retried": 3, "deferred": 0, "dead_lettered": 1}
    # And the DLQ entry tells the operator what happened
    assert dead.id == envelope.id
    assert dead.event_type == "user.signup"
    assert dead.routing_key == "user.signup"
    assert dead.attempts == settings.max_retry + 1
    assert dead.reason.startswith("retries exhausted after 3 retries")
    assert "451" in dead.last_error and "Mailbox temporarily unavailable" in dead.last_error
    assert dead.first_failure is not None
    first_failure = datetime.fromisoformat(dead.first_failure)
    # the first failure, not the last: the three retries waited 100+200+200ms in between
    ladder = sum(settings.retry_delay(n) for n in range(1, settings.max_retry + 1))
    assert started - timedelta(seconds=1) <= first_failure
    assert first_failure <= seen_dead_at - timedelta(seconds=ladder)
    # And nothing is left behind in the work queue or the tiers
    names = Names(settings.prefix)
    for delay in settings.tier_delays():
        assert await depth(connection, names.retry_queue("email", delay)) == 0
    assert await depth(connection, names.work("email")) == 0
    record = await delivery_record(settings, envelope)
    assert record is not None
    # the delivery record says why the user was not notified
    assert (record.status, record.attempts) == ("dead", 4)
    assert record.last_error is not None and "451" in record.last_error
    assert record.last_error.startswith("retries exhausted")


async def test_permanent_refusal_goes_to_the_dlq_after_one_attempt(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, topology: Settings,
) -> None:
    settings = make_settings(smtp_url=smtp_url(smtp))
    smtp.faults.refuse_always = "550 5.1.1 No such user here"
    envelope = make_envelope()
    async with email_worker(settings) as worker:
        await publish(connection, settings, envelope)
        [dead] = await dead_letters(connection, settings, 1)
        await asyncio.sleep(0.6)  # longer than every retry tier
    assert smtp.received == 1
    assert worker.stats == {"delivered": 0, "retried": 0, "deferred": 0, "dead_lettered": 1}
    assert dead.id == envelope.id
    assert dead.reason.startswith("permanent")
    assert "550" in dead.reason and "No such user here" in dead.last_error
    assert dead.attempts == 1
    assert dead.routing_key == "user.signup"


# --- malformed messages ----------------------------------------------------------------


def _valid_json(**changes: Any) -> bytes:
    body: dict[str, Any] = json.loads(make_envelope().to_json())
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b"this is not JSON {", ["json"]),
        (b"", ["json"]),
        (b'{"type": "user.signup"}', ["actor", "recipients"]),
        (_valid_json(type="user.unknown"), ["type", "user.unknown"]),
        (_valid_json(recipients=[{"user_id": "u1", "email": "not-an-address"}]),
         ["recipients.0.email"]),
        (_valid_json(version=2), ["version"]),
    ],
    ids=["not-json", "empty", "missing-fields", "unknown-type", "bad-email", "version"],
)
async def test_malformed_message_is_dead_lettered_and_the_worker_carries_on(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, topology: Settings, body: bytes, mentions: list[str],
) -> None:
    settings = make_settings(smtp_url=smtp_url(smtp))
    good = make_envelope()
    async with email_worker(settings) as worker:
        # Given a malformed message, followed by a valid one
        await publish_raw(connection, settings, body, message_id="bad-1")
        await publish(connection, settings, good)
        # Then the valid one is delivered …
        async with asyncio.timeout(10):
            await smtp.wait_for(1)
        # … and the malformed one waits in the DLQ, saying why
        [dead] = await dead_letters(connection, settings, 1)
        await eventually(lambda: worker.stats["delivered"] == 1)
    assert worker.stats == {"delivered": 1, "retried": 0, "deferred": 0, "dead_lettered": 1}
    assert smtp.received == 1
    assert smtp.messages[0]["Message-ID"].startswith(f"<{good.id}.")
    assert dead.id == "bad-1"
    assert dead.reason.startswith("permanent: malformed message")
    for word in mentions:
        assert word in dead.reason.lower(), dead.reason
    assert dead.attempts == 1


# --- retries never fan out again -------------------------------------------------------


async def test_retried_login_email_does_not_duplicate_other_channels(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, topology: Settings,
) -> None:
    # Given an email worker (only) and an SMTP server refusing once
    settings = make_settings(smtp_url=smtp_url(smtp))
    smtp.faults.refuse_first = 1
    names = Names(settings.prefix)
    async with email_worker(settings) as worker:
        # When a login event fans out to email, in-app and SMS
        await publish(connection, settings, make_envelope("user.login"))
        async with asyncio.timeout(10):
            await smtp.wait_for(1)
        await eventually(lambda: worker.stats["delivered"] == 1)
    # Then the email went through one retry …
    assert smtp.received == 2
    assert worker.stats["retried"] == 1
    # … which came back to the email queue only: one in-app and one SMS copy, as published
    assert await depth(connection, names.work("in_app")) == 1
    assert await depth(connection, names.work("sms")) == 1
    assert await depth(connection, names.work("push")) == 0
    assert await depth(connection, names.work("email")) == 0


# --- idempotency (SQLite and PostgreSQL) -----------------------------------------------


async def test_duplicate_publication_sends_one_email(
    database_url: str, connection: AbstractRobustConnection,
    make_settings: Callable[..., Settings], smtp: MailSink, topology: Settings,
) -> None:
    # Given the same event published twice (a relay crash between confirm and mark)
    settings = make_settings(smtp_url=smtp_url(smtp))
    envelope = make_envelope()
    async with email_worker(settings) as worker:
        await publish(connection, settings, envelope)
        await publish(connection, settings, envelope)
        # When both copies have been settled
        await eventually(lambda: worker.stats["delivered"] == 2, timeout=15)
        await asyncio.sleep(0.3)
    # Then one email was sent, and both copies were acked
    assert smtp.received == 1 and len(smtp.messages) == 1
    assert worker.stats["dead_lettered"] == 0
    assert await depth(connection, Names(settings.prefix).work("email")) == 0
    record = await delivery_record(settings, envelope)
    assert record is not None and record.status == "sent"


async def test_already_sent_delivery_is_acked_without_sending(
    database_url: str, connection: AbstractRobustConnection,
    make_settings: Callable[..., Settings], smtp: MailSink, topology: Settings,
) -> None:
    # Given a delivery recorded as sent (say, before a DLQ replay or a redelivery)
    settings = make_settings(smtp_url=smtp_url(smtp))
    envelope = make_envelope()
    engine = make_engine(settings.database_url)
    try:
        await init_db(engine)
        store = DeliveryStore(engine, lease=10)
        assert await store.claim(envelope.id, envelope.type, "email", "u-ada") is Claim.GO
        await store.sent(envelope.id, "email", "u-ada", "smtp")
    finally:
        await engine.dispose()
    async with email_worker(settings) as worker:
        # When the message arrives again
        await publish(connection, settings, envelope)
        await eventually(lambda: worker.stats["delivered"] == 1)
    # Then it is acked and nothing is sent
    assert smtp.received == 0
    assert worker.stats == {"delivered": 1, "retried": 0, "deferred": 0, "dead_lettered": 0}
    assert await depth(connection, Names(settings.prefix).work("email")) == 0


async def test_other_recipients_still_get_theirs_after_a_partial_send(
    database_url: str, connection: AbstractRobustConnection,
    make_settings: Callable[..., Settings], smtp: MailSink, topology: Settings,
) -> None:
    # Given an event for two recipients, the first already sent
    settings = make_settings(smtp_url=smtp_url(smtp))
    envelope = Envelope(type="user.signup", actor=Actor(id="svc"), recipients=[
        Recipient(user_id="u-ada", email="ada@example.com", name="Ada"),
        Recipient(user_id="u-bob", email="bob@example.com", name="Bob"),
    ])
    engine = make_engine(settings.database_url)
    try:
        await init_db(engine)
        store = DeliveryStore(engine, lease=10)
        await store.claim(envelope.id, envelope.type, "email", "u-ada")
        await store.sent(envelope.id, "email", "u-ada", "smtp")
    finally:
        await engine.dispose()
    async with email_worker(settings) as worker:
        await publish(connection, settings, envelope)
        async with asyncio.timeout(10):
            messages = await smtp.wait_for(1)
        await eventually(lambda: worker.stats["delivered"] == 1)
    # Then only the second recipient is emailed
    assert [m["To"].addresses[0].addr_spec for m in messages] == ["bob@example.com"]
    assert smtp.received == 1


# --- rate limits are waits, not failures -----------------------------------------------


async def test_rate_limit_replies_do_not_use_the_retry_budget(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, declared: Declare,
) -> None:
    # Given max_retry=1 and an SMTP server saying "rate limit exceeded" three times
    settings = await declared(make_settings(smtp_url=smtp_url(smtp), max_retry=1,
                                            retry_delays="100ms"))
    smtp.faults.refuse_first = 3
    smtp.faults.refuse_code = "421 4.7.0 Rate limit exceeded, too many messages"
    async with email_worker(settings) as worker:
        # When an event arrives
        await publish(connection, settings, make_envelope())
        # Then it is still delivered, on the fourth attempt
        async with asyncio.timeout(15):
            await smtp.wait_for(1)
        await eventually(lambda: worker.stats["delivered"] == 1)
    assert smtp.received == 4
    # the three waits are deferrals, not retries
    assert worker.stats == {"delivered": 1, "retried": 0, "deferred": 3, "dead_lettered": 0}
    assert await browse(connection, Names(settings.prefix), "email") == []


async def test_a_real_failure_after_rate_limits_still_has_its_full_budget(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, declared: Declare,
) -> None:
    # Given max_retry=1: two rate-limit waits, then a temporary failure, then success
    settings = await declared(make_settings(smtp_url=smtp_url(smtp), max_retry=1,
                                            retry_delays="100ms"))
    replies = iter(["421 4.7.0 Too many messages, slow down",
                    "421 4.7.0 Too many messages, slow down",
                    "451 4.3.0 Temporary failure, try again"])
    original = smtp.handle_DATA

    async def scripted(server: Any, session: Any, envelope: Any) -> str:
        reply = next(replies, None)
        if reply is None:
            return await original(server, session, envelope)
        smtp.received += 1
        return reply

    smtp.handle_DATA = scripted  # type: ignore[method-assign]
    async with email_worker(settings) as worker:
        await publish(connection, settings, make_envelope())
        async with asyncio.timeout(15):
            await smtp.wait_for(1)
        await eventually(lambda: worker.stats["delivered"] == 1)
    assert worker.stats == {"delivered": 1, "retried": 1, "deferred": 2, "dead_lettered": 0}
    assert smtp.received == 4


# --- poison messages -------------------------------------------------------------------


async def test_poison_message_is_dead_lettered_after_the_delivery_limit(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    declared: Declare,
) -> None:
    # Given a work queue with delivery_limit=2
    settings = await declared(make_settings(delivery_limit=2))
    names = Names(settings.prefix)
    envelope = make_envelope()
    await publish(connection, settings, envelope)
    # When a "worker" takes it and crashes before the ack, again and again
    channel = await connection.channel()
    deliveries = 0
    try:
        queue = await channel.get_queue(names.work("email"))
        async with asyncio.timeout(15):
            while True:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    if await depth(connection, names.dlq("email")):
                        break
                    await asyncio.sleep(0.05)
                    continue
                assert message.message_id == envelope.id
                deliveries += 1
                await message.nack(requeue=True)
    finally:
        await channel.close()
    # Then the broker gave up after the first delivery and delivery_limit redeliveries
    assert deliveries == settings.delivery_limit + 1
    assert await depth(connection, names.work("email")) == 0
    # And the DLQ says so
    [dead] = await browse(connection, names, "email")
    assert dead.id == envelope.id
    assert dead.event_type == "user.signup"
    assert dead.routing_key == "user.signup"
    assert "delivery_limit" in dead.reason
    assert dead.first_failure is not None



async def test_a_provider_that_never_stops_saying_slow_down_ends_in_the_dlq(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, declared: Declare,
) -> None:
    # Given an SMTP server that rate-limits forever, and deferrals capped at 1s
    settings = await declared(make_settings(smtp_url=smtp_url(smtp), max_retry=5,
                                            retry_delays="200ms", max_defer="1s"))
    smtp.faults.refuse_always = "421 4.7.0 Rate limit exceeded"
    envelope = make_envelope()
    async with email_worker(settings) as worker:
        await publish(connection, settings, envelope)
        # Then, once the cap has passed, the message is parked instead of cycling
        [dead] = await dead_letters(connection, settings, 1)
    assert dead.reason.startswith("still deferred after")
    assert "HERALD_MAX_DEFER" in dead.reason
    assert worker.stats["retried"] == 0 and worker.stats["deferred"] >= 1
    record = await delivery_record(settings, envelope)
    assert record is not None and record.status == "dead"
