"""Email workers as separate processes, for benchmarks that measure them from outside.

``Stage`` is one ``HERALD_PREFIX`` with everything a scenario sets up for it (a
temporary database, local provider servers, worker processes started as a user
starts them) and removes all of it when the scenario ends, whatever happened:
workers stopped (killed if they hang), queues and exchanges deleted, the prefix's
Redis keys deleted, the database dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text

from bench.common import (
    REPO,
    Broker,
    TimedSink,
    alive,
    descendants,
    free_port,
    herald_cli,
    herald_env,
    settings_for,
    temp_database,
    unique_prefix,
)
from herald.db import make_engine
from herald.settings import Settings
from topology.declare import declare
from topology.envelope import Envelope
from topology.messages import build_message
from topology.spec import Names, build

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CHANNEL = "email"
T = TypeVar("T")


@dataclass
class GreetedSink(TimedSink):
    """A ``TimedSink`` that also notes when each SMTP session said EHLO.

    A session starts right after the sender took its rate-limit slot, so EHLO times
    show the limiter's spacing; DATA times add the jitter of the SMTP exchange.
    """

    greeted: list[float] = field(default_factory=list)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        """aiosmtpd hook (the 5-argument form): note the time, answer as usual."""
        self.greeted.append(time.monotonic())
        session.host_name = hostname  # aiosmtpd leaves this to a handler that hooks EHLO
        return responses


# ---------------------------------------------------------------- a worker as a user runs it


def worker_command() -> list[str]:
    """``uv run --no-sync python -m consumers email``, or this interpreter without uv."""
    uv = shutil.which("uv")
    if uv:
        return [uv, "run", "--no-sync", "--project", str(REPO), "python", "-m", "consumers",
                CHANNEL]
    return [sys.executable, "-m", "consumers", CHANNEL]


class WorkerProcess:
    """One email worker process in its own session, its output in a log file.

    ``command`` runs something else the same way (a Celery or Dramatiq worker in the
    throughput comparison); without ``HERALD_WORKER_METRICS_PORT`` it has no metrics.
    """

    def __init__(self, name: str, env: dict[str, str], log_path: Path,
                 command: Sequence[str] | None = None) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.command = list(command) if command is not None else worker_command()
        self.metrics_port = int(env.get("HERALD_WORKER_METRICS_PORT", "0"))
        self.process: asyncio.subprocess.Process | None = None
        self.exit_code: int | None = None

    async def start(self) -> None:
        """Spawn it (its own session: a Ctrl-C on the bench reaches it only through us)."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, env=self.env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)

    @property
    def running(self) -> bool:
        """Started and not exited."""
        return self.process is not None and self.process.returncode is None

    def pids(self) -> list[int]:
        """Its pid and every live pid below it (``uv run`` starts Python as a child)."""
        if not self.running:
            return []
        assert self.process is not None
        return [self.process.pid, *descendants(self.process.pid)]

    def log(self) -> str:
        """Everything it printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        """Its last ``lines`` lines."""
        return "\n".join(self.log().splitlines()[-lines:])

    def count(self, pattern: re.Pattern[str] | str) -> int:
        """Log lines matching ``pattern`` (a regex, or a plain substring)."""
        found = pattern.search if isinstance(pattern, re.Pattern) else (
            lambda line: pattern in line)
        return sum(1 for line in self.log().splitlines() if found(line))

    async def metrics(self) -> Metrics:
        """Scrape its Prometheus endpoint (empty if it does not answer)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                body = (await client.get(url)).text
        except httpx.HTTPError:
            return Metrics([])
        return Metrics([(s.name, dict(s.labels), float(s.value))
                        for family in text_string_to_metric_families(body)
                        for s in family.samples])

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, as a service manager stops it; its exit code, or None (then killed)."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), timeout)
        if self.process.returncode is None:
            await self.kill()
            return None
        self.exit_code = self.process.returncode
        return self.exit_code

    async def kill(self) -> None:
        """SIGKILL it and everything below it (its own pids only)."""
        if self.process is None:
            return
        pids = descendants(self.process.pid)
        if self.process.returncode is None:
            pids.insert(0, self.process.pid)
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)


