"""herald's email job done the usual way in Celery and in Dramatiq, for the comparison.

The job is the one herald's email worker does, minus what only herald does (the
preference check, the idempotency claim and the delivery record in a database):
take one signup event, render ``templates/email/user.signup.{subject,txt,html}.j2``
with jinja2 (a sandboxed environment configured as ``consumers.templates.Renderer``
configures its own: ``StrictUndefined``, HTML autoescaped, ``trim_blocks`` and
``lstrip_blocks``), build an ``email.message.EmailMessage`` as ``consumers/email.py``
does (text part, HTML alternative, ``Message-ID``, ``Date``) and send it over one
SMTP connection per worker process that stays open between tasks (smtplib).

The task modules are ``bench.celery_job`` and ``bench.dramatiq_job``; their workers
are started here as their users start them (``celery worker``, ``dramatiq``), each in
its own session, and every queue and exchange a run made is deleted after it.
Celery and Dramatiq are in the ``bench`` dependency group (``uv run --group bench``),
not in herald's runtime dependencies.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from bench.common import AMQP_URL, REPO, Broker
from bench.workers import WorkerProcess

TEMPLATES = REPO / "templates"
#: herald's default ``HERALD_EMAIL_FROM``.
SENDER = "herald <no-reply@herald.local>"
EVENT = "user.signup"


# ---------------------------------------------------------------- the job itself


class Mailer:
    """Renders a signup email and sends it over one SMTP connection kept for the process.

    Thread-safe: Dramatiq runs tasks in threads, and they share the one connection
    (sends take turns; rendering does not wait for them).
    """

    def __init__(self, host: str, port: int, templates: Path = TEMPLATES,
                 sender: str = SENDER) -> None:
        self.host = host
        self.port = port
        self.sender = sender
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(str(templates)), undefined=StrictUndefined,
            autoescape=lambda name: name is not None and name.endswith(".html.j2"),
            trim_blocks=True, lstrip_blocks=True)
        self._smtp: smtplib.SMTP | None = None
        self._lock = threading.Lock()

    def render(self, part: str, context: dict[str, Any]) -> str:
        """One part of the signup email, stripped."""
        return self.env.get_template(f"email/{EVENT}.{part}.j2").render(context).strip()

    def compose(self, event: dict[str, Any]) -> EmailMessage:
        """The multipart email for the event's (first and only) recipient."""
        recipient = event["recipients"][0]
        context = {"event": event, "recipient": recipient, "data": event["data"],
                   "actor": event["actor"], "occurred_at": event["occurred_at"]}
        message = EmailMessage()
        message["Subject"] = " ".join(self.render("subject", context).split())
        message["From"] = self.sender
        message["To"] = Address(display_name=recipient.get("name") or "",
                                addr_spec=recipient["email"])
        message["Date"] = formatdate(localtime=False)
        message.set_content(self.render("txt", context))
        message.add_alternative(self.render("html", context), subtype="html")
        message["Message-ID"] = f"<{event['id']}.{recipient['user_id']}@herald>"
        message["X-Herald-Event"] = f"{event['type']} {event['id']}"
        return message

    def send(self, message: EmailMessage) -> None:
        """Send over the kept connection; reconnect once if the server had closed it."""
        with self._lock:
            for attempt in (1, 2):
                if self._smtp is None:
                    self._smtp = smtplib.SMTP(self.host, self.port, timeout=10)
                    self._smtp.ehlo()
                try:
                    self._smtp.send_message(message)
                    return
                except smtplib.SMTPServerDisconnected:
                    self._smtp = None
                    if attempt == 2:
                        raise

    def deliver(self, event: dict[str, Any]) -> None:
        """The task: render and send one email."""
        self.send(self.compose(event))


_mailer: Mailer | None = None


def mailer() -> Mailer:
    """This process's mailer, made on first use from ``BENCH_SMTP_HOST``/``BENCH_SMTP_PORT``."""
    global _mailer
    if _mailer is None:
        _mailer = Mailer(os.environ.get("BENCH_SMTP_HOST", "127.0.0.1"),
                         int(os.environ.get("BENCH_SMTP_PORT", "1025")))
    return _mailer


# ---------------------------------------------------------------- running them


