"""Processes that start, stop and die properly: real processes, real signals.

- each channel worker exits 0 soon after SIGTERM (every background task ends
  when cancelled);
- a worker started while the broker is down waits for it, one line per attempt,
  and still exits 0 on SIGTERM;
- the children of ``herald run`` die with it, however it dies (SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection

from herald.settings import Settings
from tests.conftest import delete_topology, eventually
from tests.procs import Spawned, alive, clean_env, herald_cmd
from tests.tcpproxy import free_port

SHUTDOWN_TIMEOUT = 2.0
#: What a worker may take past HERALD_SHUTDOWN_TIMEOUT to exit (interpreter exit, a noisy machine).
EXIT_SLACK = 8.0


def worker_env(settings: Settings, tmp_path: Path, **extra: object) -> dict[str, str]:
    """A worker's environment: the test's prefix, its own SQLite file, a 2 s shutdown bound.

    SMTP points at a port nothing listens on: an idle email worker never connects.
    """
    values: dict[str, object] = {
        "HERALD_PREFIX": settings.prefix, "HERALD_AMQP_URL": settings.amqp_url,
        "HERALD_DATABASE_URL": f"sqlite:///{tmp_path}/herald.db",
        "HERALD_SMTP_URL": f"smtp://127.0.0.1:{free_port()}",
        "HERALD_SHUTDOWN_TIMEOUT": f"{SHUTDOWN_TIMEOUT}s", "HERALD_LOG_LEVEL": "INFO",
        "HERALD_SMS_DIR": tmp_path / "sms", "HERALD_PUSH_DIR": tmp_path / "push",
    }
    values.update(extra)
    return clean_env(**values)


async def stop_within(proc: Spawned, bound: float) -> tuple[int, float]:
    """SIGTERM ``proc``; its exit code and how long it took (fails past ``bound``)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(bound):
            code = await proc.wait()
    except TimeoutError:
        raise AssertionError(f"still running {bound:.0f}s after SIGTERM:\n{proc.log}") from None
    return code, time.monotonic() - started


@pytest.mark.parametrize("channel", ["email", "in_app", "push", "sms"])
async def test_a_worker_exits_0_soon_after_sigterm(
    channel: str, settings: Settings, connection: AbstractRobustConnection, tmp_path: Path
) -> None:
    # Given a channel worker consuming from the shared broker
    proc = await Spawned.start([sys.executable, "-m", "consumers", channel],
                               worker_env(settings, tmp_path), cwd=tmp_path)
    try:
        async with asyncio.timeout(60):
            await proc.wait_for_line("consuming ")
        # When it gets SIGTERM
        code, _took = await stop_within(proc, SHUTDOWN_TIMEOUT + EXIT_SLACK)
    finally:
        await proc.kill()
        await delete_topology(connection, settings)
    # Then it stopped cleanly (every background task ended when cancelled)
    assert code == 0, proc.log
    assert "worker stopped" in proc.log
    assert "Traceback" not in proc.log, proc.log
    assert "Task was destroyed but it is pending" not in proc.log, proc.log


