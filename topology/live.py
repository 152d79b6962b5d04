"""Live updates over RabbitMQ: new inbox items to every API process, cache invalidations to workers.

Routing keys on ``Names.live`` (a topic exchange):
- ``notification.<user_id>``: body = the inbox item JSON (``NotificationItem``:
  id, event_id, event_type, title, body, read, created_at).
- ``user.<user_id>.changed``: body = ``{"user_id": ...}``; a user's contact details or
  preferences changed, cached copies must be dropped.

Fan-out goes through the broker, never process memory, so any number of API
processes each see every item. The traffic is transient by design: messages
are not persistent, and each subscriber reads its own exclusive, auto-delete
queue that holds at most :data:`QUEUE_MAX_LENGTH` messages for at most
:data:`MESSAGE_TTL` (oldest dropped first). What a subscriber misses while
its connection is down is gone; ``subscribe(..., gaps=True)`` says when that
may have happened, so the caller can re-read its source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from yarl import URL

from herald.errors import HeraldError
from herald.settings import Settings
from topology.spec import Names, build


def notification_key(user_id: str) -> str:
    """Routing key of a new inbox item for ``user_id``."""
    return f"notification.{user_id}"


def user_changed_key(user_id: str) -> str:
    """Routing key saying ``user_id``'s contacts or preferences changed."""
    return f"user.{user_id}.changed"


USER_CHANGED_PATTERN = "user.*.changed"

#: The key a ``gaps=True`` subscription yields (with an empty body) after its
#: queue was re-created: messages published in between were lost.
GAP = ""

#: Seconds to open the connection (TCP + AMQP handshake).
CONNECT_TIMEOUT = 3.0
#: Seconds one ``publish`` may take in all, connecting included.
PUBLISH_TIMEOUT = 5.0
#: Seconds to open a subscription (channel, queue, bindings, consumer).
SUBSCRIBE_TIMEOUT = 5.0
#: After a failed connect, fail at once for this long instead of trying again:
#: a burst of requests while the broker is down must not each wait a timeout.
RETRY_AFTER = 2.0
#: Seconds between reconnect attempts of the robust connection.
RECONNECT_INTERVAL = 1.0
#: A subscriber's queue keeps at most this many messages, dropping the oldest.
QUEUE_MAX_LENGTH = 1000
#: A message nobody took within this many seconds expires.
MESSAGE_TTL = 60.0
#: Messages handed to a subscriber before it takes them (the rest wait in its queue).
PREFETCH = 20
#: Seconds to close a subscription or the connection before giving up on it.
CLOSE_TIMEOUT = 5.0

log = logging.getLogger("herald.live")


class LiveUnavailable(HeraldError):
    """Raised when a subscription cannot be opened: broker unreachable, timeout, or hub closed."""


_END = object()


class Subscription:
    """The messages of one exclusive queue as ``(routing_key, body)``; ends when closed.

    Each message is acknowledged when the iterator hands it out, so at most
    :data:`PREFETCH` wait in this process and the rest in the broker queue,
    which is bounded. A body that is not a JSON object is logged and skipped.
    """

    def __init__(self, hub: LiveHub, channel: AbstractRobustChannel, gaps: bool) -> None:
        self._hub = hub
        self._channel = channel
        self._report_gaps = gaps
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._closed = False
        #: The queue's name (unique; exclusive to this connection).
        self.queue_name = ""
        #: How often the queue was re-created after a reconnect (messages may be lost).
        self.gaps = 0

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(message)

    def _reopened(self, _channel: Any) -> None:
        # The robust channel re-declared the queue, its bindings and consumer.
        self.gaps += 1
        log.info("live subscription re-established after a reconnect (gap %d)", self.gaps)
        if self._report_gaps and not self._closed:
            self._inbox.put_nowait((GAP, {}))

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[str, dict[str, Any]]:
        while True:
            if self._closed:
                raise StopAsyncIteration
            item = await self._inbox.get()
            if item is _END:
                self._inbox.put_nowait(_END)  # for any other waiter
                raise StopAsyncIteration
            if isinstance(item, tuple):
                return item
            assert isinstance(item, AbstractIncomingMessage)
            # A message received before a reconnect cannot be acked on the new
            # channel; its queue is gone anyway, so the ack is moot.
            with contextlib.suppress(Exception):
                await item.ack()
            try:
                body = json.loads(item.body)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                log.warning("live message on %r is not a JSON object; skipped", item.routing_key)
                continue
            return item.routing_key or "", body

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed

    async def aclose(self) -> None:
        """End the iteration and close the channel (which deletes the queue); idempotent."""
        if not self._closed:
            self._closed = True
            self._inbox.put_nowait(_END)
            self._channel.reopen_callbacks.discard(self._reopened)
        if self._channel.is_closed:
            self._hub._forget(self)
            return
        try:
            await asyncio.wait_for(self._channel.close(), CLOSE_TIMEOUT)
        except Exception as exc:
            log.debug("closing a live subscription: %s", exc)
        self._hub._forget(self)


