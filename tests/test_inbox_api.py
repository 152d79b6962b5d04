"""Bearer tokens from ``POST /login`` and the ``/me/notifications`` inbox, on both DBs."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from herald.db import make_engine, session_factory
from herald.models import ApiToken, IdempotencyKey, Notification, as_utc, utcnow
from herald.settings import Settings
from tests.harness import PASSWORD, rows, sign_up

TRAIL = [{"node": "quiet_hours", "label": "inside quiet hours?", "answer": "yes"}]


@pytest.fixture
def api_settings(database_url: str, make_settings: Callable[..., Settings]) -> Settings:
    """Settings on the parametrised database (SQLite, then PostgreSQL)."""
    return make_settings()


async def _insert(settings: Settings, *new: Any) -> list[int]:
    """Commit ``new`` rows through a connection of the test's own; their ids."""
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            session.add_all(new)
            await session.flush()
            return [getattr(row, "id", 0) for row in new]
    finally:
        await engine.dispose()


def _note(user_id: str, n: int, **fields: Any) -> Notification:
    return Notification(event_id=str(uuid.uuid4()), event_type="user.post", user_id=user_id,
                        title=f"title {n}", body=f"body {n}",
                        created_at=utcnow() + timedelta(seconds=n), **fields)


def _ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


# --- tokens ----------------------------------------------------------------------------


