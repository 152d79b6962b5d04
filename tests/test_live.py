"""The live hub and ``GET /me/notifications/stream`` on the real broker, across API processes.

Two ``LiveHub`` instances stand for two processes (each has its own
connection); two ``create_app`` instances served by uvicorn on their own
ports stand for two API processes sharing one database.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from httpx_sse import ServerSentEvent, aconnect_sse

from herald.db import make_engine, session_factory
from herald.models import Notification, User, utcnow
from herald.settings import Settings
from producer.api import create_app
from producer.auth import issue_token
from tests.conftest import eventually
from tests.harness import api_client
from tests.tcpproxy import TcpProxy, free_port
from topology.live import (
    GAP,
    PREFETCH,
    PUBLISH_TIMEOUT,
    QUEUE_MAX_LENGTH,
    SUBSCRIBE_TIMEOUT,
    USER_CHANGED_PATTERN,
    LiveHub,
    LiveUnavailable,
    notification_key,
    user_changed_key,
)

STREAM = "/me/notifications/stream"
#: Seconds to wait for anything that should happen now (generous: CI is slow).
WAIT = 15.0


# --- helpers shared with tests/test_inbox_page.py -----------------------------------------


@dataclass
class Served:
    """A running uvicorn server: its base URL, the server, and its task."""

    url: str
    server: uvicorn.Server
    stopped: asyncio.Task[None]


@asynccontextmanager
async def serve(app: FastAPI, graceful: float = 5) -> AsyncIterator[Served]:
    """Run ``app`` with uvicorn on a free port in this event loop until the block ends."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False,
                            log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=round(graceful))
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), timeout=WAIT)
        if task.done():
            task.result()  # raise what stopped it
            raise AssertionError("uvicorn stopped before it started")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Served(f"http://127.0.0.1:{port}", server, task)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT)


async def user_with_token(settings: Settings, name: str) -> tuple[str, dict[str, str]]:
    """A user and a valid bearer token written straight to the (migrated) database.

    Faster than :func:`sign_up` (no argon2), for tests about the stream, not about login.
    """
    user = User(email=f"{name}@example.com", name=name, password_hash="-")
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            session.add(user)
            await session.flush()
            token = issue_token(session, user.id, 3600)
    finally:
        await engine.dispose()
    return user.id, {"Authorization": f"Bearer {token}"}


def item(notification_id: int, title: str = "hello", **fields: Any) -> dict[str, Any]:
    """An inbox item as the in-app worker announces it."""
    return {"id": notification_id, "event_id": str(uuid.uuid4()), "event_type": "user.post",
            "title": title, "body": f"body of {title}", "read": False,
            "created_at": utcnow().isoformat(), **fields}


async def next_event(events: AsyncIterator[ServerSentEvent]) -> ServerSentEvent:
    """The next event of an open stream (pings are comments: never events)."""
    return await asyncio.wait_for(anext(events), WAIT)


@asynccontextmanager
async def stream(client: httpx.AsyncClient, headers: dict[str, str], **params: Any
                 ) -> AsyncIterator[AsyncIterator[ServerSentEvent]]:
    """An open SSE stream of ``client``'s inbox, its events as an iterator."""
    async with aconnect_sse(client, "GET", STREAM, headers=headers, params=params) as source:
        assert source.response.status_code == 200, await source.response.aread()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        yield source.aiter_sse()


async def until_ready(events: AsyncIterator[ServerSentEvent]) -> list[ServerSentEvent]:
    """Every event up to ``ready`` (the replay), after which the stream is live."""
    replay = []
    while (event := await next_event(events)).event != "ready":
        replay.append(event)
    return replay


async def insert(settings: Settings, *rows: Notification) -> list[int]:
    """Commit ``rows`` through a connection of the test's own; their ids."""
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            session.add_all(rows)
            await session.flush()
            return [row.id for row in rows if row.id is not None]
    finally:
        await engine.dispose()


def note(user_id: str, n: int, **fields: Any) -> Notification:
    return Notification(event_id=str(uuid.uuid4()), event_type="user.post", user_id=user_id,
                        title=f"title {n}", body=f"body {n}",
                        created_at=utcnow() + timedelta(seconds=n), **fields)


@pytest.fixture
async def hubs(topology: Settings) -> AsyncIterator[tuple[LiveHub, LiveHub]]:
    """Two hubs on the test's topology: two processes' worth of connections."""
    a, b = LiveHub(topology), LiveHub(topology)
    yield a, b
    await a.aclose()
    await b.aclose()


