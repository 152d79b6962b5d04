"""The signup email as a Celery task (``celery -A bench.celery_job worker``; see bench.rivals).

Configured from ``BENCH_*`` variables when the worker imports it: the broker
(``BENCH_AMQP_URL``), the queue (``BENCH_RIVAL_QUEUE``; its exchange and routing key
take the same name, so each run's names are its own on the shared broker) and the
queue type (``BENCH_RIVAL_QUEUE_TYPE``: quorum, like herald's work queues, or classic).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.worker.consumer.delayed_delivery import (  # type: ignore[import-untyped]
    DelayedDelivery,
)

from bench.rivals import mailer

TASK = "bench.send_signup"

# With a quorum queue Celery (5.5+) also declares its native delayed-delivery topology:
# 28 broker-wide exchanges and queues named celery_delayed_<n>, shared by every Celery
# app on the broker and never removed. Only ETA/countdown tasks use them and this job
# has none, so on the shared broker the step is left out; the per-task path is the same.
DelayedDelivery.include_if = lambda self, c: False


def make_app(broker_url: str, queue: str, queue_type: str, confirm_publish: bool = False
             ) -> Celery:
    """The Celery app: ``acks_late`` (ack after the email went, as herald acks after
    recording), no result backend, default prefetch multiplier, names from ``queue``;
    ``confirm_publish`` for the bench's pre-fill (the worker only consumes)."""
    app = Celery("bench_celery", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        task_default_queue_type=queue_type,
        worker_enable_remote_control=False,  # no pidbox queue per worker on the broker
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        broker_transport_options={"confirm_publish": confirm_publish},
    )

    @app.task(name=TASK)  # type: ignore[untyped-decorator]
    def send_signup(event: dict[str, Any]) -> None:
        mailer().deliver(event)

    return app


app = make_app(os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
               os.environ.get("BENCH_RIVAL_QUEUE", "bench-celery"),
               os.environ.get("BENCH_RIVAL_QUEUE_TYPE", "quorum"))
