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

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.amqp import connect
from herald.db import init_db, is_outage, make_engine, session_factory
from herald.errors import DatabaseUnavailable
from herald.logs import setup_logging, setup_sentry
from herald.metrics import RELAYED
from herald.models import OutboxEvent
from herald.settings import Settings, load_settings
from herald.supervisor import die_with_parent
from topology.declare import declare
from topology.messages import build_message
from topology.spec import Names, build

log = logging.getLogger("herald.relay")
_MAX_BACKOFF = 30.0
#: Longest pause between two polls of a database that does not answer: events
#: committed once it is back wait at most this long.
_DB_MAX_BACKOFF = 5.0
#: What the broker raises when the connection is lost or cannot be made.
_BROKER_ERRORS = (*CONNECTION_EXCEPTIONS, TimeoutError, OSError)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Relay:
    """Moves outbox rows to the events exchange. Safe to run as several processes on PostgreSQL.

    A broker failure drops the connection and opens a new one; a database
    outage keeps it (the broker is fine) and polls again until the database
    answers, logging once when it goes and once when it is back.
    """

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.sessions: async_sessionmaker[AsyncSession] = session_factory(engine)
        self._postgres = engine.dialect.name == "postgresql"
        self._stopping = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._db_down = False
        self.published = 0

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand (also while it waits for the
        broker or the database)."""
        self._stopping.set()

    @property
    def connection(self) -> AbstractRobustConnection | None:
        """The broker connection in use (None before the first and after a broker failure)."""
        return self._connection

    @property
    def database_down(self) -> bool:
        """True from a failed poll of an unreachable database until one goes through."""
        return self._db_down

    async def _exchange_or_connect(self) -> AbstractExchange:
        """The events exchange; waits for the broker (``CancelledError`` once stopped)."""
        if self._exchange is not None and self._connection and not self._connection.is_closed:
            return self._exchange
        connection = await connect(self.settings.amqp_url, name="herald relay",
                                   stop=self._stopping)
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

        Raises:
            DatabaseUnavailable: the database cannot be reached (the broker
                connection is fine and kept).
            AMQP connection errors, TimeoutError, OSError: the broker failed (rows
                confirmed before the failure are marked first).
        An unroutable or nacked row keeps its place with ``last_error`` set.
        """
        exchange = await self._exchange_or_connect()
        done = 0
        broker_error: BaseException | None = None
        try:
            async with self.sessions() as session:
                query = (select(OutboxEvent).where(col(OutboxEvent.published_at).is_(None))
                         .order_by(col(OutboxEvent.created_at))
                         .limit(self.settings.relay_batch))
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
                        except _BROKER_ERRORS as exc:
                            # Kept apart from the database's errors (both can be
                            # OSError): this one drops the broker connection.
                            broker_error = exc
                            break
                        row.published_at = datetime.now(UTC)
                        row.last_error = None
                        done += 1
                finally:
                    # Also on a broker error mid-batch: the rows confirmed so far
                    # stay marked (the row locks are held until here).
                    await session.commit()
        except Exception as exc:
            if is_outage(exc):
                raise DatabaseUnavailable(_short(exc)) from exc
            raise
        self.published += done
        RELAYED.inc(done)
        if broker_error is not None:
            raise broker_error
        return done

    async def run(self) -> None:
        """Publish until :meth:`stop`; survives broker and database outages."""
        backoff = self.settings.relay_interval
        while not self._stopping.is_set():
            try:
                done = await self.publish_batch()
            except asyncio.CancelledError:
                if self._stopping.is_set() and not _cancelling():
                    break  # stopped while waiting for the broker
                raise
            except DatabaseUnavailable as exc:
                if not self._db_down:
                    self._db_down = True
                    log.warning("database unreachable (%s); polling until it is back, "
                                "the broker connection stays open", exc)
                backoff = min(backoff * 2 if backoff else 0.5, _DB_MAX_BACKOFF)
            except _BROKER_ERRORS as exc:
                log.warning("broker unavailable (%s); reconnecting in %.1fs", _short(exc),
                            backoff)
                await self._drop_connection()
                backoff = min(backoff * 2 if backoff else 0.5, _MAX_BACKOFF)
            except DBAPIError as exc:  # not an outage: a statement failed; try again later
                log.error("outbox poll failed (%s); retrying in %.1fs", _short(exc), backoff)
                backoff = min(backoff * 2 if backoff else 0.5, _MAX_BACKOFF)
            else:
                if self._db_down:
                    self._db_down = False
                    log.info("database reachable again; publishing the outbox")
                backoff = self.settings.relay_interval
                if done >= self.settings.relay_batch:
                    continue
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
        await self._drop_connection()

    async def wait_for_database(self) -> bool:
        """Set up the schema, waiting while the database is unreachable (one line when it
        is, one when it answers); False if stopped meanwhile.

        Raises:
            HeraldError: the schema cannot be set up (as :func:`herald.db.init_db`).
        """
        backoff = 0.5
        waiting = False
        while not self._stopping.is_set():
            try:
                await init_db(self.engine)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                if not waiting:
                    waiting = True
                    log.warning("database unreachable at start-up (%s); waiting for it",
                                _short(exc))
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, _DB_MAX_BACKOFF)
                continue
            if waiting:
                log.info("database reachable")
            return True
        return False

    async def _drop_connection(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            with suppress(Exception):
                await connection.close()


async def _main(settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    relay = Relay(settings, engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    try:
        if await relay.wait_for_database():
            log.info("relay started")
            await relay.run()
    finally:
        await engine.dispose()
    log.info("relay stopped after publishing %d events", relay.published)


def main() -> None:
    """``python -m producer.relay``."""
    die_with_parent()
    settings = load_settings()
    setup_logging(settings.log_level, "relay")
    setup_sentry(settings.sentry_dsn, "relay")
    asyncio.run(_main(settings))


if __name__ == "__main__":
    main()
