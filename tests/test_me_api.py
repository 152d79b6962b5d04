"""Sign-up's profile fields and ``/me``: profile, preferences, channel preferences, devices and
presence, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from herald.db import make_engine, session_factory
from herald.models import (
    ApiToken,
    ChannelPreferences,
    Device,
    OutboxEvent,
    User,
    UserPreferences,
    as_utc,
    utcnow,
)
from herald.phones import normalise_phone
from herald.settings import Settings
from producer.auth import hash_token
from tests.harness import rows
from topology.live import LiveHub

PASSWORD = "correct horse battery"
IOS_TOKEN = "ab" * 32
WEB_SUB = {"endpoint": "https://push.example.com/wpush/v2/abcdef123456",
           "keys": {"p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQ",
                    "auth": "tBHItJI5svbpez7KI4CCXg"}}
DEFAULT_PREFS = {"dnd": None, "snooze_until": None, "dnd_override_allowed": True,
                 "thread_everything": False, "desktop": "mentions", "mobile": "mentions",
                 "highlight_words": [], "sms_login_alerts": False}


@pytest.fixture
def api_settings(database_url: str, make_settings: Callable[..., Settings]) -> Settings:
    """Settings on the parametrised database (SQLite, then PostgreSQL)."""
    return make_settings()


@pytest.fixture
def changed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The routing keys of the cache invalidations the API publishes (recorded, not sent)."""
    keys: list[str] = []

    async def publish(_self: LiveHub, routing_key: str, _body: dict[str, Any]) -> bool:
        keys.append(routing_key)
        return True

    monkeypatch.setattr(LiveHub, "publish", publish)
    return keys


async def _signup(api: httpx.AsyncClient, name: str, **extra: Any) -> httpx.Response:
    return await api.post("/signup", json={"email": f"{name}@example.com", "password": PASSWORD,
                                           "name": name.title(), **extra})


async def _login(api: httpx.AsyncClient, name: str, **extra: Any) -> tuple[str, dict[str, str]]:
    """Sign ``name`` up and log in through the API; their id and ``Authorization`` header."""
    signup = await _signup(api, name, **extra)
    assert signup.status_code == 201, signup.text
    login = await api.post("/login", json={"email": f"{name}@example.com", "password": PASSWORD})
    assert login.status_code == 200, login.text
    return login.json()["user"]["id"], {"Authorization": f"Bearer {login.json()['access_token']}"}


async def _user(settings: Settings, name: str, **fields: Any) -> tuple[str, dict[str, str]]:
    """A user ``name`` (handle ``name``) and a token, written straight to the database.

    Skips argon2 (two hashes per user through /signup and /login), which is
    most of a test's time; the sign-up and login tests go through the API.
    """
    user = User(email=f"{name}@example.com", name=name.title(), handle=name,
                password_hash="unused", **fields)
    token = f"token-{user.id}"
    await insert(settings, user, ApiToken(token_hash=hash_token(token), user_id=user.id,
                                          expires_at=utcnow() + timedelta(hours=1)))
    return user.id, {"Authorization": f"Bearer {token}"}


async def insert(settings: Settings, *new: Any) -> None:
    """Commit ``new`` rows through a connection of the test's own."""
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            for row in new:
                session.add(row)
                await session.flush()
    finally:
        await engine.dispose()


def _fields(response: httpx.Response) -> list[Any]:
    assert response.status_code == 422, response.text
    return [err["loc"][-1] for err in response.json()["detail"]]


# --- phone numbers (pure) ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "e164"), [
    ("+14155550100", "+14155550100"),
    ("+1 (415) 555-0100", "+14155550100"),
    ("  +33 6 12 34 56 78 ", "+33612345678"),
    ("+44 20 7946 0958", "+442079460958"),
    ("+49 30 123456", "+4930123456"),
])
def test_phone_numbers_are_normalised_to_e164(text: str, e164: str) -> None:
    assert normalise_phone(text) == e164


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("0612345678", "must start with +"),
    ("14155550100", "must start with +"),
    ("+1 415", "not a valid phone number"),
    ("+999 1234567", "country code"),
    ("+1 abc", "not a phone number"),
    ("+" + "1" * 50, "longer than"),
])
def test_bad_phone_numbers_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalise_phone(text)


