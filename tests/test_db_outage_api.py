"""A database outage at the API and at the outbox relay: PostgreSQL of our own, stopped and
started again while the processes keep running.

The API answers 503 ``{"detail": "database unavailable; retry later"}`` with
``Retry-After`` on whatever route met the outage (route, bearer dependency,
idempotency layer), on the same keep-alive connection; the relay keeps its
broker connection and publishes what was committed once the database is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection

from herald.db import init_db, make_engine, session_factory
from herald.settings import Settings
from producer.outbox import add_event
from producer.relay import Relay
from tests.conftest import delete_topology, eventually
from tests.pgtemp import TempPostgres, temp_postgres
from tests.procs import Spawned, clean_env
from tests.tcpproxy import TcpProxy, free_port
from topology.envelope import Actor, Envelope, Recipient
from topology.spec import Names

API = [sys.executable, "-m", "producer.api"]
OUTAGE = {"detail": "database unavailable; retry later"}


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[TempPostgres]:
    """A PostgreSQL server of this test's own (the shared one must never be stopped)."""
    with temp_postgres(tmp_path / "pg") as server:
        yield server


@contextlib.asynccontextmanager
async def api_process(settings: Settings, pg: TempPostgres, tmp_path: Path
                      ) -> AsyncIterator[tuple[Spawned, TcpProxy]]:
    """``python -m producer.api`` on ``pg``, reached through a proxy that counts connections."""
    port = free_port()
    env = clean_env(HERALD_PREFIX=settings.prefix, HERALD_AMQP_URL=settings.amqp_url,
                    HERALD_DATABASE_URL=pg.url, HERALD_API_PORT=port, HERALD_LOG_LEVEL="INFO")
    proc = await Spawned.start(API, env, cwd=tmp_path)
    proxy = TcpProxy("127.0.0.1", port)
    await proxy.open()
    try:
        async with asyncio.timeout(40):
            await proc.wait_for_line("Application startup complete")
        yield proc, proxy
    finally:
        await proxy.close()
        await proc.kill()


def client(proxy: TcpProxy) -> httpx.AsyncClient:
    """HTTP/1.1 with one keep-alive connection at most: a dropped one shows as a second."""
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", timeout=15,
                             limits=httpx.Limits(max_connections=1,
                                                 max_keepalive_connections=1))


def signup_body(n: int) -> dict[str, Any]:
    return {"email": f"user{n}@example.com", "password": "correct horse", "name": f"User {n}"}


def assert_outage(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == OUTAGE
    assert response.headers["retry-after"] == "5"


async def test_api_answers_503_on_the_same_connection_while_postgres_is_down(
    settings: Settings, pg: TempPostgres, tmp_path: Path
) -> None:
    async with api_process(settings, pg, tmp_path) as (proc, proxy), client(proxy) as http:
        # Given a user who signed up and logged in, on one keep-alive connection
        assert (await http.post("/signup", json=signup_body(1))).status_code == 201
        login = await http.post("/login", json={"email": "user1@example.com",
                                                "password": "correct horse"})
        assert login.status_code == 200, login.text
        bearer = {"Authorization": f"Bearer {login.json()['access_token']}"}
        assert (await http.get("/me", headers=bearer)).status_code == 200
        assert (await http.get("/healthz")).json() == {"status": "ok", "database": "ok"}

        # When PostgreSQL stops
        await asyncio.to_thread(pg.stop)

        # Then every route that needs it answers 503 with Retry-After: the route body,
        # the bearer check (a dependency), the idempotency layer (a dependency with yield)
        assert_outage(await http.post("/signup", json=signup_body(2)))
        assert_outage(await http.post("/signup", json=signup_body(3),
                                      headers={"Idempotency-Key": "k-3"}))
        assert_outage(await http.post("/login", json={"email": "user1@example.com",
                                                      "password": "correct horse"}))
        assert_outage(await http.get("/me", headers=bearer))
        assert_outage(await http.get("/metrics"))
        # And the process is alive and says what is wrong
        health = await http.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "database": "unavailable"}

        # When PostgreSQL is back
        await asyncio.to_thread(pg.start)

        # Then the same requests go through again (the idempotent one too: its 503
        # was not stored as the key's answer)
        assert (await http.post("/signup", json=signup_body(2))).status_code == 201
        again = await http.post("/signup", json=signup_body(3),
                                headers={"Idempotency-Key": "k-3"})
        assert again.status_code == 201, again.text
        assert "idempotent-replayed" not in again.headers
        assert (await http.get("/me", headers=bearer)).status_code == 200

    # And all of it went over one connection: none was dropped
    assert proxy.connections == 1
    assert "Traceback" not in proc.log, proc.log
    assert "database unavailable" in proc.log  # logged (once per burst, not per request)
    assert 1 <= proc.log.count("answered 503") <= 2, proc.log


