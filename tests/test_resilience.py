"""Provider resilience on the real broker: failover, circuit breakers, shared rate limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest
from aio_pika.abc import AbstractRobustConnection

from consumers.ratelimit import TokenBucketLimiter
from herald.mailsink import MailSink
from herald.settings import Rate, Settings
from tests.conftest import eventually, smtp_url
from tests.harness import email_worker
from tests.standins.sendgrid import SendGridStandIn
from tests.tcpproxy import free_port
from tests.test_worker import delivery_record, depth, make_envelope, publish
from topology.dlq import browse
from topology.spec import Names

KEY = "SG.test.key"


@pytest.fixture
async def sendgrid() -> AsyncIterator[SendGridStandIn]:
    async with SendGridStandIn(require_key=KEY) as sg:
        yield sg


def dead_smtp() -> str:
    """An SMTP URL where nothing listens (connection refused)."""
    return f"smtp://127.0.0.1:{free_port()}"


def chain_settings(make_settings: Callable[..., Settings], smtp: str, sg: SendGridStandIn,
                   **overrides: object) -> Settings:
    values: dict[str, object] = {
        "smtp_url": smtp, "email_providers": "smtp,sendgrid", "sendgrid_api_key": KEY,
        "sendgrid_url": sg.url, "smtp_timeout": "2s", "breaker_threshold": 3,
        "breaker_cooldown": "1s"}
    values.update(overrides)
    return make_settings(**values)


async def test_dead_primary_fails_over_to_the_backup_with_nothing_in_the_dlq(
    database_url: str, connection: AbstractRobustConnection,
    make_settings: Callable[..., Settings], sendgrid: SendGridStandIn, topology: Settings,
) -> None:
    # Given SMTP refusing connections and SendGrid healthy, max_retry=0
    settings = chain_settings(make_settings, dead_smtp(), sendgrid, max_retry=0)
    envelopes = [make_envelope(email=f"u{i}@example.com", user_id=f"u{i}") for i in range(5)]
    async with email_worker(settings) as worker:
        # When five signups arrive
        for envelope in envelopes:
            await publish(connection, settings, envelope)
        # Then SendGrid sends all five, none is retried or dead-lettered
        await eventually(lambda: worker.stats["delivered"] == 5, timeout=20)
    assert len(sendgrid.messages) == 5
    assert worker.stats["retried"] == 0 and worker.stats["dead_lettered"] == 0
    assert await browse(connection, Names(settings.prefix), "email") == []
    # And each delivery record says which provider sent it
    record = await delivery_record(settings, envelopes[0])
    assert record is not None and (record.status, record.provider) == ("sent", "sendgrid")


async def test_a_transient_primary_failure_tries_the_backup_first(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, sendgrid: SendGridStandIn, topology: Settings,
) -> None:
    # 421 once (the provider's trouble), then fine; a 451 would be about the recipient
    # and stay with SMTP (tests/test_greylisting.py)
    smtp.faults.refuse_first = 1
    smtp.faults.refuse_code = "421 4.3.0 Service not available, closing channel"
    settings = chain_settings(make_settings, smtp_url(smtp), sendgrid)
    first, second = make_envelope(user_id="a"), make_envelope(user_id="b", email="b@example.com")
    async with email_worker(settings) as worker:
        await publish(connection, settings, first)
        await eventually(lambda: worker.stats["delivered"] == 1, timeout=15)
        await publish(connection, settings, second)
        await eventually(lambda: worker.stats["delivered"] == 2, timeout=15)
    # the first went to SendGrid on the same attempt; the second by SMTP again
    assert worker.stats["retried"] == 0
    assert len(sendgrid.messages) == 1 and len(smtp.messages) == 1
    assert (await delivery_record(settings, first)).provider == "sendgrid"  # type: ignore[union-attr]
    assert (await delivery_record(settings, second)).provider == "smtp"  # type: ignore[union-attr]


async def test_a_permanent_refusal_does_not_fail_over(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, sendgrid: SendGridStandIn, topology: Settings,
) -> None:
    smtp.faults.refuse_always = "550 5.1.1 No such user"
    settings = chain_settings(make_settings, smtp_url(smtp), sendgrid)
    async with email_worker(settings) as worker:
        await publish(connection, settings, make_envelope())
        await eventually(lambda: worker.stats["dead_lettered"] == 1, timeout=15)
    assert sendgrid.requests == 0
    [dead] = await browse(connection, Names(settings.prefix), "email")
    assert dead.reason.startswith("permanent") and "550" in dead.reason


async def test_a_dead_channel_pauses_consumption_and_resumes_by_itself(
    database_url: str, connection: AbstractRobustConnection,
    make_settings: Callable[..., Settings], sendgrid: SendGridStandIn, topology: Settings,
) -> None:
    # Given both providers down, a breaker that opens after 3 failures for 1s,
    # and a retry budget of 1 (a ladder would dead-letter everything quickly)
    sendgrid.always_status = 503
    settings = chain_settings(make_settings, dead_smtp(), sendgrid, max_retry=1,
                              retry_delays="200ms", prefetch=2, concurrency=2)
    envelopes = [make_envelope(email=f"u{i}@example.com", user_id=f"u{i}") for i in range(6)]
    names = Names(settings.prefix)
    async with email_worker(settings) as worker:
        for envelope in envelopes:
            await publish(connection, settings, envelope)
        # When every circuit opens, the worker stops consuming
        await eventually(lambda: worker.stats.get("paused", 0) >= 1, timeout=20)
        async def waiting() -> bool:
            return await depth(connection, names.work("email")) > 0
        await eventually(waiting, timeout=10)
        assert await browse(connection, names, "email") == []
        # Then, once SendGrid is back, it resumes by itself and sends everything once
        sendgrid.always_status = None
        await eventually(lambda: worker.stats["delivered"] == 6, timeout=30)
    assert await browse(connection, names, "email") == []
    assert worker.stats["dead_lettered"] == 0
    assert sorted(m["personalizations"][0]["to"][0]["email"] for m in sendgrid.messages) == \
        sorted(f"u{i}@example.com" for i in range(6))


async def test_429_retry_after_backs_the_provider_off_without_using_a_retry(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    topology: Settings,
) -> None:
    async with SendGridStandIn(require_key=KEY, rate_limit_first=1, retry_after=1) as sg:
        settings = make_settings(email_providers="sendgrid", sendgrid_api_key=KEY,
                                 sendgrid_url=sg.url, max_retry=0, retry_delays="100ms")
        async with email_worker(settings) as worker:
            await publish(connection, settings, make_envelope())
            await eventually(lambda: worker.stats["delivered"] == 1, timeout=15)
        statuses = [c.status for c in sg.calls]
        times = [c.at for c in sg.calls]
    assert statuses == [429, 202]
    # the whole provider waited out Retry-After, not just the 100ms tier
    assert times[1] - times[0] >= 0.95
    assert worker.stats == {"delivered": 1, "retried": 0, "deferred": 1, "dead_lettered": 0}


async def test_two_workers_share_one_rate_limit_through_redis(
    redis_url: str, connection: AbstractRobustConnection,
    make_settings: Callable[..., Settings], smtp: MailSink, topology: Settings,
) -> None:
    # Given a provider that refuses more than 15 per second, and two workers
    # (separate connections and limiters) capped at 10/s together through Redis
    smtp.faults.rate_cap = 15
    settings = make_settings(smtp_url=smtp_url(smtp), redis_url=redis_url,
                             email_rate_limit="10/s", max_retry=0)
    count = 30
    async with AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(email_worker(settings)) for _ in range(2)]
        for i in range(count):
            await publish(connection, settings, make_envelope(email=f"u{i}@example.com",
                                                              user_id=f"u{i}"))
        # When they drain the burst
        await eventually(lambda: sum(w.stats["delivered"] for w in workers) == count,
                         timeout=30)
    # Then both took part, nothing was refused, and no second held more than the cap
    assert all(w.stats["delivered"] > 0 for w in workers)
    assert smtp.refused == 0
    assert len(smtp.messages) == count


async def test_two_limiters_on_one_redis_share_one_bucket(redis_url: str) -> None:
    # Given two limiters (two workers) on one Redis, at one message per minute
    namespace = f"t-{time.monotonic_ns()}"
    first, second = (TokenBucketLimiter({"p": Rate(1, 60)}, namespace, redis_url)
                     for _ in range(2))
    try:
        async with asyncio.timeout(10):
            # When the first takes the minute's slot
            await first.acquire("p")
            # Then the second gets none (with a bucket each, it would at once)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(second.acquire("p"), 0.5)
            # And a 429 pause set by one holds the other back too
            await first.pause("q", 30)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(second.acquire("q"), 0.5)
    finally:
        await first.aclose()
        await second.aclose()


async def test_without_redis_each_limiter_has_its_own_bucket() -> None:
    # The contrast the README warns about: per-process buckets do not add up.
    first, second = (TokenBucketLimiter({"p": Rate(1, 60)}, "t-local") for _ in range(2))
    async with asyncio.timeout(5):
        await first.acquire("p")
        await second.acquire("p")  # its own bucket: no wait
