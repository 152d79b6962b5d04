"""The database: one async engine per process, SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
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


#: Any fixed number: the advisory lock that serialises migrations on PostgreSQL.
_INIT_LOCK = 0x68657261  # "hera"
T = TypeVar("T")


async def _migrating(engine: AsyncEngine, step: Callable[[Connection], T]) -> T:
    """Run ``step`` in one transaction that holds the database's migration lock.

    PostgreSQL: a transaction-scoped advisory lock, so processes starting
    together take turns and the later ones find the schema at head. SQLite:
    ``BEGIN IMMEDIATE`` takes the write lock up front (waiting up to the busy
    timeout), which also makes the migration all-or-nothing; SQLite still
    answers "database is locked" at once in a few cases (WAL set-up), retried.
    Taking turns matters inside one process too: alembic keeps the running
    migration in module globals, which two interleaved ``run_sync`` would share.
    """
    attempt = 0
    while True:
        try:
            async with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                       {"key": _INIT_LOCK})
                elif engine.dialect.name == "sqlite":
                    await conn.exec_driver_sql("BEGIN IMMEDIATE")
                return await conn.run_sync(step)
        except OperationalError as exc:
            attempt += 1
            if "locked" not in str(exc) or attempt == 5:
                raise
            await asyncio.sleep(0.05 * attempt)


async def init_db(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (idempotent, and safe when several
    processes start at once).

    A database ``create_all`` made before herald had migrations is adopted
    (stamped at the revision it matches) first.

    Raises:
        HeraldError: the database is at a revision this herald does not know, or
            has herald tables that match no revision.
    """
    await upgrade_db(engine)


async def upgrade_db(engine: AsyncEngine, revision: str = "head"
                     ) -> tuple[str | None, str | None]:
    """Upgrade to ``revision`` (like :func:`init_db`); returns the revisions before and after.

    A revision at or below the current one changes nothing.

    Raises:
        HeraldError: an unknown revision, or as :func:`init_db`.
    """
    from herald import migrations  # alembic on first use, not for every importer of herald.db

    return await _migrating(engine, lambda conn: migrations.upgrade(conn, revision))


async def downgrade_db(engine: AsyncEngine, revision: str) -> tuple[str | None, str | None]:
    """Downgrade to ``revision`` (``base``: no tables); returns the revisions before and after.

    Dropped tables and columns lose their data.

    Raises:
        HeraldError: an unknown revision, one above the current, or as :func:`init_db`.
    """
    from herald import migrations

    return await _migrating(engine, lambda conn: migrations.downgrade(conn, revision))


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at; None when empty or made before migrations."""
    from herald import migrations

    async with engine.connect() as conn:
        return await conn.run_sync(migrations.current)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep objects usable after commit."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


@asynccontextmanager
async def transaction(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session whose work commits on success and rolls back on any exception."""
    async with factory() as session, session.begin():
        yield session


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means the database cannot be reached, not that a statement failed.

    Connection refused or lost, the server shutting down, a pool that cannot
    connect: the same statement may succeed once the database is back. A
    constraint violation or a bad statement is not an outage. SQLite's
    "database is locked" counts (it passes once the writer is done); a probe
    (:func:`probe`) tells when the database answers again.
    """
    from sqlalchemy.exc import DBAPIError, InterfaceError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, (OperationalError, InterfaceError, PoolTimeout,
                                ConnectionError, TimeoutError)):
            return True
        if isinstance(current, OSError) and not isinstance(current, FileNotFoundError):
            return True
        name = type(current).__name__
        if name in _OUTAGE_NAMES:
            return True
        current = current.__cause__ or current.__context__
    return False


#: asyncpg's errors for a server that is going away or not accepting connections
#: (matched by name: asyncpg is only imported when PostgreSQL is used).
_OUTAGE_NAMES = frozenset({
    "ConnectionDoesNotExistError", "CannotConnectNowError", "ConnectionFailureError",
    "AdminShutdownError", "CrashShutdownError", "TooManyConnectionsError",
    "InterfaceError", "InternalClientError", "ConnectionRejectionError",
})


async def probe(engine: AsyncEngine) -> None:
    """Run ``SELECT 1``; raises when the database does not answer."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
