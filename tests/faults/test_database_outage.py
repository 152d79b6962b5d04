"""The database goes away for a few seconds while events keep coming in.

On a PostgreSQL server the test starts itself (initdb in a temp dir:
``tests/pgtemp.py``), never the shared one. The API, relay and worker are
real processes pointed at it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import FaultSink, attach, stack
from tests.faults.ledger import SENT
from tests.pgtemp import TempPostgres, require_postgres_binaries

CONCURRENCY = 2


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[TempPostgres]:
    """A started PostgreSQL of this test's own, removed afterwards."""
    require_postgres_binaries()
    server = TempPostgres(tmp_path / "pg")
    try:
        server.start()
        yield server
    finally:
        server.remove()


async def test_database_outage_answers_503_spends_no_retries_and_loses_nothing(
    amqp_url: str, own_postgres: TempPostgres, sink: FaultSink, tmp_path: Path
) -> None:
    # Given the API, the relay and a worker (2 sends at a time) on the test's own
    # PostgreSQL, and a provider slower (300 ms a message) than the load (10 a second):
    # the worker has a backlog when the database goes, so it meets the outage mid-work
    sink.latency = 0.3
    async with stack(amqp_url=amqp_url, database_url=own_postgres.url, sink=sink,
                     root=tmp_path, HERALD_CONCURRENCY=CONCURRENCY) as s:
        await s.start()

        # When events keep coming in (10 a second) and the database stops for ~5 s
        # meanwhile (pg_ctl stop -m fast: every session is cut), then starts again
        load = asyncio.create_task(s.load(100, every=0.1))
        await asyncio.sleep(2)
        await asyncio.to_thread(own_postgres.stop, "fast")
        down_at = time.monotonic()
        backlog = sum(p.status == 202 for p in s.posted) - len(sink.messages)
        await asyncio.sleep(5)
        await asyncio.to_thread(own_postgres.start)
        up_at = time.monotonic()
        await load

        # Then the API said 503 (never 500) while it was down, every event it accepted
        # is sent, none was dead-lettered or retried because of the outage
        ledger = await s.settled(timeout=40)
        text = attach(ledger, "database outage")
        worker_logs = "".join("".join(p.lines) for p in s.spawned if p is not s.api)
    during = [p for p in s.posted if down_at + 0.5 <= p.at <= up_at - 0.5]
    assert during, "no event came in while the database was down"
    assert backlog > 0, "the worker had caught up: nothing met the outage"
    assert {p.status for p in during} == {503}, [(p.status, p.error) for p in during]
    assert set(s.statuses) <= {202, 503}, s.statuses
    assert ledger.dead_letters == [], text
    assert "retry 1 in" not in worker_logs, "a retry was spent on the outage"
    assert ledger.counts == {SENT: s.expected}, text
    # A send the provider accepted while the database was away is recorded once it is
    # back (the worker holds the record, and the message, meanwhile): never sent twice.
    ledger.check(max_duplicates=0, title="database outage")
