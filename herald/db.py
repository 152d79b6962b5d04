"""The database: one async engine per process, SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

import herald.models  # noqa: F401 - registers the tables on SQLModel.metadata


def make_engine(url: str) -> AsyncEngine:
    """An engine for a driver URL as :class:`herald.settings.Settings` normalises it.

    SQLite gets WAL and a busy timeout so the API, relay and workers (separate
    processes) can share one file.
    """
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


#: Any fixed number: the advisory lock that serialises table creation on PostgreSQL.
_INIT_LOCK = 0x68657261  # "hera"


async def init_db(engine: AsyncEngine) -> None:
    """Create missing tables (idempotent, and safe when several processes start at once).

    ``create_all`` checks, then creates, so two processes starting together can
    both try. PostgreSQL: a transaction-scoped advisory lock makes them take
    turns. SQLite (no such lock): the loser's "already exists", or the
    "database is locked" SQLite answers at once when a reader must become a
    writer, is retried, and its next check finds the table.
    """
    for attempt in range(5):
        try:
            async with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                       {"key": _INIT_LOCK})
                await conn.run_sync(SQLModel.metadata.create_all)
            return
        except OperationalError as exc:
            if not any(s in str(exc) for s in ("already exists", "locked")) or attempt == 4:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep objects usable after commit."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


@asynccontextmanager
async def transaction(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session whose work commits on success and rolls back on any exception."""
    async with factory() as session, session.begin():
        yield session
