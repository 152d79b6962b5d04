"""A throw-away PostgreSQL server for tests that stop, kill or restart the database.

The shared server on 5432 must never be stopped; a test that needs an outage
starts its own with :func:`temp_postgres` (initdb in a temp dir, its own port,
listening on 127.0.0.1 only, ``fsync=off``). As root, every PostgreSQL
binary runs as the ``postgres`` OS user (``runuser``), which refuses to run
as root.

pytest's ``tmp_path`` lives under a 0700 directory of root that the
``postgres`` user cannot enter, and Unix socket paths are limited to ~107
bytes; so when ``root`` is not usable the cluster goes to a short directory
of its own under the system temp dir (removed at exit like the rest).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: Seconds ``start`` and ``stop`` wait for the server.
_WAIT = 60
#: Unix socket paths longer than this do not fit ``sun_path`` (108 bytes with the file name).
_MAX_SOCKET_DIR = 80


def postgres_binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` (else ``pg_ctl``'s on PATH), or None."""
    versions: list[tuple[int, Path]] = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        if re.fullmatch(r"\d+", bindir.parent.name) and (bindir / "initdb").exists():
            versions.append((int(bindir.parent.name), bindir))
    if versions:
        return max(versions)[1]
    found = shutil.which("pg_ctl")
    if found and (Path(found).parent / "initdb").exists():
        return Path(found).parent
    return None


def require_postgres_binaries() -> Path:
    """The binaries, or skip the test (fail it under ``CI=true``) saying what is missing."""
    bindir = postgres_binaries()
    if bindir is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql"
        if IN_CI:
            pytest.fail(f"{reason}; they are required in CI")
        pytest.skip(reason)
    return bindir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if not Path("/proc/self/stat").exists():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children_of(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


class TempPostgres:
    """One PostgreSQL cluster of its own: ``start`` / ``stop`` / ``kill`` as often as needed.

    ``url`` reaches it as the ``postgres`` superuser (trust authentication) on
    its ``postgres`` database. Methods block (use ``asyncio.to_thread`` from
    a loop that must keep running meanwhile).
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        bindir = postgres_binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found (see postgres_binaries())")
        self.bindir = bindir
        self.root = Path(root)
        self.port = port if port is not None else _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0
        self._base: Path | None = None
        self._own_base = False

    # --- layout ---------------------------------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=_WAIT,
                              env={**os.environ, "LC_ALL": "C.UTF-8"})

    def _reachable(self, path: Path) -> bool:
        """True when the server's user can write in ``path`` and its socket path fits."""
        if len(str(path / "sock")) > _MAX_SOCKET_DIR:
            return False
        if not self._as_postgres:
            return True
        return self._run("test", "-w", str(path), "-a", "-x", str(path),
                         check=False).returncode == 0

    def _layout(self) -> Path:
        if self._base is not None:
            return self._base
        self.root.mkdir(parents=True, exist_ok=True)
        base = self.root / "postgres"
        base.mkdir(exist_ok=True)
        self._chown(base)
        if not self._reachable(base):
            base.rmdir()
            base = Path(tempfile.mkdtemp(prefix="herald-pg-"))
            self._own_base = True
            self._chown(base)
            # Gone with the test process even if nobody calls remove().
            atexit.register(self.remove)
            (self.root / "postgres-dir").write_text(f"{base}\n")
        (base / "sock").mkdir(exist_ok=True)
        self._chown(base / "sock")
        self._base = base
        return base

    def _chown(self, path: Path) -> None:
        if self._as_postgres:
            shutil.chown(path, "postgres", "postgres")
            path.chmod(0o700)

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._layout() / "data"

    @property
    def socket_dir(self) -> Path:
        """Where the server puts its Unix socket."""
        return self._layout() / "sock"

    @property
    def log_file(self) -> Path:
        """The server's log (read it when a test fails)."""
        return self._layout() / "server.log"

    # --- control --------------------------------------------------------------------------

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    def running(self) -> bool:
        """True while the postmaster runs."""
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def start(self) -> None:
        """initdb on first start, then start and wait until it accepts connections.

        Raises:
            RuntimeError: the server did not come up (the message has its log's tail).
        """
        if self.running():
            return
        data = self.data_dir
        if self._postmaster_pid() is not None:
            # Left by a killed postmaster. PostgreSQL removes a stale one itself, but
            # takes a zombie (not yet reaped by init) for a live server; so with
            # the socket's lock file.
            (data / "postmaster.pid").unlink()
            for stale in self.socket_dir.glob(".s.PGSQL.*"):
                stale.unlink()
        if not (data / "PG_VERSION").exists():
            self._run(self.bindir / "initdb", "-D", str(data), "-U", "postgres",
                      "-A", "trust", "-E", "UTF8", "--no-sync")
        options = " ".join([
            f"-p {self.port}", "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.socket_dir}",
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c max_connections=100", "-c shared_buffers=16MB",
        ])
        done = self._run(self.bindir / "pg_ctl", "start", "-D", str(data), "-l",
                         str(self.log_file), "-w", "-t", str(_WAIT), "-o", options, check=False)
        if done.returncode != 0 or not self._accepting():
            raise RuntimeError(f"temp PostgreSQL on {self.port} did not start: "
                               f"{done.stdout}{done.stderr}\n{self._log_tail()}")

    def _accepting(self) -> bool:
        deadline = time.monotonic() + _WAIT
        while time.monotonic() < deadline:
            done = self._run(self.bindir / "pg_isready", "-h", "127.0.0.1", "-p",
                             str(self.port), "-U", "postgres", "-t", "2", check=False)
            if done.returncode == 0:
                return True
            time.sleep(0.1)
        return False

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (smart, fast or immediate) and wait until it is down."""
        if not self.running():
            return
        self._run(self.bindir / "pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode,
                  "-w", "-t", str(_WAIT), check=False)
        self._wait_gone(self._postmaster_pid())

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash); returns once its processes are gone.

        The backends notice their postmaster's death and exit; any that lingers
        is killed too, so that a following :meth:`start` finds no shared memory
        in use.
        """
        pid = self._postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        children = _children_of(pid)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._wait_gone(pid)
        deadline = time.monotonic() + 10
        while any(_pid_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        for child in children:
            if _pid_alive(child):
                with suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        for child in children:
            self._wait_gone(child)

    @staticmethod
    def _wait_gone(pid: int | None, timeout: float = _WAIT) -> None:
        deadline = time.monotonic() + timeout
        while pid is not None and _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def remove(self) -> None:
        """Kill the server if it runs and delete its files (idempotent)."""
        if self._base is None:
            return
        if self.running():
            self.stop("immediate")
            if self.running():
                self.kill()
        shutil.rmtree(self._base, ignore_errors=True)
        if self._own_base:
            with suppress(OSError):
                (self.root / "postgres-dir").unlink()
        self._base = None

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


@contextmanager
def temp_postgres(root: Path) -> Iterator[TempPostgres]:
    """A started :class:`TempPostgres` under ``root``; stopped and removed at exit.

    Skips the test (fails it under ``CI=true``) when the binaries are missing.
    """
    require_postgres_binaries()
    server = TempPostgres(root)
    try:
        server.start()
        yield server
    finally:
        server.remove()


__all__ = ["TempPostgres", "postgres_binaries", "require_postgres_binaries", "temp_postgres"]
