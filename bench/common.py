"""What the benchmarks share: a mail sink in its own thread, ``herald run`` as a subprocess,
temporary databases, broker clean-up and a few statistics.

Every benchmark uses its own ``HERALD_PREFIX`` (``bench-<name>-<random>``) and deletes
the queues and exchanges of that prefix when it ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import aio_pika
import asyncpg  # type: ignore[import-untyped]
from aio_pika.abc import AbstractRobustConnection
from aiosmtpd.smtp import SMTP, Envelope, Session

from herald.amqp import connect
from herald.mailsink import MailSink, start_sink
from herald.settings import Settings, load_settings
from topology.spec import build

REPO = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("HERALD_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
#: Admin connection used to create and drop the temporary PostgreSQL database.
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


# ---------------------------------------------------------------- small helpers


def unique_prefix(name: str) -> str:
    """A topology prefix no one else uses."""
    return f"bench-{name}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (0-100) with linear interpolation, like numpy's default."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def max_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most events in any rolling ``window`` seconds (half-open, as the sink counts)."""
    ordered = sorted(times)
    best = 0
    start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def ms(seconds: float) -> str:
    """Seconds as milliseconds, one decimal."""
    return f"{seconds * 1000:.1f} ms"


def print_table(title: str, rows: Sequence[tuple[str, ...]]) -> None:
    """A plain, aligned table (copies well into Markdown notes)."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(rows[0]))]
    print(f"\n== {title}")
    for row in rows:
        print("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    sys.stdout.flush()


def run_main(main: Coroutine[Any, Any, int]) -> NoReturn:
    """Run a benchmark's coroutine with signal-safe clean-up, then exit with its code."""
    stop_on_signals()
    try:
        code = asyncio.run(main)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted (cleaned up)", file=sys.stderr)
        code = 130
    sys.exit(code)


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both cancel the benchmark so that its clean-up runs.

    (A background job started by a non-interactive shell inherits SIGINT ignored;
    a plain SIGTERM would end Python without running ``finally`` blocks.)
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: os.kill(os.getpid(), signal.SIGINT))


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


_EMAIL_LIKE = re.compile(r"[^\s<>@]+@[^\s<>@]+")


