"""A greylisting SMTP server delivers everything, through the real worker and broker.

Greylisting answers 451 to each recipient's first attempts; that is about one
address, not an outage. Before recipient-level failures were told apart, a
burst of first attempts opened the SMTP circuit breaker, the channel paused,
and the probe after the cooldown was another first attempt: nothing went out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from herald.mailsink import MailSink
from herald.settings import Settings
from tests.conftest import eventually, smtp_url
from tests.harness import email_worker
from tests.standins.sendgrid import SendGridStandIn
from tests.test_worker import make_envelope, publish
from topology.dlq import browse
from topology.spec import Names

KEY = "SG.test.key"


async def breakers(worker: Any) -> dict[str, str]:
    """The email chain's breaker states (the worker's handler is the email channel)."""
    states: dict[str, str] = await worker.handler.providers.states()
    return states


async def test_fifty_greylisted_recipients_are_all_delivered_without_a_pause(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, topology: Settings,
) -> None:
    # Given a server greylisting each recipient for 2 s, a 1s,2s,4s ladder and the
    # default breaker (5 failures in a row open it)
    smtp.faults.greylist_seconds = 2.0
    settings = make_settings(smtp_url=smtp_url(smtp), retry_delays="1s,2s,4s", max_retry=3)
    assert settings.breaker_threshold == 5
    count = 50
    async with email_worker(settings) as worker:
        # When 50 signups for 50 distinct recipients arrive at once
        for i in range(count):
            await publish(connection, settings, make_envelope(email=f"u{i}@example.com",
                                                              user_id=f"u{i}"))
        # Then every one is delivered (bounded generously; about 3 s of ladder each)
        await eventually(lambda: worker.stats["delivered"] == count, timeout=60)
        # And the channel never paused, and the SMTP circuit is closed at the end
        assert "paused" not in worker.stats
        assert (await breakers(worker))["smtp"] == "closed"
    assert sorted(str(m["To"]) for m in smtp.messages) == \
        sorted(f"Ada <u{i}@example.com>" for i in range(count))
    # each recipient was greylisted at least once, and each refusal cost one retry
    assert count <= smtp.greylisted <= count * settings.max_retry
    assert worker.stats["retried"] == smtp.greylisted
    assert worker.stats["dead_lettered"] == 0 and worker.stats["deferred"] == 0
    assert await browse(connection, Names(settings.prefix), "email") == []


async def test_greylisting_does_not_fail_over_to_the_backup(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, topology: Settings,
) -> None:
    # Given a greylisting primary and a healthy SendGrid behind it, breaker threshold 3
    smtp.faults.greylist_seconds = 1.0
    async with SendGridStandIn(require_key=KEY) as sendgrid:
        settings = make_settings(smtp_url=smtp_url(smtp), email_providers="smtp,sendgrid",
                                 sendgrid_api_key=KEY, sendgrid_url=sendgrid.url,
                                 retry_delays="1s,2s", max_retry=3, breaker_threshold=3)
        count = 10
        async with email_worker(settings) as worker:
            # When ten recipients are greylisted on their first attempt
            for i in range(count):
                await publish(connection, settings, make_envelope(email=f"u{i}@example.com",
                                                                  user_id=f"u{i}"))
            await eventually(lambda: worker.stats["delivered"] == count, timeout=60)
            # Then the primary sent them all after the window; the backup got nothing
            assert sendgrid.requests == 0
            assert await breakers(worker) == {"smtp": "closed", "sendgrid": "closed"}
        assert "paused" not in worker.stats
    assert len(smtp.messages) == count and smtp.greylisted >= count
