"""The worker runtime: consume a channel's queue, ack, retry through tiers, dead-letter.

Every message ends in exactly one of: ack after delivery; ack after a
confirmed publish to a retry tier; ack after a confirmed publish to the DLQ;
or no ack at all (connection lost, worker killed), so the broker redelivers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, Protocol

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.dbgate import DatabaseGate
from consumers.retry import DeadLetter, plan
from consumers.slots import Slots
from consumers.units import unit_copy
from herald.amqp import connect
from herald.errors import (
    ChannelDown,
    DeliveryFailure,
    PermanentError,
    TransientError,
)
from herald.metrics import INFLIGHT, MESSAGES, PAUSED, QUEUE_DEPTH
from herald.settings import Settings
from topology.declare import declare
from topology.envelope import CONTENT_TYPE, Envelope
from topology.messages import build_message
from topology.spec import (
    H_ATTEMPT,
    H_ATTEMPTS_TOTAL,
    H_DELIVERIES,
    H_FIRST_FAILURE,
    H_LAST_ERROR,
    H_REASON,
    H_ROUTING_KEY,
    H_UNIT,
    Names,
    build,
)

log = logging.getLogger("herald.worker")


class ChannelHandler(Protocol):
    """Delivers one envelope on one channel; raises ``DeliveryFailure`` subclasses."""

    name: str

    async def units(self, envelope: Envelope) -> list[str]:
        """The units of work ``envelope`` names on this channel, each once: the recipients'
        user ids (push: ``<user_id>/<device_id>``, or the bare user id of someone without
        devices, whose "no" is recorded by :meth:`deliver`)."""

    async def deliver(self, envelope: Envelope, unit: str) -> None:
        """Deliver to that one unit (idempotently), or raise."""

    async def dead_lettered(self, envelope: Envelope, unit: str | None, reason: str) -> None:
        """Record that the unit (None: every unsettled unit of the envelope) went to the DLQ
        (the "why was I not notified")."""

    async def unavailable_for(self) -> float:
        """Seconds until the channel can deliver again (0: now); the worker pauses meanwhile."""

    async def aclose(self) -> None:
        """Release connections when the worker stops."""

    async def tick(self) -> None:
        """Periodic work (digests), every ``digest_interval``; errors are logged."""


def _int_header(headers: dict[str, Any], name: str) -> int:
    try:
        return int(headers.get(name, 0))
    except (TypeError, ValueError):
        return 0


class _Outage(Exception):
    """The database is unreachable: wait for it, then handle the same message again."""


class Worker:
    """Consumes ``<prefix>.<channel>`` with bounded concurrency until :meth:`stop`.

    ``engine`` (the channel's database) lets the worker tell a database
    outage from a failed delivery: while the database is unreachable it stops
    consuming, holds the messages in hand unacked, spends no retries, and
    handles them again once a probe answers.
    """

    def __init__(self, settings: Settings, handler: ChannelHandler,
                 engine: AsyncEngine | None = None) -> None:
        self.settings = settings
        self.handler = handler
        self.engine = engine
        self.names = Names(settings.prefix)
        self._stop = asyncio.Event()
        self._down = asyncio.Event()  # set when a message found every provider down
        self._recovered = asyncio.Event()  # set when a probe after a pause went through
        self._db = DatabaseGate(engine, handler.name, self._stop)
        self._probing = False
        self._slots = Slots(settings.concurrency)
        self._prefetch = settings.prefetch
        self._resized = asyncio.Event()  # set when the slots outgrew the prefetch
        #: Retries back from the delay tiers get slots of their own (the room kept for
        #: them): they never queue behind new work for a slot either.
        self._due_slots = Slots(max(1, settings.concurrency // 2))
        self._inflight: set[asyncio.Task[None]] = set()
        self._retry: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._default: AbstractExchange | None = None
        self.ready = asyncio.Event()
        #: Long-running side jobs (cache invalidation listeners) started with the consumer
        #: and cancelled when it stops.
        self.background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.stats = {"delivered": 0, "retried": 0, "deferred": 0, "dead_lettered": 0}

    def stop(self) -> None:
        """Stop consuming; :meth:`run` finishes in-flight work and returns."""
        self._stop.set()

    async def run(self) -> None:
        """Connect (waiting for the broker), declare, consume until stopped, then drain
        within ``shutdown_timeout``."""
        try:
            connection: AbstractRobustConnection = await connect(
                self.settings.amqp_url, name=f"herald worker {self.handler.name}",
                stop=self._stop)
        except asyncio.CancelledError:
            if self._stop.is_set():  # stopped while waiting for the broker
                return
            raise
        try:
            await declare(connection, build(self.settings))
            channel: AbstractChannel = await connection.channel(
                publisher_confirms=True, on_return_raises=True)
            await channel.set_qos(prefetch_count=self._prefetch)
            self._retry = await channel.get_exchange(self.names.retry)
            self._dlx = await channel.get_exchange(self.names.dlx)
            self._default = channel.default_exchange
            work: AbstractQueue = await channel.get_queue(self.names.work(self.handler.name))
            due: AbstractQueue = await channel.get_queue(self.names.due(self.handler.name))
            # Two consumers: new work, and retries back from the delay tiers. Each
            # has its own prefetch (per consumer) and its own slots, so a retry due
            # now is taken at once even with a backlog of new work queued.
            consumers = _Consumers([(work, self._on_message), (due, self._on_due)])
            await consumers.start()
            sampler = asyncio.create_task(self._sample_depths(connection))
            sizer = asyncio.create_task(self._size_to_provider())
            ticker = asyncio.create_task(self._tick())
            side = [asyncio.create_task(job()) for job in self.background]
            self.ready.set()
            log.info("consuming %s and %s (prefetch %d, concurrency %d)", work.name, due.name,
                     self.settings.prefetch, self.settings.concurrency)
            while not self._stop.is_set():
                await _first(self._stop.wait(), self._down.wait(), self._recovered.wait(),
                             self._db.went_down.wait(), self._resized.wait())
                if self._resized.is_set():
                    self._resized.clear()
                    if consumers.active and not self._probing and not self._stop.is_set():
                        # A qos change applies to consumers started after it.
                        await channel.set_qos(prefetch_count=self._prefetch)
                        await consumers.cancel()
                        await consumers.start()
                    continue
                if self._db.went_down.is_set() and not self._stop.is_set():
                    # The database is gone: take no more messages until it answers.
                    await consumers.cancel()
                    PAUSED.labels(self.handler.name).set(1)
                    await _first(self._stop.wait(), self._db.ok.wait())
                    PAUSED.labels(self.handler.name).set(0)
                    self._db.went_down.clear()
                    if not self._stop.is_set():
                        await consumers.start()
                    continue
                if self._recovered.is_set() and not self._stop.is_set() and consumers.active:
                    # The probe went through: back to the full prefetch (a qos
                    # change applies to consumers started after it).
                    self._recovered.clear()
                    await channel.set_qos(prefetch_count=self._prefetch)
                    await consumers.cancel()
                    await consumers.start()
                    log.info("%s providers are back: full prefetch again", self.handler.name)
                self._down.clear()
                wait = 0.0 if self._stop.is_set() else await self.handler.unavailable_for()
                if wait <= 0 or not consumers.active:
                    continue
                # Every provider is down: leave the messages in the queue rather
                # than spin them through the retry tiers, until a probe may go.
                await consumers.cancel()
                PAUSED.labels(self.handler.name).set(1)
                self.stats["paused"] = self.stats.get("paused", 0) + 1
                log.warning("every %s provider is down: consumption paused for %.1fs",
                            self.handler.name, wait)
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)
                PAUSED.labels(self.handler.name).set(0)
                if not self._stop.is_set():
                    # One message at a time until one goes through: a probe, not
                    # a prefetch's worth of messages bounced back to the tiers.
                    await channel.set_qos(prefetch_count=1)
                    self._probing = True
                    self._recovered.clear()
                    await consumers.start()
                    log.info("resuming %s: the next message probes the providers", work.name)
            sampler.cancel()
            sizer.cancel()
            for task in side:
                task.cancel()
            self._db.close()
            await consumers.cancel()
            await self._drain()
            # A digest being sent finishes (it returns on stop); cancel only past the bound.
            with suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(ticker, self.settings.shutdown_timeout)
            await asyncio.gather(sampler, sizer, *side, return_exceptions=True)
        finally:
            with suppress(Exception):
                await self.handler.aclose()
            with suppress(Exception):
                await connection.close()

    async def _tick(self) -> None:
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.digest_interval)
            if self._stop.is_set():
                return
            if not self._db.ok.is_set():
                continue  # nothing to digest from a database that does not answer
            try:
                await self.handler.tick()
            except Exception as exc:
                if await self._db.suspect(exc):
                    continue
                log.exception("periodic work of %s failed", self.handler.name)

    async def _size_to_provider(self) -> None:
        """Every second, fit the slots (and the prefetch) to rate x latency."""
        wanted = getattr(self.handler, "wanted_inflight", None)
        if wanted is None:
            return
        floor, ceiling = self.settings.concurrency, max(self.settings.concurrency,
                                                       self.settings.max_concurrency)
        while not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)
            size = int(wanted(floor, ceiling))
            if size == self._slots.size:
                continue
            log.info("%s: %d messages in flight to keep the provider at its cap (was %d)",
                     self.handler.name, size, self._slots.size)
            await self._slots.resize(size)
            if size > self._prefetch or self._prefetch > max(size, self.settings.prefetch):
                self._prefetch = max(size, self.settings.prefetch)
                self._resized.set()

    async def _sample_depths(self, connection: AbstractRobustConnection) -> None:
        """Keep ``herald_queue_messages`` current for this channel's work queue and DLQ.

        Uses its own channel: a failed passive declare closes the channel it ran on.
        """
        names = (self.names.work(self.handler.name), self.names.dlq(self.handler.name))
        while True:
            with suppress(Exception):
                channel = await connection.channel()
                try:
                    for name in names:
                        queue = await channel.declare_queue(name, passive=True)
                        QUEUE_DEPTH.labels(name).set(queue.declaration_result.message_count or 0)
                finally:
                    await channel.close()
            await asyncio.sleep(15)

    async def _drain(self) -> None:
        if not self._inflight:
            return
        log.info("waiting up to %.1fs for %d in-flight messages", self.settings.shutdown_timeout,
                 len(self._inflight))
        _done, pending = await asyncio.wait(self._inflight, timeout=self.settings.shutdown_timeout)
        for task in pending:
            task.cancel()  # the handler returns the message to the queue
        if pending:
            await asyncio.wait(pending, timeout=5)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._spawn(self._handle(message, self._slots))

    async def _on_due(self, message: AbstractIncomingMessage) -> None:
        self._spawn(self._handle(message, self._due_slots))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    # --- one message ------------------------------------------------------------------

    async def _handle(self, message: AbstractIncomingMessage, slots: Slots) -> None:
        channel = self.handler.name
        async with slots:
            INFLIGHT.labels(channel).inc()
            try:
                while True:
                    try:
                        await self._process(message)
                        return
                    except _Outage:
                        # Held unacked (no retry spent, no delivery counted) until the
                        # database answers; then the same message is handled again.
                        await _first(self._stop.wait(), self._db.ok.wait())
                        if self._stop.is_set() and not self._db.ok.is_set():
                            await self._nack(message)
                            return
            except asyncio.CancelledError:
                await self._nack(message)
                raise
            except Exception:
                # Nothing may escape a message's task ("Task exception was never
                # retrieved"); unacked, the broker redelivers it.
                log.exception("could not handle message %s; leaving it to the broker",
                              message.message_id)
                await self._nack(message)
            finally:
                INFLIGHT.labels(channel).dec()

    async def _process(self, message: AbstractIncomingMessage) -> None:
        """Handle one message: split it, or deliver its one unit; settle it either way."""
        headers: dict[str, Any] = dict(message.headers or {})
        # Deliveries that died without an outcome: earlier copies' (carried in our
        # header through deferrals and retries) plus this copy's (the broker's count).
        deaths = _int_header(headers, H_DELIVERIES) + _int_header(headers, "x-delivery-count")
        envelope: Envelope | None = None
        unit = _unit(headers)
        try:
            _check_content_type(message)
            try:
                envelope = Envelope.from_json(message.body)
            except (ValidationError, ValueError) as exc:
                raise PermanentError(f"malformed message: {_short(exc)}") from None
            if deaths >= self.settings.delivery_limit:
                await self._dead_letter(
                    message, envelope, unit, headers,
                    f"crash loop: delivered {deaths} times without an outcome (a worker "
                    f"died or was stopped while handling it; HERALD_DELIVERY_LIMIT="
                    f"{self.settings.delivery_limit})")
                return
            if unit is None:
                units = await self.handler.units(envelope)
                if len(units) != 1:
                    await self._split(message, envelope, units, headers)
                    return
                unit = units[0]
            await self.handler.deliver(envelope, unit)
        except DeliveryFailure as exc:
            await self._settle_failure(message, envelope, unit, exc, deaths)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if await self._db.suspect(exc):
                raise _Outage from exc
            log.exception("unexpected error on message %s", message.message_id)
            await self._settle_failure(message, envelope, unit,
                                       TransientError(f"unexpected: {exc!r}"), deaths)
        else:
            await self._ack(message)
            self._count("delivered")
            if self._probing:
                self._probing = False
                self._recovered.set()

    async def _split(self, message: AbstractIncomingMessage, envelope: Envelope,
                     units: list[str], headers: dict[str, Any]) -> None:
        """Publish one message per unit to this channel's queue (confirmed), then ack."""
        channel = self.handler.name
        assert self._default is not None
        work = self.names.work(channel)
        event_type = message.type or envelope.type
        await asyncio.gather(*(
            self._default.publish(unit_copy(envelope, channel, unit, headers, event_type),
                                  routing_key=work, mandatory=True, timeout=10)
            for unit in units))
        await self._ack(message)
        self._count("split")
        log.info("event %s split into %d %s messages", envelope.id, len(units), channel)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except Exception as exc:
            # The connection went (broker restart): the broker redelivers the message
            # and the delivery claim makes the redelivery a no-op.
            log.warning("could not ack message %s (%s); the broker will redeliver it",
                        message.message_id, _reason(exc))

    async def _nack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.nack(requeue=True)
        except Exception as exc:
            log.warning("could not return message %s (%s); the broker will redeliver it",
                        message.message_id, _reason(exc))

    def _count(self, outcome: str) -> None:
        self.stats[outcome] = self.stats.get(outcome, 0) + 1
        MESSAGES.labels(self.handler.name, outcome).inc()

    async def _dead_letter(self, message: AbstractIncomingMessage, envelope: Envelope | None,
                           unit: str | None, headers: dict[str, Any], reason: str) -> None:
        headers.setdefault(H_FIRST_FAILURE, datetime.now(UTC).isoformat())
        headers.setdefault(H_ROUTING_KEY, message.routing_key or "")
        headers[H_LAST_ERROR] = headers.get(H_LAST_ERROR) or reason[:1000]
        headers[H_REASON] = reason[:1000]
        assert self._dlx is not None
        await self._dlx.publish(self._copy(message, headers), routing_key=self.handler.name,
                                mandatory=True, timeout=10)
        await self._ack(message)
        self._count("dead_lettered")
        log.warning("message %s dead-lettered: %s", message.message_id, reason)
        if envelope is not None:
            try:  # the DLQ entry is the record that counts
                await self.handler.dead_lettered(envelope, unit, reason)
            except Exception as exc:
                log.warning("message %s: DLQ reason not recorded (%s)", message.message_id,
                            _reason(exc))

    async def _settle_failure(self, message: AbstractIncomingMessage, envelope: Envelope | None,
                              unit: str | None, exc: DeliveryFailure, deaths: int) -> None:
        headers: dict[str, Any] = dict(message.headers or {})
        retries = _int_header(headers, H_ATTEMPT)
        now = datetime.now(UTC)
        first = headers.setdefault(H_FIRST_FAILURE, now.isoformat())
        headers.setdefault(H_ROUTING_KEY, message.routing_key or "")
        headers[H_LAST_ERROR] = exc.reason[:1000]
        headers[H_ATTEMPTS_TOTAL] = _int_header(headers, H_ATTEMPTS_TOTAL) + 1
        # The copy keeps counting the deliveries that died: a message that crashes
        # its worker cannot start afresh by being deferred (lease) or retried.
        headers[H_DELIVERIES] = deaths
        step = plan(self.settings, retries, exc, waited=_seconds_since(first, now))
        channel = self.handler.name
        try:
            if isinstance(step, DeadLetter):
                await self._dead_letter(message, envelope, unit, headers, step.reason)
                return
            headers[H_ATTEMPT] = step.retries
            assert self._retry is not None
            await self._retry.publish(
                self._copy(message, headers),
                routing_key=self.names.retry_key(channel, step.delay),
                mandatory=True, timeout=10)
            if isinstance(exc, ChannelDown):
                self._down.set()
            deferred = step.retries == retries
            self._count("deferred" if deferred else "retried")
            log.info("message %s: %s in %.3gs (%s)", message.message_id,
                     "deferred" if deferred else f"retry {step.retries}", step.delay,
                     exc.reason)
            await self._ack(message)
        except Exception as err:
            # Not acked: the broker redelivers it (now or when we reconnect).
            log.warning("could not settle message %s (%s); leaving it to the broker",
                        message.message_id, _reason(err))
            await self._nack(message)

    @staticmethod
    def _copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
        headers.pop("x-death", None)
        headers.pop("x-delivery-count", None)
        return build_message(message.body, message.message_id or "", message.type or "",
                             headers)


class _Consumers:
    """The worker's consumers (work queue, due queue), started and cancelled together."""

    def __init__(self, queues: list[tuple[AbstractQueue, Callable[
            [AbstractIncomingMessage], Coroutine[Any, Any, None]]]]) -> None:
        self._queues = queues
        self._tags: list[tuple[AbstractQueue, str]] = []

    @property
    def active(self) -> bool:
        """True while consuming."""
        return bool(self._tags)

    async def start(self) -> None:
        """Consume every queue (no-op when already consuming)."""
        if not self._tags:
            for queue, callback in self._queues:
                self._tags.append((queue, await queue.consume(callback)))

    async def cancel(self) -> None:
        """Stop consuming; messages in hand stay ours (unacked) until settled."""
        tags, self._tags = self._tags, []
        for queue, tag in tags:
            with suppress(Exception):
                await queue.cancel(tag)


def _unit(headers: dict[str, Any]) -> str | None:
    value = headers.get(H_UNIT)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value if isinstance(value, str) and value else None


def _check_content_type(message: AbstractIncomingMessage) -> None:
    """Only JSON (or no content type, as some AMQP clients send); raises PermanentError."""
    kind = (message.content_type or "").split(";", 1)[0].strip().lower()
    if kind not in ("", CONTENT_TYPE):
        raise PermanentError(f"unsupported content type {kind!r}: herald reads "
                             f"{CONTENT_TYPE} envelopes only")
    encoding = (message.content_encoding or "").strip().lower()
    if encoding not in ("", "utf-8", "utf8", "identity"):
        raise PermanentError(f"unsupported content encoding {encoding!r}: herald reads "
                             f"plain UTF-8 JSON")


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__


async def _first(*aws: Any) -> None:
    """Wait until the first of ``aws`` completes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _seconds_since(iso: Any, now: datetime) -> float:
    try:
        then = datetime.fromisoformat(str(iso))
    except ValueError:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max((now - then).total_seconds(), 0.0)


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        errs = exc.errors()
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errs[:5])
    return str(exc)[:300]