# --- the hub ------------------------------------------------------------------------------


async def test_a_subscriber_gets_what_another_hub_publishes_for_its_keys_only(
    hubs: tuple[LiveHub, LiveHub],
) -> None:
    a, b = hubs
    # Given hub A subscribed to Ada's items and, separately, to every user change
    async with a.subscribe(notification_key("ada")) as ada, \
            a.subscribe(USER_CHANGED_PATTERN) as changes:
        # When hub B announces Bob's item, then Ada's, then a user change
        assert await b.publish(notification_key("bob"), {"n": 1})
        assert await b.publish(notification_key("ada"), {"n": 2})
        assert await b.publish(user_changed_key("ada"), {"user_id": "ada"})
        # Then Ada's subscription gets Ada's item first (Bob's never came: one
        # publisher's messages keep their order in a queue)
        assert await asyncio.wait_for(anext(ada), WAIT) == ("notification.ada", {"n": 2})
        assert await asyncio.wait_for(anext(changes), WAIT) == (
            "user.ada.changed", {"user_id": "ada"})
        assert a.open_subscriptions == 2
    # And leaving the block closed both queues
    assert a.open_subscriptions == 0


async def test_every_subscriber_gets_its_own_copy(hubs: tuple[LiveHub, LiveHub]) -> None:
    a, b = hubs
    async with a.subscribe(notification_key("ada")) as one, \
            b.subscribe(notification_key("ada")) as two:
        assert await a.publish(notification_key("ada"), {"n": 1})
        assert await asyncio.wait_for(anext(one), WAIT) == ("notification.ada", {"n": 1})
        assert await asyncio.wait_for(anext(two), WAIT) == ("notification.ada", {"n": 1})


async def test_a_body_that_is_not_a_json_object_is_skipped(
    hubs: tuple[LiveHub, LiveHub], connection: Any, topology: Settings,
) -> None:
    import aio_pika

    a, b = hubs
    async with a.subscribe(notification_key("ada")) as ada:
        channel = await connection.channel()
        exchange = await channel.get_exchange(a.names.live)
        for junk in (b"not json", b"[1, 2]"):
            await exchange.publish(aio_pika.Message(junk), notification_key("ada"))
        await channel.close()
        assert await b.publish(notification_key("ada"), {"n": 3})
        assert await asyncio.wait_for(anext(ada), WAIT) == ("notification.ada", {"n": 3})


async def test_the_queue_is_exclusive_and_deleted_with_the_subscription(
    hubs: tuple[LiveHub, LiveHub], connection: Any,
) -> None:
    import aiormq.exceptions

    a, _ = hubs
    async with a.subscribe(notification_key("ada")) as ada:
        [subscription] = a._subscriptions
        assert subscription is ada and subscription.queue_name
        # Another connection may not touch it
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelLockedResource):
            await channel.declare_queue(subscription.queue_name, passive=True)
    # And it is gone once the subscription closed
    channel = await connection.channel()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await channel.declare_queue(subscription.queue_name, passive=True)


async def test_a_slow_subscriber_keeps_only_the_newest_messages(
    hubs: tuple[LiveHub, LiveHub], connection: Any,
) -> None:
    import aio_pika

    a, _ = hubs
    total = QUEUE_MAX_LENGTH + PREFETCH + 100
    async with a.subscribe(notification_key("ada")) as ada:
        # Given a subscriber that takes nothing while many items are published
        # (all at once, in order on one channel; the confirms say they are queued)
        channel = await connection.channel()
        exchange = await channel.get_exchange(a.names.live)
        await asyncio.gather(*(
            exchange.publish(aio_pika.Message(json.dumps({"n": n}).encode()),
                             notification_key("ada"))
            for n in range(total)))
        await channel.close()
        # Then it holds what was handed out before it stalled (the prefetch)
        # and the newest QUEUE_MAX_LENGTH: the oldest waiting ones were dropped
        got = [(await asyncio.wait_for(anext(ada), WAIT))[1]["n"]
               for _ in range(PREFETCH + QUEUE_MAX_LENGTH)]
        assert got == list(range(PREFETCH)) + list(range(total - QUEUE_MAX_LENGTH, total))


