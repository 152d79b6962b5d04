"""The fault suite's machinery: herald as real processes, load through the real API, faults.

Every test here runs the API (``python -m producer.api``), the outbox relay
(``python -m producer.relay``) and the email worker (``python -m consumers
email``) as processes of their own, on a topology prefix and a database of
their own, sending to an SMTP server (:class:`FaultSink`) in the test's event
loop. Load goes in through ``POST /events``; the test injects its fault, then
reads the ledger (``tests/faults/ledger.py``).

A needed binary that is missing (``rabbitmq-server``, ``initdb``) skips the
test saying which; under ``CI=true`` it fails instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiosmtpd.smtp import SMTP, Envelope, Session

from herald.mailsink import Faults, MailSink, start_sink
from herald.settings import Settings, load_settings
from tests.conftest import _SPARE_DATABASES, IN_CI, _empty, delete_topology, eventually
from tests.faults.ledger import Accepted, Ledger, collect
from tests.faults.rabbitnode import RabbitNode, rabbitmq_binaries
from tests.procs import Finished, Spawned, clean_env, herald_cmd, run
from tests.tcpproxy import free_port

TOKEN = "fault-suite-token"
API = [sys.executable, "-m", "producer.api"]
RELAY = [sys.executable, "-m", "producer.relay"]
WORKER = [sys.executable, "-m", "consumers", "email"]
#: Seconds a process may take to start on a busy 2-core machine.
START_TIMEOUT = 45


def missing(what: str) -> None:
    """Skip the test because ``what`` is missing; fail it under ``CI=true``."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI (CI=true)")
    pytest.skip(f"{what} not found")


# --- the provider: an SMTP server that misbehaves on purpose ---------------------------------


@dataclass
class FaultSink(MailSink):
    """:class:`MailSink` with per-address faults at RCPT TO and latency on DATA.

    ``MailSink.faults`` (refuse, hang, greylist) still applies on top.
    """

    latency: float = 0.0  #: every DATA waits this long before it is answered
    slow: dict[str, float] = field(default_factory=dict)  #: address → extra DATA latency
    refuse: dict[str, str] = field(default_factory=dict)  #: address → reply at RCPT TO
    #: Addresses whose RCPT TO kills ``victim()`` (a send that crashes its worker).
    kill_on: set[str] = field(default_factory=set)
    victim: Callable[[], int | None] | None = None
    kills: int = 0
    in_data: int = 0  #: DATA commands being handled right now (sends in flight)
    interrupted: int = 0  #: DATA commands whose client went away before the answer
    rcpt: Counter[str] = field(default_factory=Counter)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        """aiosmtpd hook: refuse, kill the sender, or hand over to the sink (greylisting)."""
        address = address.lower()
        self.rcpt[address] += 1
        if address in self.refuse:
            return self.refuse[address]
        if address in self.kill_on and self.victim is not None:
            pid = self.victim()
            if pid is not None:
                # Only a worker this test started, by its pid.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.kills += 1
            return "421 4.3.0 the sender is gone"
        parent = getattr(super(), "handle_RCPT", None)
        if parent is not None:
            reply: str = await parent(server, session, envelope, address, rcpt_options)
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """aiosmtpd hook: wait the latency, then accept as :class:`MailSink` does.

        aiosmtpd cancels this when the client's connection drops (a killed
        worker): a message still waiting here is not accepted.
        """
        self.in_data += 1
        try:
            delay = self.latency + max((self.slow.get(a.lower(), 0.0)
                                        for a in envelope.rcpt_tos), default=0.0)
            if delay:
                await asyncio.sleep(delay)
            return await super().handle_DATA(server, session, envelope)
        except asyncio.CancelledError:
            self.interrupted += 1
            raise
        finally:
            self.in_data -= 1


@pytest.fixture
async def sink() -> AsyncIterator[FaultSink]:
    """A :class:`FaultSink` on a free port (``sink.port``), no faults yet."""
    server, fault_sink = await serve_sink(FaultSink(faults=Faults()))
    yield fault_sink
    server.close()
    await server.wait_closed()


async def serve_sink(fault_sink: FaultSink, port: int = 0) -> tuple[asyncio.Server, FaultSink]:
    """Serve ``fault_sink`` on ``port`` (0: a free one, stored in ``fault_sink.port``)."""
    server = await start_sink(fault_sink, port=port)
    fault_sink.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return server, fault_sink


