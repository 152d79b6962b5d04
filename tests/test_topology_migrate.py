"""Upgrading a broker declared by an older herald: nothing is lost, old messages are handled.

The older topology had classic retry tiers ``<channel>.retry.<delay>`` that
expired back into the work queue, and envelopes naming several recipients in
one message. This herald declares its own tiers beside them, handles what the
old tiers still hold, and ``herald topology migrate`` retires them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import DeliveryError, PublishError
from typer.testing import CliRunner

from herald.cli import app
from herald.mailsink import MailSink
from herald.settings import Settings
from tests.conftest import delete_topology, smtp_url
from tests.harness import email_worker
from tests.test_worker import depth
from topology.declare import declare
from topology.envelope import Actor, Envelope, Recipient
from topology.messages import build_message
from topology.spec import Names, build


async def declare_legacy_tier(connection: AbstractRobustConnection, settings: Settings,
                              delay: float) -> str:
    """The email retry tier as herald declared it before (and the exchanges it needs)."""
    names = Names(settings.prefix)
    await declare(connection, build(settings))  # exchanges and work queues exist then too
    channel = await connection.channel()
    try:
        tier = await channel.declare_queue(
            names.legacy_retry_queue("email", delay), durable=True, arguments={
                "x-queue-type": "classic", "x-message-ttl": round(delay * 1000),
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.work("email")})
        await tier.bind(names.retry, names.legacy_retry_key("email", delay))
    finally:
        await channel.close()
    return names.legacy_retry_queue("email", delay)


async def test_a_broker_with_old_tiers_upgrades_without_losing_a_message(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink,
) -> None:
    # Given a broker from the older herald, with an old-format envelope (two recipients
    # in one message) waiting in an old 2 s tier
    settings = make_settings(smtp_url=smtp_url(smtp), retry_delays="2s", max_retry=1)
    legacy = await declare_legacy_tier(connection, settings, 2.0)
    envelope = Envelope(type="user.signup", actor=Actor(id="svc"), recipients=[
        Recipient(user_id="u-a", email="a@example.com"),
        Recipient(user_id="u-b", email="b@example.com")])
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    retry = await channel.get_exchange(Names(settings.prefix).retry)
    await retry.publish(build_message(envelope.to_json(), envelope.id, envelope.type),
                        routing_key=Names(settings.prefix).legacy_retry_key("email", 2.0),
                        mandatory=True, timeout=10)
    try:
        # When the new herald starts (it declares its topology next to the old one) …
        async with email_worker(settings):
            # … and an operator migrates while the old tier still holds the message
            first = await asyncio.to_thread(
                CliRunner().invoke, app, ["topology", "migrate"], env=_env(settings))
            # Then the old tier is unbound at once but kept while it drains …
            assert first.exit_code == 1, first.output
            assert "1 message(s) still draining" in first.output
            with pytest.raises((PublishError, DeliveryError)):
                await retry.publish(
                    build_message(b"{}", "late", "user.signup"),
                    routing_key=Names(settings.prefix).legacy_retry_key("email", 2.0),
                    mandatory=True, timeout=10)
            # … its message expires into the work queue, is split and delivered to both
            async with asyncio.timeout(20):
                await smtp.wait_for(2)
            # and a second run, once it is empty, deletes it
            second = await asyncio.to_thread(
                CliRunner().invoke, app, ["topology", "migrate", "--wait", "10"],
                env=_env(settings))
        assert second.exit_code == 0, second.output
        assert f"{legacy}: deleted" in second.output
        assert sorted(str(m["To"]) for m in smtp.messages) == ["a@example.com",
                                                               "b@example.com"]
        with pytest.raises(Exception, match="NOT_FOUND"):
            await depth(connection, legacy)
    finally:
        await channel.close()
        await delete_topology(connection, settings)


async def test_migrate_on_a_current_broker_changes_nothing(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    try:
        result = await asyncio.to_thread(
            CliRunner().invoke, app, ["topology", "migrate"], env=_env(settings))
        assert result.exit_code == 0, result.output
        assert f"topology of {settings.prefix!r} is current" in result.output
        assert "removed" not in result.output
    finally:
        await delete_topology(connection, settings)


def _env(settings: Settings) -> dict[str, str]:
    return {"HERALD_AMQP_URL": settings.amqp_url, "HERALD_PREFIX": settings.prefix,
            "HERALD_DATABASE_URL": settings.database_url,
            "HERALD_RETRY_DELAYS": ",".join(f"{d:g}s" for d in settings.retry_delays),
            "HERALD_MAX_RETRY": str(settings.max_retry)}


async def test_a_retry_due_now_does_not_wait_behind_a_backlog_of_new_work(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink,
) -> None:
    # Given 300 new signups queued and a provider taking 50 ms each (15 s of work at
    # two at a time), and one retry parked in the 200 ms tier
    settings = make_settings(smtp_url=smtp_url(smtp), retry_delays="200ms", max_retry=1,
                             concurrency=2, prefetch=2)
    await declare(connection, build(settings))
    names = Names(settings.prefix)
    smtp.faults.hang_first, smtp.faults.hang_seconds = 100_000, 0.05
    channel = await connection.channel(publisher_confirms=True)
    try:
        for n in range(300):
            backlog = Envelope(type="user.signup", actor=Actor(id="svc"), recipients=[
                Recipient(user_id=f"u-{n}", email=f"new{n}@example.com")])
            await channel.default_exchange.publish(
                build_message(backlog.to_json(), backlog.id, backlog.type),
                routing_key=names.work("email"), timeout=10)
        retried = Envelope(type="user.signup", actor=Actor(id="svc"), recipients=[
            Recipient(user_id="u-retry", email="retry@example.com")])
        retry = await channel.get_exchange(names.retry)
        await retry.publish(build_message(retried.to_json(), retried.id, retried.type),
                            routing_key=names.retry_key("email", 0.2), timeout=10)
        # When the worker starts on the backlog
        async with email_worker(settings):
            async with asyncio.timeout(30):
                while not any(str(m["To"]) == "retry@example.com" for m in smtp.messages):
                    await asyncio.sleep(0.05)
        # Then the retry went out among the first few, not after the 300
        position = [str(m["To"]) for m in smtp.messages].index("retry@example.com")
        assert position < 60, position
    finally:
        await channel.close()
        await delete_topology(connection, settings)
