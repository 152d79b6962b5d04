"""The in-app worker on the real broker: a notification row per (event, user), once.

Events go in the way the relay publishes them (to the events exchange), or
straight into the in-app work queue when the topology would not route them
there (malformed bytes; an event type the table does not send in-app).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from aio_pika.abc import AbstractRobustConnection

from consumers.deliveries import DeliveryStore
from herald.db import init_db, make_engine, session_factory
from herald.models import Delivery, Notification
from herald.settings import Settings
from tests.conftest import eventually
from tests.harness import in_app_worker, rows
from tests.test_policy import cancel
from tests.test_worker import make_envelope, publish, publish_raw
from topology.dlq import DeadMessage, browse
from topology.envelope import Envelope
from topology.messages import build_message
from topology.spec import Names

CHANNEL = "in_app"


async def in_app_delivery(settings: Settings, envelope: Envelope) -> Delivery | None:
    engine = make_engine(settings.database_url)
    try:
        await init_db(engine)
        return await DeliveryStore(engine, lease=10).get(envelope.id, CHANNEL,
                                                         envelope.recipients[0].user_id)
    finally:
        await engine.dispose()


async def in_app_dead_letters(connection: AbstractRobustConnection, settings: Settings,
                              count: int = 1) -> list[DeadMessage]:
    async def enough() -> list[DeadMessage] | None:
        found = await browse(connection, Names(settings.prefix), CHANNEL)
        return found if len(found) >= count else None

    found: list[DeadMessage] = await eventually(enough, timeout=15, interval=0.1)
    return found


async def publish_to_in_app(connection: AbstractRobustConnection, settings: Settings,
                            envelope: Envelope) -> None:
    """Put a valid envelope straight into the in-app work queue, bypassing the routing table."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        await channel.default_exchange.publish(
            build_message(envelope.to_json(), envelope.id, envelope.type),
            routing_key=Names(settings.prefix).work(CHANNEL), mandatory=True, timeout=10)
    finally:
        await channel.close()


async def test_a_login_becomes_one_notification_row_and_a_sent_delivery(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    settings = topology
    envelope = make_envelope("user.login").model_copy(
        update={"data": {"ip": "203.0.113.7", "user_agent": "Firefox"}})
    async with in_app_worker(settings) as worker:
        # When a login is published like the relay does
        await publish(connection, settings, envelope)
        await eventually(lambda: worker.stats["delivered"] == 1)
    # Then the user has one inbox row, rendered from the in-app templates
    found = await rows(settings, Notification)
    assert len(found) == 1
    row = found[0]
    assert (row.event_id, row.user_id, row.event_type) == (envelope.id, "u-ada", "user.login")
    assert row.title == "New sign-in"
    assert "203.0.113.7" in row.body and "Firefox" in row.body
    assert row.delivered is True
    assert [step["node"] for step in json.loads(row.trail)] == ["event"]  # not a message
    assert row.reason == "notified: user.login"
    # And the delivery is recorded as sent by the database "provider"
    record = await in_app_delivery(settings, envelope)
    assert record is not None and (record.status, record.provider) == ("sent", "db")


async def test_the_same_envelope_twice_makes_one_row(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    settings = topology
    envelope = make_envelope("user.login")
    async with in_app_worker(settings) as worker:
        # When the relay publishes the same event twice (a confirm lost, say)
        await publish(connection, settings, envelope)
        await publish(connection, settings, envelope)
        await eventually(lambda: worker.stats["delivered"] == 2)
    # Then the second is acked as already sent: one row
    assert len(await rows(settings, Notification)) == 1
    record = await in_app_delivery(settings, envelope)
    assert record is not None and record.status == "sent" and record.attempts == 1


async def test_a_row_stored_before_a_crash_is_not_inserted_again(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    # Given a worker that inserted the row but died before recording the delivery sent
    settings = topology
    envelope = make_envelope("user.login")
    engine = make_engine(settings.database_url)
    try:
        await init_db(engine)
        async with session_factory(engine)() as session:
            session.add(Notification(event_id=envelope.id, event_type=envelope.type,
                                     user_id="u-ada", title="New sign-in", body="earlier"))
            await session.commit()
    finally:
        await engine.dispose()
    async with in_app_worker(settings) as worker:
        # When the message is redelivered
        await publish(connection, settings, envelope)
        await eventually(lambda: worker.stats["delivered"] == 1)
    # Then the unique (event_id, user_id) keeps the one row, and the delivery ends sent
    found = await rows(settings, Notification)
    assert [r.body for r in found] == ["earlier"]
    record = await in_app_delivery(settings, envelope)
    assert record is not None and record.status == "sent"


async def test_a_cancelled_key_records_cancelled_and_no_row(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    settings = topology
    await cancel(settings, "login-k1")
    envelope = make_envelope("user.login").model_copy(update={"cancel_key": "login-k1"})
    async with in_app_worker(settings) as worker:
        await publish(connection, settings, envelope)
        await eventually(lambda: worker.stats["delivered"] == 1)
    assert await rows(settings, Notification) == []
    record = await in_app_delivery(settings, envelope)
    assert record is not None and record.status == "cancelled"
    assert "login-k1" in (record.last_error or "")


async def test_a_malformed_message_goes_to_the_in_app_dlq(
    topology: Settings, connection: AbstractRobustConnection
) -> None:
    settings = topology
    async with in_app_worker(settings):
        await publish_raw(connection, settings, b"{not json", "bad-1", channel_name=CHANNEL)
        dead = await in_app_dead_letters(connection, settings)
    assert [d.id for d in dead] == ["bad-1"]
    assert "malformed" in dead[0].reason
    assert await rows(settings, Notification) == []


async def test_a_missing_template_dead_letters_naming_it(
    topology: Settings, make_settings: Callable[..., Settings], tmp_path: Path,
    connection: AbstractRobustConnection
) -> None:
    # Given a templates directory with the in-app title of user.send_req but not its body
    root = Path(__file__).resolve().parent.parent / "templates"
    templates = tmp_path / "templates"
    (templates / CHANNEL).mkdir(parents=True)
    shutil.copy(root / CHANNEL / "user.send_req.title.j2", templates / CHANNEL)
    settings = make_settings(templates_dir=templates)
    envelope = make_envelope("user.send_req")
    async with in_app_worker(settings):
        # When a send_req reaches the in-app queue
        await publish_to_in_app(connection, settings, envelope)
        dead = await in_app_dead_letters(connection, settings)
    # Then it skips the retry ladder and the DLQ says which template is missing
    assert [d.id for d in dead] == [envelope.id]
    assert "in_app/user.send_req.body.j2" in dead[0].reason
    assert dead[0].attempts == 1
    assert await rows(settings, Notification) == []
    record = await in_app_delivery(settings, envelope)
    assert record is not None and record.status == "dead"
