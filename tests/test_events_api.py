"""``/events``, ``/events/cancel`` and ``Idempotency-Key`` in-process, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pydantic
import pytest
from fastapi import HTTPException
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
from sqlmodel import update

from herald.cancellations import is_cancelled
from herald.db import init_db, make_engine, session_factory
from herald.models import Cancellation, IdempotencyKey, OutboxEvent, User, utcnow
from herald.settings import Settings
from producer import events as events_module
from producer.idempotency import Idempotency, IdempotentReplay, fingerprint
from producer.schemas import MAX_DATA_BYTES
from tests.harness import api_client, rows
from topology.envelope import Envelope

TOKEN = "s3rvice-t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PASSWORD = "correct horse battery"
ADA = {"email": "ada@example.com", "password": PASSWORD, "name": "Ada"}
EVENT: dict[str, Any] = {
    "type": "user.post",
    "actor": {"id": "billing", "name": "Billing"},
    "recipients": [{"user_id": "u-1", "email": "ada@example.com", "name": "Ada"}],
    "data": {"title": "Invoice ready"},
}


@pytest.fixture
def api_settings(database_url: str, make_settings: Callable[..., Settings]) -> Settings:
    """Settings on the parametrised database, with the service token set."""
    return make_settings(service_token=TOKEN)




async def _execute(settings: Settings, statement: Any) -> None:
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            await session.exec(statement)
    finally:
        await engine.dispose()


def _key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def _fields(response: httpx.Response) -> list[Any]:
    return [err["loc"][-1] for err in response.json()["detail"]]


# --- the envelope ----------------------------------------------------------------------


def test_an_envelope_without_the_new_fields_still_parses() -> None:
    # A message a producer of before this change published.
    old = {"id": "e-1", "type": "user.signup", "occurred_at": "2024-05-01T12:00:00Z",
           "actor": {"id": "u"}, "recipients": [{"user_id": "u"}], "data": {}, "version": 1}
    envelope = Envelope.from_json(json.dumps(old).encode())
    assert (envelope.critical, envelope.cancel_key, envelope.digest) == (False, None, False)
    assert envelope.version == 1
    again = Envelope.from_json(envelope.to_json())
    assert again == envelope


@pytest.mark.parametrize("key", ["", "has space", "a/b", "x" * 201, "é"])
def test_envelope_rejects_a_bad_cancel_key(key: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        Envelope(type="user.post", actor={"id": "a"}, recipients=[{"user_id": "u"}],
                 cancel_key=key)
    assert err.value.errors()[0]["loc"] == ("cancel_key",)


def test_envelope_accepts_the_new_fields_and_still_forbids_unknown_ones() -> None:
    envelope = Envelope(type="user.post", actor={"id": "a"}, recipients=[{"user_id": "u"}],
                        critical=True, digest=True, cancel_key="Order-7:ship.v2_" + "x" * 184)
    assert len(envelope.cancel_key or "") == 200
    body = json.loads(envelope.to_json())
    assert body["critical"] is True and body["digest"] is True
    with pytest.raises(pydantic.ValidationError):
        Envelope.model_validate({**body, "priority": "high"})


# --- POST /events ----------------------------------------------------------------------


async def test_an_event_is_queued_in_the_outbox(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # When a service raises an event with every option
    payload = {**EVENT, "critical": True, "cancel_key": "invoice:7", "digest": True,
               "recipients": [{"user_id": "u-1", "email": "ada@example.com", "name": "Ada",
                               "phone": "+15551234567", "locale": "fr"}]}
    response = await api.post("/events", json=payload, headers=AUTH)
    # Then 202 with the event id, and the envelope waits in the outbox for the relay
    assert response.status_code == 202, response.text
    event_id = response.json()["event_id"]
    assert response.json() == {"event_id": event_id}
    [row] = await rows(api_settings, OutboxEvent)
    assert row.id == event_id and row.routing_key == "user.post"
    assert row.published_at is None
    envelope = Envelope.from_json(row.body.encode())
    assert envelope.id == event_id
    assert envelope.actor.id == "billing" and envelope.actor.name == "Billing"
    assert [r.model_dump() for r in envelope.recipients] == [payload["recipients"][0]]
    assert envelope.data == {"title": "Invoice ready"}
    assert (envelope.critical, envelope.cancel_key, envelope.digest) == (True, "invoice:7", True)


async def test_an_event_gets_the_defaults(api: httpx.AsyncClient, api_settings: Settings) -> None:
    minimal = {"type": "user.send_req", "actor": {"id": "a"}, "recipients": [{"user_id": "u"}]}
    response = await api.post("/events", json=minimal, headers=AUTH)
    assert response.status_code == 202, response.text
    [row] = await rows(api_settings, OutboxEvent)
    envelope = json.loads(row.body)
    assert envelope["data"] == {} and envelope["recipients"][0]["locale"] == "en"
    assert (envelope["critical"], envelope["cancel_key"], envelope["digest"]) == (
        False, None, False)


async def test_a_given_id_is_used_and_a_repeat_is_200_and_emits_nothing(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    event_id = str(uuid.uuid4())
    first = await api.post("/events", json={**EVENT, "id": event_id}, headers=AUTH)
    assert first.status_code == 202, first.text
    assert first.json() == {"event_id": event_id}
    # The same id again (even spelled in capitals, even with another body): 200, no new row
    for again in ({**EVENT, "id": event_id}, {**EVENT, "id": event_id.upper(), "data": {}}):
        response = await api.post("/events", json=again, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json() == {"event_id": event_id}
    found = await rows(api_settings, OutboxEvent)
    assert [r.id for r in found] == [event_id]
    assert json.loads(found[0].body)["data"] == EVENT["data"]


async def test_two_concurrent_events_with_one_id_emit_once(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    event_id = str(uuid.uuid4())
    responses = await asyncio.gather(*(
        api.post("/events", json={**EVENT, "id": event_id}, headers=AUTH) for _ in range(2)))
    assert sorted(r.status_code for r in responses) == [200, 202], [r.text for r in responses]
    assert all(r.json() == {"event_id": event_id} for r in responses)
    assert len(await rows(api_settings, OutboxEvent)) == 1


async def test_without_an_id_two_identical_events_are_two_events(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Without an id or an Idempotency-Key, nothing deduplicates (as before this change).
    ids = {(await api.post("/events", json=EVENT, headers=AUTH)).json()["event_id"]
           for _ in range(2)}
    assert len(ids) == 2
    assert {r.id for r in await rows(api_settings, OutboxEvent)} == ids
    assert await rows(api_settings, IdempotencyKey) == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({**EVENT, "type": "user.unknown"}, "type"),
        ({**EVENT, "type": "signup"}, "type"),
        ({k: v for k, v in EVENT.items() if k != "type"}, "type"),
        ({k: v for k, v in EVENT.items() if k != "actor"}, "actor"),
        ({**EVENT, "actor": {"name": "no id"}}, "id"),
        ({**EVENT, "recipients": []}, "recipients"),
        ({**EVENT, "recipients": [{"user_id": "u"}] * 1001}, "recipients"),
        ({**EVENT, "recipients": [{"user_id": "u", "email": "nope"}]}, "email"),
        ({**EVENT, "recipients": [{"user_id": "u", "fax": "1"}]}, "fax"),
        ({**EVENT, "data": [1, 2]}, "data"),
        ({**EVENT, "data": "text"}, "data"),
        ({**EVENT, "cancel_key": "has space"}, "cancel_key"),
        ({**EVENT, "cancel_key": "k" * 201}, "cancel_key"),
        ({**EVENT, "id": "not-a-uuid"}, "id"),
        ({**EVENT, "priority": "high"}, "priority"),
    ],
)
async def test_bad_events_are_422_naming_the_field(
    api: httpx.AsyncClient, api_settings: Settings, payload: dict[str, Any], field: str
) -> None:
    response = await api.post("/events", json=payload, headers=AUTH)
    assert response.status_code == 422, response.text
    assert field in _fields(response), response.text
    assert await rows(api_settings, OutboxEvent) == []


async def test_an_unknown_type_is_explained(api: httpx.AsyncClient) -> None:
    response = await api.post("/events", json={**EVENT, "type": "user.nope"}, headers=AUTH)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "type"]
    assert "unknown event type 'user.nope'" in error["msg"]
    assert "user.signup" in error["msg"] and "user.send_req" in error["msg"]


async def test_a_thousand_recipients_are_fine(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    recipients = [{"user_id": f"u{i}"} for i in range(1000)]
    response = await api.post("/events", json={**EVENT, "recipients": recipients}, headers=AUTH)
    assert response.status_code == 202, response.text
    [row] = await rows(api_settings, OutboxEvent)
    assert len(json.loads(row.body)["recipients"]) == 1000


def _data_of_size(size: int) -> dict[str, str]:
    data = {"blob": ""}
    data["blob"] = "x" * (size - len(json.dumps(data, separators=(",", ":"))))
    assert len(json.dumps(data, separators=(",", ":")).encode()) == size
    return data


async def test_data_up_to_64_kib_is_accepted_and_beyond_is_422(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Exactly at the limit: accepted
    at_limit = await api.post("/events", json={**EVENT, "data": _data_of_size(MAX_DATA_BYTES)},
                              headers=AUTH)
    assert at_limit.status_code == 202, at_limit.text
    # One byte more: refused, naming the field and the limit
    over = await api.post("/events", json={**EVENT, "data": _data_of_size(MAX_DATA_BYTES + 1)},
                          headers=AUTH)
    assert over.status_code == 422, over.text[:300]
    [error] = over.json()["detail"]
    assert error["loc"] == ["body", "data"]
    assert "65537 bytes" in error["msg"] and "64 KiB" in error["msg"]
    assert "xxxx" not in over.text  # the oversize input is not echoed
    assert len(await rows(api_settings, OutboxEvent)) == 1


# --- the service token -----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "wrong", "longer", "shorter", "basic", "no-scheme", "empty"],
)
@pytest.mark.parametrize(("path", "payload"), [("/events", EVENT),
                                               ("/events/cancel", {"key": "k"})])
async def test_a_missing_or_wrong_token_is_401(
    api: httpx.AsyncClient, api_settings: Settings, headers: dict[str, str], path: str,
    payload: dict[str, Any],
) -> None:
    response = await api.post(path, json=payload, headers={**headers, **_key()})
    assert response.status_code == 401, response.text
    assert response.json() == {"detail": "missing or wrong service token"}
    assert response.headers["www-authenticate"] == "Bearer"
    assert await rows(api_settings, OutboxEvent) == []
    assert await rows(api_settings, Cancellation) == []
    # A refused request stores no answer under its key.
    assert await rows(api_settings, IdempotencyKey) == []


@pytest.mark.parametrize(("path", "payload"), [("/events", EVENT),
                                               ("/events/cancel", {"key": "k"})])
async def test_without_a_configured_token_events_are_off(
    database_url: str, make_settings: Callable[..., Settings], path: str,
    payload: dict[str, Any],
) -> None:
    settings = make_settings()  # HERALD_SERVICE_TOKEN unset
    assert settings.service_token is None
    async with api_client(settings) as api:
        for headers in ({}, AUTH, {"Authorization": "Bearer "}):
            response = await api.post(path, json=payload, headers=headers)
            assert response.status_code == 503, response.text
            assert response.json() == {"detail": "set HERALD_SERVICE_TOKEN to enable /events"}
    assert await rows(settings, OutboxEvent) == []


def test_an_empty_token_setting_means_unset(make_settings: Callable[..., Settings]) -> None:
    assert make_settings(service_token="").service_token is None


async def test_a_refused_token_does_not_burn_the_idempotency_key(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    key = _key()
    refused = await api.post("/events", json=EVENT, headers={**key, "Authorization": "Bearer x"})
    assert refused.status_code == 401
    accepted = await api.post("/events", json=EVENT, headers={**key, **AUTH})
    assert accepted.status_code == 202, accepted.text
    assert "idempotent-replayed" not in accepted.headers
    assert len(await rows(api_settings, OutboxEvent)) == 1


# --- POST /events/cancel and is_cancelled ----------------------------------------------


async def test_cancel_records_the_key_and_twice_is_fine(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # When a service cancels a key
    first = await api.post("/events/cancel", json={"key": "invoice:7"}, headers=AUTH)
    # Then 202 with the key and when it was cancelled
    assert first.status_code == 202, first.text
    body = first.json()
    assert set(body) == {"key", "cancelled_at"} and body["key"] == "invoice:7"
    # And cancelling again is 202 with the same time; the table counts requests
    second = await api.post("/events/cancel", json={"key": "invoice:7"}, headers=AUTH)
    assert second.status_code == 202, second.text
    assert second.json() == body
    [row] = await rows(api_settings, Cancellation)
    assert row.key == "invoice:7" and row.request_count == 2
    assert "idempotent-replayed" not in second.headers


async def test_concurrent_first_cancellations_agree(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    responses = await asyncio.gather(*(
        api.post("/events/cancel", json={"key": "race"}, headers=AUTH) for _ in range(3)))
    assert [r.status_code for r in responses] == [202] * 3, [r.text for r in responses]
    assert len({r.json()["cancelled_at"] for r in responses}) == 1
    [row] = await rows(api_settings, Cancellation)
    assert row.request_count == 3


@pytest.mark.parametrize("payload", [{}, {"key": ""}, {"key": "a b"}, {"key": "k" * 201},
                                     {"key": "k", "reason": "x"}])
async def test_a_bad_cancel_is_422(
    api: httpx.AsyncClient, api_settings: Settings, payload: dict[str, Any]
) -> None:
    response = await api.post("/events/cancel", json=payload, headers=AUTH)
    assert response.status_code == 422, response.text
    assert _fields(response)[0] in ("key", "reason")
    assert await rows(api_settings, Cancellation) == []


async def test_is_cancelled_reads_what_the_api_wrote(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    assert (await api.post("/events/cancel", json={"key": "order:1"}, headers=AUTH)
            ).status_code == 202
    engine = make_engine(api_settings.database_url)
    try:
        factory = session_factory(engine)
        # Through a factory (a short session of its own)
        assert await is_cancelled(factory, "order:1") is True
        assert await is_cancelled(factory, "order:2") is False
        # Through the caller's session (sqlmodel's, or plain SQLAlchemy's)
        async with factory() as session:
            assert await is_cancelled(session, "order:1") is True
            assert await is_cancelled(session, "order:2") is False
        async with SAAsyncSession(engine) as plain:
            assert await is_cancelled(plain, "order:1") is True
            assert await is_cancelled(plain, "Order:1") is False
    finally:
        await engine.dispose()


async def test_is_cancelled_on_an_empty_database(api_settings: Settings) -> None:
    engine = make_engine(api_settings.database_url)
    await init_db(engine)
    try:
        assert await is_cancelled(session_factory(engine), "anything") is False
    finally:
        await engine.dispose()


# --- Idempotency-Key: replay -----------------------------------------------------------


async def _counts(settings: Settings) -> tuple[int, int, int]:
    cancellations: list[Cancellation] = await rows(settings, Cancellation)
    return (len(await rows(settings, User)), len(await rows(settings, OutboxEvent)),
            sum(c.request_count for c in cancellations))


ROUTES: list[tuple[str, dict[str, Any], int]] = [
    ("/signup", ADA, 201),
    ("/login", {"email": ADA["email"], "password": PASSWORD}, 200),
    ("/events", EVENT, 202),
    ("/events/cancel", {"key": "invoice:7"}, 202),
]


async def _given_a_user_for_login(api: httpx.AsyncClient, path: str) -> None:
    if path == "/login":
        assert (await api.post("/signup", json=ADA)).status_code == 201


@pytest.mark.parametrize(("path", "payload", "code"), ROUTES)
async def test_a_retry_with_the_key_replays_the_answer_and_emits_nothing(
    api: httpx.AsyncClient, api_settings: Settings, path: str, payload: dict[str, Any],
    code: int,
) -> None:
    await _given_a_user_for_login(api, path)
    key = _key()
    # Given a first request with a key
    first = await api.post(path, json=payload, headers={**AUTH, **key})
    assert first.status_code == code, first.text
    assert "idempotent-replayed" not in first.headers
    after_first = await _counts(api_settings)
    # When it is retried, with the body spelled differently (order, spaces)
    respelled = json.dumps(dict(reversed(list(payload.items()))), indent=2)
    for content in (json.dumps(payload), respelled):
        again = await api.post(path, content=content,
                               headers={**AUTH, **key, "content-type": "application/json"})
        # Then the first answer comes back byte for byte, marked as a replay
        assert again.status_code == code, again.text
        assert again.content == first.content
        assert again.headers["content-type"] == first.headers["content-type"]
        assert again.headers["idempotent-replayed"] == "true"
    # And nothing new happened: no second user, event or cancellation count
    assert await _counts(api_settings) == after_first
    assert len(await rows(api_settings, IdempotencyKey)) == 1


@pytest.mark.parametrize(("path", "payload", "code"), ROUTES)
async def test_the_key_with_another_body_is_422(
    api: httpx.AsyncClient, api_settings: Settings, path: str, payload: dict[str, Any],
    code: int,
) -> None:
    await _given_a_user_for_login(api, path)
    key = _key()
    assert (await api.post(path, json=payload, headers={**AUTH, **key})).status_code == code
    before = await _counts(api_settings)
    other = {**payload, **({"key": "other"} if "key" in payload else {})}
    if "password" in payload:
        other["password"] = PASSWORD + "!"  # only the secret differs
    elif "type" in payload:
        other["data"] = {"title": "Another"}
    response = await api.post(path, json=other, headers={**AUTH, **key})
    assert response.status_code == 422, response.text
    assert response.json() == {"detail": (
        f"this Idempotency-Key was already used with another request body on POST {path}; "
        "send a new key for a new request")}
    assert "idempotent-replayed" not in response.headers
    assert await _counts(api_settings) == before


async def test_keys_are_per_route(api: httpx.AsyncClient, api_settings: Settings) -> None:
    key = _key()
    assert (await api.post("/signup", json=ADA, headers=key)).status_code == 201
    events = await api.post("/events", json=EVENT, headers={**AUTH, **key})
    assert events.status_code == 202, events.text
    assert "idempotent-replayed" not in events.headers
    assert len(await rows(api_settings, OutboxEvent)) == 2


async def test_a_quoted_key_is_the_same_key(api: httpx.AsyncClient) -> None:
    # The IETF draft writes the key as a structured-field string: "…"
    first = await api.post("/events", json=EVENT, headers={**AUTH, "Idempotency-Key": "abc-1"})
    again = await api.post("/events", json=EVENT,
                           headers={**AUTH, "Idempotency-Key": '"abc-1"'})
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.content == first.content


# --- Idempotency-Key: what is stored ---------------------------------------------------


async def test_a_409_is_stored_and_replayed(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Given Ada's account, a signup with her email and a key is refused
    assert (await api.post("/signup", json=ADA)).status_code == 201
    key = _key()
    refused = await api.post("/signup", json={**ADA, "name": "Imposter"}, headers=key)
    assert refused.status_code == 409
    # When the account goes away and the same request is retried with the key
    await _execute(api_settings, OutboxEvent.__table__.delete())  # type: ignore[attr-defined]
    await _execute(api_settings, User.__table__.delete())  # type: ignore[attr-defined]
    again = await api.post("/signup", json={**ADA, "name": "Imposter"}, headers=key)
    # Then the stored 409 comes back (the route did not run again)
    assert again.status_code == 409
    assert again.content == refused.content
    assert again.headers["idempotent-replayed"] == "true"
    assert await rows(api_settings, User) == []
    # While the same request with a new key now succeeds
    fresh = await api.post("/signup", json={**ADA, "name": "Imposter"}, headers=_key())
    assert fresh.status_code == 201


async def test_a_401_login_is_replayed_with_its_challenge(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    assert (await api.post("/signup", json=ADA)).status_code == 201
    key = _key()
    wrong = {"email": ADA["email"], "password": "wrong password"}
    first = await api.post("/login", json=wrong, headers=key)
    assert first.status_code == 401
    again = await api.post("/login", json=wrong, headers=key)
    assert again.status_code == 401 and again.content == first.content
    assert again.headers["www-authenticate"] == "Bearer"
    assert again.headers["idempotent-replayed"] == "true"
    assert await rows(api_settings, OutboxEvent) != []  # the signup's only
    assert len(await _outbox_of(api_settings, "user.login")) == 0


async def _outbox_of(settings: Settings, routing_key: str) -> list[OutboxEvent]:
    return [r for r in await rows(settings, OutboxEvent) if r.routing_key == routing_key]


async def test_the_stored_fingerprint_is_not_a_fast_hash_of_the_password(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    key = _key()
    assert (await api.post("/signup", json=ADA, headers=key)).status_code == 201
    [row] = await rows(api_settings, IdempotencyKey)
    canonical = json.dumps(ADA, sort_keys=True, separators=(",", ":")).encode()
    assert row.request_hash != hashlib.sha256(canonical).hexdigest()
    assert PASSWORD not in row.response_body and PASSWORD not in row.request_hash
    assert row.route == "POST /signup" and row.status_code == 201


async def test_a_request_that_fails_validation_is_not_stored(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Like Stripe: the route never ran, so the client may fix the body and keep the key.
    key = _key()
    bad = await api.post("/events", json={**EVENT, "type": "user.nope"}, headers={**AUTH, **key})
    assert bad.status_code == 422
    good = await api.post("/events", json=EVENT, headers={**AUTH, **key})
    assert good.status_code == 202, good.text
    assert "idempotent-replayed" not in good.headers
    assert len(await rows(api_settings, OutboxEvent)) == 1


async def test_a_5xx_is_not_stored(
    api: httpx.AsyncClient, api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the outbox write fails: once with a 503, once with a crash
    real = events_module.add_event
    failures: list[BaseException] = [HTTPException(503, "database is read-only"),
                                     RuntimeError("disk on fire")]

    def failing(session: Any, envelope: Envelope) -> OutboxEvent:
        if failures:
            raise failures.pop(0)
        return real(session, envelope)

    monkeypatch.setattr(events_module, "add_event", failing)
    key = _key()
    first = await api.post("/events", json=EVENT, headers={**AUTH, **key})
    assert first.status_code == 503
    with pytest.raises(RuntimeError, match="disk on fire"):
        await api.post("/events", json=EVENT, headers={**AUTH, **key})
    assert await rows(api_settings, IdempotencyKey) == []
    # When the client retries with the same key, the request runs for real
    third = await api.post("/events", json=EVENT, headers={**AUTH, **key})
    assert third.status_code == 202, third.text
    assert "idempotent-replayed" not in third.headers
    assert len(await rows(api_settings, OutboxEvent)) == 1


async def test_an_expired_key_is_free_again(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    key = _key()
    first = await api.post("/events", json=EVENT, headers={**AUTH, **key})
    assert first.status_code == 202
    # Given the stored answer is older than the TTL (24h by default)
    assert api_settings.idempotency_ttl == 86400
    old = utcnow() - timedelta(hours=24, seconds=1)
    await _execute(api_settings, update(IdempotencyKey).values(created_at=old))
    # When the key comes back, even with another body
    other = {**EVENT, "data": {"title": "Another"}}
    again = await api.post("/events", json=other, headers={**AUTH, **key})
    # Then it is a new request: a new event, and the key's row is replaced
    assert again.status_code == 202, again.text
    assert "idempotent-replayed" not in again.headers
    assert again.json()["event_id"] != first.json()["event_id"]
    assert len(await rows(api_settings, OutboxEvent)) == 2
    [row] = await rows(api_settings, IdempotencyKey)
    assert json.loads(row.response_body) == again.json()
    # And within the TTL it replays again
    third = await api.post("/events", json=other, headers={**AUTH, **key})
    assert third.headers["idempotent-replayed"] == "true" and third.content == again.content


async def test_a_key_just_inside_the_ttl_still_replays(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    key = _key()
    first = await api.post("/events", json=EVENT, headers={**AUTH, **key})
    recent = utcnow() - timedelta(hours=23, minutes=59)
    await _execute(api_settings, update(IdempotencyKey).values(created_at=recent))
    again = await api.post("/events", json=EVENT, headers={**AUTH, **key})
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.content == first.content


# --- Idempotency-Key: the header -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "code"),
    [("", 422), ("k" * 256, 422), (" padded", 422), ("tab\there", 422), ('""', 400)],
    ids=["empty", "256-chars", "leading-space", "control-char", "empty-quoted"],
)
async def test_a_bad_key_is_refused_naming_the_header(
    api: httpx.AsyncClient, api_settings: Settings, value: str, code: int
) -> None:
    response = await api.post("/signup", json=ADA, headers={"Idempotency-Key": value})
    assert response.status_code == code, response.text
    assert "Idempotency-Key" in response.text
    if code == 422:
        assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert await rows(api_settings, User) == []
    assert await rows(api_settings, IdempotencyKey) == []


async def test_a_255_character_key_is_fine(api: httpx.AsyncClient) -> None:
    key = {"Idempotency-Key": "k" * 255}
    assert (await api.post("/signup", json=ADA, headers=key)).status_code == 201
    again = await api.post("/signup", json=ADA, headers=key)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"


# --- Idempotency-Key: concurrency ------------------------------------------------------


async def test_two_concurrent_requests_with_one_key_emit_once(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    for _ in range(3):
        key = _key()
        responses = await asyncio.gather(*(
            api.post("/events", json=EVENT, headers={**AUTH, **key}) for _ in range(2)))
        assert [r.status_code for r in responses] == [202, 202], [r.text for r in responses]
        assert responses[0].content == responses[1].content
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 1
    assert len(await rows(api_settings, OutboxEvent)) == 3


@pytest.mark.parametrize(("path", "payload", "code"), ROUTES)
async def test_requests_that_both_passed_the_lookup_still_emit_once(
    api: httpx.AsyncClient, api_settings: Settings, monkeypatch: pytest.MonkeyPatch,
    path: str, payload: dict[str, Any], code: int,
) -> None:
    # Given two requests held until both have looked the key up and found nothing
    await _given_a_user_for_login(api, path)
    before = await _counts(api_settings)
    barrier = asyncio.Barrier(2)
    real_lookup = Idempotency.lookup
    held = 0

    async def lookup(self: Idempotency, sessions: Any) -> IdempotencyKey | None:
        nonlocal held
        found = await real_lookup(self, sessions)
        if held < 2:
            held += 1
            await asyncio.wait_for(barrier.wait(), 10)
        return found

    monkeypatch.setattr(Idempotency, "lookup", lookup)
    key = _key()
    # When both run the route at once
    responses = await asyncio.gather(*(
        api.post(path, json=payload, headers={**AUTH, **key}) for _ in range(2)))
    # Then one took effect, the other replays its answer
    assert [r.status_code for r in responses] == [code, code], [r.text for r in responses]
    assert responses[0].content == responses[1].content
    assert sorted(r.headers.get("idempotent-replayed", "") for r in responses) == ["", "true"]
    users, outbox, cancels = await _counts(api_settings)
    expected = {"/signup": (1, 1, 0), "/login": (0, 1, 0), "/events": (0, 1, 0),
                "/events/cancel": (0, 0, 1)}[path]
    assert (users - before[0], outbox - before[1], cancels - before[2]) == expected
    assert len(await rows(api_settings, IdempotencyKey)) == 1


async def test_a_conflict_without_a_stored_answer_is_409_in_progress(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # The key's insert collided, yet no answer is readable: the other request is unfinished.
    engine = make_engine(api_settings.database_url)
    try:
        sessions = session_factory(engine)
        raw = json.dumps(EVENT).encode()
        idem = Idempotency("k-1", "POST /events", await fingerprint(raw, "POST /events", "k-1"),
                           ttl=60)
        with pytest.raises(HTTPException) as err:
            await idem.resolve_conflict(sessions)
        assert err.value.status_code == 409
        assert err.value.detail == ("a request with this Idempotency-Key is in progress; "
                                    "retry later")
        # Once the other request's answer is stored: a replay (same body) or 422 (another)
        async with sessions() as session, session.begin():
            await idem.stage(session, events_module.EventQueued(event_id="e-1"), 202)
        with pytest.raises(IdempotentReplay) as replay:
            await idem.resolve_conflict(sessions)
        assert replay.value.row.status_code == 202
        other = Idempotency("k-1", "POST /events", "0" * 64, ttl=60)
        with pytest.raises(HTTPException) as mismatch:
            await other.resolve_conflict(sessions)
        assert mismatch.value.status_code == 422
    finally:
        await engine.dispose()


async def test_the_fingerprint_ignores_spelling_but_not_content() -> None:
    a = await fingerprint(b'{"a": 1, "b": [1, 2]}', "POST /x", "k")
    assert a == await fingerprint(b'{"b":[1,2],"a":1}', "POST /x", "k")
    assert a != await fingerprint(b'{"a": 1, "b": [2, 1]}', "POST /x", "k")
    assert a != await fingerprint(b'{"a": "1", "b": [1, 2]}', "POST /x", "k")
    # Not JSON: the raw bytes count
    assert await fingerprint(b"{nope", "POST /x", "k") != await fingerprint(b"{nope ",
                                                                             "POST /x", "k")


# --- OpenAPI ---------------------------------------------------------------------------


async def test_openapi_documents_the_header_the_token_and_examples(
    api: httpx.AsyncClient,
) -> None:
    spec = (await api.get("/openapi.json")).json()
    for path in ("/signup", "/login", "/events", "/events/cancel"):
        operation = spec["paths"][path]["post"]
        [header] = [p for p in operation["parameters"] if p["in"] == "header"]
        assert header["name"] == "Idempotency-Key" and header["required"] is False
        assert header["schema"]["anyOf"][0]["maxLength"] == 255
        assert "Idempotent-Replayed" in header["description"]
        assert {"409", "422"} <= set(operation["responses"])
    for path in ("/events", "/events/cancel"):
        operation = spec["paths"][path]["post"]
        assert operation["security"] == [{"HTTPBearer": []}]
        assert {"202", "401", "503"} <= set(operation["responses"])
    assert "200" in spec["paths"]["/events"]["post"]["responses"]
    schemas = spec["components"]["schemas"]
    for name in ("EventIn", "EventQueued", "CancelIn", "Cancelled"):
        assert schemas[name]["examples"], name
    example = schemas["EventIn"]["examples"][0]
    assert example["type"] in ("user.signup", "user.login", "user.post", "user.send_req")
    assert set(schemas["EventIn"]["properties"]) == {
        "type", "actor", "recipients", "data", "critical", "cancel_key", "digest", "id"}