async def test_a_worker_waits_for_an_unreachable_broker_and_still_stops_on_sigterm(
    settings: Settings, tmp_path: Path
) -> None:
    # Given the SMS worker pointed at a port where no broker listens
    port = free_port()
    env = worker_env(settings, tmp_path, HERALD_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/")
    proc = await Spawned.start([sys.executable, "-m", "consumers", "sms"], env, cwd=tmp_path)
    try:
        # Then it keeps running and says so once per attempt
        async with asyncio.timeout(60):
            await proc.wait_for_line("attempt 3,")
        assert proc.proc.returncode is None
        retries = [line for line in proc.lines if "unreachable" in line and "attempt" in line]
        attempts = [re.findall(r"attempt (\d+)", line) for line in retries]
        assert attempts[:3] == [["1"], ["2"], ["3"]], proc.log
        assert f"127.0.0.1:{port}" in retries[0]
        assert "guest:guest" not in proc.log  # the password stays out of the log
        # When it gets SIGTERM while waiting
        code, _took = await stop_within(proc, SHUTDOWN_TIMEOUT + EXIT_SLACK)
    finally:
        await proc.kill()
    # Then it exits 0, and never printed a traceback
    assert code == 0, proc.log
    assert "Traceback" not in proc.log, proc.log


# --- herald run dies: so do its children ---------------------------------------------------

_STARTED = re.compile(r"started (\S+) \(pid (\d+)\)")
_CHILDREN = {"api", "relay", "worker.email", "worker.in_app", "worker.push", "worker.sms"}


def run_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """``herald run`` on the test's prefix and SQLite file. HERALD_SMTP_URL is set (to a
    port nothing listens on) so no dev mail sink is started: its own test is below."""
    return clean_env(
        HERALD_PREFIX=settings.prefix, HERALD_AMQP_URL=settings.amqp_url,
        HERALD_DATABASE_URL=f"sqlite:///{tmp_path}/herald.db", HERALD_API_PORT=free_port(),
        HERALD_SMTP_URL=f"smtp://127.0.0.1:{free_port()}",
        HERALD_SHUTDOWN_TIMEOUT=f"{SHUTDOWN_TIMEOUT}s", HERALD_LOG_LEVEL="INFO")


def children_of(supervisor: Spawned) -> dict[str, int]:
    """The children ``herald run`` said it started, by name."""
    return {m.group(1): int(m.group(2)) for m in _STARTED.finditer(supervisor.log)}


@pytest.mark.parametrize("when", ["starting", "up"])
async def test_the_children_of_herald_run_die_when_it_is_killed(
    when: str, settings: Settings, connection: AbstractRobustConnection, tmp_path: Path
) -> None:
    # Given `herald run`, with its children just spawned ("starting": still importing,
    # before they could ask to follow their parent) or all of them serving ("up")
    supervisor = await Spawned.start(herald_cmd("run"), run_env(settings, tmp_path),
                                     cwd=tmp_path)
    children: dict[str, int] = {}
    try:
        async with asyncio.timeout(60):
            await supervisor.wait_for_line("started worker.sms (pid")
            if when == "up":
                for text in ["Application startup complete", "relay started",
                             "consuming " + settings.prefix + ".email",
                             "consuming " + settings.prefix + ".in_app",
                             "consuming " + settings.prefix + ".push",
                             "consuming " + settings.prefix + ".sms"]:
                    await supervisor.wait_for_line(text)
        children = children_of(supervisor)
        assert set(children) == _CHILDREN, supervisor.log

        # When the supervisor is killed outright (no chance to stop anything)
        supervisor.send_signal(signal.SIGKILL)
        # (not proc.wait(): on Python 3.11 it also waits for the log pipe, which
        # every child holds open)
        await eventually(lambda: not alive(supervisor.pid), timeout=10)

        # Then every child is gone soon after: at once when up, as soon as it gets
        # to its main() when it was still importing (slow on a loaded machine)
        with contextlib.suppress(AssertionError):
            await eventually(lambda: not any(alive(pid) for pid in children.values()),
                             timeout=15 if when == "up" else 40, interval=0.1)
        still = {name: pid for name, pid in children.items() if alive(pid)}
        assert still == {}, supervisor.log
        async with asyncio.timeout(15):
            await supervisor.wait()  # the rest of the children's last words
    finally:
        # Children first: they hold the supervisor's log pipe open (see above).
        for pid in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await supervisor.kill()
        await delete_topology(connection, settings)
    if when == "up":
        # having stopped as on SIGTERM (cleanly), not been killed
        assert "worker stopped" in supervisor.log
        assert "relay stopped" in supervisor.log


async def test_the_dev_mail_sink_dies_with_its_parent(tmp_path: Path) -> None:
    # Given the dev mail sink started by a parent that tells it its pid, as herald run does
    parent = await Spawned.start([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        "env = dict(os.environ, HERALD_PARENT_PID=str(os.getpid()))\n"
        "child = subprocess.Popen([sys.executable, '-m', 'herald.mailsink'], env=env)\n"
        "print(f'started mailsink (pid {child.pid})', file=sys.stderr, flush=True)\n"
        "time.sleep(3600)\n")], clean_env(HERALD_MAILSINK_PORT=free_port(),
                                          HERALD_MAIL_DIR=tmp_path / "mail"), cwd=tmp_path)
    pid = 0
    try:
        async with asyncio.timeout(60):
            await parent.wait_for_line("dev mail sink on")
        pid = children_of(parent)["mailsink"]
        # When the parent is killed
        parent.send_signal(signal.SIGKILL)
        await eventually(lambda: not alive(parent.pid), timeout=10)
        # Then the sink goes too
        with contextlib.suppress(AssertionError):
            await eventually(lambda: not alive(pid), timeout=10, interval=0.1)
        assert not alive(pid), "the mail sink outlived its parent"
    finally:
        if pid:  # first: it holds the parent's log pipe open
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await parent.kill()
