"""Schema migrations on real SQLite and PostgreSQL: the scripts against the models, data
kept across upgrades, downgrades, databases made before migrations, ``herald db``.

The comparison test is the one that fails when a model changes without a migration;
``test_the_comparison_sees_each_kind_of_drift`` shows it is not vacuous.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel, select
from typer.testing import CliRunner

from herald import migrations
from herald.cli import app
from herald.db import (
    current_revision,
    downgrade_db,
    init_db,
    make_engine,
    session_factory,
    upgrade_db,
)
from herald.errors import HeraldError
from herald.models import Channel, User, as_utc
from herald.settings import load_settings

HEAD = migrations.head()
CREATED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def spine_metadata() -> sa.MetaData:
    """The tables as herald's models declared them at git 3d867e4, before migrations
    (frozen here: deriving them from today's models would drift with them)."""
    spine = sa.MetaData()

    def ts(name: str, nullable: bool = False) -> sa.Column[datetime]:
        return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)

    def text(name: str, nullable: bool = False) -> sa.Column[str]:
        return sa.Column(name, sa.Text(), nullable=nullable)

    def string(name: str, length: int, nullable: bool = False, **kw: Any) -> sa.Column[str]:
        return sa.Column(name, sa.String(length), nullable=nullable, **kw)

    def serial() -> sa.Column[int]:
        return sa.Column("id", sa.Integer(), primary_key=True)

    sa.Table("users", spine, string("email", 320, unique=True, index=True),
             string("name", 200), string("id", 36, primary_key=True),
             string("password_hash", 200), ts("created_at"))
    sa.Table("outbox", spine, string("id", 36, primary_key=True), string("routing_key", 100),
             text("body"), ts("created_at"), ts("published_at", True),
             sa.Column("attempts", sa.Integer(), nullable=False), text("last_error", True))
    sa.Table("deliveries", spine, serial(), string("event_id", 36, index=True),
             string("event_type", 100), string("channel", 20), string("recipient", 100),
             string("status", 20), string("provider", 50, True),
             sa.Column("attempts", sa.Integer(), nullable=False), text("last_error", True),
             ts("claimed_until", True), ts("sent_at", True), text("summary", True),
             string("address", 320, True), ts("created_at"), ts("updated_at"),
             sa.UniqueConstraint("event_id", "channel", "recipient"))
    sa.Table("idempotency_keys", spine, serial(), string("route", 100), string("key", 255),
             string("request_hash", 64), sa.Column("status_code", sa.Integer(), nullable=False),
             text("response_body"), text("response_headers"), ts("created_at"),
             sa.UniqueConstraint("route", "key"))
    sa.Table("cancellations", spine, string("key", 200, primary_key=True), ts("cancelled_at"),
             sa.Column("request_count", sa.Integer(), nullable=False))
    sa.Table("notifications", spine, serial(), string("event_id", 36, index=True),
             string("event_type", 100), string("user_id", 100, index=True), text("title"),
             text("body"), sa.Column("delivered", sa.Boolean(), nullable=False), text("trail"),
             text("reason"), ts("read_at", True), ts("created_at"),
             sa.UniqueConstraint("event_id", "user_id"))
    sa.Table("api_tokens", spine, string("token_hash", 64, primary_key=True),
             string("user_id", 36, index=True), ts("created_at"), ts("expires_at"))
    assert set(spine.tables) == migrations.SPINE_TABLES
    return spine


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh, empty database (SQLite and PostgreSQL)."""
    engine = make_engine(load_settings(database_url=database_url).database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def twin(database_url: str, tmp_path: Path,
               request: pytest.FixtureRequest) -> AsyncIterator[AsyncEngine]:
    """An engine on a second fresh database next to ``database_url``'s."""
    if database_url.startswith("sqlite"):
        engine = make_engine(load_settings(database_url=f"sqlite:///{tmp_path}/twin.db")
                             .database_url)
        yield engine
        await engine.dispose()
        return
    server = request.getfixturevalue("postgres_url")
    name = f"herald_twin_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = f"{server.rsplit('/', 1)[0]}/{name}"
    engine = make_engine(load_settings(database_url=url).database_url)
    yield engine
    await engine.dispose()
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def differences(engine: AsyncEngine, metadata: sa.MetaData | None = None) -> list[Any]:
    """What alembic's autogenerate would change to make the database match ``metadata``:
    tables, columns, types (with their lengths), nullability, indexes, unique and foreign
    keys. Server defaults are left out: 0002 keeps some the models do not declare."""
    def compare(conn: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata or SQLModel.metadata))

    async with engine.connect() as conn:
        return await conn.run_sync(compare)


