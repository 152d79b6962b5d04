"""Shared fixtures: real RabbitMQ, PostgreSQL/SQLite and Redis, each test isolated.

Service URLs come from the environment (``HERALD_TEST_AMQP_URL``,
``HERALD_TEST_POSTGRES_URL``, ``HERALD_TEST_REDIS_URL``); without one, a
testcontainer is started when Docker is reachable, otherwise the test is
skipped, except under CI (``CI=true``), where a missing service fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from herald.db import init_db, make_engine
from herald.mailsink import Faults, MailSink, start_sink
from herald.settings import Settings, load_settings
from topology.declare import declare
from topology.spec import build

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI but not configured/reachable")
    pytest.skip(f"{what} not available")


def _docker_ok() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """The broker every test uses (its own prefix keeps tests apart)."""
    url = os.environ.get("HERALD_TEST_AMQP_URL")
    if url:
        yield url
        return
    if not _docker_ok():
        _unavailable("RabbitMQ (HERALD_TEST_AMQP_URL)")
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13-management") as rmq:
        params = rmq.get_connection_params()
        yield f"amqp://guest:guest@{params.host}:{params.port}/"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server URL (``postgresql://user@host:port/db``); tests make their own DB."""
    url = os.environ.get("HERALD_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if not _docker_ok():
        _unavailable("PostgreSQL (HERALD_TEST_POSTGRES_URL)")
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16", driver=None) as pg:
        yield pg.get_connection_url()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL."""
    url = os.environ.get("HERALD_TEST_REDIS_URL")
    if url:
        yield url
        return
    if not _docker_ok():
        _unavailable("Redis (HERALD_TEST_REDIS_URL)")
    from testcontainers.redis import RedisContainer

    with RedisContainer() as redis:
        yield f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0"


@pytest.fixture
def prefix() -> str:
    """A topology prefix no other test uses."""
    return f"t-{uuid.uuid4().hex[:10]}"


#: Databases this test process made and emptied, ready for its next test. Dropping a
#: database costs PostgreSQL a checkpoint (seconds); emptying its schema does not.
_SPARE_DATABASES: list[str] = []


async def _empty(admin: asyncpg.Connection, server: str, name: str) -> bool:
    """Drop everything in ``name`` (its public schema); False if that did not work."""
    await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
    try:
        conn = await asyncpg.connect(f"{server.rsplit('/', 1)[0]}/{name}")
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()
    return True


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh (empty) database per test, on SQLite and on PostgreSQL (as users write the URL).

    PostgreSQL databases are reused within a test process after their schema
    is dropped, so every test still starts from nothing.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/herald.db"
        return
    server = request.getfixturevalue("postgres_url")
    if _SPARE_DATABASES:
        name = _SPARE_DATABASES.pop()
    else:
        name = f"herald_t_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
    base = server.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin = await asyncpg.connect(server)
    try:
        if await _empty(admin, server, name):
            _SPARE_DATABASES.append(name)
        else:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session", autouse=True)
def _drop_spare_databases(request: pytest.FixtureRequest) -> Iterator[None]:
    """Drop this process's reusable databases when the session ends."""
    yield
    if not _SPARE_DATABASES:
        return
    server = os.environ.get("HERALD_TEST_POSTGRES_URL")
    if not server:
        return

    async def drop() -> None:
        admin = await asyncpg.connect(server)
        try:
            while _SPARE_DATABASES:
                name = _SPARE_DATABASES.pop()
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(drop())


@pytest.fixture
def make_settings(
    amqp_url: str, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[..., Settings]:
    """Settings for this test (own prefix and database), fast delays; override any field.

    The database is SQLite in ``tmp_path`` unless the test asks for the
    ``database_url`` fixture, which runs it on SQLite and on PostgreSQL.
    """
    if "database_url" in request.fixturenames:
        database_url = request.getfixturevalue("database_url")
    else:
        database_url = f"sqlite:///{tmp_path}/herald.db"

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": amqp_url, "prefix": prefix, "database_url": database_url,
            "retry_delays": "100ms,200ms,400ms", "max_retry": 3, "smtp_timeout": "2s",
            "shutdown_timeout": "3s", "relay_interval": "50ms", "mail_dir": tmp_path / "mail",
            "email_rate_limit": "1000/s",
        }
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Default test settings."""
    return make_settings()


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractRobustConnection]:
    """A broker connection for the test body."""
    conn = await aio_pika.connect_robust(amqp_url)
    yield conn
    await conn.close()


async def delete_topology(conn: AbstractRobustConnection, settings: Settings) -> None:
    """Remove every queue and exchange of ``settings.prefix``."""
    topo = build(settings)
    for queue in topo.queues:
        ch = await conn.channel()
        try:
            await ch.queue_delete(queue.name)
        except Exception:
            pass
        finally:
            if not ch.is_closed:
                await ch.close()
    ch = await conn.channel()
    for ex in topo.exchanges:
        await ch.exchange_delete(ex.name)
    await ch.close()


@pytest.fixture
async def topology(
    connection: AbstractRobustConnection, settings: Settings
) -> AsyncIterator[Settings]:
    """Declare the test's topology and delete it afterwards; yields the settings."""
    await declare(connection, build(settings))
    yield settings
    await delete_topology(connection, settings)


@pytest.fixture
async def api(api_settings: Settings) -> AsyncIterator[Any]:
    """An HTTP client on the API built from the test module's ``api_settings`` fixture."""
    from tests.harness import api_client

    async with api_client(api_settings) as client:
        yield client


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Any]:
    """An engine on the test database with the tables created."""
    engine = make_engine(settings.database_url)
    await init_db(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def smtp() -> AsyncIterator[MailSink]:
    """A real SMTP server (aiosmtpd) on a free port; set ``smtp.faults`` to misbehave."""
    sink = MailSink(faults=Faults())
    server = await start_sink(sink)
    sink.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    yield sink
    server.close()
    await server.wait_closed()


def smtp_url(sink: MailSink) -> str:
    """``smtp://127.0.0.1:<port>`` of a sink from the ``smtp`` fixture."""
    return f"smtp://127.0.0.1:{sink.port}"  # type: ignore[attr-defined]


async def eventually(check: Callable[[], Any], timeout: float = 10.0,
                     interval: float = 0.05) -> Any:
    """Poll ``check`` (sync or async) until it returns a truthy value; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