async def test_publish_with_the_broker_unreachable_returns_false_and_subscribe_raises(
    make_settings: Callable[..., Settings],
) -> None:
    # Given a hub whose broker URL points at a closed port
    hub = LiveHub(make_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/"))
    try:
        # Then publishing answers False within its time bound, and again at once
        for _ in range(2):
            assert await asyncio.wait_for(hub.publish("notification.ada", {"n": 1}),
                                          PUBLISH_TIMEOUT + 1) is False
        # And subscribing raises LiveUnavailable rather than hanging
        with pytest.raises(LiveUnavailable):
            await asyncio.wait_for(hub.listen("notification.ada"), SUBSCRIBE_TIMEOUT + 1)
    finally:
        await hub.aclose()


async def test_a_subscription_survives_a_broker_reconnect_and_reports_the_gap(
    hubs: tuple[LiveHub, LiveHub], topology: Settings, amqp_url: str,
    make_settings: Callable[..., Settings],
) -> None:
    _, b = hubs
    upstream = urlsplit(amqp_url)
    async with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 5672) as proxy:
        hub = LiveHub(make_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
        try:
            async with hub.subscribe(notification_key("ada"), gaps=True) as ada:
                assert await b.publish(notification_key("ada"), {"n": 1})
                assert await asyncio.wait_for(anext(ada), WAIT) == ("notification.ada", {"n": 1})
                # When the broker connection drops and comes back
                await proxy.close()
                await proxy.open()
                # Then the subscription says messages may have been lost
                assert await asyncio.wait_for(anext(ada), WAIT) == (GAP, {})
                # And it receives again, on a queue declared anew
                assert await b.publish(notification_key("ada"), {"n": 2})
                assert await asyncio.wait_for(anext(ada), WAIT) == ("notification.ada", {"n": 2})
                # And the hub publishes again through the restored connection
                assert await hub.publish(notification_key("ada"), {"n": 3})
                assert await asyncio.wait_for(anext(ada), WAIT) == ("notification.ada", {"n": 3})
        finally:
            await hub.aclose()


async def test_closing_the_hub_ends_its_subscriptions(hubs: tuple[LiveHub, LiveHub]) -> None:
    a, _ = hubs
    async with a.subscribe(notification_key("ada")) as ada:
        waiting = asyncio.ensure_future(anext(ada))
        await a.aclose()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, WAIT)
    with pytest.raises(LiveUnavailable):
        await a.listen(notification_key("ada"))
    assert await a.publish(notification_key("ada"), {}) is False


# --- the SSE stream -----------------------------------------------------------------------


async def test_an_item_published_through_one_api_process_reaches_a_stream_on_another(
    topology: Settings,
) -> None:
    # Given two API processes on one database, and Ada and Bob streaming from process 1
    app1, app2 = create_app(topology), create_app(topology)
    async with serve(app1) as first, serve(app2), \
            httpx.AsyncClient(base_url=first.url, timeout=WAIT) as one:
        ada, ada_auth = await user_with_token(topology, "ada")
        bob, bob_auth = await user_with_token(topology, "bob")
        async with stream(one, ada_auth) as ada_events, stream(one, bob_auth) as bob_events:
            assert await until_ready(ada_events) == []
            await until_ready(bob_events)
            # When process 2 announces Bob's item, a malformed one and Ada's
            hub2: LiveHub = app2.state.live
            assert await hub2.publish(notification_key(bob), item(7, "for bob"))
            assert await hub2.publish(notification_key(ada), {"id": "not an item"})
            assert await hub2.publish(notification_key(ada), item(8, "for ada"))
            # Then Ada's stream shows her item first (Bob's and the malformed never came)
            event = await next_event(ada_events)
            assert (event.event, event.id) == ("notification", "8")
            body = json.loads(event.data)
            assert body["title"] == "for ada" and body["read"] is False
            assert set(body) == {"id", "event_id", "event_type", "title", "body", "read",
                                 "created_at"}
            # And Bob's stream shows his
            event = await next_event(bob_events)
            assert (event.event, event.id, json.loads(event.data)["title"]) == (
                "notification", "7", "for bob")
        # And the streams' queues are gone once the clients left
        hub1: LiveHub = app1.state.live
        await eventually(lambda: hub1.open_subscriptions == 0, timeout=WAIT)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-token"}],
                         ids=["no-token", "bad-token"])