def one_line(error: BaseException | str, limit: int = 160) -> str:
    """An error as one short line for a table cell, with anything address-like masked."""
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    text = " ".join(_EMAIL_LIKE.sub("<address>", text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (Linux /proc; gone ones count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / ticks


def settings_for(env: dict[str, str]) -> Settings:
    """The settings a herald process started with ``env`` (HERALD_* overrides) reads."""
    overrides = {k.removeprefix("HERALD_").lower(): v for k, v in env.items()
                 if k.startswith("HERALD_")}
    return load_settings(**overrides)


# ---------------------------------------------------------------- mail sink in its own thread


@dataclass
class TimedSink(MailSink):
    """A ``MailSink`` that also notes when each DATA arrived and what it answered."""

    attempts: list[tuple[float, str]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Time-stamp the attempt, then behave as the sink does."""
        arrived = time.monotonic()
        reply = await super().handle_DATA(server, session, envelope)
        self.attempts.append((arrived, reply[:3]))
        return reply


class CountingSink:
    """An "instant" SMTP server for throughput runs: it accepts every command and every
    message at once and only notes when each message arrived.

    A few lines of asyncio rather than aiosmtpd: aiosmtpd costs ~1.2 ms of CPU per
    message here (measured: 1000 messages over one connection), which at a few hundred
    messages per second would take half a core from the senders under test on this
    2-core machine. This one parses nothing but command verbs and the end of DATA, and
    answers as aiosmtpd does by default (EHLO: SIZE, 8BITMIME; no STARTTLS, no AUTH),
    so aiosmtplib and smtplib speak to it exactly as they speak to the sink in tests.
    """

    def __init__(self) -> None:
        self.times: list[float] = []  #: ``time.monotonic()`` at the end of each DATA

    @property
    def count(self) -> int:
        """Messages accepted so far."""
        return len(self.times)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        """Serve on ``host:port`` (0: a free port, ``server.sockets[0]``)."""
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _CountingSmtp(self.times), host, port)


class _CountingSmtp(asyncio.Protocol):
    """One SMTP session of a :class:`CountingSink`."""

    _EHLO = b"250-herald-bench\r\n250-SIZE 33554432\r\n250-8BITMIME\r\n250 HELP\r\n"
    _REPLIES = {b"HELO": b"250 herald-bench\r\n", b"MAIL": b"250 OK\r\n",
                b"RCPT": b"250 OK\r\n", b"RSET": b"250 OK\r\n", b"NOOP": b"250 OK\r\n",
                b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n"}

    def __init__(self, times: list[float]) -> None:
        self.times = times
        self.buffer = bytearray()
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 herald-bench ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        replies: list[bytes] = []
        while True:
            if self.in_data:
                if self.buffer.startswith(b".\r\n"):  # an empty message
                    end, skip = 0, 3
                else:
                    end, skip = self.buffer.find(b"\r\n.\r\n"), 5
                if end < 0:
                    break
                del self.buffer[:end + skip]
                self.in_data = False
                self.times.append(time.monotonic())
                replies.append(b"250 2.0.0 OK: queued\r\n")
                continue
            newline = self.buffer.find(b"\r\n")
            if newline < 0:
                break
            verb = bytes(self.buffer[:4]).upper()
            del self.buffer[:newline + 2]
            if verb == b"EHLO":
                replies.append(self._EHLO)
            elif verb == b"QUIT":
                self.transport.write(b"".join(replies) + b"221 Bye\r\n")
                self.transport.close()
                return
            else:
                replies.append(self._REPLIES.get(verb, b"502 Command not implemented\r\n"))
                self.in_data = verb == b"DATA"
        if replies:
            self.transport.write(b"".join(replies))


class SinkThread:
    """Serves a sink on 127.0.0.1 from its own asyncio loop in a daemon thread.

    The bench's own loop (HTTP client, broker polling) then cannot delay the
    sink's replies or its time stamps. Timestamps are ``time.monotonic()``,
    comparable with the bench's.
    """

    def __init__(self, sink: MailSink | CountingSink) -> None:
        self.sink = sink
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="mailsink", daemon=True)

    @property
    def url(self) -> str:
        """``smtp://127.0.0.1:<port>``."""
        return f"smtp://127.0.0.1:{self.port}"

    def __enter__(self) -> SinkThread:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"mail sink did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                self.sink.start() if isinstance(self.sink, CountingSink)
                else start_sink(self.sink))
            self.port = server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(server.wait_closed())
            loop.close()


async def wait_until(check: Any, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``check()`` (sync) until true; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


# ---------------------------------------------------------------- databases


@contextlib.asynccontextmanager
async def temp_database(kind: str, directory: Path) -> AsyncIterator[str]:
    """A fresh database URL as a user writes it: a SQLite file in ``directory``, or a
    PostgreSQL database created on 127.0.0.1:5432 (user postgres) and dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory}/herald.db"
        return
    if kind != "postgresql":
        raise ValueError(f"unknown database kind {kind!r}")
    name = f"herald_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# ---------------------------------------------------------------- broker


class Broker:
    """A connection for looking at queues and for deleting a prefix's topology."""

    def __init__(self, url: str = AMQP_URL) -> None:
        self.url = url
        self.connection: AbstractRobustConnection | None = None

    async def __aenter__(self) -> Broker:
        self.connection = await connect(self.url, name="herald bench", wait=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def counts(self, queue: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of ``queue``, or None when it does not exist."""
        assert self.connection is not None
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)
        except aio_pika.exceptions.ChannelClosed:
            return None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def delete_topology(self, settings: Settings) -> int:
        """Delete every queue and exchange of ``settings.prefix``; returns queues deleted."""
        assert self.connection is not None
        topo = build(settings)
        deleted = 0
        for queue in topo.queues:
            channel = await self.connection.channel()
            try:
                await channel.queue_delete(queue.name)
                deleted += 1
            except Exception:  # best effort: it may not exist
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
        for exchange in topo.exchanges:
            channel = await self.connection.channel()
            try:
                await channel.exchange_delete(exchange.name)
            except Exception:  # best effort
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
        return deleted


# ---------------------------------------------------------------- herald as a user runs it


def herald_command(*args: str) -> list[str]:
    """``uv run --no-sync herald ARGS`` (what a user types), or the venv's script without uv."""
    uv = shutil.which("uv")
    if uv:
        return [uv, "run", "--no-sync", "--project", str(REPO), "herald", *args]
    return [str(Path(sys.executable).with_name("herald")), *args]


def herald_env(overrides: dict[str, str]) -> dict[str, str]:
    """This environment plus ``overrides`` (and the broker URL, unless already set)."""
    env = dict(os.environ)
    env.setdefault("HERALD_AMQP_URL", AMQP_URL)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(overrides)
    return env


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    tree = _children_of()
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def peak_rss_mib(pid: int) -> float | None:
    """The peak resident memory (VmHWM) of ``pid`` in MiB, if it is still there."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def find_child(pids: Sequence[int], needle: str) -> int | None:
    """The first of ``pids`` whose command line contains ``needle``."""
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            return pid
    return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class HeraldRun:
    """``herald run`` in a subprocess, output to a log file; stopped with SIGINT like Ctrl-C."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env = env
        self.log_path = log_path
        self.args = args
        self.process: asyncio.subprocess.Process | None = None
        self.tree: list[int] = []  #: pids below the supervisor, noted once it is ready
        self.started = 0.0

    async def start(self) -> None:
        """Spawn it (in its own session, so a Ctrl-C on the bench does not reach it)."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *herald_command("run", *self.args), env=self.env, cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
        self.started = time.monotonic()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines it printed."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, broker: Broker, api_port: int | None, queue: str | None,
                         timeout: float = 90.0) -> float:
        """Wait until the API answers /healthz and ``queue`` has a consumer; returns seconds."""
        import httpx

        assert self.process is not None
        deadline = time.monotonic() + timeout
        api_ok = api_port is None
        worker_ok = queue is None
        async with httpx.AsyncClient(timeout=2) as client:
            while not (api_ok and worker_ok):
                if self.process.returncode is not None:
                    raise RuntimeError(f"herald run exited with {self.process.returncode}:\n"
                                       f"{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"herald run not ready within {timeout:.0f}s:\n"
                                       f"{self.log_tail()}")
                if not api_ok:
                    with contextlib.suppress(httpx.HTTPError):
                        api_ok = (await client.get(
                            f"http://127.0.0.1:{api_port}/healthz")).status_code == 200
                if not worker_ok and queue is not None:
                    found = await broker.counts(queue)
                    worker_ok = found is not None and found[1] > 0
                await asyncio.sleep(0.1)
        self.tree = descendants(self.process.pid)
        return time.monotonic() - self.started

    async def interrupt(self, timeout: float = 90.0) -> tuple[int | None, float, list[int]]:
        """SIGINT (Ctrl-C); returns (exit code or None on timeout, seconds, pids left alive)."""
        assert self.process is not None
        sent = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGINT)
        try:
            code: int | None = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            code = None
        took = time.monotonic() - sent
        await asyncio.sleep(0.2)
        return code, took, [p for p in self.tree if alive(p)]

    async def cleanup(self) -> None:
        """Kill whatever of this run is still alive (only its own pids), after a failure."""
        if self.process is None:
            return
        pids = [*descendants(self.process.pid), *self.tree]
        if self.process.returncode is None:
            pids.insert(0, self.process.pid)
        for pid in dict.fromkeys(pids):
            if alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)


async def herald_cli(env: dict[str, str], *args: str,
                     timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``herald ARGS`` to completion; returns (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *herald_command(*args), env=env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return int(process.returncode or 0), out.decode(), err.decode()