# --- sign-up -----------------------------------------------------------------------------


async def test_signup_stores_handle_phone_locale_and_zone_and_events_carry_them(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # When Ada signs up with every profile field, in loose spellings
    response = await _signup(api, "ada", handle=" Ada.L ", phone="+44 20 7946 0958",
                             locale="en_GB", timezone="europe/london")
    # Then they are stored normalised and shown in full to her
    assert response.status_code == 201, response.text
    user = response.json()["user"]
    assert user == {"id": user["id"], "email": "ada@example.com", "name": "Ada",
                    "handle": "ada.l", "phone": "+442079460958", "locale": "en-gb",
                    "timezone": "Europe/London"}
    [row] = await rows(api_settings, User)
    assert (row.handle, row.phone, row.locale, row.timezone) == (
        "ada.l", "+442079460958", "en-gb", "Europe/London")
    # And the signup and login events' recipient carries the phone and the locale
    await api.post("/login", json={"email": "ada@example.com", "password": PASSWORD})
    events: list[OutboxEvent] = await rows(api_settings, OutboxEvent)
    assert sorted(e.routing_key for e in events) == ["user.login", "user.signup"]
    for event in events:
        assert json.loads(event.body)["recipients"] == [{
            "user_id": row.id, "email": "ada@example.com", "name": "Ada",
            "phone": "+442079460958", "locale": "en-gb"}]


async def test_signup_defaults(api: httpx.AsyncClient) -> None:
    user = (await _signup(api, "ada")).json()["user"]
    assert (user["handle"], user["phone"], user["locale"], user["timezone"]) == (
        "ada", None, "en", "UTC")


@pytest.mark.parametrize(("emails", "handles"), [
    (["Ada.Lovelace+news@example.com"], ["ada.lovelacenews"]),
    (["ada@a.example", "ada@b.example", "ADA@c.example"], ["ada", "ada2", "ada3"]),
    (["x@example.com", "x@example.org"], ["x2", "x3"]),
    (["here@example.com", "channel@example.com"], ["here2", "channel2"]),
    (["__@example.com", "--@example.org"], ["user", "user2"]),
    (["_bob_@example.com"], ["bob"]),
    ([("a" * 60) + "@example.com"], ["a" * 36]),
])
async def test_a_missing_handle_is_derived_from_the_email_and_made_unique(
    api: httpx.AsyncClient, emails: list[str], handles: list[str]
) -> None:
    got = []
    for email in emails:
        response = await api.post("/signup", json={"email": email, "password": PASSWORD,
                                                   "name": "Someone"})
        assert response.status_code == 201, response.text
        got.append(response.json()["user"]["handle"])
    assert got == handles


async def test_a_derived_handle_skips_one_taken_explicitly(api: httpx.AsyncClient) -> None:
    assert (await _signup(api, "bob", handle="ada")).status_code == 201
    assert (await _signup(api, "ada")).json()["user"]["handle"] == "ada2"


async def test_a_taken_handle_is_409_whatever_its_case(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    assert (await _signup(api, "ada", handle="ada")).status_code == 201
    response = await _signup(api, "bob", handle="ADA")
    assert response.status_code == 409, response.text
    assert response.json() == {"detail": "handle already taken"}
    assert len(await rows(api_settings, User)) == 1
    assert len(await rows(api_settings, OutboxEvent)) == 1


@pytest.mark.parametrize(("extra", "field"), [
    ({"handle": "here"}, "handle"),
    ({"handle": "Everyone"}, "handle"),
    ({"handle": "channel"}, "handle"),
    ({"handle": "a"}, "handle"),
    ({"handle": "-ada"}, "handle"),
    ({"handle": "ada lovelace"}, "handle"),
    ({"handle": "a" * 41}, "handle"),
    ({"phone": "4155550100"}, "phone"),
    ({"phone": "+1 415"}, "phone"),
    ({"phone": "call me"}, "phone"),
    ({"locale": "english!"}, "locale"),
    ({"locale": "e"}, "locale"),
    ({"locale": "en-" + "x" * 20}, "locale"),
    ({"timezone": "Mars/Olympus"}, "timezone"),
    ({"timezone": "localtime"}, "timezone"),
    ({"timezone": "../etc/passwd"}, "timezone"),
])
async def test_signup_refuses_bad_profile_fields_naming_them(
    api: httpx.AsyncClient, api_settings: Settings, extra: dict[str, str], field: str
) -> None:
    response = await _signup(api, "ada", **extra)
    assert field in _fields(response)
    assert await rows(api_settings, User) == []


# --- /me ---------------------------------------------------------------------------------

ME_ROUTES = [
    ("GET", "/me"), ("PATCH", "/me"), ("GET", "/me/preferences"),
    ("PATCH", "/me/preferences"), ("GET", "/me/channels/c1/preferences"),
    ("PATCH", "/me/channels/c1/preferences"), ("POST", "/me/devices"),
    ("GET", "/me/devices"), ("DELETE", "/me/devices/d1"), ("POST", "/me/presence"),
    ("GET", "/me/presence"),
]


@pytest.mark.parametrize(("method", "path"), ME_ROUTES)
async def test_every_me_route_needs_a_token(
    api: httpx.AsyncClient, method: str, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        response = await api.request(method, path, headers=headers,
                                     json={} if method in ("PATCH", "POST") else None)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"


async def test_get_me_shows_the_own_record_in_full(api: httpx.AsyncClient) -> None:
    user_id, auth = await _login(api, "ada", phone="+14155550100", timezone="America/New_York")
    response = await api.get("/me", headers=auth)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": user_id, "email": "ada@example.com", "name": "Ada",
                               "handle": "ada", "phone": "+14155550100", "locale": "en",
                               "timezone": "America/New_York"}


async def test_patch_me_changes_only_what_is_given(
    api: httpx.AsyncClient, api_settings: Settings, changed: list[str]
) -> None:
    # Given Ada with a phone
    user_id, auth = await _user(api_settings, "ada", phone="+14155550100")
    # When she changes her handle, locale and zone
    response = await api.patch("/me", headers=auth, json={
        "handle": "Lovelace", "locale": "fr_CA", "timezone": "Europe/Paris"})
    # Then those change, the rest stays, and workers are told
    assert response.status_code == 200, response.text
    assert response.json() == {"id": user_id, "email": "ada@example.com", "name": "Ada",
                               "handle": "lovelace", "phone": "+14155550100",
                               "locale": "fr-ca", "timezone": "Europe/Paris"}
    assert changed == [f"user.{user_id}.changed"]
    # When she renames herself and removes her phone
    response = await api.patch("/me", headers=auth, json={"name": " Ada L ", "phone": None})
    assert response.status_code == 200, response.text
    assert (response.json()["name"], response.json()["phone"]) == ("Ada L", None)
    [row] = await rows(api_settings, User)
    assert (row.name, row.handle, row.phone, row.locale) == ("Ada L", "lovelace", None, "fr-ca")
    # And a new phone is normalised
    response = await api.patch("/me", headers=auth, json={"phone": "+33 6 12 34 56 78"})
    assert response.json()["phone"] == "+33612345678"
    # And GET /me agrees
    assert (await api.get("/me", headers=auth)).json() == response.json()


async def test_patch_me_to_a_taken_handle_is_409_and_to_ones_own_is_fine(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    await _user(api_settings, "bob")
    _, auth = await _user(api_settings, "ada")
    response = await api.patch("/me", headers=auth, json={"handle": "BOB"})
    assert response.status_code == 409, response.text
    assert response.json() == {"detail": "handle already taken"}
    response = await api.patch("/me", headers=auth, json={"handle": "ada"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("body", "field"), [
    ({"handle": "here"}, "handle"),
    ({"handle": "x"}, "handle"),
    ({"handle": None}, "handle"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": None}, "name"),
    ({"phone": "0612345678"}, "phone"),
    ({"locale": "12"}, "locale"),
    ({"locale": None}, "locale"),
    ({"timezone": "Nowhere/Town"}, "timezone"),
    ({"timezone": None}, "timezone"),
    ({"email": "new@example.com"}, "email"),
])
async def test_patch_me_refuses_bad_input_naming_the_field(
    api: httpx.AsyncClient, api_settings: Settings, body: dict[str, Any], field: str
) -> None:
    _, auth = await _user(api_settings, "ada")
    assert field in _fields(await api.patch("/me", headers=auth, json=body))
    [row] = await rows(api_settings, User)
    assert (row.name, row.handle, row.locale) == ("Ada", "ada", "en")


# --- preferences -------------------------------------------------------------------------


async def test_preferences_are_the_defaults_until_written(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, auth = await _user(api_settings, "ada")
    response = await api.get("/me/preferences", headers=auth)
    assert response.status_code == 200, response.text
    assert response.json() == DEFAULT_PREFS
    assert await rows(api_settings, UserPreferences) == []


async def test_preferences_patch_is_partial_and_creates_the_row(
    api: httpx.AsyncClient, api_settings: Settings, changed: list[str]
) -> None:
    user_id, auth = await _user(api_settings, "ada")
    # When Ada sets a DnD window, desktop pref and highlight words
    response = await api.patch("/me/preferences", headers=auth, json={
        "dnd": {"start": "22:00", "end": "07:00"}, "desktop": "all",
        "highlight_words": [" deploy ", "Outage", "outage", "DEPLOY", "on-call"]})
    assert response.status_code == 200, response.text
    expected = {**DEFAULT_PREFS, "dnd": {"start": "22:00", "end": "07:00"}, "desktop": "all",
                "highlight_words": ["deploy", "Outage", "on-call"]}
    assert response.json() == expected
    [row] = await rows(api_settings, UserPreferences)
    assert (row.user_id, row.dnd_start, row.dnd_end) == (user_id, "22:00", "07:00")
    assert json.loads(row.highlight_words) == ["deploy", "Outage", "on-call"]
    assert changed == [f"user.{user_id}.changed"]
    # When she changes two more, the earlier ones stay
    response = await api.patch("/me/preferences", headers=auth, json={
        "mobile": "dms", "sms_login_alerts": True, "thread_everything": True,
        "dnd_override_allowed": False})
    expected.update(mobile="dms", sms_login_alerts=True, thread_everything=True,
                    dnd_override_allowed=False)
    assert response.json() == expected
    assert (await api.get("/me/preferences", headers=auth)).json() == expected
    # And dnd: null switches the window off, and an empty list clears the words
    response = await api.patch("/me/preferences", headers=auth,
                               json={"dnd": None, "highlight_words": []})
    expected.update(dnd=None, highlight_words=[])
    assert response.json() == expected
    [row] = await rows(api_settings, UserPreferences)
    assert (row.dnd_start, row.dnd_end, row.highlight_words) == (None, None, "[]")
    # And an empty body changes nothing
    assert (await api.patch("/me/preferences", headers=auth, json={})).json() == expected


async def test_snooze_by_minutes_or_until_a_time(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, auth = await _user(api_settings, "ada")
    # snooze_minutes: now + 90 minutes (bounded by the clock around the call)
    before = datetime.now(UTC)
    response = await api.patch("/me/preferences", headers=auth, json={"snooze_minutes": 90})
    after = datetime.now(UTC)
    assert response.status_code == 200, response.text
    until = datetime.fromisoformat(response.json()["snooze_until"])
    assert before + timedelta(minutes=90) <= until <= after + timedelta(minutes=90)
    stored = (await api.get("/me/preferences", headers=auth)).json()["snooze_until"]
    assert datetime.fromisoformat(stored) == until
    # snooze_until with an offset: stored as that instant
    response = await api.patch("/me/preferences", headers=auth,
                               json={"snooze_until": "2031-01-02T03:04:05+02:00"})
    assert datetime.fromisoformat(response.json()["snooze_until"]) == datetime(
        2031, 1, 2, 1, 4, 5, tzinfo=UTC)
    # null: snoozing stops
    response = await api.patch("/me/preferences", headers=auth, json={"snooze_until": None})
    assert response.json()["snooze_until"] is None


@pytest.mark.parametrize(("body", "field"), [
    ({"dnd": {"start": "22:00", "end": "22:00"}}, "dnd"),
    ({"dnd": {"start": "24:00", "end": "07:00"}}, "start"),
    ({"dnd": {"start": "22:00", "end": "7:00"}}, "end"),
    ({"dnd": {"start": "22:00"}}, "end"),
    ({"snooze_until": "2031-01-02T03:04:05"}, "snooze_until"),
    ({"snooze_minutes": 0}, "snooze_minutes"),
    ({"snooze_minutes": 1441}, "snooze_minutes"),
    ({"snooze_minutes": None}, "snooze_minutes"),
    ({"snooze_minutes": 5, "snooze_until": "2031-01-02T03:04:05Z"}, "snooze_minutes"),
    ({"desktop": "everything"}, "desktop"),
    ({"mobile": "sometimes"}, "mobile"),
    ({"desktop": None}, "desktop"),
    ({"thread_everything": None}, "thread_everything"),
    ({"highlight_words": ["ok", "  "]}, "highlight_words"),
    ({"highlight_words": ["x" * 51]}, "highlight_words"),
    ({"highlight_words": [f"w{i}" for i in range(51)]}, "highlight_words"),
    ({"highlight_words": None}, "highlight_words"),
    ({"muted": True}, "muted"),
])
async def test_preferences_refuse_bad_input_naming_the_field(
    api: httpx.AsyncClient, api_settings: Settings, body: dict[str, Any], field: str
) -> None:
    _, auth = await _user(api_settings, "ada")
    assert field in _fields(await api.patch("/me/preferences", headers=auth, json=body))
    assert await rows(api_settings, UserPreferences) == []


async def test_fifty_highlight_words_are_fine(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, auth = await _user(api_settings, "ada")
    response = await api.patch("/me/preferences", headers=auth,
                               json={"highlight_words": [f"w{i}" for i in range(50)]})
    assert response.status_code == 200, response.text
    assert len(response.json()["highlight_words"]) == 50


# --- channel preferences -----------------------------------------------------------------


async def _channel(api: httpx.AsyncClient, auth: dict[str, str], *member_ids: str) -> str:
    response = await api.post("/channels", headers=auth,
                              json={"name": "general", "member_ids": list(member_ids)})
    assert response.status_code == 201, response.text
    channel_id: str = response.json()["id"]
    return channel_id


async def test_channel_preferences_default_then_partial_update(
    api: httpx.AsyncClient, api_settings: Settings, changed: list[str]
) -> None:
    user_id, auth = await _user(api_settings, "ada")
    channel_id = await _channel(api, auth)
    path = f"/me/channels/{channel_id}/preferences"
    defaults = {"channel_id": channel_id, "muted": False, "suppress_channel_mentions": False,
                "desktop": "default", "mobile": "default"}
    response = await api.get(path, headers=auth)
    assert response.status_code == 200, response.text
    assert response.json() == defaults
    response = await api.patch(path, headers=auth, json={"muted": True, "mobile": "mentions"})
    assert response.status_code == 200, response.text
    assert response.json() == {**defaults, "muted": True, "mobile": "mentions"}
    response = await api.patch(path, headers=auth, json={"suppress_channel_mentions": True,
                                                         "desktop": "nothing"})
    expected = {**defaults, "muted": True, "mobile": "mentions",
                "suppress_channel_mentions": True, "desktop": "nothing"}
    assert response.json() == expected
    assert (await api.get(path, headers=auth)).json() == expected
    [row] = await rows(api_settings, ChannelPreferences)
    assert (row.user_id, row.channel_id, row.muted, row.desktop) == (
        user_id, channel_id, True, "nothing")
    assert changed == [f"user.{user_id}.changed"] * 2


@pytest.mark.parametrize("method", ["GET", "PATCH"])
async def test_channel_preferences_of_unknown_or_foreign_channels(
    api: httpx.AsyncClient, api_settings: Settings, method: str
) -> None:
    _, ada = await _user(api_settings, "ada")
    _, bob = await _user(api_settings, "bob")
    channel_id = await _channel(api, ada)
    unknown = await api.request(method, "/me/channels/nope/preferences", headers=bob,
                                json={"muted": True} if method == "PATCH" else None)
    assert unknown.status_code == 404, unknown.text
    foreign = await api.request(method, f"/me/channels/{channel_id}/preferences", headers=bob,
                                json={"muted": True} if method == "PATCH" else None)
    assert foreign.status_code == 403, foreign.text


@pytest.mark.parametrize(("body", "field"), [
    ({"desktop": "all"}, "desktop"), ({"mobile": "never"}, "mobile"),
    ({"muted": None}, "muted"), ({"muted": "loud"}, "muted"), ({"dnd": None}, "dnd")])
async def test_channel_preferences_refuse_bad_input(
    api: httpx.AsyncClient, api_settings: Settings, body: dict[str, Any], field: str
) -> None:
    _, auth = await _user(api_settings, "ada")
    channel_id = await _channel(api, auth)
    response = await api.patch(f"/me/channels/{channel_id}/preferences", headers=auth, json=body)
    assert field in _fields(response)


# --- devices -----------------------------------------------------------------------------


@pytest.mark.parametrize(("platform", "token", "stored", "masked"), [
    ("ios", IOS_TOKEN.upper(), IOS_TOKEN, "…" + IOS_TOKEN[-6:]),
    ("android", " fcm:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx ",
     "fcm:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx", "…-1RYqx"),
    ("web", WEB_SUB, json.dumps(WEB_SUB, separators=(",", ":")), "…123456"),
    ("web", json.dumps({**WEB_SUB, "expirationTime": None}, indent=2),
     json.dumps(WEB_SUB, separators=(",", ":")), "…123456"),
    ("web", {**WEB_SUB, "endpoint": "http://127.0.0.1:8080/push/abc"},
     json.dumps({**WEB_SUB, "endpoint": "http://127.0.0.1:8080/push/abc"},
                separators=(",", ":")), "…sh/abc"),
])
async def test_register_a_device(
    api: httpx.AsyncClient, api_settings: Settings, changed: list[str],
    platform: str, token: Any, stored: str, masked: str
) -> None:
    user_id, auth = await _user(api_settings, "ada")
    response = await api.post("/me/devices", headers=auth,
                              json={"platform": platform, "token": token, "name": "phone"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["platform"], body["token"], body["name"]) == (platform, masked, "phone")
    [row] = await rows(api_settings, Device)
    assert (row.id, row.user_id, row.token) == (body["id"], user_id, stored)
    assert row.token_hash == hashlib.sha256(stored.encode()).hexdigest()
    assert changed == [f"user.{user_id}.changed"]
    listed = await api.get("/me/devices", headers=auth)
    assert listed.status_code == 200 and listed.json() == [body]
    assert stored not in listed.text


@pytest.mark.parametrize(("body", "field"), [
    ({"platform": "ios", "token": "ab" * 31}, "token"),
    ({"platform": "ios", "token": "zz" * 32}, "token"),
    ({"platform": "android", "token": "  "}, "token"),
    ({"platform": "android", "token": "a" * 4097}, "token"),
    ({"platform": "android", "token": "has space"}, "token"),
    ({"platform": "android", "token": {"x": 1}}, "token"),
    ({"platform": "web", "token": "not json"}, "token"),
    ({"platform": "web", "token": "[]"}, "token"),
    ({"platform": "web", "token": {**WEB_SUB, "endpoint": "http://push.example.com/x"}},
     "token"),
    ({"platform": "web", "token": {**WEB_SUB, "endpoint": "ftp://push.example.com/x"}},
     "token"),
    ({"platform": "web", "token": {**WEB_SUB, "endpoint": "https://"}}, "token"),
    ({"platform": "web", "token": {"endpoint": WEB_SUB["endpoint"]}}, "token"),
    ({"platform": "web", "token": {**WEB_SUB, "keys": {"p256dh": "ok"}}}, "token"),
    ({"platform": "web", "token": {**WEB_SUB, "keys": {"p256dh": "a b", "auth": "x"}}},
     "token"),
    ({"platform": "blackberry", "token": "x"}, "platform"),
    ({"platform": "ios", "token": IOS_TOKEN, "name": "x" * 101}, "name"),
    ({"platform": "ios"}, "token"),
])
async def test_bad_devices_are_422_naming_the_field(
    api: httpx.AsyncClient, api_settings: Settings, body: dict[str, Any], field: str
) -> None:
    _, auth = await _user(api_settings, "ada")
    assert field in _fields(await api.post("/me/devices", headers=auth, json=body))
    assert await rows(api_settings, Device) == []


async def test_a_registered_token_moves_to_whoever_registers_it(
    api: httpx.AsyncClient, api_settings: Settings, changed: list[str]
) -> None:
    # Given Ada's iPhone
    ada_id, ada = await _user(api_settings, "ada")
    bob_id, bob = await _user(api_settings, "bob")
    first = await api.post("/me/devices", headers=ada,
                           json={"platform": "ios", "token": IOS_TOKEN, "name": "iPhone"})
    assert first.status_code == 201
    # When Ada registers it again: 200, the same row, renamed
    again = await api.post("/me/devices", headers=ada,
                           json={"platform": "ios", "token": IOS_TOKEN.upper(), "name": "Mine"})
    assert again.status_code == 200, again.text
    assert (again.json()["id"], again.json()["name"]) == (first.json()["id"], "Mine")
    # When Bob signs in on that phone and registers the same token
    moved = await api.post("/me/devices", headers=bob,
                           json={"platform": "ios", "token": IOS_TOKEN})
    # Then 200: the token is Bob's now, Ada's row is gone
    assert moved.status_code == 200, moved.text
    [row] = await rows(api_settings, Device)
    assert (row.id, row.user_id) == (moved.json()["id"], bob_id)
    assert (await api.get("/me/devices", headers=ada)).json() == []
    assert [d["id"] for d in (await api.get("/me/devices", headers=bob)).json()] == [row.id]
    # And both users' caches are invalidated
    assert changed[-2:] == [f"user.{bob_id}.changed", f"user.{ada_id}.changed"]
    # While the same token on another platform is another device
    other = await api.post("/me/devices", headers=ada,
                           json={"platform": "android", "token": IOS_TOKEN})
    assert other.status_code == 201, other.text
    assert len(await rows(api_settings, Device)) == 2


async def test_delete_a_device_only_ones_own(
    api: httpx.AsyncClient, api_settings: Settings, changed: list[str]
) -> None:
    ada_id, ada = await _user(api_settings, "ada")
    _, bob = await _user(api_settings, "bob")
    created = await api.post("/me/devices", headers=ada,
                             json={"platform": "android", "token": "token-1"})
    device_id = created.json()["id"]
    # Bob cannot delete it (nor learn it exists), nor can anyone delete what does not exist
    assert (await api.delete(f"/me/devices/{device_id}", headers=bob)).status_code == 404
    assert (await api.delete("/me/devices/nope", headers=ada)).status_code == 404
    assert len(await rows(api_settings, Device)) == 1
    # Ada can
    response = await api.delete(f"/me/devices/{device_id}", headers=ada)
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert await rows(api_settings, Device) == []
    assert changed == [f"user.{ada_id}.changed"] * 2
    assert (await api.delete(f"/me/devices/{device_id}", headers=ada)).status_code == 404


async def test_devices_list_only_the_callers(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, ada = await _user(api_settings, "ada")
    _, bob = await _user(api_settings, "bob")
    await api.post("/me/devices", headers=ada, json={"platform": "android", "token": "t-ada"})
    await api.post("/me/devices", headers=bob, json={"platform": "android", "token": "t-bob"})
    assert [d["token"] for d in (await api.get("/me/devices", headers=ada)).json()] == ["…t-ada"]


# --- presence ----------------------------------------------------------------------------


async def test_presence_heartbeat(api: httpx.AsyncClient, api_settings: Settings) -> None:
    _, auth = await _user(api_settings, "ada")
    # Before the first heartbeat: never
    response = await api.get("/me/presence", headers=auth)
    assert response.status_code == 200 and response.json() == {"last_active_at": None}
    # A heartbeat records now
    before = datetime.now(UTC)
    beat = await api.post("/me/presence", headers=auth)
    after = datetime.now(UTC)
    assert beat.status_code == 200, beat.text
    at = datetime.fromisoformat(beat.json()["last_active_at"])
    assert before <= at <= after
    [row] = await rows(api_settings, User)
    assert row.last_active_at is not None
    assert as_utc(row.last_active_at) == at
    assert datetime.fromisoformat(
        (await api.get("/me/presence", headers=auth)).json()["last_active_at"]) == at
    # The next one moves it forward
    later = datetime.fromisoformat((await api.post("/me/presence", headers=auth))
                                   .json()["last_active_at"])
    assert later >= at
