"""Telling a database outage from a failed delivery, and waiting it out.

A worker's database is its ledger: with it down, no claim can be taken and
no outcome recorded, so nothing should be attempted, and nothing should be
counted against the message (a retry spent on an outage is a retry the
provider never had). The gate pauses consumption while the database does not
answer a probe and opens again when it does, logging one line each way.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from sqlalchemy.ext.asyncio import AsyncEngine

from herald.db import is_outage, probe
from herald.errors import DatabaseUnavailable

log = logging.getLogger("herald.worker")


class DatabaseGate:
    """Open while the database answers; closed from a failed probe until a probe passes."""

    def __init__(self, engine: AsyncEngine | None, what: str, stop: asyncio.Event) -> None:
        self.engine = engine
        self.what = what
        self._stop = stop
        #: Set while the database answers (as far as we know).
        self.ok = asyncio.Event()
        self.ok.set()
        #: Set when an outage began; the consumer loop clears it once it paused.
        self.went_down = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None

    async def suspect(self, exc: BaseException) -> bool:
        """True (and the gate closes) when ``exc`` came from a database that is down.

        The error's type alone is not enough (an OSError may come from
        anywhere): the database must also fail a probe right now.
        """
        if self.engine is None or not (isinstance(exc, DatabaseUnavailable) or is_outage(exc)):
            return False
        if not self.ok.is_set():
            return True
        try:
            await asyncio.wait_for(probe(self.engine), 5)
        except Exception:
            if self.ok.is_set():
                self.ok.clear()
                self.went_down.set()
                log.warning("database unreachable (%s): %s consumption paused; nothing is "
                            "retried until it answers", _first_line(exc), self.what)
                self._watch = asyncio.create_task(self._wait_until_back())
            return True
        return False

    async def _wait_until_back(self) -> None:
        assert self.engine is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = 0.5
        while not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            try:
                await asyncio.wait_for(probe(self.engine), 5)
            except Exception:
                delay = min(delay * 2, 5.0)
                continue
            log.warning("database is back after %.1fs: %s consuming again",
                        loop.time() - started, self.what)
            self.ok.set()
            return

    def close(self) -> None:
        """Stop probing (the worker is stopping)."""
        if self._watch is not None:
            self._watch.cancel()


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