async def tables(engine: AsyncEngine) -> dict[str, set[str]]:
    """Each table's column names."""
    def read(conn: sa.Connection) -> dict[str, set[str]]:
        inspector = sa.inspect(conn)
        return {name: {c["name"] for c in inspector.get_columns(name)}
                for name in inspector.get_table_names()}

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def create_all(engine: AsyncEngine, metadata: sa.MetaData) -> None:
    """What ``init_db`` did before migrations: ``create_all``, no ``alembic_version``."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


async def add_spine_user(engine: AsyncEngine, user_id: str = "u-1") -> None:
    """A user row as the 0001 schema holds it."""
    users = sa.table("users", sa.column("id"), sa.column("email"), sa.column("name"),
                     sa.column("password_hash"),
                     sa.column("created_at", sa.DateTime(timezone=True)))
    async with engine.begin() as conn:
        await conn.execute(users.insert().values(
            id=user_id, email=f"{user_id}@example.com", name="Ada", password_hash="x",
            created_at=CREATED))


async def get_user(engine: AsyncEngine, user_id: str = "u-1") -> User:
    async with session_factory(engine)() as session:
        return (await session.exec(select(User).where(User.id == user_id))).one()


async def test_an_empty_database_upgraded_to_head_matches_the_models(
    engine: AsyncEngine,
) -> None:
    # Given an empty database, when it is initialised
    await init_db(engine)
    # Then it is at head and alembic sees nothing to change against the models
    assert await current_revision(engine) == HEAD
    assert await differences(engine) == []
    # And a second start changes nothing
    assert await upgrade_db(engine) == (HEAD, HEAD)


async def test_the_comparison_sees_each_kind_of_drift(engine: AsyncEngine) -> None:
    # Given a database at head, and the models as someone might change them without a
    # migration: a new column, a longer string, a column made NOT NULL, a new index
    await init_db(engine)
    drifted = sa.MetaData()
    for table in SQLModel.metadata.sorted_tables:
        table.to_metadata(drifted)
    users, outbox = drifted.tables["users"], drifted.tables["outbox"]
    users.append_column(sa.Column("nickname", sa.String(30), nullable=True))
    users.c.name.type = sa.String(300)
    outbox.c.last_error.nullable = False
    sa.Index("ix_outbox_routing_key", outbox.c.routing_key)
    # When the database is compared with them, then each change is reported
    found = {str(d[0][0] if isinstance(d, list) else d[0]) for d in await differences(
        engine, drifted)}
    assert found == {"add_column", "modify_type", "modify_nullable", "add_index"}


async def test_revision_0001_is_the_schema_before_migrations(engine: AsyncEngine) -> None:
    await upgrade_db(engine, migrations.SPINE)
    assert await current_revision(engine) == migrations.SPINE
    assert await differences(engine, spine_metadata()) == []


async def test_a_0001_database_keeps_its_users_through_the_upgrade(engine: AsyncEngine) -> None:
    # Given a database at 0001 with a user
    await upgrade_db(engine, "0001")
    await add_spine_user(engine)
    # When it is upgraded
    assert await upgrade_db(engine) == (migrations.SPINE, HEAD)
    # Then the user is there, and the new columns have their defaults
    user = await get_user(engine)
    assert (user.email, user.name, user.handle, user.phone) == (
        "u-1@example.com", "Ada", None, None)
    assert (user.locale, user.timezone, user.last_active_at) == ("en", "UTC", None)
    assert as_utc(user.created_at) == as_utc(user.updated_at) == CREATED
    assert await differences(engine) == []


async def test_downgrade_to_0001_and_upgrade_again(engine: AsyncEngine) -> None:
    # Given a database at head with a user (handle set) and a channel
    await init_db(engine)
    await add_spine_user(engine)
    async with session_factory(engine)() as session:
        user = (await session.exec(select(User))).one()
        user.handle, user.locale = "ada", "fr"
        session.add(Channel(name="general", created_by=user.id))
        await session.commit()
    # When it goes down to 0001
    assert await downgrade_db(engine, migrations.SPINE) == (HEAD, migrations.SPINE)
    # Then the 0002 tables and columns are gone, the user is not
    schema = await tables(engine)
    assert set(schema) == migrations.SPINE_TABLES | {"alembic_version"}
    assert schema["users"] == {"id", "email", "name", "password_hash", "created_at"}
    assert await differences(engine, spine_metadata()) == []
    # And back up: the schema matches the models again, the user has defaults
    assert await upgrade_db(engine) == (migrations.SPINE, HEAD)
    assert await differences(engine) == []
    user = await get_user(engine)
    assert (user.handle, user.locale) == (None, "en")
    # And down to base leaves no table but alembic's
    await downgrade_db(engine, "base")
    assert set(await tables(engine)) == {"alembic_version"}


async def test_a_database_made_before_migrations_is_stamped_0001_and_upgraded(
    engine: AsyncEngine,
) -> None:
    # Given the tables create_all made at 3d867e4, a user, no alembic_version
    await create_all(engine, spine_metadata())
    await add_spine_user(engine)
    assert await current_revision(engine) is None
    # When herald starts
    await init_db(engine)
    # Then it was adopted and upgraded, with the user kept
    assert await current_revision(engine) == HEAD
    assert await differences(engine) == []
    assert (await get_user(engine)).timezone == "UTC"


async def test_a_dev_database_made_by_create_all_of_todays_models_is_stamped_head(
    engine: AsyncEngine,
) -> None:
    await create_all(engine, SQLModel.metadata)
    async with session_factory(engine)() as session:
        session.add(User(id="u-1", email="u-1@example.com", name="Ada", password_hash="x"))
        await session.commit()
    assert await upgrade_db(engine) == (HEAD, HEAD)
    assert await differences(engine) == []
    assert (await get_user(engine)).email == "u-1@example.com"


async def test_tables_that_match_no_revision_are_refused_and_left_alone(
    engine: AsyncEngine,
) -> None:
    # Given some herald tables, neither 0001's set nor today's
    partial = sa.MetaData()
    for name in ("users", "outbox"):
        SQLModel.metadata.tables[name].to_metadata(partial)
    await create_all(engine, partial)
    # When herald starts, then it says what is missing and stamps nothing
    with pytest.raises(HeraldError, match=r"match no revision.*deliveries"):
        await init_db(engine)
    assert set(await tables(engine)) == {"users", "outbox"}


async def test_a_migration_that_fails_half_way_changes_nothing(engine: AsyncEngine) -> None:
    # Given a database at 0001 where a table 0002 creates after altering users exists
    await upgrade_db(engine, migrations.SPINE)
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE channel_members (x INTEGER)"))
    # When the upgrade fails on it
    with pytest.raises(sa.exc.DatabaseError, match="channel_members"):
        await init_db(engine)
    # Then users was not altered and the revision is still 0001 (one transaction, SQLite too)
    schema = await tables(engine)
    assert set(schema) == migrations.SPINE_TABLES | {"alembic_version", "channel_members"}
    assert schema["users"] == {"id", "email", "name", "password_hash", "created_at"}
    assert await current_revision(engine) == migrations.SPINE


async def test_a_database_from_a_newer_release_is_refused(engine: AsyncEngine) -> None:
    await init_db(engine)
    async with engine.begin() as conn:
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099_future'"))
    with pytest.raises(HeraldError, match="'0099_future', which this herald does not know"):
        await init_db(engine)


async def test_bad_revisions_are_one_line_errors(engine: AsyncEngine) -> None:
    await upgrade_db(engine, migrations.SPINE)
    with pytest.raises(HeraldError, match="not a valid downgrade target"):
        await downgrade_db(engine, "0002")  # above 0001
    assert await upgrade_db(engine, "base") == (migrations.SPINE, migrations.SPINE)  # no-op
    with pytest.raises(HeraldError, match="unknown revision 'nope'"):
        migrations.check_revision("nope")
    assert await current_revision(engine) == migrations.SPINE


async def test_many_processes_adopting_an_old_database_at_once(database_url: str) -> None:
    # Given a database made before migrations, and four processes' engines, two tasks each
    url = load_settings(database_url=database_url).database_url
    engines = [make_engine(url) for _ in range(4)]
    try:
        await create_all(engines[0], spine_metadata())
        await add_spine_user(engines[0])
        # When they all start at the same moment
        async with asyncio.timeout(60):
            await asyncio.gather(*(init_db(e) for e in engines for _ in range(2)))
        # Then none failed, the schema is at head once, and the user is kept
        assert await current_revision(engines[0]) == HEAD
        assert await differences(engines[0]) == []
        assert (await get_user(engines[0])).locale == "en"
    finally:
        for engine in engines:
            await engine.dispose()


async def test_names_are_the_ones_create_all_gives(engine: AsyncEngine,
                                                   twin: AsyncEngine) -> None:
    # Given one database migrated to head and a twin made by create_all of the models
    await init_db(engine)
    await create_all(twin, SQLModel.metadata)

    def names(conn: sa.Connection) -> set[tuple[str, str, str | None]]:
        inspector = sa.inspect(conn)
        found: set[tuple[str, str, str | None]] = set()
        for table in SQLModel.metadata.tables:
            found |= {(table, "index", i["name"]) for i in inspector.get_indexes(table)}
            if conn.dialect.name == "postgresql":  # SQLite's create_all leaves them unnamed
                found |= {(table, "unique", u["name"])
                          for u in inspector.get_unique_constraints(table)}
                found |= {(table, "fk", f["name"]) for f in inspector.get_foreign_keys(table)}
                found.add((table, "pk", inspector.get_pk_constraint(table)["name"]))
        return found

    # Then both carry the same index (and, on PostgreSQL, constraint) names
    async with engine.connect() as a, twin.connect() as b:
        assert await a.run_sync(names) == await b.run_sync(names)


async def test_migrating_leaves_herald_logging_alone(engine: AsyncEngine) -> None:
    probe = logging.getLogger("herald.probe")
    root_handlers = list(logging.getLogger().handlers)
    await init_db(engine)
    assert not probe.disabled
    assert logging.getLogger().handlers == root_handlers


runner = CliRunner()


async def herald_db(url: str, *args: str) -> tuple[int, str, str]:
    """``herald db ARGS`` in-process (in a thread: the command runs its own event loop)."""
    result = await asyncio.to_thread(runner.invoke, app, ["db", *args],
                                     env={"HERALD_DATABASE_URL": url})
    return result.exit_code, result.stdout, result.stderr


async def test_the_db_commands(database_url: str) -> None:
    assert await herald_db(database_url, "current") == (0, (
        "none (an empty database, or one made before migrations: "
        "`herald db upgrade` adopts it)\n"), "")
    assert await herald_db(database_url, "init") == (
        0, f"database ready at revision {HEAD}\n", "")
    assert await herald_db(database_url, "current") == (0, f"{HEAD} (head)\n", "")
    assert await herald_db(database_url, "downgrade", "0001") == (
        0, f"downgraded {HEAD} -> 0001_spine\n", "")
    assert await herald_db(database_url, "current") == (
        0, f"0001_spine (head is {HEAD}: run `herald db upgrade`)\n", "")
    assert await herald_db(database_url, "upgrade") == (
        0, f"upgraded 0001_spine -> {HEAD}\n", "")
    assert await herald_db(database_url, "upgrade", "head") == (0, f"already at {HEAD}\n", "")
    assert await herald_db(database_url, "downgrade", "base") == (
        0, f"downgraded {HEAD} -> base\n", "")
    assert await herald_db(database_url, "init") == (
        0, f"database ready at revision {HEAD}\n", "")


@pytest.mark.parametrize(("args", "code", "message"), [
    (("upgrade", "nope"), 2, "error: unknown revision 'nope'; known: 0001_spine, "),
    (("downgrade", "0003"), 2, "error: unknown revision '0003'"),
    (("downgrade", "0002"), 1, "error: cannot migrate to '0002': Destination 0002 is not"),
])
async def test_a_bad_revision_is_one_line(database_url: str, args: tuple[str, ...], code: int,
                                          message: str) -> None:
    await herald_db(database_url, "upgrade", "0001")
    exit_code, stdout, stderr = await herald_db(database_url, *args)
    assert (exit_code, stdout) == (code, "")
    assert stderr.startswith(message) and stderr.count("\n") == 1, stderr


@pytest.mark.parametrize(("url", "message"), [
    ("postgresql://herald:secret@127.0.0.1:1/herald",
     "error: cannot reach the database postgresql://herald:***@127.0.0.1:1/herald: "),
    ("sqlite:////proc/herald/herald.db", "error: cannot open the database sqlite:////proc/"),
])
@pytest.mark.parametrize("command", ["init", "current", "upgrade"])
async def test_an_unreachable_database_is_one_line(url: str, message: str,
                                                   command: str) -> None:
    code, stdout, stderr = await herald_db(url, command)
    assert (code, stdout) == (1, "")
    assert stderr.startswith(message) and stderr.count("\n") == 1, stderr
    assert "secret" not in stderr