@dataclass
class Metrics:
    """Samples scraped from one worker's ``/metrics``."""

    samples: list[tuple[str, dict[str, str], float]]

    def get(self, name: str, **labels: str) -> int:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        return round(sum(value for sample, have, value in self.samples if sample == name
                         and all(have.get(k) == v for k, v in labels.items())))

    def outcome(self, outcome: str) -> int:
        """``herald_messages_total`` for the email channel and ``outcome``."""
        return self.get("herald_messages_total", channel=CHANNEL, outcome=outcome)


# ---------------------------------------------------------------- one prefix, cleaned up


class Stage:
    """One HERALD_PREFIX with its database, servers and workers, all removed on exit.

    ``database`` is ``sqlite`` (a file under ``scratch``) or ``postgresql`` (a database
    created on 127.0.0.1:5432 and dropped); worker logs go to ``log_dir/<prefix>/``.
    """

    def __init__(self, name: str, database: str, broker: Broker, log_dir: Path,
                 scratch: Path) -> None:
        self.prefix = unique_prefix(name)
        self.database = database
        self.broker = broker
        self.log_dir = log_dir / self.prefix
        self.scratch = scratch / self.prefix
        self.names = Names(self.prefix)
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None
        self.database_url = ""
        self.workers: list[WorkerProcess] = []
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Stage:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.database_url = await self._stack.enter_async_context(
            temp_database(self.database, self.scratch))
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None,
                        tb: object) -> None:
        if isinstance(exc, Exception):  # not on Ctrl-C: then the clean-up is all we want
            for name, tail in self.logs().items():
                print(f"\n-- last lines of {name}:\n{tail}", file=sys.stderr)
        # Each step runs even when one before it failed.
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("stop the workers", lambda: asyncio.gather(
                *(w.stop(timeout=15) for w in self.workers if w.running)))]
        if self.settings is not None:
            settings = self.settings
            steps.append(("delete the topology", lambda: self.broker.delete_topology(settings)))
        steps.append(("delete the Redis keys", lambda: redis_keys(self.prefix, delete=True)))
        steps.append(("drop the database, stop the servers", self._stack.aclose))
        for what, step in steps:
            try:
                await step()
            except Exception as error:
                print(f"clean-up of {self.prefix}: could not {what}: {error!r}",
                      file=sys.stderr)

    def enter(self, manager: AbstractContextManager[T]) -> T:
        """Enter a context (a sink thread) that ends with the stage."""
        return self._stack.enter_context(manager)

    async def enter_async(self, manager: AbstractAsyncContextManager[T]) -> T:
        """Enter an async context (the SendGrid stand-in) that ends with the stage."""
        return await self._stack.enter_async_context(manager)

    def configure(self, **overrides: str) -> Settings:
        """The workers' environment: this prefix and database plus ``overrides``."""
        self.env = herald_env({
            "HERALD_PREFIX": self.prefix,
            "HERALD_DATABASE_URL": self.database_url,
            "HERALD_EMAIL_PROVIDERS": "smtp",
            "HERALD_REDIS_URL": "",  # per-process buckets unless a scenario asks for Redis
            "HERALD_LOG_LEVEL": "INFO",
            "HERALD_MAIL_DIR": str(self.scratch / "mail"),
            **overrides,
        })
        self.settings = settings_for(self.env)
        return self.settings

    async def prepare(self) -> None:
        """What an operator does before starting workers: declare the topology (so that
        publishing never races a worker) and ``herald db init`` (workers that create the
        tables at the same time can collide on PostgreSQL)."""
        assert self.broker.connection is not None and self.settings is not None
        await declare(self.broker.connection, build(self.settings))
        code, _out, err = await herald_cli(self.env, "db", "init")
        if code != 0:
            raise RuntimeError(f"herald db init exited {code}: {err.strip()}")

    async def start_workers(self, count: int, timeout: float = 90.0) -> list[WorkerProcess]:
        """Start ``count`` workers at once; return when each one consumes the work queue."""
        started: list[WorkerProcess] = []
        for _ in range(count):
            name = f"worker{len(self.workers) + 1}"
            env = {**self.env, "HERALD_WORKER_METRICS_PORT": str(free_port())}
            started.append(WorkerProcess(name, env, self.log_dir / f"{name}.log"))
            self.workers.append(started[-1])
        await asyncio.gather(*(w.start() for w in started))
        deadline = time.monotonic() + timeout
        while True:
            for w in started:
                if not w.running:
                    code = w.process.returncode if w.process else None
                    raise RuntimeError(f"{w.name} exited with {code}:\n{w.tail()}")
            found = await self.broker.counts(self.names.work(CHANNEL))
            if found is not None and found[1] >= len([w for w in self.workers if w.running]):
                return started
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not consuming within {timeout:.0f}s")
            await asyncio.sleep(0.2)

    async def stop_workers(self) -> list[int | None]:
        """SIGTERM every worker; their exit codes (None: had to be killed)."""
        return list(await asyncio.gather(*(w.stop() for w in self.workers)))

    async def publish(self, envelopes: Sequence[Envelope], exchange_name: str | None = None,
                      routing_key: str | None = None, headers: dict[str, Any] | None = None,
                      ) -> None:
        """Publish like the relay (confirmed, mandatory); by default to the events exchange."""
        assert self.broker.connection is not None
        channel = await self.broker.connection.channel(publisher_confirms=True,
                                                       on_return_raises=True)
        try:
            exchange = await channel.get_exchange(exchange_name or self.names.events)
            for start in range(0, len(envelopes), 50):
                await asyncio.gather(*(
                    exchange.publish(build_message(e.to_json(), e.id, e.type, dict(headers or {})),
                                     routing_key=routing_key or e.type, mandatory=True,
                                     timeout=10)
                    for e in envelopes[start:start + 50]))
        finally:
            await channel.close()

    async def ready(self, queue: str) -> int:
        """Messages ready in ``queue`` (passive declare; -1 if it is missing)."""
        found = await self.broker.counts(queue)
        return -1 if found is None else found[0]

    async def tiers(self) -> dict[str, int]:
        """Messages waiting in each retry tier of the email channel."""
        assert self.settings is not None
        names = [self.names.retry_queue(CHANNEL, d) for d in self.settings.tier_delays()]
        return {name: await self.ready(name) for name in names}

    async def dlq_list(self) -> list[dict[str, Any]]:
        """``herald dlq list email --json``."""
        code, out, err = await herald_cli(self.env, "dlq", "list", CHANNEL, "--json")
        if code != 0:
            raise RuntimeError(f"herald dlq list exited {code}: {err.strip()}")
        rows: list[dict[str, Any]] = json.loads(out)
        return rows

    async def deliveries(self) -> dict[tuple[str, str], tuple[int, int]]:
        """The delivery table: (status, provider) → (rows, attempts summed)."""
        assert self.settings is not None
        engine = make_engine(self.settings.database_url)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(text(
                    "SELECT status, provider, count(*), sum(attempts) FROM deliveries "
                    "GROUP BY status, provider"))
                return {(str(s), str(p)): (int(n), int(a or 0)) for s, p, n, a in result.all()}
        finally:
            await engine.dispose()

    def logs(self) -> dict[str, str]:
        """Every worker's last lines (shown when a check fails)."""
        return {f"{w.name} ({self.prefix})": w.tail() for w in self.workers}


def redis_pattern(prefix: str) -> str:
    """Every key of ``prefix``: herald's own (``herald:<prefix>:…``, the 429 pause) and the
    token buckets, which throttled-py stores as ``herald:v1:gcra:<prefix>:…``."""
    return f"herald*:{prefix}:*"


async def redis_keys(prefix: str, delete: bool = False) -> list[str]:
    """The Redis keys of ``prefix`` right now (deleted too when ``delete``)."""
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=redis_pattern(prefix))]
        if keys and delete:
            await client.delete(*keys)
    except (OSError, RedisError):
        if not delete:
            raise
        return []
    finally:
        await client.aclose()
    return sorted(k.decode() if isinstance(k, bytes) else str(k) for k in keys)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float,
                   interval: float = 0.25) -> bool:
    """Poll the async ``check()`` until true; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True
