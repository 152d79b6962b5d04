"""The broker crashes (kill -9) and comes back while events keep coming in.

On a RabbitMQ node this module starts itself (own node name, ports and data
dir: ``tests/faults/rabbitnode.py``), never the shared one. The API, relay
and worker are real processes pointed at it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.faults.conftest import FaultSink, attach, stack
from tests.faults.ledger import SENT
from tests.faults.rabbitnode import RabbitNode


async def test_broker_restart_under_load_loses_nothing_and_sends_once(
    rabbit_node: RabbitNode, service_db: str, sink: FaultSink, tmp_path: Path
) -> None:
    # Given the API, the relay and a worker on the test's own broker node
    async with stack(amqp_url=rabbit_node.url, database_url=service_db, sink=sink,
                     root=tmp_path) as s:
        await s.start()

        # When events keep coming in (5 a second) and the broker is killed -9 and
        # started again meanwhile
        load = asyncio.create_task(s.load(50, every=0.2))
        await asyncio.sleep(2)
        killed_at = time.monotonic()
        away = await asyncio.to_thread(rabbit_node.restart, True)
        back_at = time.monotonic()
        await load

        # Then every accepted event is sent, exactly once
        ledger = await s.settled(timeout=45)
        text = attach(ledger, f"broker restart (away {away:.1f}s)")
    during = [p for p in s.posted if killed_at <= p.at <= back_at]
    assert during, "no event came in while the broker was away"
    assert s.statuses == {202: 50}, s.statuses  # the API writes the outbox, not the broker
    assert ledger.counts == {SENT: 50}, text
    ledger.check(max_duplicates=0, title="broker restart")
