"""``herald.amqp``: several brokers in ``HERALD_AMQP_URL``, tried in order, and a lost
connection that reconnects to the next broker instead of the dead one.

The broker is the real one (``HERALD_TEST_AMQP_URL``); "a node that went away" is a
TCP proxy in front of it that closes, or a port nothing listens on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from urllib.parse import urlsplit

import aio_pika
import pytest

import herald.amqp
from herald.amqp import MultiHostConnection, broker_urls, connect
from herald.errors import ConfigError
from herald.settings import load_settings
from tests.conftest import eventually
from tests.tcpproxy import TcpProxy, free_port

SECRET = "s3cret-pw"


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(("url", "expected"), [
    ("amqp://guest:guest@localhost:5672/", ["amqp://guest:guest@localhost:5672/"]),
    ("amqp://u:p@h1:5672,h2:5673,h3/vh?heartbeat=5",
     ["amqp://u:p@h1:5672/vh?heartbeat=5", "amqp://u:p@h2:5673/vh?heartbeat=5",
      "amqp://u:p@h3/vh?heartbeat=5"]),
    ("amqp://h1, h2", ["amqp://h1", "amqp://h2"]),
    ("amqps://u:p,q@[::1]:5671,h2/%2F", ["amqps://u:p,q@[::1]:5671/%2F", "amqps://u:p,q@h2/%2F"]),
    ("amqp://a:b@h1:5672/v,amqp://c:d@h2/v", ["amqp://a:b@h1:5672/v", "amqp://c:d@h2/v"]),
    ("amqp://a@h1//;amqps://h2:5671//", ["amqp://a@h1//", "amqps://h2:5671//"]),
])
def test_broker_urls_one_url_per_host(url: str, expected: list[str]) -> None:
    assert broker_urls(url) == expected


@pytest.mark.parametrize(("url", "says"), [
    ("http://h1/", "must look like amqp://"),
    ("", "must look like amqp://"),
    (f"amqp://u:{SECRET}@h1,,h2/", "host 2 of 3 is empty"),
    (f"amqp://u:{SECRET}@h1,h2,/", "host 3 of 3 is empty"),
    (f"amqp://u:{SECRET}@h1:99999,h2/", "host 1 of 2 'h1:99999': the port"),
    (f"amqp://u:{SECRET}@h1,h2:abc/", "host 2 of 2 'h2:abc': the port"),
    (f"amqp://u:{SECRET}@h1:0/", "host 'h1:0': the port"),
    ("amqp:///vhost", "host is empty"),
    (f"amqp://u:{SECRET}@h1/,http://h2/", "URL 2 (http://h2/): scheme must be amqp"),
    (f"amqp://u:{SECRET}@h1,h2/,amqp://h3/", "list either full URLs or hosts"),
])
def test_bad_urls_name_the_variable_and_the_host_never_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(amqp_url=url)
    message = str(caught.value)
    assert message.startswith("HERALD_AMQP_URL: ")
    assert says in message
    assert SECRET not in message


def test_settings_keep_a_multi_host_url_as_written() -> None:
    url = "amqp://guest:guest@127.0.0.1:5672,127.0.0.1:5673/"
    assert load_settings(amqp_url=url).amqp_url == url


# ---------------------------------------------------------------- connecting


@pytest.fixture
def in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Try the brokers from the first one (the start is random otherwise)."""
    monkeypatch.setattr(herald.amqp, "_first", lambda count: 0)


def broker_at(amqp_url: str, password: str | None = None) -> tuple[str, str, int]:
    """(``user:password``, host, port) of the test broker."""
    parts = urlsplit(amqp_url)
    return (f"{parts.username}:{password or parts.password}", parts.hostname or "",
            parts.port or 5672)


@pytest.mark.usefixtures("in_order")
async def test_a_closed_first_host_is_skipped_with_a_log_line_without_password(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a URL whose first host is a closed port, the second the real broker
    creds, host, port = broker_at(amqp_url)
    dead = free_port()
    url = f"amqp://{creds}@127.0.0.1:{dead},{host}:{port}/"
    caplog.set_level(logging.WARNING, logger="herald.amqp")
    # When connecting without waiting (an operator command)
    connection = await connect(url, name="test amqp", wait=False)
    try:
        # Then the second one answers, and the first one's failure was logged once
        assert isinstance(connection, MultiHostConnection)
        assert connection.url.port == port
        channel = await connection.channel()
        await channel.close()
    finally:
        await connection.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "herald.amqp"]
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{dead}" in lines[0] and "unreachable" in lines[0]
    assert f"{host}:{port}" in lines[0]  # names the broker it tries next
    password = creds.split(":", 1)[1]
    assert f":{password}@" not in lines[0]