class LiveHub:
    """One lazily opened robust connection per process for publishing and subscribing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        [spec] = [ex for ex in build(settings).exchanges if ex.name == self.names.live]
        self._exchange_type = aio_pika.ExchangeType(spec.type)
        self._lock = asyncio.Lock()
        self._exchange_lock = asyncio.Lock()
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._retry_at = 0.0
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._subscriptions: set[Subscription] = set()

    # --- connection ---------------------------------------------------------------------

    async def _connect(self) -> AbstractRobustConnection:
        """The open connection, opened on first use; LiveUnavailable when it cannot be."""
        async with self._lock:
            if self._closed:
                raise LiveUnavailable("the live hub is closed")
            if self._connection is not None:
                if not self._connection.connected.is_set():
                    raise LiveUnavailable("the message broker connection is down; reconnecting")
                return self._connection
            loop = asyncio.get_running_loop()
            if loop.time() < self._retry_at:
                raise LiveUnavailable("the message broker was unreachable moments ago")
            connection = aio_pika.RobustConnection(
                URL(self.settings.amqp_url), reconnect_interval=RECONNECT_INTERVAL,
                client_properties={"connection_name": f"herald live ({self.settings.prefix})"})
            try:
                await asyncio.wait_for(connection.connect(timeout=CONNECT_TIMEOUT),
                                       CONNECT_TIMEOUT + 1)
            except BaseException as exc:
                self._retry_at = loop.time() + RETRY_AFTER
                with contextlib.suppress(Exception):
                    await connection.close()
                if isinstance(exc, Exception):
                    raise LiveUnavailable(
                        f"cannot reach the message broker: {type(exc).__name__}: {exc}"
                    ) from exc
                raise
            self._connection = connection
            return connection

    async def _declare_exchange(self, channel: AbstractRobustChannel) -> AbstractExchange:
        # Same type and durability as ``topology.declare``: idempotent, and works
        # before the topology was declared.
        return await channel.declare_exchange(self.names.live, self._exchange_type, durable=True)

    # --- publishing ---------------------------------------------------------------------

    async def publish(self, routing_key: str, body: dict[str, Any]) -> bool:
        """Publish ``body`` as JSON; False (logged, never raised) when the broker is unreachable.

        Takes at most :data:`PUBLISH_TIMEOUT` seconds, connecting included,
        and returns at once while the connection is known to be down. True
        means the broker confirmed it (it may still reach no subscriber).
        """
        try:
            await asyncio.wait_for(self._publish(routing_key, body), PUBLISH_TIMEOUT)
        except Exception as exc:
            log.warning("live update %s not published: %s: %s", routing_key,
                        type(exc).__name__, exc)
            return False
        return True

    async def _publish_exchange(self) -> AbstractExchange:
        """The live exchange on the publishing channel (publisher confirms), opened once."""
        connection = await self._connect()
        async with self._exchange_lock:
            if self._exchange is not None:
                return self._exchange
            channel = await connection.channel(publisher_confirms=True)
            try:
                self._exchange = await self._declare_exchange(channel)
                self._publish_channel = channel
            except BaseException:
                with contextlib.suppress(Exception):
                    await channel.close()
                raise
            return self._exchange

    async def _publish(self, routing_key: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        exchange = await self._publish_exchange()
        message = aio_pika.Message(payload, content_type="application/json",
                                   delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)
        try:
            await exchange.publish(message, routing_key, mandatory=False,
                                   timeout=PUBLISH_TIMEOUT)
        except BaseException:
            # Start from a fresh channel next time (this one may be closed or stuck).
            channel, self._publish_channel, self._exchange = self._publish_channel, None, None
            if channel is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT)
            raise

    # --- subscribing --------------------------------------------------------------------

    async def listen(self, *binding_keys: str, gaps: bool = False) -> Subscription:
        """Open a subscription bound with ``binding_keys``; the caller must ``aclose()`` it.

        Raises:
            LiveUnavailable: the broker is unreachable or did not answer within
                :data:`SUBSCRIBE_TIMEOUT` (or the hub is closed).
        """
        if not binding_keys:
            raise ValueError("give at least one binding key")
        connection = await self._connect()
        try:
            channel = await asyncio.wait_for(connection.channel(publisher_confirms=False),
                                             SUBSCRIBE_TIMEOUT)
        except Exception as exc:
            raise LiveUnavailable(f"cannot open a channel: {type(exc).__name__}: {exc}") from exc
        subscription = Subscription(self, channel, gaps)
        self._subscriptions.add(subscription)
        try:
            await asyncio.wait_for(self._setup(channel, subscription, binding_keys),
                                   SUBSCRIBE_TIMEOUT)
        except BaseException as exc:
            await subscription.aclose()
            if isinstance(exc, Exception):
                raise LiveUnavailable(
                    f"cannot subscribe to live updates: {type(exc).__name__}: {exc}") from exc
            raise
        return subscription

    async def _setup(self, channel: AbstractRobustChannel, subscription: Subscription,
                     binding_keys: tuple[str, ...]) -> None:
        await channel.set_qos(prefetch_count=PREFETCH)
        exchange = await self._declare_exchange(channel)
        # No name: aio-pika picks a unique one, so the robust channel can declare the
        # same queue again after a reconnect. Exclusive: gone with the connection;
        # auto-delete: gone with its consumer (the channel).
        queue = await channel.declare_queue(exclusive=True, auto_delete=True, arguments={
            "x-queue-type": "classic",
            "x-max-length": QUEUE_MAX_LENGTH,
            "x-overflow": "drop-head",
            "x-message-ttl": round(MESSAGE_TTL * 1000),
        })
        subscription.queue_name = queue.name
        for key in binding_keys:
            await queue.bind(exchange, key)
        await queue.consume(subscription._deliver, no_ack=False)
        channel.reopen_callbacks.add(subscription._reopened)

    def subscribe(self, *binding_keys: str, gaps: bool = False
                  ) -> AbstractAsyncContextManager[AsyncIterator[tuple[str, dict[str, Any]]]]:
        """An exclusive auto-delete queue bound with ``binding_keys``; yields (key, body).

        Entering raises :class:`LiveUnavailable` when the broker cannot be
        reached. The subscription survives reconnects of the connection (the
        queue is declared again; what was published meanwhile is lost). With
        ``gaps=True`` it then yields ``(GAP, {})`` first. The iteration ends
        when the hub is closed.
        """
        return self._subscribed(binding_keys, gaps)

    @asynccontextmanager
    async def _subscribed(self, binding_keys: tuple[str, ...], gaps: bool
                          ) -> AsyncIterator[AsyncIterator[tuple[str, dict[str, Any]]]]:
        subscription = await self.listen(*binding_keys, gaps=gaps)
        try:
            yield subscription
        finally:
            await subscription.aclose()

    @property
    def open_subscriptions(self) -> int:
        """Subscriptions opened and not yet closed (one queue and channel each)."""
        return len(self._subscriptions)

    def _forget(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called: no new subscription or publish."""
        return self._closed

    async def aclose(self) -> None:
        """End every subscription and close the connection if one was opened; idempotent.

        Every call waits for one close, bounded by :data:`CLOSE_TIMEOUT` per
        step. The close runs in a task of its own: a caller cancelled while
        it waits stops waiting at once, and the close goes on (an AMQP close
        interrupted half-way, as ``asyncio.run`` does to what is left at its
        end, never completes: the process hung on exit).
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        async with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
            self._exchange = self._publish_channel = None
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)
            except Exception as exc:
                log.debug("closing the live connection: %s", exc)
