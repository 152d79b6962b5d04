"""One unit of work per message: a bad recipient or device hurts nobody else; crash loops end.

Through the real broker and the real workers: an envelope naming several
recipients is split into one message per recipient (push: per device), each
with its own retry ladder, DLQ entry and replay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from sqlmodel import select
from typer.testing import CliRunner

from consumers.deliveries import Claim, DeliveryStore
from herald.cli import app
from herald.db import init_db, make_engine, session_factory
from herald.mailsink import Faults, MailSink, start_sink
from herald.models import Delivery, Device, User
from herald.settings import Settings
from tests.conftest import delete_topology, eventually, smtp_url
from tests.harness import email_worker, push_worker
from tests.standins.fcm import FcmStandIn
from tests.test_worker import dead_letters, depth, publish
from topology.declare import declare
from topology.dlq import browse
from topology.envelope import Actor, Envelope, Recipient
from topology.messages import build_message
from topology.spec import H_DELIVERIES, Names, build


class PickySink(MailSink):
    """A mail server that refuses some addresses at RCPT TO (550, no such user)."""

    def __init__(self, refused: set[str]) -> None:
        super().__init__(faults=Faults())
        self.refused_addresses = refused

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address in self.refused_addresses:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
async def picky() -> AsyncIterator[PickySink]:
    sink = PickySink({"bad@example.com"})
    server = await start_sink(sink)
    sink.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    yield sink
    server.close()
    await server.wait_closed()


def signup(*people: tuple[str, str]) -> Envelope:
    return Envelope(type="user.signup", actor=Actor(id="svc", name="billing"),
                    recipients=[Recipient(user_id=u, email=e, name=u) for u, e in people],
                    data={"name": "you"})


async def records(settings: Settings, event_id: str) -> dict[str, Delivery]:
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session:
            found = (await session.exec(select(Delivery).where(
                Delivery.event_id == event_id))).all()
        return {d.recipient: d for d in found}
    finally:
        await engine.dispose()


async def test_one_unaddressable_recipient_does_not_silence_the_others(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    picky: PickySink, topology: Settings,
) -> None:
    # Given three recipients, the first of whom the mail server refuses for good
    settings = make_settings(smtp_url=smtp_url(picky))
    envelope = signup(("u-bad", "bad@example.com"), ("u-ann", "ann@example.com"),
                      ("u-cy", "cy@example.com"))
    async with email_worker(settings) as worker:
        await publish(connection, settings, envelope)
        # Then the other two are emailed …
        async with asyncio.timeout(15):
            await picky.wait_for(2)
        # … and only the refused one waits in the DLQ, as its own entry
        [dead] = await dead_letters(connection, settings, 1)
        await eventually(lambda: worker.stats["delivered"] == 2)
    assert sorted(str(m["To"]) for m in picky.messages) == ["u-ann <ann@example.com>",
                                                            "u-cy <cy@example.com>"]
    assert worker.stats["split"] == 1 and worker.stats["dead_lettered"] == 1
    assert dead.id == f"{envelope.id}:email:u-bad"
    assert dead.reason.startswith("permanent") and "550" in dead.reason
    rows = await records(settings, envelope.id)
    assert {k: r.status for k, r in rows.items()} == {
        "u-bad": "dead", "u-ann": "sent", "u-cy": "sent"}
    # And nobody else's record carries the refused recipient's error
    assert rows["u-ann"].last_error is None

    # When the operator fixes the address book and replays that event's entries
    picky.refused_addresses.clear()
    async with email_worker(settings) as worker:
        result = await asyncio.to_thread(
            CliRunner().invoke, app, ["dlq", "replay", "email", "--event", envelope.id],
            env=_cli_env(settings))
        assert result.exit_code == 0, result.output
        assert "replayed 1" in result.output
        async with asyncio.timeout(15):
            await picky.wait_for(3)
    # Then it is sent, and nobody got a second email
    assert len(picky.messages) == 3
    assert (await records(settings, envelope.id))["u-bad"].status == "sent"


def _cli_env(settings: Settings) -> dict[str, str]:
    return {"HERALD_AMQP_URL": settings.amqp_url, "HERALD_PREFIX": settings.prefix,
            "HERALD_DATABASE_URL": settings.database_url}


async def test_replay_by_event_says_when_an_event_has_no_entry(
    make_settings: Callable[..., Settings], topology: Settings,
) -> None:
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["dlq", "replay", "email", "--event", "no-such-event"],
        env=_cli_env(topology))
    assert result.exit_code == 1
    assert "no DLQ entry for event(s): no-such-event" in result.output


async def seed(settings: Settings, *rows: Any) -> None:
    engine = make_engine(settings.database_url)
    try:
        await init_db(engine)
        async with session_factory(engine)() as session:
            for row in rows:
                session.add(row)
                await session.flush()
            await session.commit()
    finally:
        await engine.dispose()


async def test_one_broken_device_does_not_stop_the_others(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    # Given three members with an Android phone each; FCM refuses the third's token for
    # good (403 SENDER_ID_MISMATCH: the token belongs to another app)
    async with FcmStandIn() as fcm:
        settings = make_settings(fcm_credentials_file=fcm.write_service_account(tmp_path),
                                 fcm_url=fcm.url, push_dir=tmp_path / "push")
        users = ["u-a", "u-b", "u-c"]
        tokens = {u: fcm.new_token() for u in users}
        fcm.foreign_tokens.add(tokens["u-c"])
        await seed(settings, *[User(id=u, email=f"{u}@example.com", name=u, password_hash="x",
                                    handle=u.replace("-", "")) for u in users],
                   *[Device(id=f"d-{u}", user_id=u, platform="android", token=tokens[u],
                            token_hash=(u[-1] * 64)) for u in users])
        envelope = Envelope(type="user.send_req", actor=Actor(id="u-z", name="Zed"),
                            recipients=[Recipient(user_id=u) for u in users],
                            data={"request_id": "r-1", "from_name": "Zed"})
        async with push_worker(settings) as worker:
            await publish(connection, settings, envelope)
            # Then the two good phones get the push …
            await eventually(lambda: len(fcm.messages) == 2, timeout=15)
            # … and the broken one has its own DLQ entry
            async def one_dead() -> list[Any] | None:
                found = await browse(connection, Names(settings.prefix), "push")
                return found or None

            [dead] = await eventually(one_dead, timeout=15)
            await eventually(lambda: worker.stats["delivered"] == 2)
    assert dead.id == f"{envelope.id}:push:u-c/d-u-c"
    assert "SENDER_ID_MISMATCH" in dead.last_error
    rows = await records(settings, envelope.id)
    assert {k: r.status for k, r in rows.items()} == {
        "u-a/d-u-a": "sent", "u-b/d-u-b": "sent", "u-c/d-u-c": "dead"}
    assert sorted(m["token"] for m in fcm.messages) == sorted([tokens["u-a"], tokens["u-b"]])


async def test_a_crash_count_survives_a_lease_deferral_and_ends_in_the_dlq(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: Any,
) -> None:
    # Given a delivery whose claim a crashed worker still holds (its lease runs for a
    # minute), and a message that already died once in an earlier copy
    settings = make_settings(smtp_url=smtp_url(smtp), delivery_limit=2, retry_delays="200ms")
    await declare(connection, build(settings))
    try:
        await _crash_count_survives(connection, settings, smtp)
    finally:
        await delete_topology(connection, settings)


async def _crash_count_survives(connection: AbstractRobustConnection, settings: Settings,
                                smtp: Any) -> None:
    names = Names(settings.prefix)
    envelope = signup(("u-ada", "ada@example.com"))
    engine = make_engine(settings.database_url)
    await init_db(engine)
    store = DeliveryStore(engine, lease=60)
    assert await store.claim(envelope.id, envelope.type, "email", "u-ada") is Claim.GO
    await engine.dispose()
    ch = await connection.channel(publisher_confirms=True)
    await ch.default_exchange.publish(
        build_message(envelope.to_json(), envelope.id, envelope.type, {H_DELIVERIES: 1}),
        routing_key=names.work("email"), timeout=10)
    await ch.close()
    # When a worker finds the claim held, it defers the message …
    async with email_worker(settings) as worker:
        await eventually(lambda: worker.stats["deferred"] >= 1, timeout=10)
    # … and the copy back from the tier (in the due queue) still counts the earlier death
    ch = await connection.channel()
    queue = await ch.get_queue(names.due("email"))
    message = await eventually(lambda: queue.get(no_ack=False, fail=False), timeout=10)
    assert message.headers[H_DELIVERIES] == 1
    # When that copy dies too (returned unacked, as by a kill -9)
    await message.nack(requeue=True)
    await ch.close()
    # Then the next worker parks it in the DLQ instead of deferring it again
    async with email_worker(settings) as worker:
        [dead] = await dead_letters(connection, settings, 1)
    assert dead.reason.startswith("crash loop: delivered 2 times without an outcome")
    assert "HERALD_DELIVERY_LIMIT=2" in dead.reason
    assert smtp.received == 0
    assert await depth(connection, names.work("email")) == 0
    assert (await records(settings, envelope.id))["u-ada"].status == "dead"


@pytest.mark.parametrize(("content_type", "encoding", "said"), [
    ("text/plain", None, "unsupported content type 'text/plain'"),
    ("application/x-python-serialize", None, "unsupported content type"),
    ("application/json", "gzip", "unsupported content encoding 'gzip'"),
])
async def test_messages_that_are_not_json_go_to_the_dlq_saying_so(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: Any, topology: Settings, content_type: str, encoding: str | None, said: str,
) -> None:
    settings = make_settings(smtp_url=smtp_url(smtp))
    envelope = signup(("u-ada", "ada@example.com"))
    message = build_message(envelope.to_json(), envelope.id, envelope.type)
    message.content_type = content_type
    message.content_encoding = encoding
    ch = await connection.channel(publisher_confirms=True)
    await ch.default_exchange.publish(message, routing_key=Names(settings.prefix).work("email"),
                                      timeout=10)
    await ch.close()
    async with email_worker(settings):
        [dead] = await dead_letters(connection, settings, 1)
    assert said in dead.reason
    assert smtp.received == 0
