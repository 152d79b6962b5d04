"""Real processes, real signals: a worker killed mid-send, SIGTERM with work in flight,
``herald run`` and Ctrl-C, and the broker going away while users sign up.

SMTP is a real server (aiosmtpd) in the test's event loop; RabbitMQ and the
database are real. Every process started here is killed in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelNotFoundEntity
from sqlmodel import select

from herald.db import make_engine, session_factory
from herald.mailsink import MailSink
from herald.models import Delivery, OutboxEvent
from herald.settings import Settings
from tests.conftest import delete_topology, eventually, smtp_url
from tests.harness import api_client, email_worker, relay
from tests.procs import Spawned, alive, clean_env, herald_cmd, run
from tests.tcpproxy import TcpProxy, free_port
from topology.envelope import Actor, Envelope, Recipient
from topology.messages import build_message
from topology.spec import Names

WORKER = [sys.executable, "-m", "consumers", "email"]


def worker_env(settings: Settings, tmp_path: Path, **extra: object) -> dict[str, str]:
    """The environment of a worker subprocess on the test's prefix, database and SMTP sink."""
    assert settings.smtp_url
    values: dict[str, object] = {
        "HERALD_PREFIX": settings.prefix, "HERALD_AMQP_URL": settings.amqp_url,
        "HERALD_DATABASE_URL": f"sqlite:///{tmp_path}/herald.db",
        "HERALD_SMTP_URL": settings.smtp_url, "HERALD_RETRY_DELAYS": "100ms,200ms,400ms",
        "HERALD_MAX_RETRY": 3, "HERALD_EMAIL_RATE_LIMIT": "1000/s", "HERALD_LOG_LEVEL": "INFO",
    }
    values.update(extra)
    return clean_env(**values)


async def start_worker(env: dict[str, str], cwd: Path) -> Spawned:
    """``python -m consumers email``, returned once it consumes."""
    proc = await Spawned.start(WORKER, env, cwd=cwd)
    try:
        async with asyncio.timeout(30):
            await proc.wait_for_line("consuming ")
    except BaseException:
        await proc.kill()
        raise
    return proc


def signup(n: int = 0) -> Envelope:
    """A ``user.signup`` event."""
    return Envelope(type="user.signup", actor=Actor(id=f"u{n}"),
                    recipients=[Recipient(user_id=f"u{n}", email=f"user{n}@example.com",
                                          name=f"User {n}")],
                    data={"name": f"User {n}"})