# --- databases and brokers -------------------------------------------------------------------


@pytest.fixture
async def service_db(postgres_url: str) -> AsyncIterator[str]:
    """A fresh database on the shared PostgreSQL server for the processes of one test."""
    if _SPARE_DATABASES:
        name = _SPARE_DATABASES.pop()
    else:
        name = f"herald_f_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
    yield f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    admin = await asyncpg.connect(postgres_url)
    try:
        # Emptied and kept for the next test of this process (dropping costs a checkpoint).
        if await _empty(admin, postgres_url, name):
            _SPARE_DATABASES.append(name)
        else:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this module's own (never the shared one), stopped at the end.

    One per module: a start costs 6-12 s here.
    """
    if rabbitmq_binaries() is None:
        missing("RabbitMQ server binaries (rabbitmq-server, rabbitmqctl)")
    node = RabbitNode(tmp_path_factory.mktemp("rabbit"))
    try:
        node.start()
        yield node
    finally:
        node.close()


# --- herald as processes ---------------------------------------------------------------------


@dataclass
class Posted:
    """One ``POST /events``: what was sent and what came back."""

    event_id: str
    recipients: tuple[str, ...]
    status: int | None  #: None: no answer (connection refused, reset, timed out)
    at: float
    error: str | None = None


class Stack:
    """herald's processes for one test, the load they get, and what came of it.

    Every process started here is killed when the stack closes (also on failure).
    """

    def __init__(self, *, amqp_url: str, database_url: str, sink: FaultSink, root: Path,
                 **env: object) -> None:
        self.amqp_url = amqp_url
        self.database_url = database_url
        self.sink = sink
        self.root = root
        self.prefix = f"f-{uuid.uuid4().hex[:10]}"
        self.api_port = free_port()
        values: dict[str, object] = {
            "HERALD_PREFIX": self.prefix, "HERALD_AMQP_URL": amqp_url,
            "HERALD_DATABASE_URL": database_url,
            "HERALD_SMTP_URL": f"smtp://127.0.0.1:{sink.port}",  # type: ignore[attr-defined]
            "HERALD_SERVICE_TOKEN": TOKEN, "HERALD_API_HOST": "127.0.0.1",
            "HERALD_API_PORT": self.api_port,
            "HERALD_RETRY_DELAYS": "200ms,400ms,800ms", "HERALD_MAX_RETRY": 3,
            "HERALD_SMTP_TIMEOUT": "2s", "HERALD_SHUTDOWN_TIMEOUT": "3s",
            "HERALD_RELAY_INTERVAL": "50ms", "HERALD_EMAIL_RATE_LIMIT": "1000/s",
            "HERALD_LOG_LEVEL": "INFO", "HERALD_MAIL_DIR": root / "mail",
            "HERALD_PUSH_DIR": root / "push", "HERALD_SMS_DIR": root / "sms",
            # A process that hangs at start-up is sent SIGABRT: its stacks land in its log.
            "PYTHONFAULTHANDLER": 1,
        }
        values.update(env)
        self.env = clean_env(**values)
        self.api: Spawned | None = None
        self.relay: Spawned | None = None
        self.worker: Spawned | None = None
        self.spawned: list[Spawned] = []
        self.posted: list[Posted] = []
        self.worker_deaths: list[int] = []  #: exit codes of workers the keeper replaced
        self._keeper: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._connection: AbstractRobustConnection | None = None
        self._sequence = 0

    def settings(self) -> Settings:
        """Settings as the processes read them (the topology they declare)."""
        values = {k[len("HERALD_"):].lower(): v for k, v in self.env.items()
                  if k.startswith("HERALD_") and not k.startswith("HERALD_TEST_")}
        return load_settings(**values)

    # --- processes ---------------------------------------------------------------------

    async def _spawn(self, cmd: list[str], ready: str, **env: object) -> Spawned:
        proc = await Spawned.start(cmd, {**self.env, **{k: str(v) for k, v in env.items()}},
                                   cwd=self.root)
        self.spawned.append(proc)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await proc.wait_for_line(ready)
        except TimeoutError:
            raise AssertionError(f"{cmd[2:]} did not log {ready!r} within {START_TIMEOUT}s\n"
                                 f"{await _stack_of(proc)}") from None
        finally:
            if proc.proc.returncode is None and not any(ready in line for line in proc.lines):
                await proc.kill()
        return proc

    async def start_api(self) -> Spawned:
        """The API process, returned once ``/healthz`` answers."""
        proc = await Spawned.start(API, self.env, cwd=self.root)
        self.spawned.append(proc)
        self.api = proc
        self._http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.api_port}",
                                       timeout=10, headers={"Authorization": f"Bearer {TOKEN}"})

        async def up() -> bool:
            if proc.proc.returncode is not None:
                raise AssertionError(f"the API exited ({proc.proc.returncode}):\n{proc.log}")
            assert self._http is not None
            with contextlib.suppress(httpx.TransportError):
                return (await self._http.get("/healthz")).status_code == 200
            return False

        try:
            await eventually(up, timeout=START_TIMEOUT, interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"the API did not answer /healthz: {exc}\n"
                                 f"{await _stack_of(proc)}") from None
        return proc

    async def start_relay(self) -> Spawned:
        """The outbox relay, returned once it connected to the broker (topology declared)."""
        self.relay = await self._spawn(RELAY, "connected to the broker")
        return self.relay

    async def start_worker(self, **env: object) -> Spawned:
        """An email worker, returned once it consumes; it becomes ``self.worker``."""
        self.worker = await self._spawn(WORKER, "consuming ", **env)
        return self.worker

    async def start(self, workers: int = 1) -> None:
        """API, relay and ``workers`` workers, started side by side."""
        await asyncio.gather(self.start_api(), self.start_relay(),
                             *(self.start_worker() for _ in range(workers)))

    def keep_worker_running(self) -> None:
        """Start a new worker each time ``self.worker`` dies (the test's supervisor)."""

        async def keep() -> None:
            while True:
                current = self.worker
                assert current is not None
                code = await current.wait()
                self.worker_deaths.append(code)
                await self.start_worker()

        self._keeper = asyncio.create_task(keep())

    async def stop_keeping(self) -> None:
        """Stop replacing dead workers (before killing or stopping one on purpose)."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keeper
            self._keeper = None

    async def herald(self, *args: str, timeout: float = 60) -> Finished:
        """The ``herald`` command with this stack's settings, run to the end."""
        return await run(herald_cmd(*args), self.env, cwd=self.root, timeout=timeout)

    def logs(self, lines: int = 15) -> str:
        """The last lines of every process's log (for assertion messages)."""
        parts = []
        for proc in self.spawned:
            tail = "".join(proc.lines[-lines:])
            parts.append(f"--- pid {proc.pid} (exit {proc.proc.returncode}):\n{tail}")
        return "\n".join(parts)

    # --- load ----------------------------------------------------------------------------

    def recipients(self, count: int) -> list[dict[str, str]]:
        """``count`` new recipients (user ids ``r<n>``, addresses ``r<n>@example.com``)."""
        found = []
        for _ in range(count):
            self._sequence += 1
            user = f"r{self._sequence}"
            found.append({"user_id": user, "email": f"{user}@example.com", "name": user})
        return found

    async def post(self, recipients: list[dict[str, str]] | None = None) -> Posted:
        """``POST /events`` (``user.signup``) to ``recipients`` (default: one new one).

        The event id is ours, so an event whose answer is lost is still known.
        """
        assert self._http is not None, "start_api() first"
        recipients = recipients or self.recipients(1)
        event_id = str(uuid.uuid4())
        body = {"id": event_id, "type": "user.signup", "actor": {"id": "fault-suite"},
                "recipients": recipients, "data": {"name": "Fault"}}
        users = tuple(r["user_id"] for r in recipients)
        started = time.monotonic()
        try:
            response = await self._http.post("/events", json=body)
            posted = Posted(event_id, users, response.status_code, started,
                            None if response.status_code < 400 else response.text[:200])
        except httpx.HTTPError as exc:
            posted = Posted(event_id, users, None, started, f"{type(exc).__name__}: {exc}")
        self.posted.append(posted)
        return posted

    async def load(self, count: int, every: float = 0.05,
                   recipients: int = 1) -> list[Posted]:
        """Post ``count`` events one after the other, ``every`` seconds apart."""
        done = []
        for _ in range(count):
            done.append(await self.post(self.recipients(recipients)))
            await asyncio.sleep(every)
        return done

    @property
    def statuses(self) -> Counter[int | None]:
        """How many posts got each status (None: no answer)."""
        return Counter(p.status for p in self.posted)

    @property
    def accepted(self) -> list[Accepted]:
        """Events the API accepted (202, or 200: known before)."""
        return [Accepted(p.event_id, p.recipients) for p in self.posted
                if p.status in (200, 202)]

    @property
    def uncertain(self) -> list[Accepted]:
        """Events whose answer never came: maybe stored, maybe not."""
        return [Accepted(p.event_id, p.recipients) for p in self.posted if p.status is None]

    @property
    def expected(self) -> int:
        """Accepted recipient-deliveries."""
        return sum(len(a.recipients) for a in self.accepted)

    # --- reading the outcome ---------------------------------------------------------------

    async def connection(self) -> AbstractRobustConnection:
        """A broker connection of the test's own (reconnects by itself)."""
        if self._connection is None or self._connection.is_closed:
            self._connection = await aio_pika.connect_robust(self.amqp_url)
        return self._connection

    async def ledger(self) -> Ledger:
        """The ledger as things stand now."""
        return await collect(self.accepted, self.database_url, await self.connection(),
                             self.prefix, list(self.sink.messages), uncertain=self.uncertain)

    async def settled(self, timeout: float = 30, done: Callable[[Ledger], bool] | None = None,
                      quiet: float = 1.0, stable: float = 10.0) -> Ledger:
        """The ledger once every accepted delivery has one outcome (or ``done`` says so),
        re-read after ``quiet`` seconds so that a late duplicate shows up.

        A ledger where every delivery has some outcome but that stays as it is for
        ``stable`` seconds (longer than a dead worker's claim) is returned as it is: the
        test's assertions say what is wrong with it. Raises AssertionError with the
        ledger and the processes' logs after ``timeout``.
        """
        check = done or (lambda ledger: ledger.settled)
        deadline = time.monotonic() + timeout
        ledger = await self.ledger()
        seen, since = _signature(ledger), time.monotonic()
        while not check(ledger):
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"not settled within {timeout}s\n{ledger.report()}\n"
                                     f"{self.logs()}")
            if not ledger.lost and now - since > stable:
                print(f"ledger unchanged for {stable}s, not settled:\n{self.logs()}")
                return ledger
            await asyncio.sleep(0.25)
            ledger = await self.ledger()
            if (signature := _signature(ledger)) != seen:
                seen, since = signature, time.monotonic()
        await asyncio.sleep(quiet)
        return await self.ledger()

    # --- the end -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Kill every process, close clients, delete the topology (when the broker answers)."""
        await self.stop_keeping()
        for proc in self.spawned:
            await proc.kill()
        if self._http is not None:
            await self._http.aclose()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(15):
                connection = await self.connection()
                await delete_topology(connection, self.settings())
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()


@contextlib.asynccontextmanager
async def stack(*, amqp_url: str, database_url: str, sink: FaultSink, root: Path,
                **env: object) -> AsyncIterator[Stack]:
    """A :class:`Stack` (not started yet), closed on the way out."""
    s = Stack(amqp_url=amqp_url, database_url=database_url, sink=sink, root=root, **env)
    try:
        yield s
    finally:
        await s.aclose()


async def _stack_of(proc: Spawned) -> str:
    """The log of a process that hangs, with the Python stacks of its threads (SIGABRT
    with ``PYTHONFAULTHANDLER`` set); the process is gone afterwards."""
    if proc.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await proc.wait()
    await proc.kill()
    return proc.log[-6000:]


def _signature(ledger: Ledger) -> tuple[object, ...]:
    """What changes while deliveries are still moving."""
    return (sorted(ledger.counts.items()), ledger.duplicate_count, len(ledger.dead_letters),
            sorted((k, tuple(m)) for k, m in ledger.mismatches.items()))


def attach(ledger: Ledger, title: str) -> str:
    """The ledger's report, printed (visible with ``-s`` or on failure) and returned for
    assertion messages."""
    text = ledger.report(title)
    print(text)
    return text
