"""The outbox relay: publishes committed events with confirms, then marks them.

A row is marked published only after the broker confirmed it (routed to at
least one queue: ``mandatory``). Broker down → rows wait; the relay catches
up when it returns. Crash between confirm and mark → the event is published
again; consumers deduplicate on the delivery key.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import suppress
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.db import init_db, make_engine, session_factory
from herald.logs import setup_logging, setup_sentry
from herald.metrics import RELAYED
from herald.models import OutboxEvent
from herald.settings import Settings, load_settings
from topology.declare import declare
from topology.messages import build_message
from topology.spec import Names, build

log = logging.getLogger("herald.relay")
_MAX_BACKOFF = 30.0


class Relay:
    """Moves outbox rows to the events exchange. Safe to run as several processes on PostgreSQL."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.sessions: async_sessionmaker[AsyncSession] = session_factory(engine)
        self._postgres = engine.dialect.name == "postgresql"
        self._stopping = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self.published = 0

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand."""
        self._stopping.set()

    async def _exchange_or_connect(self) -> AbstractExchange:
        if self._exchange is not None and self._connection and not self._connection.is_closed:
            return self._exchange
        connection = await aio_pika.connect_robust(self.settings.amqp_url)
        try:
            await declare(connection, build(self.settings))
            channel: AbstractChannel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._exchange = await channel.get_exchange(Names(self.settings.prefix).events)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        log.info("connected to the broker")
        return self._exchange

    async def publish_batch(self) -> int:
        """Publish up to ``relay_batch`` pending rows; return how many were confirmed.

        Raises connection errors (the caller backs off); an unroutable or
        nacked row keeps its place with ``last_error`` set.
        """
        exchange = await self._exchange_or_connect()
        done = 0
        async with self.sessions() as session:
            query = (select(OutboxEvent).where(col(OutboxEvent.published_at).is_(None))
                     .order_by(col(OutboxEvent.created_at)).limit(self.settings.relay_batch))
            if self._postgres:
                query = query.with_for_update(skip_locked=True)
            rows = (await session.exec(query)).all()
            try:
                for row in rows:
                    message = build_message(row.body.encode(), row.id, row.routing_key)
                    row.attempts += 1
                    try:
                        await exchange.publish(message, routing_key=row.routing_key,
                                               mandatory=True, timeout=10)
                    except (PublishError, DeliveryError) as exc:
                        row.last_error = f"broker refused: {exc}"[:2000]
                        log.error("event %s (%s) not accepted by the broker: %s",
                                  row.id, row.routing_key, exc)
                        continue
                    row.published_at = datetime.now(UTC)
                    row.last_error = None
                    done += 1
            finally:
                # Also on a connection error mid-batch: the rows confirmed so
                # far stay marked (the row locks are held until here).
                await session.commit()
        self.published += done
        RELAYED.inc(done)
        return done

    async def run(self) -> None:
        """Publish until :meth:`stop`; survives broker and database outages."""
        backoff = self.settings.relay_interval
        while not self._stopping.is_set():
            try:
                done = await self.publish_batch()
                backoff = self.settings.relay_interval
                if done >= self.settings.relay_batch:
                    continue
            except (*CONNECTION_EXCEPTIONS, TimeoutError, DBAPIError) as exc:
                log.warning("broker or database unavailable (%s); retrying in %.1fs",
                            str(exc)[:200] or type(exc).__name__, backoff)
                await self._drop_connection()
                backoff = min(backoff * 2 if backoff else 0.5, _MAX_BACKOFF)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            with suppress(Exception):
                await connection.close()


async def _main(settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    await init_db(engine)
    relay = Relay(settings, engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    log.info("relay started")
    try:
        await relay.run()
    finally:
        await engine.dispose()
    log.info("relay stopped after publishing %d events", relay.published)


def main() -> None:
    """``python -m producer.relay``."""
    settings = load_settings()
    setup_logging(settings.log_level, "relay")
    setup_sentry(settings.sentry_dsn, "relay")
    asyncio.run(_main(settings))


if __name__ == "__main__":
    main()
