"""The HTTP API in-process, on SQLite and PostgreSQL: statuses, validation and the outbox."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from herald.db import make_engine, session_factory
from herald.models import OutboxEvent, User
from herald.settings import Settings
from tests.harness import api_client, rows

PASSWORD = "correct horse battery"
ADA = {"email": "Ada@Example.com", "password": PASSWORD, "name": "Ada"}


@pytest.fixture
def api_settings(database_url: str, make_settings: Callable[..., Settings]) -> Settings:
    """Settings on the parametrised database (SQLite, then PostgreSQL)."""
    return make_settings()




async def _outbox(settings: Settings, routing_key: str | None = None) -> list[OutboxEvent]:
    found: list[OutboxEvent] = await rows(settings, OutboxEvent)
    return [r for r in found if routing_key is None or r.routing_key == routing_key]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- signup ----------------------------------------------------------------------------


async def test_signup_commits_the_user_and_its_outbox_event(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # When someone signs up
    response = await api.post("/signup", json=ADA)
    # Then 201 with the public user (no password, no hash) and the event id
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["user"]["email"] == "ada@example.com"
    assert body["user"]["name"] == "Ada"
    assert set(body["user"]) == {"id", "email", "name", "handle", "phone", "locale", "timezone"}
    assert body["user"]["handle"] == "ada" and body["user"]["locale"] == "en"
    assert PASSWORD not in response.text
    # And the user row and exactly one unpublished user.signup event are committed
    users: list[User] = await rows(api_settings, User)
    assert [u.email for u in users] == ["ada@example.com"]
    assert users[0].password_hash != PASSWORD and PASSWORD not in users[0].password_hash
    events = await _outbox(api_settings)
    assert len(events) == 1
    event = events[0]
    assert event.id == body["event_id"]
    assert event.routing_key == "user.signup"
    assert event.published_at is None
    envelope = json.loads(event.body)
    assert envelope["id"] == event.id and envelope["type"] == "user.signup"
    assert envelope["actor"]["id"] == users[0].id
    assert envelope["recipients"] == [{"user_id": users[0].id, "email": "ada@example.com",
                                       "name": "Ada", "phone": None, "locale": "en"}]
    assert PASSWORD not in event.body


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({**ADA, "email": "not-an-email"}, "email"),
        ({**ADA, "email": "ada@"}, "email"),
        ({**ADA, "password": "Zq9#x"}, "password"),
        ({**ADA, "name": "   "}, "name"),
        ({**ADA, "name": ""}, "name"),
        ({**ADA, "is_admin": True}, "is_admin"),
        ({"email": ADA["email"], "password": PASSWORD}, "name"),
    ],
)
async def test_signup_rejects_bad_input_naming_the_field(
    api: httpx.AsyncClient, api_settings: Settings, payload: dict[str, Any], field: str
) -> None:
    response = await api.post("/signup", json=payload)
    assert response.status_code == 422, response.text
    fields = [err["loc"][-1] for err in response.json()["detail"]]
    assert field in fields, response.text
    # The password never comes back (not even when it is the offending field).
    assert PASSWORD not in response.text
    assert str(payload.get("password")) not in response.text
    # And nothing was written.
    assert await rows(api_settings, User) == []
    assert await _outbox(api_settings) == []


async def test_short_password_is_not_echoed(api: httpx.AsyncClient) -> None:
    response = await api.post("/signup", json={**ADA, "password": "s3cr#t"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "password"]
    assert "s3cr#t" not in response.text
    assert "input" not in response.json()["detail"][0]


@pytest.mark.parametrize("content", [None, b"", b"{not json", b"[]"])
async def test_signup_without_a_usable_body_is_422(
    api: httpx.AsyncClient, content: bytes | None
) -> None:
    response = await api.post("/signup", content=content,
                              headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"


async def test_taken_email_is_409_whatever_its_case(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    assert (await api.post("/signup", json=ADA)).status_code == 201
    for email in ("Ada@Example.com", "ada@example.com", "ADA@EXAMPLE.COM", " ada@example.com "):
        response = await api.post("/signup", json={**ADA, "email": email, "name": "Imposter"})
        assert response.status_code == 409, (email, response.text)
        assert response.json()["detail"] == "email already registered"
    # The refused signups left neither a user nor an event behind.
    assert len(await rows(api_settings, User)) == 1
    assert len(await _outbox(api_settings)) == 1


# --- login -----------------------------------------------------------------------------


async def test_login_answers_200_and_emits_a_login_event(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Given a user
    signup = await api.post("/signup", json=ADA)
    assert signup.status_code == 201
    # When they log in (with their email in another case)
    response = await api.post("/login", json={"email": "ADA@example.com", "password": PASSWORD},
                              headers={"user-agent": "pytest-browser/1.0"})
    # Then 200 and a user.login event in the outbox, next to the signup one
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user"] == signup.json()["user"]
    logins = await _outbox(api_settings, "user.login")
    assert [e.id for e in logins] == [body["event_id"]]
    envelope = json.loads(logins[0].body)
    assert envelope["recipients"][0]["email"] == "ada@example.com"
    assert envelope["data"]["user_agent"] == "pytest-browser/1.0"
    assert envelope["data"]["name"] == "Ada"
    assert PASSWORD not in logins[0].body
    assert len(await _outbox(api_settings, "user.signup")) == 1


@pytest.mark.parametrize(
    "credentials",
    [
        {"email": "ada@example.com", "password": "wrong password"},
        {"email": "nobody@example.com", "password": PASSWORD},
    ],
    ids=["wrong-password", "unknown-email"],
)
async def test_bad_credentials_are_401_and_emit_nothing(
    api: httpx.AsyncClient, api_settings: Settings, credentials: dict[str, str]
) -> None:
    assert (await api.post("/signup", json=ADA)).status_code == 201
    response = await api.post("/login", json=credentials)
    assert response.status_code == 401, response.text
    # The same answer either way: the API does not say which emails exist.
    assert response.json() == {"detail": "invalid email or password"}
    assert await _outbox(api_settings, "user.login") == []


async def test_login_validation_does_not_echo_the_password(api: httpx.AsyncClient) -> None:
    response = await api.post("/login", json={"email": "nope", "password": PASSWORD})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "email"]
    assert PASSWORD not in response.text


# --- the broker is not on the request path ---------------------------------------------


async def test_api_works_with_the_broker_unreachable(
    database_url: str, make_settings: Callable[..., Settings]
) -> None:
    # Given settings whose broker URL points at a closed port
    settings = make_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{_closed_port()}/")
    async with api_client(settings) as api:
        # When a user signs up and logs in
        signup = await api.post("/signup", json=ADA)
        login = await api.post("/login", json={"email": ADA["email"], "password": PASSWORD})
    # Then both succeed and both events wait in the outbox for the relay
    assert signup.status_code == 201, signup.text
    assert login.status_code == 200, login.text
    events = await _outbox(settings)
    assert sorted(e.routing_key for e in events) == ["user.login", "user.signup"]
    assert all(e.published_at is None for e in events)
    assert {e.id for e in events} == {signup.json()["event_id"], login.json()["event_id"]}


async def test_outbox_rows_are_ordered_by_creation(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # The relay publishes oldest first; creation times must reflect commit order.
    for i in range(3):
        response = await api.post("/signup", json={**ADA, "email": f"u{i}@example.com"})
        assert response.status_code == 201
    engine = make_engine(api_settings.database_url)
    try:
        async with session_factory(engine)() as session:
            rows = (await session.exec(
                select(OutboxEvent).order_by(col(OutboxEvent.created_at)))).all()
    finally:
        await engine.dispose()
    assert [json.loads(r.body)["recipients"][0]["email"] for r in rows] == [
        "u0@example.com", "u1@example.com", "u2@example.com"]


async def test_metrics_show_the_outbox_backlog_and_events(api: httpx.AsyncClient) -> None:
    # Given two signups that no relay has published yet
    for name in ("ada", "bob"):
        response = await api.post("/signup", json={
            "email": f"{name}@example.com", "password": "correct horse", "name": name})
        assert response.status_code == 201
    # When Prometheus scrapes the API
    metrics = await api.get("/metrics")
    # Then the backlog gauge counts them and the event counter has the type
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    lines = metrics.text.splitlines()
    assert "herald_outbox_pending 2.0" in lines
    assert any(line.startswith('herald_events_total{type="user.signup"}') for line in lines)
