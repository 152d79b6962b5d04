"""The database layer on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

from sqlalchemy import inspect

from herald.db import init_db, make_engine
from herald.settings import load_settings


async def test_processes_starting_together_create_the_tables_once(database_url: str) -> None:
    # Given a fresh database and four processes' engines (as workers scaling out)
    url = load_settings(database_url=database_url).database_url
    engines = [make_engine(url) for _ in range(4)]
    try:
        # When they all create the tables at the same moment
        async with asyncio.timeout(60):
            await asyncio.gather(*(init_db(engine) for engine in engines))
        # Then none fails and every table is there
        async with engines[0].connect() as conn:
            tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    finally:
        for engine in engines:
            await engine.dispose()
    assert {"users", "outbox", "deliveries", "idempotency_keys", "cancellations"} <= tables
