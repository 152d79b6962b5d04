"""Faults of the worker process: kill -9 mid-send (repeatedly), a message that crashes every
worker it reaches, SIGTERM with messages in flight.

Real processes (API, relay, worker) on the shared broker under a prefix of
their own, a database of their own on the shared PostgreSQL server, load
through ``POST /events``, and the ledger at the end.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

from tests.conftest import eventually
from tests.faults.conftest import FaultSink, attach, stack
from tests.faults.ledger import DLQ, SENT, Ledger


async def test_kill_9_mid_send_repeatedly_loses_nothing(
    amqp_url: str, service_db: str, sink: FaultSink, tmp_path: Path
) -> None:
    # Given the API, the relay and a worker that sends one message at a time (so that a
    # kill interrupts at most one send: the bound on duplicates), to a provider that
    # takes 250 ms per message; SMTP timeout 1s, so a dead worker's claim lasts 7s
    sink.latency = 0.25
    async with stack(amqp_url=amqp_url, database_url=service_db, sink=sink, root=tmp_path,
                     HERALD_CONCURRENCY=1, HERALD_SMTP_TIMEOUT="1s") as s:
        await s.start()

        # When 20 events come in while the worker is killed (-9) mid-send, 3 times,
        # and started again each time
        load = asyncio.create_task(s.load(20, every=0.1))
        kills = 0
        for _ in range(3):
            await eventually(lambda: sink.in_data > 0, timeout=20, interval=0.005)
            assert s.worker is not None
            s.worker.send_signal(signal.SIGKILL)
            async with asyncio.timeout(10):
                assert await s.worker.wait() == -signal.SIGKILL
            kills += 1
            await s.start_worker()
            await asyncio.sleep(0.3)
        await load

        # Then every accepted delivery is sent; the only duplicates come from the window
        # between the provider's accept and the record, at most one per kill
        ledger = await s.settled(timeout=40)
        text = attach(ledger, f"kill -9 x{kills} mid-send")
    assert s.statuses == {202: 20}, s.statuses
    assert sink.interrupted >= 1, f"no send was in flight at a kill\n{text}"
    assert ledger.counts == {SENT: 20}, text
    ledger.check(max_duplicates=kills, title="kill -9 mid-send")


async def test_a_message_that_kills_every_worker_ends_in_the_dlq_and_the_rest_flow(
    amqp_url: str, service_db: str, sink: FaultSink, tmp_path: Path
) -> None:
    # Given a provider that kills the worker whenever it is handed one address, a worker
    # restarted each time it dies, and HERALD_DELIVERY_LIMIT=2. One message at a time
    # and no prefetch: a bystander unacked on the killed worker would share the count.
    async with stack(amqp_url=amqp_url, database_url=service_db, sink=sink, root=tmp_path,
                     HERALD_DELIVERY_LIMIT=2, HERALD_SMTP_TIMEOUT="1s",
                     HERALD_CONCURRENCY=1, HERALD_PREFETCH=1) as s:
        [crash] = s.recipients(1)
        sink.kill_on = {crash["email"]}
        sink.victim = lambda: s.worker.pid if s.worker is not None else None
        await s.start()
        s.keep_worker_running()

        # When that recipient's event comes in among ten others
        crashing = await s.post([crash])
        await s.load(10, every=0.1)

        # Then it reaches the DLQ after a few crashes, saying it hit the delivery limit,
        # and every other event is sent
        key = (crashing.event_id, "email", crash["user_id"])

        def done(ledger: Ledger) -> bool:
            return key in ledger.entries and ledger.entries[key].outcome == DLQ \
                and ledger.counts[SENT] == 10 and ledger.settled

        ledger = await s.settled(timeout=50, done=done)
        await s.stop_keeping()
        text = attach(ledger, f"crash loop ({sink.kills} kills)")
    assert s.statuses == {202: 11}, s.statuses
    assert 1 <= sink.kills <= 3, f"{sink.kills} crashes for a delivery limit of 2\n{text}"
    [entry] = ledger.dead_letters
    assert entry.id.startswith(crashing.event_id)
    assert re.search(r"delivery[ _]limit", entry.reason, re.IGNORECASE), entry.reason
    assert ledger.entries[key].row_status == "dead", text
    ledger.check(title="crash loop")


async def test_sigterm_with_messages_in_flight_exits_0_and_a_new_worker_finishes(
    amqp_url: str, service_db: str, sink: FaultSink, tmp_path: Path
) -> None:
    # Given a worker (4 at a time, shutdown bound 1s) and a provider that takes 300 ms per
    # message, and 2.5 s for two addresses (past the bound, within the 3s SMTP timeout)
    shutdown = 1.0
    sink.latency = 0.3
    async with stack(amqp_url=amqp_url, database_url=service_db, sink=sink, root=tmp_path,
                     HERALD_CONCURRENCY=4, HERALD_SHUTDOWN_TIMEOUT=f"{shutdown}s",
                     HERALD_SMTP_TIMEOUT="3s") as s:
        slow = s.recipients(2)
        sink.slow = {r["email"]: 2.5 for r in slow}
        await s.start()
        for recipient in slow:
            await s.post([recipient])
        await s.load(18, every=0.02)
        await eventually(lambda: all(sink.rcpt[r["email"]] for r in slow) and sink.in_data >= 2,
                         timeout=20, interval=0.01)

        # When the worker gets SIGTERM with those sends in flight
        assert s.worker is not None
        first = s.worker
        started = time.monotonic()
        first.send_signal(signal.SIGTERM)

        # Then it exits 0 within the bound (plus start-up noise), the slow ones given back
        async with asyncio.timeout(shutdown + 15):
            code = await first.wait()
        elapsed = time.monotonic() - started
        assert code == 0, first.log
        assert elapsed < shutdown + 6, elapsed
        assert "waiting up to" in first.log

        # And a new worker sends the rest, each once
        await s.start_worker()
        ledger = await s.settled(timeout=40)
        text = attach(ledger, "SIGTERM in flight")
    assert sink.interrupted >= 1, f"nothing was in flight past the bound\n{text}"
    assert ledger.counts == {SENT: 20}, text
    ledger.check(title="SIGTERM in flight")
