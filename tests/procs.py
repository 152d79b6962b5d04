"""Run herald as real processes in tests: the ``herald`` script, workers, ``herald run``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERALD_BIN = Path(sys.executable).with_name("herald")


def herald_cmd(*args: str) -> list[str]:
    """The ``herald`` console script (as installed) with ``args``."""
    if HERALD_BIN.exists():
        return [str(HERALD_BIN), *args]
    return [sys.executable, "-c", "from herald.cli import main; main()", *args]


def clean_env(**values: object) -> dict[str, str]:
    """This environment without any ``HERALD_*`` setting (tests' own URLs kept), plus ``values``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HERALD_") or k.startswith("HERALD_TEST_")}
    env.update({k: str(v) for k, v in values.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Finished:
    """What a command that ran to the end said."""

    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """Non-empty stderr lines."""
        return [line for line in self.stderr.splitlines() if line.strip()]


async def run(cmd: Sequence[str], env: dict[str, str], cwd: Path | None = None,
              timeout: float = 60) -> Finished:
    """Run ``cmd`` to completion (killed after ``timeout`` seconds)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode is not None
    return Finished(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


@dataclass
class Spawned:
    """A long-running process whose stderr (its log) is collected line by line."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, cmd: Sequence[str], env: dict[str, str],
                    cwd: Path | None = None) -> Spawned:
        """Start ``cmd`` with stdout discarded and stderr collected."""
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        spawned = cls(proc)
        spawned._reader = asyncio.create_task(spawned._read())
        return spawned

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    @property
    def log(self) -> str:
        """Everything written to stderr so far."""
        return "".join(self.lines)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace"))
            self._changed.set()
        self._changed.set()

    async def wait_for_line(self, text: str) -> str:
        """The first stderr line containing ``text`` (wrap in ``asyncio.timeout``).

        Raises AssertionError if the process exits first.
        """
        while True:
            for line in self.lines:
                if text in line:
                    return line
            if self._reader is not None and self._reader.done():
                raise AssertionError(f"process exited ({self.proc.returncode}) before "
                                     f"logging {text!r}:\n{self.log}")
            self._changed.clear()
            await self._changed.wait()

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the process."""
        self.proc.send_signal(sig)

    async def wait(self) -> int:
        """Wait for the exit code (wrap in ``asyncio.timeout``)."""
        code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        """SIGKILL if still running, and reap (always safe to call; use in ``finally``)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, already exited, counts as gone)."""
    if Path("/proc/self/stat").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


__all__ = ["Finished", "Spawned", "alive", "clean_env", "herald_cmd", "run"]
