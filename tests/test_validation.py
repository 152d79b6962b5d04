"""``herald.validation`` (names, addresses, text, event data) and the API refusing, with a 422
naming the field, what a worker could not deliver or PostgreSQL could not store.

The API tests run on SQLite and PostgreSQL: NUL characters and ids past 32 bits were 500s
on PostgreSQL only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

from herald.db import make_engine, session_factory
from herald.models import ApiToken, Channel, OutboxEvent, Post, User, utcnow
from herald.settings import Settings
from herald.validation import (
    MAX_EMAIL,
    display_name,
    email_address,
    one_line,
    storable_json,
    text,
)
from producer.auth import hash_token
from producer.schemas import MAX_DB_INT
from tests.harness import PASSWORD, rows

TOKEN = "s3rvice-t0ken-for-validation"
SERVICE = {"Authorization": f"Bearer {TOKEN}"}
#: In every refused value below: a message that contains it echoed the input.
SECRET = "Zq7secret"


# --- display_name --------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("Ada", "Ada"),
    ("  Ada Lovelace \t", "Ada Lovelace"),
    ("Zoë Brontë", "Zoë Brontë"),
    ("José 😀", "José 😀"),
    ("👩‍💻 Ada", "👩‍💻 Ada"),  # ZWJ sequences keep their joiner
    ("李小龍", "李小龍"),
    ('Ada "the countess" & co.', 'Ada "the countess" & co.'),
    ("x" * 200, "x" * 200),
])
def test_display_name_accepts(raw: str, expected: str) -> None:
    assert display_name(raw) == expected
    assert display_name(display_name(raw)) == expected
    # What the email worker will build from it: encodes and serialises.
    message = EmailMessage()
    message["To"] = Address(display_name=expected, addr_spec="ada@example.com")
    assert message.as_bytes()


@pytest.mark.parametrize(("raw", "why"), [
    ("", "blank"), ("   ", "blank"), ("\t\n", "blank"),
    (f"{SECRET}\r\nBcc: x@example.com", "U+000D"),
    (f"{SECRET}\nx", "U+000A"),
    (f"{SECRET}\tx", "U+0009"),
    (f"{SECRET}\x00", "U+0000"),
    (f"{SECRET}\x7f", "U+007F"),
    (f"{SECRET}\x85x", "U+0085"),
    (f"{SECRET}\u2028x", "U+2028"),
    (f"{SECRET}\u2029x", "U+2029"),
    (f"{SECRET}\ud800x", "U+D800"),
    (f"{SECRET} <x@example.com>", "'<'"),
    (f"{SECRET}>", "'>'"),
    (SECRET + "x" * 200, "longer than 200"),
])
def test_display_name_refuses_without_echoing(raw: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)) as caught:
        display_name(raw)
    assert SECRET not in str(caught.value)


def test_display_name_has_a_configurable_bound() -> None:
    assert display_name("x" * 80, max_length=80) == "x" * 80
    with pytest.raises(ValueError, match="longer than 80"):
        display_name("x" * 81, max_length=80)


# --- email_address ---------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("ada@example.com", "ada@example.com"),
    ("  ada@example.com ", "ada@example.com"),
    ("Ada.Lovelace@Example.COM", "Ada.Lovelace@example.com"),  # the local part keeps its case
    ("ada+news@example.com", "ada+news@example.com"),
    ("o'brien@example.co.uk", "o'brien@example.co.uk"),
    ("ada@bücher.de", "ada@xn--bcher-kva.de"),
    ("ada@BÜCHER.de", "ada@xn--bcher-kva.de"),
    ("ada@xn--bcher-kva.de", "ada@xn--bcher-kva.de"),
    ("info@例え.jp", "info@xn--r8jz45g.jp"),
])
def test_email_address_accepts_what_plain_smtp_delivers(raw: str, expected: str) -> None:
    assert email_address(raw) == expected
    assert email_address(expected) == expected  # idempotent: the worker checks again
    assert Address(addr_spec=expected).addr_spec == expected
    assert expected.isascii() and len(expected) <= MAX_EMAIL


@pytest.mark.parametrize(("raw", "why"), [
    ("", "blank"),
    (SECRET, "an @"),
    (f"{SECRET}@", "an @"),
    (f"@{SECRET}.com", "an @"),
    (f"jösé{SECRET}@example.com", "ASCII"),
    (f"{SECRET}ü@bücher.de", "ASCII"),
    (f"{SECRET}\r\n@example.com", "line break"),
    (f"{SECRET}\x00@example.com", "NUL"),
    (f"{SECRET} x@example.com", "deliverable"),
    (f'"{SECRET} x"@example.com', "deliverable"),  # quoted local parts: not deliverable here
    (f"{SECRET}..x@example.com", "deliverable"),
    (f"{SECRET}@example", "deliverable"),
    (f"{SECRET}@localhost", "deliverable"),
    (f"{SECRET}@[127.0.0.1]", "deliverable"),
    (f"Ada <{SECRET}@example.com>", "deliverable"),
    (f"{SECRET}@" + "a" * 250 + ".com", "longer than 254"),
    (f"{SECRET}@" + "ü" * 60 + ".de", "deliverable"),  # a label past 63 octets in ASCII
])
def test_email_address_refuses_without_echoing(raw: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)) as caught:
        email_address(raw)
    assert SECRET not in str(caught.value) and "ü" not in str(caught.value)


# --- text, one_line ----------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "multiline", "expected"), [
    ("hello", False, "hello"),
    ("  spaced  ", False, "  spaced  "),  # text is not stripped
    ("é 😀 中文", False, "é 😀 中文"),
    ("line 1\nline 2\tcol", True, "line 1\nline 2\tcol"),
    ("windows\r\nline\rmac", True, "windows\nline\nmac"),
    ("", True, ""),
])
def test_text_accepts(raw: str, multiline: bool, expected: str) -> None:
    assert text(raw, multiline=multiline) == expected
    assert text(expected, multiline=multiline) == expected


@pytest.mark.parametrize(("raw", "multiline", "why"), [
    (f"{SECRET}\x00", True, "NUL"),
    (f"{SECRET}\x00", False, "NUL"),
    (f"{SECRET}\x1b[31m", True, "U+001B"),
    (f"{SECRET}\x0b", True, "U+000B"),
    (f"{SECRET}\x0c", True, "U+000C"),
    (f"{SECRET}\x7f", True, "U+007F"),
    (f"{SECRET}\x9b", True, "U+009B"),
    (f"{SECRET}\u2028", True, "U+2028"),
    (f"{SECRET}\udfff", True, "surrogate"),
    (f"{SECRET}\n", False, "U+000A"),
    (f"{SECRET}\r", False, "U+000D"),
    (f"{SECRET}\t", False, "U+0009"),
])
def test_text_refuses_without_echoing(raw: str, multiline: bool, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)) as caught:
        text(raw, multiline=multiline)
    assert SECRET not in str(caught.value)
    assert f"position {len(SECRET) + 1}" in str(caught.value)


def test_text_bounds_the_length_after_normalising_newlines() -> None:
    assert text("a\r\n" * 5, multiline=True, max_length=10) == "a\n" * 5
    with pytest.raises(ValueError, match="longer than 9"):
        text("a\r\n" * 5, multiline=True, max_length=9)


def test_one_line_is_text_without_line_breaks() -> None:
    assert one_line("3f2a9c4e-1b7d") == "3f2a9c4e-1b7d"
    with pytest.raises(ValueError, match=re.escape("U+0000")):
        one_line("3f2a\x00")


# --- storable_json ----------------------------------------------------------------------------


def test_storable_json_keeps_anything_storable_unchanged() -> None:
    data = {"title": "é\n\t\x1b ok", "n": 1, "x": 1.5, "ok": True, "none": None,
            "list": [{"deep": ["a", ["b"]]}], "": "empty key"}
    assert storable_json(data) is data


@pytest.mark.parametrize(("data", "where"), [
    ({"title": f"{SECRET}\x00"}, "data.title contains a NUL"),
    ({"items": [1, {"b c": ["x", f"{SECRET}\x00"]}]}, 'data.items[1]["b c"][1] contains a NUL'),
    ({"outer": {f"{SECRET}\x00": 1}}, "a key of data.outer contains a NUL"),
    ({f"{SECRET}\x00": 1}, "a key of data contains a NUL"),
    ({"s": f"{SECRET}\ud83d"}, "data.s contains an unpaired surrogate"),
])
def test_storable_json_names_the_path_not_the_value(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ValueError) as caught:
        storable_json(data)
    assert str(caught.value).startswith(where), caught.value
    assert SECRET not in str(caught.value)


def test_storable_json_walks_any_depth_without_recursing() -> None:
    deep: Any = "\x00"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match=r"^data(\[0\]){5000} contains a NUL"):
        storable_json(deep)


# --- the API, on SQLite and PostgreSQL ------------------------------------------------------


@pytest.fixture
def api_settings(database_url: str, make_settings: Callable[..., Settings]) -> Settings:
    """Settings on the parametrised database, with a service token for ``/events``."""
    return make_settings(service_token=TOKEN)


async def _user(settings: Settings, handle: str, **fields: Any) -> tuple[str, dict[str, str]]:
    """A user and a bearer token written straight to the database (no argon2: fast)."""
    user = User(**{"email": f"{handle}@example.com", "name": handle.title(), "handle": handle,
                   "password_hash": "unused", **fields})
    token = f"token-{user.id}"
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            session.add(user)
            await session.flush()
            session.add(ApiToken(token_hash=hash_token(token), user_id=user.id,
                                 expires_at=utcnow() + timedelta(hours=1)))
    finally:
        await engine.dispose()
    return user.id, {"Authorization": f"Bearer {token}"}


def _refused(response: httpx.Response) -> list[list[Any]]:
    """The ``loc`` of each error of a 422 (which must not echo the input)."""
    assert response.status_code == 422, response.text
    assert SECRET not in response.text, response.text
    return [err["loc"] for err in response.json()["detail"]]


def _signup(**fields: Any) -> dict[str, Any]:
    return {"email": "ada@example.com", "password": PASSWORD, "name": "Ada", **fields}


@pytest.mark.parametrize(("fields", "loc"), [
    ({"name": f"{SECRET}\r\nBcc: victim@example.com"}, ["body", "name"]),
    ({"name": f"{SECRET}\nx"}, ["body", "name"]),
    ({"name": f"{SECRET}\x00"}, ["body", "name"]),
    ({"name": f"{SECRET} <evil@example.com>"}, ["body", "name"]),
    ({"email": f"jösé{SECRET}@example.com"}, ["body", "email"]),
    ({"email": f"{SECRET}\x00@example.com"}, ["body", "email"]),
    ({"email": f"{SECRET}\r\n@example.com"}, ["body", "email"]),
])
async def test_signup_refuses_what_cannot_be_mailed(
    api: httpx.AsyncClient, api_settings: Settings, fields: dict[str, Any], loc: list[Any]
) -> None:
    response = await api.post("/signup", json=_signup(**fields))
    assert _refused(response) == [loc]
    assert await rows(api_settings, User) == []
    assert await rows(api_settings, OutboxEvent) == []


async def test_signup_stores_an_idn_domain_in_ascii_and_a_unicode_name_as_given(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # When Zoë signs up with an internationalised domain and an emoji in her name
    response = await api.post("/signup", json=_signup(email="Zoe@Bücher.DE", name=" Zoë 😀 "))
    # Then the address is stored (and mailed) in ASCII form, lowercased; the name as typed
    assert response.status_code == 201, response.text
    assert response.json()["user"]["email"] == "zoe@xn--bcher-kva.de"
    [user] = await rows(api_settings, User)
    assert (user.email, user.name) == ("zoe@xn--bcher-kva.de", "Zoë 😀")
    [event] = await rows(api_settings, OutboxEvent)
    [recipient] = json.loads(event.body)["recipients"]
    assert (recipient["email"], recipient["name"]) == ("zoe@xn--bcher-kva.de", "Zoë 😀")
    # And she logs in with the address written either way
    for typed in ("zoe@bücher.de", "ZOE@xn--bcher-kva.de"):
        login = await api.post("/login", json={"email": typed, "password": PASSWORD})
        assert login.status_code == 200, login.text


async def test_login_refuses_an_undeliverable_address_as_422(api: httpx.AsyncClient) -> None:
    response = await api.post("/login", json={"email": f"jösé{SECRET}@example.com",
                                              "password": PASSWORD})
    assert _refused(response) == [["body", "email"]]


@pytest.mark.parametrize("name", [f"{SECRET}\nx", f"{SECRET}\x00", f"{SECRET}\u2028x"])
async def test_a_profile_name_is_checked_like_a_signup_name(
    api: httpx.AsyncClient, api_settings: Settings, name: str
) -> None:
    _, auth = await _user(api_settings, "ada")
    assert _refused(await api.patch("/me", headers=auth, json={"name": name})) == [
        ["body", "name"]]
    ok = await api.patch("/me", headers=auth, json={"name": "Ada Lovelace 👩‍💻"})
    assert ok.status_code == 200 and ok.json()["name"] == "Ada Lovelace 👩‍💻"


@pytest.mark.parametrize(("body", "loc"), [
    ({"highlight_words": ["deploy", f"{SECRET}\x00"]}, ["body", "highlight_words"]),
    ({"highlight_words": [f"{SECRET}\nx"]}, ["body", "highlight_words"]),
])
async def test_preferences_refuse_control_characters(
    api: httpx.AsyncClient, api_settings: Settings, body: dict[str, Any], loc: list[Any]
) -> None:
    _, auth = await _user(api_settings, "ada")
    assert _refused(await api.patch("/me/preferences", headers=auth, json=body)) == [loc]


@pytest.mark.parametrize(("body", "loc"), [
    ({"platform": "android", "token": f"{SECRET}\x00"}, ["body", "token"]),
    ({"platform": "android", "token": "fcm-token", "name": f"{SECRET}\x00"}, ["body", "name"]),
    ({"platform": "web", "token": {"endpoint": f"https://push.example.com/{SECRET}\x00",
                                   "keys": {"p256dh": "BNc", "auth": "tBH"}}},
     ["body", "token"]),
])
async def test_devices_refuse_control_characters(
    api: httpx.AsyncClient, api_settings: Settings, body: dict[str, Any], loc: list[Any]
) -> None:
    _, auth = await _user(api_settings, "ada")
    assert _refused(await api.post("/me/devices", headers=auth, json=body)) == [loc]


async def test_channel_names_and_ids_in_bodies_are_checked(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, auth = await _user(api_settings, "ada")
    bob, _ = await _user(api_settings, "bob")
    for body, loc in [
        ({"name": f"{SECRET}\x00"}, ["body", "name"]),
        ({"name": f"{SECRET}\r\nx"}, ["body", "name"]),
        ({"name": "general", "member_ids": [f"{SECRET}\x00"]}, ["body", "member_ids", 0]),
    ]:
        assert _refused(await api.post("/channels", headers=auth, json=body)) == [loc]
    created = await api.post("/channels", headers=auth,
                             json={"name": "café ☕", "member_ids": [bob]})
    assert created.status_code == 201, created.text
    channel_id = created.json()["id"]
    for path, body, loc in [
        (f"/channels/{channel_id}/members", {"user_id": f"{SECRET}\x00"}, ["body", "user_id"]),
        ("/friend-req", {"to_user_id": f"{SECRET}\x00"}, ["body", "to_user_id"]),
        ("/post", {"channel_id": f"{SECRET}\x00", "text": "hi"}, ["body", "channel_id"]),
        ("/post", {"channel_id": channel_id, "text": "hi", "thread_id": f"{SECRET}\x00"},
         ["body", "thread_id"]),
    ]:
        assert _refused(await api.post(path, headers=auth, json=body)) == [loc]
    assert [c.name for c in await rows(api_settings, Channel)] == ["café ☕"]


@pytest.mark.parametrize("raw_text", [
    f'"{SECRET}\\u0000"',  # NUL
    f'"{SECRET}\\ud800"',  # an unpaired surrogate: no UTF-8 for it
    f'"{SECRET}\\u001b[2J"',  # a terminal escape
])
async def test_post_text_refuses_what_cannot_be_stored_or_shown(
    api: httpx.AsyncClient, api_settings: Settings, raw_text: str
) -> None:
    _, auth = await _user(api_settings, "ada")
    bob, _ = await _user(api_settings, "bob")
    created = await api.post("/channels", headers=auth, json={"name": "g", "member_ids": [bob]})
    channel_id = created.json()["id"]
    # Raw JSON: the escapes reach the API as they are
    body = f'{{"channel_id": "{channel_id}", "text": {raw_text}}}'
    response = await api.post("/post", headers={**auth, "Content-Type": "application/json"},
                              content=body.encode())
    assert _refused(response) == [["body", "text"]]
    assert await rows(api_settings, Post) == []


async def test_post_text_keeps_lines_and_tabs_and_normalises_crlf(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, auth = await _user(api_settings, "ada")
    bob, _ = await _user(api_settings, "bob")
    created = await api.post("/channels", headers=auth, json={"name": "g", "member_ids": [bob]})
    response = await api.post("/post", headers=auth, json={
        "channel_id": created.json()["id"], "text": "line 1\r\n\tline 2 é 😀"})
    assert response.status_code == 201, response.text
    assert response.json()["post"]["text"] == "line 1\n\tline 2 é 😀"
    [post] = await rows(api_settings, Post)
    assert post.text == "line 1\n\tline 2 é 😀"


_EVENT: dict[str, Any] = {
    "type": "user.post", "actor": {"id": "billing", "name": "Billing"},
    "recipients": [{"user_id": "u-1", "email": "ada@example.com", "name": "Ada"}],
    "data": {"title": "Invoice ready"},
}


def _event(**changes: Any) -> dict[str, Any]:
    return {**_EVENT, **changes}


def _recipient(**changes: Any) -> list[dict[str, Any]]:
    return [{**_EVENT["recipients"][0], **changes}]


@pytest.mark.parametrize(("payload", "loc"), [
    (_event(recipients=_recipient(name=f"{SECRET}\r\nBcc: x@example.com")),
     ["body", "recipients", 0, "name"]),
    (_event(recipients=_recipient(name=f"{SECRET} <x@example.com>")),
     ["body", "recipients", 0, "name"]),
    (_event(recipients=_recipient(email=f"jösé{SECRET}@example.com")),
     ["body", "recipients", 0, "email"]),
    (_event(recipients=_recipient(user_id=f"{SECRET}\x00")),
     ["body", "recipients", 0, "user_id"]),
    (_event(recipients=_recipient(phone=f"{SECRET}\x00")), ["body", "recipients", 0, "phone"]),
    (_event(recipients=_recipient(locale=f"{SECRET}\x00")),
     ["body", "recipients", 0, "locale"]),
    (_event(actor={"id": "billing", "name": f"{SECRET}\n"}), None),  # trailing: stripped
    (_event(actor={"id": "billing", "name": f"{SECRET}\nx"}), ["body", "actor", "name"]),
    (_event(actor={"id": f"{SECRET}\x00"}), ["body", "actor", "id"]),
    (_event(data={"title": f"{SECRET}\x00"}), ["body", "data"]),
    (_event(data={"items": [{"deep": [f"{SECRET}\x00"]}]}), ["body", "data"]),
    (_event(data={f"{SECRET}\x00": "key"}), ["body", "data"]),
])
async def test_events_refuse_what_a_worker_could_not_deliver(
    api: httpx.AsyncClient, api_settings: Settings, payload: dict[str, Any],
    loc: list[Any] | None
) -> None:
    response = await api.post("/events", json=payload, headers=SERVICE)
    if loc is None:
        assert response.status_code == 202, response.text
        return
    assert _refused(response) == [loc]
    assert await rows(api_settings, OutboxEvent) == []


async def test_events_say_where_in_data_the_nul_is(api: httpx.AsyncClient) -> None:
    response = await api.post("/events", headers=SERVICE, json=_event(
        data={"items": [{"ok": "x"}, {"deep": [f"{SECRET}\x00"]}]}))
    [error] = response.json()["detail"]
    assert "data.items[1].deep[0] contains a NUL" in error["msg"], error


async def test_events_store_recipients_as_the_worker_will_mail_them(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    response = await api.post("/events", headers=SERVICE, json=_event(
        recipients=_recipient(email="Ada@Bücher.de", name=" José 😀 "),
        data={"text": "control\x1bcharacters\tin data are data"}))
    assert response.status_code == 202, response.text
    [row] = await rows(api_settings, OutboxEvent)
    body = json.loads(row.body)
    assert body["recipients"][0]["email"] == "Ada@xn--bcher-kva.de"
    assert body["recipients"][0]["name"] == "José 😀"
    assert body["data"]["text"] == "control\x1bcharacters\tin data are data"


@pytest.mark.parametrize(("method", "path", "loc"), [
    ("POST", f"/me/notifications/{2**40}/read", ["path", "notification_id"]),
    ("GET", f"/me/notifications/{2**40}/why", ["path", "notification_id"]),
    ("GET", f"/me/notifications/{MAX_DB_INT + 1}/why", ["path", "notification_id"]),
    ("GET", f"/me/notifications?before={2**40}", ["query", "before"]),
    ("GET", f"/me/notifications?before={MAX_DB_INT + 1}", ["query", "before"]),
    ("GET", "/channels/%00", ["path", "channel_id"]),
    ("GET", "/channels/a%0Ab/posts", ["path", "channel_id"]),
    ("GET", "/me/channels/%00/preferences", ["path", "channel_id"]),
    ("DELETE", "/me/devices/%00", ["path", "device_id"]),
    ("GET", "/me/events/%00/why", ["path", "event_id"]),
    ("POST", "/friend-req/%00/accept", ["path", "request_id"]),
    ("GET", "/users?handle=%00", ["query", "handle"]),
])
async def test_parameters_postgresql_cannot_take_are_422(
    api: httpx.AsyncClient, api_settings: Settings, method: str, path: str, loc: list[Any]
) -> None:
    _, auth = await _user(api_settings, "ada")
    response = await api.request(method, path, headers=auth)
    assert _refused(response) == [loc]


async def test_the_largest_integer_id_is_a_plain_404(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, auth = await _user(api_settings, "ada")
    for method, path in [("POST", f"/me/notifications/{MAX_DB_INT}/read"),
                         ("GET", f"/me/notifications/{MAX_DB_INT}/why")]:
        response = await api.request(method, path, headers=auth)
        assert response.status_code == 404, response.text
    page = await api.get(f"/me/notifications?before={MAX_DB_INT}", headers=auth)
    assert page.status_code == 200, page.text


async def test_a_post_cursor_with_a_nul_is_422(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, auth = await _user(api_settings, "ada")
    created = await api.post("/channels", headers=auth, json={"name": "g"})
    response = await api.get(f"/channels/{created.json()['id']}/posts?before=%00", headers=auth)
    assert _refused(response) == [["query", "before"]]


async def test_names_and_addresses_stored_before_the_checks_do_not_fail_events(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Given Ada's row from before names and addresses were checked at the door
    ada, ada_auth = await _user(api_settings, "ada", name="Ada\nLovelace <3",
                                email="jösé@example.com")
    bob, bob_auth = await _user(api_settings, "bob")
    created = await api.post("/channels", headers=bob_auth,
                             json={"name": "g", "member_ids": [ada]})
    channel_id = created.json()["id"]
    # When Bob posts to her and she posts to him
    for auth in (bob_auth, ada_auth):
        response = await api.post("/post", headers=auth, json={"channel_id": channel_id,
                                                               "text": "hi"})
        assert response.status_code == 201, response.text
    # Then both events go out, leaving out what no worker could use
    to_ada, from_ada = [json.loads(r.body) for r in sorted(
        await rows(api_settings, OutboxEvent), key=lambda r: r.created_at)]
    assert to_ada["recipients"] == [{"user_id": ada, "email": None, "name": None,
                                     "phone": None, "locale": "en"}]
    assert from_ada["actor"] == {"id": ada, "name": None}
    assert from_ada["recipients"][0]["user_id"] == bob
    assert from_ada["recipients"][0]["email"] == "bob@example.com"
