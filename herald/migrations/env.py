"""Alembic's entry point.

herald runs it through :mod:`herald.migrations` with a connection already in a
transaction (``config.attributes["connection"]``), and never configures
logging here. A developer's ``alembic`` command (``alembic.ini`` at the repo
root) has no connection: this opens one on ``HERALD_DATABASE_URL``, or with
``--sql`` prints the SQL for that database's dialect.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

import herald.models  # noqa: F401 - registers the tables on SQLModel.metadata


def _render_item(kind: str, obj: Any, _context: AutogenContext) -> str | Literal[False]:
    """Autogenerate writes plain ``sa.String``: scripts must not depend on sqlmodel's types."""
    if kind == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length else "sa.String()"
    return False


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things: batch copies the table
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _migrate_url() -> None:
    from herald.db import make_engine
    from herald.settings import load_settings

    engine = make_engine(load_settings().database_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_migrate)
    finally:
        await engine.dispose()


def _main() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    if config.config_file_name is not None:  # the developer's alembic command only
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    if context.is_offline_mode():  # ``alembic upgrade head --sql``: the SQL, for a DBA
        from herald.settings import load_settings

        context.configure(url=load_settings().database_url, target_metadata=SQLModel.metadata,
                          literal_binds=True, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(_migrate_url())


_main()