async def publish(connection: AbstractRobustConnection, settings: Settings,
                  envelope: Envelope) -> None:
    """Publish one event as the relay does."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        exchange = await channel.get_exchange(Names(settings.prefix).events)
        await exchange.publish(build_message(envelope.to_json(), envelope.id, envelope.type),
                               routing_key=envelope.type, mandatory=True)
    finally:
        await channel.close()


async def counts(connection: AbstractRobustConnection, settings: Settings) -> dict[str, int]:
    """Ready messages in every email queue (fresh passive declares)."""
    found: dict[str, int] = {}
    names = Names(settings.prefix)
    for queue in [names.work("email"), names.dlq("email"),
                  *(names.retry_queue("email", d) for d in settings.tier_delays())]:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            found[queue] = int(declared.declaration_result.message_count or 0)
        finally:
            await channel.close()
    return found


async def delivery(settings: Settings, event_id: str) -> Delivery | None:
    """The email delivery record of ``event_id`` in the test database."""
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session:
            return (await session.exec(select(Delivery).where(
                Delivery.event_id == event_id))).first()
    finally:
        await engine.dispose()


# --- the worker under signals --------------------------------------------------------------


async def test_worker_killed_mid_send_is_redelivered_and_sends_once(
    topology: Settings, make_settings: Callable[..., Settings], smtp: MailSink,
    connection: AbstractRobustConnection, tmp_path: Path,
) -> None:
    # Given a worker process whose SMTP server stalls on the first message's DATA
    # (SMTP timeout 3s: the claim on a delivery lasts 2*3s+5s = 11s)
    settings = make_settings(smtp_url=smtp_url(smtp), smtp_timeout="3s")
    smtp.faults.hang_first = 1
    env = worker_env(settings, tmp_path, HERALD_SMTP_TIMEOUT="3s")
    envelope = signup()
    first = await start_worker(env, tmp_path)
    second: Spawned | None = None
    try:
        await publish(connection, settings, envelope)
        async with asyncio.timeout(10):
            await eventually(lambda: smtp.received >= 1, timeout=10, interval=0.01)

        # When the worker is killed while the provider holds the message
        first.send_signal(signal.SIGKILL)
        async with asyncio.timeout(10):
            assert await first.wait() == -signal.SIGKILL
        row = await delivery(settings, envelope.id)
        assert row is not None and row.status == "sending"  # it died between claim and record
        assert smtp.messages == []

        # And a new worker starts
        second = await start_worker(env, tmp_path)

        # Then the unacked message is redelivered; once the dead worker's claim has
        # expired it is sent, exactly once
        async with asyncio.timeout(30):
            await smtp.wait_for(1)
        await asyncio.sleep(1.5)  # room for a duplicate to show up
        second.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await second.wait() == 0, second.log
    finally:
        await first.kill()
        if second is not None:
            await second.kill()
    assert len(smtp.messages) == 1
    assert envelope.id in smtp.messages[0]["Message-ID"]
    assert smtp.received == 2  # the stalled attempt and the one that went through
    row = await delivery(settings, envelope.id)
    assert row is not None and row.status == "sent" and row.attempts == 2
    assert set((await counts(connection, settings)).values()) == {0}


async def test_sigterm_finishes_the_message_in_flight_and_exits_0(
    topology: Settings, make_settings: Callable[..., Settings], smtp: MailSink,
    connection: AbstractRobustConnection, tmp_path: Path,
) -> None:
    # Given a worker whose SMTP server takes 1.5s to accept the first message
    settings = make_settings(smtp_url=smtp_url(smtp))
    smtp.faults.hang_first = 1
    smtp.faults.hang_seconds = 1.5
    env = worker_env(settings, tmp_path, HERALD_SMTP_TIMEOUT="5s",
                     HERALD_SHUTDOWN_TIMEOUT="5s")
    envelope = signup()
    worker = await start_worker(env, tmp_path)
    try:
        await publish(connection, settings, envelope)
        async with asyncio.timeout(10):
            await eventually(lambda: smtp.received >= 1, timeout=10, interval=0.01)

        # When it gets SIGTERM with that message in flight
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)

        # Then it finishes the send, acks, and exits 0 within the shutdown bound
        async with asyncio.timeout(15):
            code = await worker.wait()
        elapsed = time.monotonic() - started
    finally:
        await worker.kill()
    assert code == 0, worker.log
    assert elapsed < 5 + 3, elapsed
    assert "waiting up to" in worker.log
    assert len(smtp.messages) == 1 and envelope.id in smtp.messages[0]["Message-ID"]
    # nothing left unacked (it would be back in the queue now that the worker is gone)
    assert set((await counts(connection, settings)).values()) == {0}
    row = await delivery(settings, envelope.id)
    assert row is not None and row.status == "sent"


async def test_sigterm_returns_a_message_that_outlasts_the_shutdown_timeout(
    topology: Settings, make_settings: Callable[..., Settings], smtp: MailSink,
    connection: AbstractRobustConnection, tmp_path: Path,
) -> None:
    # Given a worker (shutdown timeout 500ms) whose SMTP server stalls 5s on the first message
    # (SMTP timeout 3s, so the stall ends by the shutdown bound, not by the SMTP timeout)
    settings = make_settings(smtp_url=smtp_url(smtp), smtp_timeout="3s")
    smtp.faults.hang_first = 1
    smtp.faults.hang_seconds = 5
    env = worker_env(settings, tmp_path, HERALD_SMTP_TIMEOUT="3s",
                     HERALD_SHUTDOWN_TIMEOUT="500ms")
    envelope = signup()
    worker = await start_worker(env, tmp_path)
    second: Spawned | None = None
    try:
        await publish(connection, settings, envelope)
        async with asyncio.timeout(10):
            await eventually(lambda: smtp.received >= 1, timeout=10, interval=0.01)

        # When it gets SIGTERM
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)

        # Then it gives up on the send after the bound, exits 0, and the message is
        # back in the work queue, not lost and not dead-lettered
        async with asyncio.timeout(15):
            code = await worker.wait()
        elapsed = time.monotonic() - started
        assert code == 0, worker.log
        assert elapsed < 0.5 + 5, elapsed
        assert "waiting up to" in worker.log
        assert "retry 1 in" not in worker.log  # returned, not failed over to a retry tier
        names = Names(settings.prefix)

        async def returned() -> bool:
            found = await counts(connection, settings)
            return found[names.work("email")] == 1 and sum(found.values()) == 1

        await eventually(returned, timeout=10)
        assert smtp.messages == []

        # And a new worker delivers it (after the first one's claim expires), once
        second = await start_worker(env, tmp_path)
        async with asyncio.timeout(30):
            await smtp.wait_for(1)
        second.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await second.wait() == 0, second.log
    finally:
        await worker.kill()
        if second is not None:
            await second.kill()
    assert len(smtp.messages) == 1 and envelope.id in smtp.messages[0]["Message-ID"]
    assert set((await counts(connection, settings)).values()) == {0}


# --- herald run ----------------------------------------------------------------------------


def _run_env(settings: Settings, tmp_path: Path, **extra: object) -> dict[str, str]:
    values: dict[str, object] = {
        "HERALD_PREFIX": settings.prefix, "HERALD_AMQP_URL": settings.amqp_url,
        "HERALD_DATABASE_URL": f"sqlite:///{tmp_path}/herald.db",
        "HERALD_API_PORT": free_port(), "HERALD_MAILSINK_PORT": free_port(),
        "HERALD_RETRY_DELAYS": "100ms,200ms,400ms", "HERALD_MAX_RETRY": 3,
        "HERALD_SHUTDOWN_TIMEOUT": "2s",
    }
    values.update(extra)
    return clean_env(**values)


_STARTED = re.compile(r"started (\S+) \(pid (\d+)\)")


async def test_herald_run_delivers_a_signup_to_the_dev_sink_and_stops_on_ctrl_c(
    settings: Settings, connection: AbstractRobustConnection, tmp_path: Path
) -> None:
    # Given `herald run` with no SMTP configured (so its dev sink saves .eml files)
    env = _run_env(settings, tmp_path)
    port = int(env["HERALD_API_PORT"])
    supervisor = await Spawned.start(herald_cmd("run"), env, cwd=tmp_path)
    children: dict[str, int] = {}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def api_up() -> bool:
                if supervisor.proc.returncode is not None:
                    raise AssertionError(f"herald run exited:\n{supervisor.log}")
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/healthz")).status_code == 200
                return False

            await eventually(api_up, timeout=40, interval=0.2)
            children = {m.group(1): int(m.group(2)) for m in _STARTED.finditer(supervisor.log)}
            assert set(children) == {"api", "relay", "worker.email", "worker.in_app",
                                     "worker.push", "worker.sms", "mailsink"}, supervisor.log

            # When someone signs up
            response = await http.post("/signup", json={
                "email": "ada@example.com", "password": "correct horse", "name": "Ada"})
            assert response.status_code == 201, response.text
            event_id = response.json()["event_id"]

        # Then the welcome email lands in var/mail/ under the working directory
        mail_dir = tmp_path / "var" / "mail"
        files = await eventually(lambda: sorted(mail_dir.glob("*.eml")), timeout=20)
        mail = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
        assert "ada@example.com" in str(mail["To"])
        assert event_id in str(mail["Message-ID"])
        assert all(alive(pid) for pid in children.values())

        # When the supervisor gets Ctrl-C (SIGINT)
        supervisor.send_signal(signal.SIGINT)

        # Then it stops every child and exits 0
        async with asyncio.timeout(40):
            code = await supervisor.wait()
        assert code == 0, supervisor.log
        assert "Traceback" not in supervisor.log
        still = {name: pid for name, pid in children.items() if alive(pid)}
        assert still == {}, supervisor.log
        assert len(sorted(mail_dir.glob("*.eml"))) == 1
    finally:
        await supervisor.kill()
        for pid in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await delete_topology(connection, settings)


async def test_herald_run_with_an_invalid_setting_names_it_and_exits_2(
    settings: Settings, tmp_path: Path
) -> None:
    env = _run_env(settings, tmp_path, HERALD_RETRY_DELAYS="abc")
    done = await run(herald_cmd("run"), env, cwd=tmp_path, timeout=30)
    assert done.code == 2
    assert "Traceback" not in done.stderr
    assert len(done.error_lines) == 1, done.stderr
    assert "HERALD_RETRY_DELAYS" in done.error_lines[0]
    assert "'abc'" in done.error_lines[0]


async def test_herald_run_with_the_broker_unreachable_says_so_and_exits_1(
    settings: Settings, tmp_path: Path
) -> None:
    env = _run_env(settings, tmp_path,
                   HERALD_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    done = await run(herald_cmd("run"), env, cwd=tmp_path, timeout=30)
    assert done.code == 1
    assert "Traceback" not in done.stderr
    assert len(done.error_lines) == 1, done.stderr
    assert done.error_lines[0].startswith("error: cannot reach RabbitMQ")


async def test_herald_run_with_the_api_port_taken_says_so_and_starts_nothing(
    settings: Settings, connection: AbstractRobustConnection, tmp_path: Path
) -> None:
    # Given something already listening on the API port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = _run_env(settings, tmp_path, HERALD_API_PORT=port)

        # When herald run starts
        done = await run(herald_cmd("run"), env, cwd=tmp_path, timeout=30)

    # Then it says which port and variable, exits non-zero, and declared nothing
    assert done.code != 0
    assert "Traceback" not in done.stderr
    assert len(done.error_lines) == 1, done.stderr
    assert f"HERALD_API_PORT {port} is in use" in done.error_lines[0]
    channel = await connection.channel()
    with pytest.raises(ChannelNotFoundEntity):
        await channel.get_queue(Names(settings.prefix).work("email"))


# --- the broker goes away ------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["after_connect", "from_start"])
async def test_signup_during_broker_outage_is_delivered_once_it_returns(
    outage: str, topology: Settings, make_settings: Callable[..., Settings], smtp: MailSink,
    amqp_url: str,
) -> None:
    broker = urlsplit(amqp_url)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    await proxy.open()
    engine = None
    try:
        # Given the API and an email worker on the real broker, and the outbox relay
        # reaching the broker only through a proxy we can cut
        settings = make_settings(smtp_url=smtp_url(smtp))
        relay_settings = make_settings(
            smtp_url=smtp_url(smtp),
            amqp_url=f"amqp://{broker.username}:{broker.password}@127.0.0.1:{proxy.port}/")
        engine = make_engine(settings.database_url)
        sessions = session_factory(engine)

        async def outbox_row(event_id: str) -> OutboxEvent:
            async with sessions() as session:
                return (await session.exec(
                    select(OutboxEvent).where(OutboxEvent.id == event_id))).one()

        async with api_client(settings) as api, email_worker(settings) as worker:
            if outage == "from_start":
                await proxy.close()
            async with relay(relay_settings) as r:
                expected = 0
                if outage == "after_connect":
                    # (the relay is up: a first signup goes through)
                    first = await api.post("/signup", json={
                        "email": "first@example.com", "password": "pw-123456", "name": "First"})
                    assert first.status_code == 201
                    async with asyncio.timeout(15):
                        await smtp.wait_for(1)
                    expected = 1
                    await proxy.close()  # the broker "goes away" for the relay

                # When a user signs up while the relay cannot reach the broker
                response = await api.post("/signup", json={
                    "email": "ada@example.com", "password": "correct horse", "name": "Ada"})

                # Then the API still answers 201 and nothing is sent yet: the event waits
                # in the outbox
                assert response.status_code == 201, response.text
                event_id = response.json()["event_id"]
                await asyncio.sleep(2)
                assert len(smtp.messages) == expected
                assert (await outbox_row(event_id)).published_at is None

                # When the broker is reachable again
                await proxy.open()

                # Then the relay reconnects and the email is delivered exactly once,
                # and the outbox row is marked published
                async with asyncio.timeout(45):
                    await smtp.wait_for(expected + 1)
                await eventually(lambda: worker.stats["delivered"] == expected + 1, timeout=5)
                await asyncio.sleep(1)  # room for a duplicate to show up

                async def published() -> OutboxEvent | None:
                    found = await outbox_row(event_id)
                    return found if found.published_at is not None else None

                row = await eventually(published, timeout=10)
                assert row.attempts >= 1
                assert r.published == expected + 1
        ids = [m["Message-ID"] for m in smtp.messages]
        assert len(ids) == expected + 1
        assert sum(event_id in mid for mid in ids) == 1
    finally:
        await proxy.close()
        if engine is not None:
            await engine.dispose()

