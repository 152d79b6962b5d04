"""``herald run``: the API, the outbox relay, the channel workers as one supervised tree.

Each part is its own process (``python -m producer.api`` …), started in its
own session so that Ctrl-C reaches only the supervisor, which then stops the
children in order, with a bound. A child that dies is restarted with backoff.
A child whose supervisor dies, however it dies (SIGKILL included), gets
SIGTERM and stops as if asked: see :func:`die_with_parent`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field

log = logging.getLogger("herald.run")
_MAX_BACKOFF = 30.0
#: The supervisor's pid, in every child's environment: the parent it must not outlive.
PARENT_PID_ENV = "HERALD_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Make the supervisor's death a SIGTERM to this process; call first thing in a child's main().

    A no-op unless ``HERALD_PARENT_PID`` is set (a process started on its
    own has no supervisor to follow). On Linux, ``prctl(PR_SET_PDEATHSIG)``
    asks the kernel for the signal when the parent exits; elsewhere nothing
    is armed. Either way, a parent already gone by now (it died before the
    signal was armed, and this process was handed to another parent) means
    SIGTERM at once. The process's own SIGTERM handling then stops it
    cleanly; before it installs any, SIGTERM simply ends it.

    Done here, in the child, rather than in a ``preexec_fn`` of the spawn:
    code between fork and exec in a process with threads (asyncio's child
    watchers are threads) can deadlock.
    """
    expected = os.environ.get(PARENT_PID_ENV, "")
    if not expected.isdigit():
        return
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                log.warning("cannot ask to be stopped with the supervisor: %s",
                            os.strerror(ctypes.get_errno()))
    # After arming, not before: a parent that died in between is caught here.
    if os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Child:
    """One supervised process."""

    name: str
    module: list[str]
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff: float = field(default=1.0)

    async def start(self) -> None:
        """Spawn the process (told our pid, so that it stops when we die)."""
        env = {**self.env, PARENT_PID_ENV: str(os.getpid())}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *self.module, env=env, start_new_session=True)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    async def stop(self, grace: float) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        with suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs; killing it", self.name, grace)
            with suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Supervisor:
    """Starts the children, restarts the ones that die, stops all on a signal."""

    def __init__(self, children: list[Child], stop_timeout: float) -> None:
        self.children = children
        self.stop_timeout = stop_timeout
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Begin an orderly stop."""
        self._stopping.set()

    async def run(self) -> int:
        """Run until stopped; returns the exit code (0 after a clean stop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        for child in self.children:
            await child.start()
        watchers = [asyncio.create_task(self._watch(c)) for c in self.children]
        await self._stopping.wait()
        log.info("stopping (up to %.0fs)…", self.stop_timeout)
        for task in watchers:
            task.cancel()
        # Producers first, so nothing new arrives while workers finish.
        for child in self.children:
            await child.stop(self.stop_timeout)
        log.info("stopped")
        return 0

    async def _watch(self, child: Child) -> None:
        while not self._stopping.is_set():
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - child.started_at > 60:
                child.backoff = 1.0
            log.error("%s exited with code %s; restarting in %.0fs", child.name, code,
                      child.backoff)
            try:
                await asyncio.wait_for(self._stopping.wait(), child.backoff)
                return
            except TimeoutError:
                pass
            child.backoff = min(child.backoff * 2, _MAX_BACKOFF)
            child.restarts += 1
            await child.start()


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    """This process's environment plus ``overrides`` (children read the same settings)."""
    env = dict(os.environ)
    env.update(overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