def installed(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


class Rival:
    """One run of a rival: a unique queue, pre-filled, drained by one worker process.

    ``prefill`` publishes (from a thread: both clients are blocking), ``start`` spawns
    the worker, ``cleanup`` stops it and deletes every queue and exchange it made.
    """

    name = "rival"
    package = ""

    def __init__(self, smtp_port: int, queue_type: str, log_dir: Path) -> None:
        self.smtp_port = smtp_port
        self.queue_type = queue_type
        self.log_dir = log_dir
        self.queue = f"bench-{self.name}-{uuid.uuid4().hex[:8]}"
        self.worker: WorkerProcess | None = None

    def env(self) -> dict[str, str]:
        """What the worker module reads."""
        return {**os.environ, "BENCH_AMQP_URL": AMQP_URL, "BENCH_RIVAL_QUEUE": self.queue,
                "BENCH_RIVAL_QUEUE_TYPE": self.queue_type, "BENCH_SMTP_HOST": "127.0.0.1",
                "BENCH_SMTP_PORT": str(self.smtp_port), "PYTHONUNBUFFERED": "1"}

    def command(self) -> list[str]:
        """How its users start the worker."""
        raise NotImplementedError

    def publish(self, events: Sequence[dict[str, Any]]) -> None:
        """Enqueue one task per event (blocking)."""
        raise NotImplementedError

    def queues(self) -> list[str]:
        """Every queue a run makes."""
        return [self.queue]

    def exchanges(self) -> list[str]:
        """Every exchange a run makes (the default exchange is not one)."""
        return []

    def check(self) -> None:
        """Raise with the reason when the package is missing."""
        if installed(self.package) is None:
            raise RuntimeError(f"{self.package} is not installed (uv run --group bench)")

    async def prefill(self, events: Sequence[dict[str, Any]]) -> None:
        """Publish ``events`` as tasks and wait until the queue holds all of them."""
        self.check()
        await asyncio.to_thread(self.publish, events)
        async with Broker() as broker:
            deadline = time.monotonic() + 30
            while True:
                found = await broker.counts(self.queue)
                if found is not None and found[0] >= len(events):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {found and found[0]} of {len(events)} tasks "
                                       "reached the queue")
                await asyncio.sleep(0.05)

    async def start(self) -> WorkerProcess:
        """Spawn the worker process."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.worker = WorkerProcess(self.name, self.env(), self.log_dir / f"{self.queue}.log",
                                    command=self.command())
        await self.worker.start()
        return self.worker

    async def cleanup(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL), delete the queues and exchanges."""
        errors: list[str] = []
        if self.worker is not None:
            try:
                await self.worker.stop(timeout=15)
            except Exception as error:
                errors.append(f"stop: {error!r}")
                await self.worker.kill()
        async with Broker() as broker:
            assert broker.connection is not None
            for queue in self.queues():
                channel = await broker.connection.channel()
                try:
                    await channel.queue_delete(queue)
                except Exception as error:  # it may never have been made
                    errors.append(f"queue {queue}: {error!r}")
                finally:
                    if not channel.is_closed:
                        await channel.close()
            for exchange in self.exchanges():
                channel = await broker.connection.channel()
                try:
                    await channel.exchange_delete(exchange)
                except Exception as error:
                    errors.append(f"exchange {exchange}: {error!r}")
                finally:
                    if not channel.is_closed:
                        await channel.close()
        for problem in errors:
            print(f"clean-up of {self.queue}: {problem}", file=sys.stderr)


class CeleryRival(Rival):
    """``celery worker --pool solo``: one process that runs the tasks itself (no pool
    children, so no IPC per task: the fastest one-process Celery), ``acks_late``, the
    default prefetch multiplier (4: four unacked tasks), no result backend."""

    name = "celery"
    package = "celery"

    def command(self) -> list[str]:
        """``celery -A bench.celery_job worker`` with the options above."""
        return [sys.executable, "-m", "celery", "-A", "bench.celery_job", "worker",
                "--pool", "solo", "--queues", self.queue, "--loglevel", "WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]

    def exchanges(self) -> list[str]:
        """The task exchange is named after the queue (``bench.celery_job``)."""
        return [self.queue]

    def publish(self, events: Sequence[dict[str, Any]]) -> None:
        """``send_task`` per event over one producer, each confirmed by the broker."""
        from bench.celery_job import TASK, make_app

        app = make_app(AMQP_URL, self.queue, self.queue_type, confirm_publish=True)
        try:
            with app.producer_or_acquire() as producer:
                for event in events:
                    app.send_task(TASK, args=(event,), producer=producer)
        finally:
            app.close()


class DramatiqRival(Rival):
    """``dramatiq bench.dramatiq_job --processes 1 --threads 1``: one worker process (its
    parent only supervises), one worker thread, its RabbitmqBroker, default middleware."""

    name = "dramatiq"
    package = "dramatiq"

    def __init__(self, smtp_port: int, queue_type: str, log_dir: Path, threads: int = 1
                 ) -> None:
        super().__init__(smtp_port, queue_type, log_dir)
        self.threads = threads

    def command(self) -> list[str]:
        """``dramatiq`` as its users start it, one process."""
        return [sys.executable, "-m", "dramatiq", "bench.dramatiq_job", "--processes", "1",
                "--threads", str(self.threads), "--queues", self.queue]

    def queues(self) -> list[str]:
        """The work queue, its delay queue and its dead-letter queue."""
        return [self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"]

    def publish(self, events: Sequence[dict[str, Any]]) -> None:
        """``broker.enqueue`` per event, each confirmed by the broker (without confirms a
        run once found 13 of 2000 missing from the queue)."""
        import dramatiq

        from bench.dramatiq_job import ACTOR, make_broker

        broker = make_broker(AMQP_URL, self.queue_type, confirm_delivery=True)
        try:
            for event in events:
                broker.enqueue(dramatiq.Message(queue_name=self.queue, actor_name=ACTOR,
                                                args=(event,), kwargs={}, options={}))
        finally:
            broker.close()
