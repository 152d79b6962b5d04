"""Declare the topology on a broker: idempotent, and precise when it cannot match."""

from __future__ import annotations

import re
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.exceptions import ChannelPreconditionFailed

from herald.errors import TopologyError, TopologyMismatch
from topology.spec import QueueSpec, Topology

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']*)'.*?"
    r"received (?:the value '(?P<got>[^']*)' of type '(?P<got_type>[^']*)'|'[^']*'|none)"
    r" but current is (?:the value '(?P<cur>[^']*)' of type '(?P<cur_type>[^']*)'"
    r"|'(?P<cur_bare>[^']*)'|none)"
)
_NOT_FOUND = object()


def _typed(value: str | None, type_name: str | None, bare: str | None) -> Any:
    if value is None:
        if bare is None:
            return _NOT_FOUND
        # Quorum queues report values without their type.
        return int(bare) if bare.lstrip("-").isdigit() else bare
    if type_name in ("long", "signedint", "short", "byte", "unsignedbyte", "unsignedshort",
                     "unsignedint"):
        return int(value)
    if type_name == "bool":
        return value == "true"
    return value


async def _declare_queue(connection: AbstractRobustConnection, spec: QueueSpec) -> None:
    """Declare one queue; on 406 find every differing argument and raise TopologyMismatch.

    RabbitMQ reports one inequivalent argument per refusal and closes the
    channel, so we retry with the broker's value for that argument until the
    declaration passes, collecting each difference on the way.
    """
    wanted = dict(spec.arguments)
    trial = dict(wanted)
    differences: dict[str, tuple[object, object]] = {}
    for _ in range(len(wanted) + 4):
        channel = await connection.channel()
        try:
            await channel.declare_queue(spec.name, durable=True, arguments=trial)
        except ChannelPreconditionFailed as exc:
            text = str(exc)
            match = _INEQUIVALENT.search(text)
            if not match or match.group("arg") in differences:
                raise TopologyError(f"queue {spec.name!r}: broker refused it: {text}") from None
            arg = match.group("arg")
            current = _typed(match.group("cur"), match.group("cur_type"), match.group("cur_bare"))
            differences[arg] = (None if current is _NOT_FOUND else current, wanted.get(arg))
            if arg == "durable":
                raise TopologyMismatch(spec.name, differences) from None
            if current is _NOT_FOUND:
                trial.pop(arg, None)
            else:
                trial[arg] = current
            continue
        finally:
            if not channel.is_closed:
                await channel.close()
        if differences:
            raise TopologyMismatch(spec.name, differences)
        return
    raise TopologyMismatch(spec.name, differences)


async def declare(connection: AbstractRobustConnection, topology: Topology) -> None:
    """Create every exchange, queue and binding of ``topology``.

    Idempotent: running it again changes nothing. Raises ``TopologyMismatch``
    naming the queue and each differing argument when a queue already exists
    with other arguments (rather than RabbitMQ's bare 406).
    """
    for queue in topology.queues:
        await _declare_queue(connection, queue)
    channel: AbstractChannel = await connection.channel()
    try:
        exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        for ex in topology.exchanges:
            try:
                exchanges[ex.name] = await channel.declare_exchange(
                    ex.name, aio_pika.ExchangeType(ex.type), durable=True
                )
            except ChannelPreconditionFailed as exc:
                raise TopologyError(f"exchange {ex.name!r}: broker refused it: {exc}") from None
        for binding in topology.bindings:
            target = await channel.get_queue(binding.queue, ensure=False)
            await target.bind(exchanges[binding.exchange], binding.routing_key)
    finally:
        await channel.close()
