"""A RabbitMQ node of the test's own: its own name, ports, data dir; killed and restarted at will.

The shared broker on 5672 (node ``rabbit@<host>``) is never touched: this
node has a random name (``herald-fault-<hex>@localhost``), its own AMQP and
distribution ports, and every file it writes (mnesia, logs, pid, plugins
list, config, Erlang cookie) under ``root``. Its ``HOME`` is ``root/home``
too, so Erlang makes a cookie there instead of reading or writing one that
somebody else uses.

Measured here (2 cores, shared with other agents): a cold start takes
about 8-12 s and a restart after ``kill -9`` about the same, so a test
module shares one node (see the ``rabbit_node`` fixture in ``conftest.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.tcpproxy import free_port

#: Where Debian's package keeps the real scripts: ``/usr/sbin/rabbitmq-server`` is a
#: wrapper that switches to the ``rabbitmq`` user and logs into the shared node's files.
_PACKAGE_BIN = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_binaries() -> Path | None:
    """The directory holding ``rabbitmq-server`` and ``rabbitmqctl``, or None if missing."""
    candidates = [_PACKAGE_BIN]
    found = shutil.which("rabbitmq-server")
    if found is not None:
        candidates.append(Path(found).resolve().parent)
    for directory in candidates:
        if (directory / "rabbitmq-server").exists() and (directory / "rabbitmqctl").exists():
            return directory
    return None


class RabbitNodeError(RuntimeError):
    """Raised when the node does not start or stop as asked (the message quotes its log)."""


class RabbitNode:
    """One RabbitMQ node in ``root``; ``start`` → ``restart`` … → ``close``.

    Every method blocks (a start takes seconds): from a test's event loop call
    them through ``asyncio.to_thread`` so the loop (and the SMTP sink on it)
    keeps serving.
    """

    def __init__(self, root: Path, bin_dir: Path | None = None) -> None:
        found = bin_dir or rabbitmq_binaries()
        if found is None:
            raise RabbitNodeError("rabbitmq-server / rabbitmqctl not found")
        self.bin_dir = found
        self.root = root
        self.name = f"herald-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.starts = 0  #: how many times the node was started (the cost to keep small)
        self.start_seconds: list[float] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: Path = root / "server.out"
        self._write_files()

    @property
    def url(self) -> str:
        """The AMQP URL of this node (guest/guest, from loopback only)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _write_files(self) -> None:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        (self.root / "enabled_plugins").write_text("[].\n")
        # Our own (empty) env file: the system one names the shared node.
        (self.root / "rabbitmq-env.conf").write_text("")
        # Our own config: the system one makes the shared node listen on 5672.
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "disk_free_limit.absolute = 10MB\n"
            "log.console = false\n"
            "log.file.level = warning\n")

    @property
    def env(self) -> dict[str, str]:
        """The environment of this node's server and CLI processes."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))}
        root = self.root
        env.update({
            "HOME": str(root / "home"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "node.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        })
        return env

    def running(self) -> bool:
        """True while the server process we started runs."""
        return self._proc is not None and self._proc.poll() is None

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <this node> args`` (never another node)."""
        return subprocess.run([str(self.bin_dir / "rabbitmqctl"), "-n", self.name, *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def start(self, timeout: float = 90) -> float:
        """Start the node and return once it takes AMQP connections; the seconds it took.

        Raises RabbitNodeError (with the log's tail) when it exits or is not up in time.
        """
        if self.running():
            raise RabbitNodeError(f"node {self.name} is already running")
        started = time.monotonic()
        with self._output.open("ab") as out:
            # Its own session: kill() takes the whole tree (beam, erl_child_setup, ...)
            # by this process group, nothing else.
            self._proc = subprocess.Popen(
                [str(self.bin_dir / "rabbitmq-server")], env=self.env, cwd=self.root,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.starts += 1
        if self.starts == 1:
            # Should the test process end without its fixture's teardown (an error at
            # exit, a KeyboardInterrupt), the node goes with it rather than linger.
            atexit.register(self.kill)
        deadline = started + timeout
        while not _accepts(self.port):
            if not self.running():
                raise RabbitNodeError(f"node {self.name} exited while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RabbitNodeError(f"node {self.name} not up in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.2)
        while True:
            # Fails at once while epmd does not know the node yet: ask again.
            left = max(deadline - time.monotonic(), 5)
            done = self.ctl("await_startup", "--timeout", str(round(left)), timeout=left + 10)
            if done.returncode == 0:
                break
            if not self.running() or time.monotonic() > deadline:
                self.kill()
                raise RabbitNodeError(f"await_startup failed: {done.stderr or done.stdout}\n"
                                      f"{self.log_tail()}")
            time.sleep(0.5)
        took = time.monotonic() - started
        self.start_seconds.append(took)
        return took

    def kill(self) -> None:
        """SIGKILL the node's process group (a crash, no clean shutdown) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        # The shell script is reaped first; its beam may hold the port a moment longer,
        # and a start meanwhile would mistake the dying node for the new one.
        deadline = time.monotonic() + 30
        while _accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``), killing it past ``timeout``."""
        if not self.running():
            self.kill()  # reap, if it died by itself
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.ctl("stop", timeout=timeout)
        assert self._proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=timeout)
        self.kill()

    def restart(self, hard: bool = True) -> float:
        """Restart the broker under its clients; the seconds it was away.

        ``hard``: kill -9 and start the node again (a crash: nothing is flushed
        on the way down, connections just break). Otherwise ``stop_app`` /
        ``start_app`` (the Erlang VM stays up; clients see a broker shutdown).
        """
        began = time.monotonic()
        if hard:
            self.kill()
            self.start()
        else:
            for step in ("stop_app", "start_app"):
                done = self.ctl(step)
                if done.returncode != 0:
                    raise RabbitNodeError(f"{step} failed: {done.stderr or done.stdout}")
            self.ctl("await_startup")
        return time.monotonic() - began

    def close(self) -> None:
        """Stop the node for good (always safe; use in ``finally``)."""
        self.stop(timeout=15)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's output and log files (for error messages)."""
        parts: list[str] = []
        for path in [self._output, *sorted((self.root / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def rabbit_node(root: Path) -> Iterator[RabbitNode]:
    """A started node in ``root``, stopped (and its files removed) on the way out."""
    node = RabbitNode(root)
    try:
        node.start()
        yield node
    finally:
        node.close()
        shutil.rmtree(root, ignore_errors=True)


__all__ = ["RabbitNode", "RabbitNodeError", "rabbit_node", "rabbitmq_binaries"]
