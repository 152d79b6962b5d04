"""Schema migrations: alembic, configured in code, its scripts inside the package.

Every function here is synchronous and takes a SQLAlchemy ``Connection`` that
is already in a transaction (``AsyncConnection.run_sync``): the caller's lock
and commit cover the whole step, and alembic never commits on its own.
:mod:`herald.db` holds the locking; ``herald db`` is the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import Connection, inspect
from sqlmodel import SQLModel

import herald.models  # noqa: F401 - registers the tables on SQLModel.metadata
from herald.errors import HeraldError

SCRIPTS = Path(__file__).parent
HEAD = "head"
#: The first revision: the schema before migrations existed (git 3d867e4).
SPINE = "0001_spine"
SPINE_TABLES = frozenset({"users", "outbox", "deliveries", "idempotency_keys",
                          "cancellations", "notifications", "api_tokens"})
VERSION_TABLE = "alembic_version"


class _Routine(logging.Filter):
    """Drops alembic's two lines per run about the DDL mode: every process start runs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl", "Will assume"))


logging.getLogger("alembic.runtime.migration").addFilter(_Routine())


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration without an ini file; ``env.py`` migrates ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision the installed herald knows."""
    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None  # a linear history with at least one script
    return revision


def check_revision(revision: str) -> None:
    """Fail early on a revision no script has (relative ones, ``-1``, are left to alembic).

    Raises:
        HeraldError: names the known revisions.
    """
    if revision in ("head", "heads", "base") or revision[:1] in "+-" or "@" in revision:
        return
    script = ScriptDirectory.from_config(config())
    try:
        script.get_revision(revision)
    except (CommandError, RevisionError):
        known = ", ".join(s.revision for s in reversed(list(script.walk_revisions())))
        raise HeraldError(f"unknown revision {revision!r}; known: {known}, head, base") from None


def current(connection: Connection) -> str | None:
    """The revision the database is at; None when it has no ``alembic_version`` row."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection, revision: str = HEAD) -> tuple[str | None, str | None]:
    """Bring the schema up to ``revision`` (idempotent); returns (before, after).

    A database made by ``create_all`` before migrations existed is stamped
    first (see :func:`adopt`).

    A revision at or below the current one changes nothing (alembic's rule).

    Raises:
        HeraldError: unknown revision, tables that match no revision, or a
            database at a revision this herald lacks.
    """
    cfg = config(connection)
    adopt(connection)
    before = _known(cfg, current(connection))
    with _revision_errors(revision):
        command.upgrade(cfg, revision)
    return before, current(connection)


def downgrade(connection: Connection, revision: str) -> tuple[str | None, str | None]:
    """Take the schema back to ``revision`` (``base``: no tables); returns (before, after).

    Dropped tables and columns lose their data.

    Raises:
        HeraldError: unknown revision, one above the current, or a database at
            a revision this herald lacks.
    """
    cfg = config(connection)
    adopt(connection)
    before = _known(cfg, current(connection))
    with _revision_errors(revision):
        command.downgrade(cfg, revision)
    return before, current(connection)


def adopt(connection: Connection) -> str | None:
    """Stamp a database whose tables ``create_all`` made before herald had migrations.

    No ``alembic_version`` table and no herald table: nothing to do (a fresh
    database). Every table and column of today's models: stamped head (a dev
    database). The 0001 tables and none added later: stamped ``0001_spine``,
    so the upgrade that follows adds the rest. Returns the stamped revision.

    Raises:
        HeraldError: herald tables that match no revision (nothing is changed).
    """
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    ours = set(SQLModel.metadata.tables)
    if VERSION_TABLE in tables or not tables & ours:
        return None
    missing: list[str] = []
    for name, table in SQLModel.metadata.tables.items():
        if name not in tables:
            missing.append(name)
            continue
        have = {column["name"] for column in inspector.get_columns(name)}
        missing += [f"{name}.{column.name}" for column in table.columns if column.name not in have]
    if not missing:
        stamp = HEAD
    elif tables >= SPINE_TABLES and not tables & (ours - SPINE_TABLES):
        stamp = SPINE
    else:
        raise HeraldError(
            f"the database has herald tables but no {VERSION_TABLE} table, and they match "
            f"no revision (missing: {', '.join(missing)}); migrate or recreate it by hand")
    command.stamp(config(connection), stamp)
    return stamp


def _known(cfg: Config, revision: str | None) -> str | None:
    """``revision``, checked against the scripts this herald ships."""
    if revision is not None:
        try:
            ScriptDirectory.from_config(cfg).get_revision(revision)
        except (CommandError, RevisionError):
            raise HeraldError(
                f"the database is at revision {revision!r}, which this herald does not know "
                "(a newer release migrated it): run that release, or its "
                "`herald db downgrade`") from None
    return revision


@contextmanager
def _revision_errors(revision: str) -> Iterator[None]:
    """Alembic's revision errors as one line naming ``revision``."""
    try:
        yield
    except (CommandError, RevisionError) as exc:
        raise HeraldError(f"cannot migrate to {revision!r}: {exc}") from None
