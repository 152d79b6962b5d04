"""A database outage is not a delivery failure: the worker pauses and spends no retries.

Each test starts its own PostgreSQL (initdb in a temp dir, tests/pgtemp.py)
so that it can stop it; the broker is the shared one, under a test prefix.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlmodel import select

from consumers.__main__ import build_email_worker
from consumers.providers.base import Gate
from herald.db import make_engine, session_factory
from herald.mailsink import MailSink
from herald.models import Delivery
from herald.settings import Settings
from tests.conftest import delete_topology, eventually, smtp_url
from tests.pgtemp import TempPostgres, temp_postgres
from tests.test_worker import make_envelope, publish
from topology.declare import declare
from topology.dlq import browse
from topology.spec import Names, build


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[TempPostgres]:
    with temp_postgres(tmp_path / "pg") as server:
        yield server


async def statuses(url: str) -> dict[str, str]:
    engine = make_engine(url)
    try:
        async with session_factory(engine)() as session:
            rows = (await session.exec(select(Delivery))).all()
        return {r.event_id: r.status for r in rows}
    finally:
        await engine.dispose()


async def test_worker_pauses_while_the_database_is_down_and_spends_no_retry(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, pg: TempPostgres, caplog: pytest.LogCaptureFixture,
) -> None:
    # Given an email worker on a database that then goes away
    settings = make_settings(smtp_url=smtp_url(smtp), database_url=pg.url)
    await declare(connection, build(settings))
    worker, engine = await build_email_worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 15)
        await asyncio.to_thread(pg.stop)
        # When five signups arrive during the outage
        envelopes = [make_envelope(user_id=f"u-{n}", email=f"u{n}@example.com")
                     for n in range(5)]
        with caplog.at_level(logging.INFO, logger="herald.worker"):
            for envelope in envelopes:
                await publish(connection, settings, envelope)
            await asyncio.sleep(3)
            # Then nothing was sent, retried or dead-lettered: the worker waits
            assert smtp.received == 0
            assert worker.stats["retried"] == worker.stats["dead_lettered"] == 0
            assert worker.stats["deferred"] == 0
            # When the database comes back
            await asyncio.to_thread(pg.start)
            async with asyncio.timeout(30):
                await smtp.wait_for(5)
            await eventually(lambda: worker.stats["delivered"] == 5, timeout=15)
        # Then each was sent once, recorded, and nothing burnt a retry
        assert smtp.received == 5
        assert worker.stats["retried"] == worker.stats["dead_lettered"] == 0
        assert await statuses(settings.database_url) == {e.id: "sent" for e in envelopes}
        assert await browse(connection, Names(settings.prefix), "email") == []
        # And the log says it once when it went and once when it came back, no tracebacks
        lines = [r for r in caplog.records if r.name == "herald.worker"]
        went = [r for r in lines if "database unreachable" in r.getMessage()]
        back = [r for r in lines if "database is back" in r.getMessage()]
        assert len(went) == 1 and len(back) == 1, [r.getMessage() for r in lines]
        assert not [r for r in caplog.records if r.exc_info]
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)
        await engine.dispose()
        await delete_topology(connection, settings)


class StopsTheDatabase:
    """An SMTP provider stand-in wrapper: the database goes down while the server accepts."""

    name = "smtp"

    def __init__(self, inner: object, pg: TempPostgres) -> None:
        self.inner = inner
        self.pg = pg
        self.sends = 0

    async def send(self, message: EmailMessage, gate: Gate | None = None) -> None:
        await self.inner.send(message, gate)  # type: ignore[attr-defined]
        self.sends += 1
        if self.sends == 1:
            await asyncio.to_thread(self.pg.stop)


async def test_a_send_the_provider_accepted_during_an_outage_is_recorded_not_resent(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings],
    smtp: MailSink, pg: TempPostgres,
) -> None:
    # Given a worker whose database goes down right after the SMTP server accepted an email
    settings = make_settings(smtp_url=smtp_url(smtp), database_url=pg.url)
    await declare(connection, build(settings))
    worker, engine = await build_email_worker(settings)
    chain = worker.handler.providers  # type: ignore[attr-defined]
    chain.providers[0] = StopsTheDatabase(chain.providers[0], pg)
    task = asyncio.create_task(worker.run())
    envelope = make_envelope()
    try:
        await asyncio.wait_for(worker.ready.wait(), 15)
        await publish(connection, settings, envelope)
        async with asyncio.timeout(15):
            await smtp.wait_for(1)
        await asyncio.sleep(2)  # the record cannot be written: the message stays unacked
        assert worker.stats["delivered"] == 0
        # When the database is back
        await asyncio.to_thread(pg.start)
        await eventually(lambda: worker.stats["delivered"] == 1, timeout=20)
        # Then the send is recorded, and the email was not sent a second time
        assert await statuses(settings.database_url) == {envelope.id: "sent"}
        await asyncio.sleep(1)
        assert smtp.received == 1
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)
        await engine.dispose()
        await delete_topology(connection, settings)