async def test_the_stream_needs_a_valid_token(topology: Settings,
                                              headers: dict[str, str]) -> None:
    async with api_client(topology) as api:
        response = await api.get(STREAM, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_the_stream_is_503_when_the_broker_is_unreachable(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    async with api_client(settings) as api:
        _, auth = await user_with_token(settings, "ada")
        response = await asyncio.wait_for(api.get(STREAM, headers=auth), WAIT)
    assert response.status_code == 503
    assert "broker" in response.json()["detail"]
    assert response.headers["retry-after"] == "5"


@pytest.mark.parametrize("how", ["last-event-id", "after"])
async def test_a_reconnect_replays_missed_rows_then_goes_live_without_duplicates(
    database_url: str, topology: Settings, how: str,
) -> None:
    settings = topology  # on SQLite, then PostgreSQL (the database_url fixture)
    app = create_app(settings)
    async with serve(app) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=WAIT) as client:
        ada, auth = await user_with_token(settings, "ada")
        bob, _ = await user_with_token(settings, "bob")
        # Given rows the client missed: Ada's, one held back, and Bob's
        ids = await insert(settings, note(ada, 1), note(ada, 2), note(bob, 3),
                           note(ada, 4, delivered=False), note(ada, 5))
        # When Ada reconnects saying the last event she saw was her first row
        headers, params = dict(auth), {}
        if how == "last-event-id":
            headers["Last-Event-ID"] = str(ids[0])
        else:
            params["after"] = ids[0]
        async with stream(client, headers, **params) as events:
            # Then her later delivered rows come first, oldest first, then ready
            replay = await until_ready(events)
            assert [(e.event, e.id) for e in replay] == [
                ("notification", str(ids[1])), ("notification", str(ids[4]))]
            assert json.loads(replay[0].data)["title"] == "title 2"
            # And live items follow, an id already replayed only once
            hub: LiveHub = app.state.live
            assert await hub.publish(notification_key(ada), item(ids[4], "again"))
            assert await hub.publish(notification_key(ada), item(ids[4] + 100, "new"))
            event = await next_event(events)
            assert (event.id, json.loads(event.data)["title"]) == (str(ids[4] + 100), "new")


async def test_a_bad_last_event_id_is_422(topology: Settings) -> None:
    async with api_client(topology) as api:
        _, auth = await user_with_token(topology, "ada")
        response = await api.get(STREAM, headers={**auth, "Last-Event-ID": "yesterday"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "last-event-id"]


async def test_a_broker_gap_inside_the_api_is_filled_from_the_database(
    topology: Settings, amqp_url: str, make_settings: Callable[..., Settings],
) -> None:
    upstream = urlsplit(amqp_url)
    async with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 5672) as proxy:
        # Given an API process whose broker link goes through a proxy, and Ada streaming
        settings = make_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
        app = create_app(settings)
        async with serve(app) as served, \
                httpx.AsyncClient(base_url=served.url, timeout=WAIT) as client:
            ada, auth = await user_with_token(settings, "ada")
            async with stream(client, auth) as events:
                await until_ready(events)
                # When the API loses the broker while a notification is stored
                await proxy.close()
                [new] = await insert(settings, note(ada, 1))
                await proxy.open()
                # Then, once reconnected, the stream sends it from the database
                event = await next_event(events)
                assert (event.event, event.id) == ("notification", str(new))


async def test_the_stream_ends_when_the_server_shuts_down(topology: Settings) -> None:
    # Given Ada streaming from a server that would wait 60 s for open connections
    async with serve(create_app(topology), graceful=60) as served, \
            httpx.AsyncClient(base_url=served.url, timeout=WAIT) as client:
        _, auth = await user_with_token(topology, "ada")
        async with stream(client, auth) as events:
            await until_ready(events)
            # When the server is asked to stop (what SIGTERM does)
            served.server.should_exit = True
            # Then the stream ends cleanly without waiting for the grace period
            assert await asyncio.wait_for(_drain(events), WAIT) == []
        await asyncio.wait_for(served.stopped, WAIT)


async def _drain(events: AsyncIterator[ServerSentEvent]) -> list[ServerSentEvent]:
    return [event async for event in events]


async def test_openapi_documents_the_stream(topology: Settings) -> None:
    async with api_client(topology) as api:
        spec = (await api.get("/openapi.json")).json()
    operation = spec["paths"][STREAM]["get"]
    assert operation["security"] == [{"HTTPBearer": []}]
    assert {"200", "401", "503"} <= operation["responses"].keys()
    content = operation["responses"]["200"]["content"]
    assert "event: notification" in content["text/event-stream"]["example"]
    assert {p["name"] for p in operation["parameters"]} == {"after", "last-event-id"}