async def test_api_started_without_its_database_answers_503_until_it_is_there(
    settings: Settings, pg: TempPostgres, tmp_path: Path
) -> None:
    # Given the API started while PostgreSQL is down
    await asyncio.to_thread(pg.stop)
    async with api_process(settings, pg, tmp_path) as (proc, proxy), client(proxy) as http:
        # Then it serves: liveness is 200, database routes are 503
        health = await http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["database"] == "unavailable"
        assert_outage(await http.post("/signup", json=signup_body(1)))
        assert "database unavailable at start-up" in proc.log

        # When PostgreSQL comes up, the API sets the schema up and signs users up
        await asyncio.to_thread(pg.start)

        async def signed_up() -> bool:
            response = await http.post("/signup", json=signup_body(1))
            assert response.status_code in (201, 503), response.text
            return response.status_code == 201

        await eventually(signed_up, timeout=20, interval=0.5)
        assert (await http.get("/healthz")).json()["database"] == "ok"
    assert proxy.connections == 1
    assert "Traceback" not in proc.log, proc.log


# --- the relay -----------------------------------------------------------------------------


def signup_event(n: int) -> Envelope:
    return Envelope(type="user.signup", actor=Actor(id=f"u{n}"),
                    recipients=[Recipient(user_id=f"u{n}", email=f"user{n}@example.com")],
                    data={"name": f"User {n}"})


async def test_relay_keeps_its_broker_connection_through_a_database_outage(
    make_settings: Callable[..., Settings], pg: TempPostgres,
    connection: AbstractRobustConnection, caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(database_url=pg.url, relay_interval="50ms")
    engine = make_engine(settings.database_url)
    await init_db(engine)
    sessions = session_factory(engine)
    relay = Relay(settings, engine)
    task = asyncio.create_task(relay.run())
    names = Names(settings.prefix)
    caplog.set_level(logging.INFO, logger="herald.relay")

    async def queued() -> int:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(names.work("email"), passive=True)
            return int(queue.declaration_result.message_count or 0)
        finally:
            await channel.close()

    async def commit(event: Envelope) -> None:
        async with sessions() as session, session.begin():
            add_event(session, event)

    try:
        # Given a relay that published a first event
        await commit(signup_event(1))
        await eventually(lambda: relay.published == 1, timeout=15)
        before = relay.connection
        assert before is not None

        # When the database is down for a few seconds (many polls)
        await asyncio.to_thread(pg.stop)
        await eventually(lambda: relay.database_down, timeout=10)
        await asyncio.sleep(3)

        # And comes back, and an event is committed
        await asyncio.to_thread(pg.start)
        await eventually(lambda: not relay.database_down, timeout=20)
        await commit(signup_event(2))

        # Then it is published, over the very same broker connection
        await eventually(lambda: relay.published == 2, timeout=20)
        assert relay.connection is before
        assert not before.is_closed
        await eventually(lambda: queued(), timeout=10)
        assert await queued() == 2
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)
        await engine.dispose()
        await delete_topology(connection, settings)
    # And the outage made one line going and one coming back, not one per poll
    lines = [r.getMessage() for r in caplog.records if r.name == "herald.relay"]
    assert sum("database unreachable" in line for line in lines) == 1, lines
    assert sum("database reachable again" in line for line in lines) == 1, lines
    assert sum("connected to the broker" in line for line in lines) == 1, lines
    assert not any("broker unavailable" in line for line in lines), lines
