"""The signup email as a Dramatiq actor (``dramatiq bench.dramatiq_job``; see bench.rivals).

Configured from ``BENCH_*`` variables when the worker imports it: the broker
(``BENCH_AMQP_URL``), the actor's queue (``BENCH_RIVAL_QUEUE``; Dramatiq adds
``<queue>.DQ`` and ``<queue>.XQ``) and the queue type (``BENCH_RIVAL_QUEUE_TYPE``).
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.rivals import mailer

ACTOR = "send_signup"


class QuorumRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitmqBroker declaring its work and delay queues as quorum queues
    (herald's work queues are quorum; Dramatiq has no setting for it). Its dead-letter
    queue stays classic: it is never consumed here."""

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(  # type: ignore[no-untyped-call]
            queue_name)
        arguments["x-queue-type"] = "quorum"
        return arguments


def make_broker(url: str, queue_type: str, confirm_delivery: bool = False) -> RabbitmqBroker:
    """The broker for ``queue_type`` (quorum or classic), default middleware;
    ``confirm_delivery`` for the bench's pre-fill (the worker only consumes)."""
    cls = QuorumRabbitmqBroker if queue_type == "quorum" else RabbitmqBroker
    return cls(url=url, confirm_delivery=confirm_delivery)


broker = make_broker(os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
                     os.environ.get("BENCH_RIVAL_QUEUE_TYPE", "quorum"))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=ACTOR, queue_name=os.environ.get("BENCH_RIVAL_QUEUE", "bench-dramatiq"))
def send_signup(event: dict[str, Any]) -> None:
    """Render and send one signup email."""
    mailer().deliver(event)