@pytest.mark.usefixtures("in_order")
async def test_no_broker_answering_raises_after_one_line_per_attempt(
    caplog: pytest.LogCaptureFixture
) -> None:
    ports = [free_port(), free_port(), free_port()]
    url = f"amqp://guest:{SECRET}@" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/"
    caplog.set_level(logging.WARNING, logger="herald.amqp")
    with pytest.raises(ConnectionError):
        await connect(url, name="test amqp", wait=False, connect_timeout=5)
    lines = [r.getMessage() for r in caplog.records if r.name == "herald.amqp"]
    # The first two name the next broker; the last failure is raised, not logged.
    assert len(lines) == 2, lines
    assert [f"127.0.0.1:{p}" in line for p, line in zip(ports, lines, strict=False)] == [
        True, True]
    assert all(SECRET not in line for line in lines)


@pytest.mark.usefixtures("in_order")
async def test_waiting_goes_round_the_brokers_until_stopped(
    caplog: pytest.LogCaptureFixture
) -> None:
    ports = [free_port(), free_port()]
    url = f"amqp://guest:{SECRET}@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/"
    caplog.set_level(logging.WARNING, logger="herald.amqp")
    stop = asyncio.Event()
    attempt = asyncio.create_task(connect(url, name="test amqp", stop=stop, connect_timeout=5))

    def rounds() -> bool:
        return sum("retrying in" in r.getMessage() for r in caplog.records) >= 2

    await eventually(rounds, timeout=20)
    stop.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(attempt, 10)
    lines = [r.getMessage() for r in caplog.records if r.name == "herald.amqp"]
    # Each round tries both, in order: first names the second, second says it waits.
    assert f"127.0.0.1:{ports[0]}" in lines[0] and f"127.0.0.1:{ports[1]}/ next" in lines[0]
    assert f"127.0.0.1:{ports[1]}" in lines[1] and "retrying in 0.5s" in lines[1]
    assert f"127.0.0.1:{ports[0]}" in lines[2]
    assert all(SECRET not in line for line in lines)


@pytest.mark.usefixtures("in_order")
async def test_a_lost_connection_reconnects_to_the_next_broker(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a connection through a proxy (broker 1), a closed port as broker 2, the real
    # broker as broker 3, and a queue the robust channel will have to declare again
    creds, host, port = broker_at(amqp_url)
    dead = free_port()
    caplog.set_level(logging.WARNING, logger="herald.amqp")
    async with TcpProxy(host, port) as proxy:
        url = (f"amqp://{creds}@127.0.0.1:{proxy.port},127.0.0.1:{dead},{host}:{port}/"
               "?reconnect_interval=0.2")
        connection = await connect(url, name="test amqp failover")
        try:
            assert isinstance(connection, MultiHostConnection)
            assert connection.url.port == proxy.port
            channel = await connection.channel()
            queue = await channel.declare_queue(f"t-amqp-{uuid.uuid4().hex[:8]}",
                                                exclusive=True, auto_delete=True)
            reconnected = asyncio.Event()
            connection.reconnect_callbacks.add(lambda *_: reconnected.set())
            # When broker 1 goes away for good
            await proxy.close()
            # Then the reconnect tries broker 2, then comes back on broker 3 with the
            # queue restored
            await asyncio.wait_for(reconnected.wait(), 20)
            assert connection.url.port == port
            await channel.default_exchange.publish(aio_pika.Message(b"after"),
                                                   routing_key=queue.name)
            got = await eventually(lambda: queue.get(fail=False), timeout=10)
            assert got.body == b"after"
            await got.ack()
        finally:
            await connection.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "herald.amqp"]
    user, password = creds.split(":", 1)
    assert any(f"127.0.0.1:{proxy.port}/" in line and "connection lost" in line
               and f"reconnecting to amqp://{user}@127.0.0.1:{dead}/" in line
               for line in lines), lines
    assert any(f"127.0.0.1:{dead}/" in line
               and f"reconnecting to amqp://{user}@{host}:{port}/" in line
               for line in lines), lines
    assert all(f":{password}@" not in line for line in lines)


@pytest.mark.usefixtures("in_order")
async def test_closing_on_purpose_does_not_move_on(amqp_url: str) -> None:
    creds, host, port = broker_at(amqp_url)
    url = f"amqp://{creds}@{host}:{port},127.0.0.1:{free_port()}/"
    connection = await connect(url, name="test amqp", wait=False)
    assert isinstance(connection, MultiHostConnection)
    await connection.close()
    assert connection.url.port == port


async def test_an_unconnected_connection_starts_from_a_random_broker(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(herald.amqp, "_first", lambda count: count - 1)
    connection = MultiHostConnection.from_url("amqp://u:p@h1,h2:5673/vh",
                                              reconnect_interval=1)
    assert [str(u) for u in connection.urls] == ["amqp://u:p@h1/vh", "amqp://u:p@h2:5673/vh"]
    assert connection.url.host == "h2" and connection.reconnect_interval == 1
    with pytest.raises(ValueError, match="host 2 of 2 is empty"):
        MultiHostConnection.from_url(f"amqp://u:{SECRET}@h1,/")