async def test_login_returns_a_working_token_stored_only_as_its_hash(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # When Ada logs in
    user_id, auth = await sign_up(api, "ada")
    token = auth["Authorization"].removeprefix("Bearer ")
    # Then the token is long and random, and only its SHA-256 is stored, for 24h
    assert len(token) >= 43
    [row] = await rows(api_settings, ApiToken)
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert row.user_id == user_id
    lifetime = as_utc(row.expires_at) - utcnow()
    assert timedelta(hours=23, minutes=59) < lifetime <= timedelta(hours=24)
    # And it opens her inbox
    response = await api.get("/me/notifications", headers=auth)
    assert response.status_code == 200, response.text
    assert response.json() == {"items": [], "unread_count": 0, "next_before": None}


async def test_login_answers_token_type_and_the_configured_lifetime(
    database_url: str, make_settings: Callable[..., Settings]
) -> None:
    from tests.harness import api_client

    settings = make_settings(token_ttl="5m")
    assert settings.token_ttl == 300
    async with api_client(settings) as api:
        await api.post("/signup", json={"email": "a@example.com", "password": PASSWORD,
                                        "name": "A"})
        body = (await api.post("/login", json={"email": "a@example.com",
                                               "password": PASSWORD})).json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 300
    assert {"user", "event_id"} <= body.keys()
    [row] = await rows(settings, ApiToken)
    assert timedelta(seconds=290) < as_utc(row.expires_at) - utcnow() <= timedelta(seconds=300)


async def test_each_login_gets_its_own_token(api: httpx.AsyncClient) -> None:
    _, first = await sign_up(api, "ada")
    again = await api.post("/login", json={"email": "ada@example.com", "password": PASSWORD})
    assert again.json()["access_token"] != first["Authorization"].removeprefix("Bearer ")


async def test_a_replayed_login_carries_the_same_token_and_stores_none_in_clear(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Given a login with an Idempotency-Key
    await sign_up(api, "ada")
    key = {"Idempotency-Key": str(uuid.uuid4())}
    creds = {"email": "ada@example.com", "password": PASSWORD}
    first = await api.post("/login", json=creds, headers=key)
    token = first.json()["access_token"]
    # When it is retried
    again = await api.post("/login", json=creds, headers=key)
    # Then the same answer, same token, and no second token was issued
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert len(await rows(api_settings, ApiToken)) == 2  # _user's login and this one
    # And the stored answer does not hold the token in clear
    [stored] = await rows(api_settings, IdempotencyKey)
    assert token not in stored.response_body
    assert json.loads(stored.response_body)["access_token"].startswith("sealed:")
    # While the token works
    response = await api.get("/me/notifications", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


@pytest.mark.parametrize("how", ["none", "garbage", "basic", "empty", "expired"])
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/me/notifications"), ("POST", "/me/notifications/1/read"),
    ("POST", "/me/notifications/read-all"), ("GET", "/me/notifications/1/why")])
async def test_no_valid_token_is_401_with_a_bearer_challenge(
    api: httpx.AsyncClient, api_settings: Settings, how: str, method: str, path: str
) -> None:
    user_id, _ = await sign_up(api, "ada")
    [note_id] = await _insert(api_settings, _note(user_id, 1))
    assert note_id == 1
    headers = {"none": {}, "garbage": {"Authorization": "Bearer not-a-token"},
               "basic": {"Authorization": "Basic YWRhOnB3"},
               "empty": {"Authorization": "Bearer "}}.get(how)
    if how == "expired":
        expired = "expired-token-0123456789"
        await _insert(api_settings, ApiToken(
            token_hash=hashlib.sha256(expired.encode()).hexdigest(), user_id=user_id,
            expires_at=utcnow() - timedelta(seconds=1)))
        headers = {"Authorization": f"Bearer {expired}"}
    response = await api.request(method, path, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"detail": "missing, invalid or expired token"}


async def test_a_token_just_before_expiry_still_works(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    user_id, _ = await sign_up(api, "ada")
    token = "nearly-expired-token-0123"
    await _insert(api_settings, ApiToken(
        token_hash=hashlib.sha256(token.encode()).hexdigest(), user_id=user_id,
        expires_at=utcnow() + timedelta(minutes=1)))
    response = await api.get("/me/notifications", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text


# --- listing ---------------------------------------------------------------------------


async def test_the_inbox_lists_only_own_delivered_rows_newest_first(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Given Ada's three delivered notifications, one held back, and Bob's two
    ada, ada_auth = await sign_up(api, "ada")
    bob, bob_auth = await sign_up(api, "bob")
    ids = await _insert(api_settings, _note(ada, 1), _note(bob, 2), _note(ada, 3),
                        _note(ada, 4, delivered=False, reason="quiet hours"),
                        _note(bob, 5), _note(ada, 6))
    # When each lists their inbox
    ada_page = await api.get("/me/notifications", headers=ada_auth)
    bob_page = await api.get("/me/notifications", headers=bob_auth)
    # Then each sees only their own delivered ones, newest first
    assert _ids(ada_page) == [ids[5], ids[2], ids[0]]
    assert _ids(bob_page) == [ids[4], ids[1]]
    body = ada_page.json()
    assert body["unread_count"] == 3 and body["next_before"] is None
    item = body["items"][0]
    assert set(item) == {"id", "event_id", "event_type", "title", "body", "read", "created_at"}
    assert (item["title"], item["body"], item["read"], item["event_type"]) == (
        "title 6", "body 6", False, "user.post")


async def test_the_unread_filter_and_unread_count(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    ada, auth = await sign_up(api, "ada")
    ids = await _insert(api_settings, _note(ada, 1), _note(ada, 2, read_at=utcnow()),
                        _note(ada, 3), _note(ada, 4, delivered=False))
    unread = await api.get("/me/notifications", params={"unread": "true"}, headers=auth)
    read = await api.get("/me/notifications", params={"unread": "false"}, headers=auth)
    both = await api.get("/me/notifications", headers=auth)
    assert _ids(unread) == [ids[2], ids[0]]
    assert _ids(read) == [ids[1]]
    assert [i["read"] for i in both.json()["items"]] == [False, True, False]
    # unread_count ignores the filter and the held-back row
    assert {r.json()["unread_count"] for r in (unread, read, both)} == {2}


async def test_pages_by_id_with_next_before(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Given five of Ada's delivered rows, interleaved with Bob's and a held-back one
    ada, auth = await sign_up(api, "ada")
    bob, _ = await sign_up(api, "bob")
    ids = await _insert(api_settings, _note(ada, 1), _note(bob, 2), _note(ada, 3),
                        _note(ada, 4, delivered=False), _note(ada, 5), _note(ada, 6),
                        _note(bob, 7), _note(ada, 8))
    mine = [ids[7], ids[5], ids[4], ids[2], ids[0]]
    # When she pages two at a time
    seen: list[int] = []
    cursors: list[int | None] = []
    params: dict[str, Any] = {"limit": 2}
    for _ in range(5):
        page = await api.get("/me/notifications", params=params, headers=auth)
        seen += _ids(page)
        cursors.append(page.json()["next_before"])
        if cursors[-1] is None:
            break
        params["before"] = cursors[-1]
    # Then three pages cover her rows once each; the last says there is no more
    assert seen == mine
    assert cursors == [mine[1], mine[3], None]
    # And a page that is exactly full has no next page
    exact = await api.get("/me/notifications", params={"limit": 5}, headers=auth)
    assert _ids(exact) == mine and exact.json()["next_before"] is None


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
    ({"before": 0}, "before"), ({"before": "abc"}, "before"), ({"unread": "maybe"}, "unread"),
])
async def test_bad_query_parameters_are_422_naming_them(
    api: httpx.AsyncClient, params: dict[str, Any], field: str
) -> None:
    _, auth = await sign_up(api, "ada")
    response = await api.get("/me/notifications", params=params, headers=auth)
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["query", field]]


async def test_a_bad_notification_id_is_422(api: httpx.AsyncClient) -> None:
    _, auth = await sign_up(api, "ada")
    for path in ("/me/notifications/abc/read", "/me/notifications/0/why"):
        method = "POST" if path.endswith("read") else "GET"
        response = await api.request(method, path, headers=auth)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["path", "notification_id"]


# --- marking read ----------------------------------------------------------------------


async def test_marking_one_read_is_idempotent(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    ada, auth = await sign_up(api, "ada")
    ids = await _insert(api_settings, _note(ada, 1), _note(ada, 2))
    # When Ada marks the first one read, twice
    first = await api.post(f"/me/notifications/{ids[0]}/read", headers=auth)
    [stamped] = [n.read_at for n in await rows(api_settings, Notification) if n.id == ids[0]]
    again = await api.post(f"/me/notifications/{ids[0]}/read", headers=auth)
    # Then both answer the item as read, and the first read time is kept
    assert first.status_code == 200, first.text
    assert first.json()["id"] == ids[0] and first.json()["read"] is True
    assert again.status_code == 200 and again.json() == first.json()
    [kept] = [n.read_at for n in await rows(api_settings, Notification) if n.id == ids[0]]
    assert stamped is not None and kept == stamped
    page = (await api.get("/me/notifications", headers=auth)).json()
    assert page["unread_count"] == 1
    assert [(i["id"], i["read"]) for i in page["items"]] == [(ids[1], False), (ids[0], True)]


async def test_read_all_marks_only_own_unread_delivered_rows(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    ada, auth = await sign_up(api, "ada")
    bob, bob_auth = await sign_up(api, "bob")
    await _insert(api_settings, _note(ada, 1), _note(ada, 2), _note(ada, 3, read_at=utcnow()),
                  _note(ada, 4, delivered=False), _note(bob, 5))
    first = await api.post("/me/notifications/read-all", headers=auth)
    assert first.status_code == 200, first.text
    assert first.json() == {"marked": 2}
    assert (await api.post("/me/notifications/read-all", headers=auth)).json() == {"marked": 0}
    assert (await api.get("/me/notifications", headers=auth)).json()["unread_count"] == 0
    # Bob's notification and Ada's held-back one are untouched
    assert (await api.get("/me/notifications", headers=bob_auth)).json()["unread_count"] == 1
    held = [n for n in await rows(api_settings, Notification) if not n.delivered]
    assert held[0].read_at is None


# --- why -------------------------------------------------------------------------------


async def test_why_explains_a_notification_that_was_not_delivered(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    ada, auth = await sign_up(api, "ada")
    held, shown = await _insert(
        api_settings, _note(ada, 1, delivered=False, reason="quiet hours",
                            trail=json.dumps(TRAIL)),
        _note(ada, 2, reason="notified: user.post"))
    response = await api.get(f"/me/notifications/{held}/why", headers=auth)
    assert response.status_code == 200, response.text
    assert response.json() == {"delivered": False, "reason": "quiet hours", "trail": TRAIL,
                               "channels": []}
    response = await api.get(f"/me/notifications/{shown}/why", headers=auth)
    assert response.json() == {"delivered": True, "reason": "notified: user.post", "trail": [],
                               "channels": []}


async def test_another_users_notification_is_404(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Given Bob's notifications, one delivered and one held back
    bob, _ = await sign_up(api, "bob")
    _, ada_auth = await sign_up(api, "ada")
    shown, held = await _insert(api_settings, _note(bob, 1),
                                _note(bob, 2, delivered=False, trail=json.dumps(TRAIL)))
    # When Ada asks about them by id, or about an id that does not exist
    for note_id in (shown, held, 999_999):
        read = await api.post(f"/me/notifications/{note_id}/read", headers=ada_auth)
        why = await api.get(f"/me/notifications/{note_id}/why", headers=ada_auth)
        # Then 404 alike, and nothing about Bob's rows changed
        assert read.status_code == 404, read.text
        assert why.status_code == 404, why.text
        assert read.json() == why.json() == {"detail": "no such notification"}
    assert all(n.read_at is None for n in await rows(api_settings, Notification))


async def test_a_held_back_notification_cannot_be_marked_read(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    ada, auth = await sign_up(api, "ada")
    [held] = await _insert(api_settings, _note(ada, 1, delivered=False))
    response = await api.post(f"/me/notifications/{held}/read", headers=auth)
    assert response.status_code == 404


async def test_openapi_documents_the_bearer_scheme_and_examples(
    api: httpx.AsyncClient,
) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, method in (("/me/notifications", "get"),
                         ("/me/notifications/{notification_id}/why", "get"),
                         ("/me/notifications/read-all", "post")):
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"HTTPBearer": []}]
        assert "401" in operation["responses"]
    schemas = spec["components"]["schemas"]
    for name in ("NotificationPage", "NotificationWhy", "MarkedRead", "LoginAccepted"):
        assert schemas[name]["examples"], name
