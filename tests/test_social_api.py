"""Channels, posts (``user.post``), friend requests (``user.send_req``) and user look-up, on
SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from herald.db import make_engine, session_factory
from herald.models import (
    ApiToken,
    ChannelMember,
    FriendRequest,
    OutboxEvent,
    Post,
    ThreadSubscription,
    User,
    utcnow,
)
from herald.settings import Settings
from producer.auth import hash_token
from tests.harness import rows

PASSWORD = "correct horse battery"


@pytest.fixture
def api_settings(database_url: str, make_settings: Callable[..., Settings]) -> Settings:
    """Settings on the parametrised database (SQLite, then PostgreSQL)."""
    return make_settings()


async def _user(settings: Settings, name: str, **fields: Any) -> tuple[str, dict[str, str]]:
    """A user ``name`` (handle ``name``) and a token, written straight to the database.

    Skips argon2 (two hashes per user through /signup and /login), which is
    most of a test's time; ``test_the_whole_flow_through_signup_and_login`` goes
    through the API.
    """
    user = User(email=f"{name}@example.com", name=name.title(), handle=name,
                password_hash="unused", **fields)
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


async def _channel(api: httpx.AsyncClient, auth: dict[str, str], *member_ids: str,
                   name: str = "general", is_dm: bool = False) -> str:
    response = await api.post("/channels", headers=auth, json={
        "name": name, "member_ids": list(member_ids), "is_dm": is_dm})
    assert response.status_code == 201, response.text
    channel_id: str = response.json()["id"]
    return channel_id


async def _outbox(settings: Settings, routing_key: str) -> list[dict[str, Any]]:
    found: list[OutboxEvent] = await rows(settings, OutboxEvent)
    return [json.loads(r.body) for r in found if r.routing_key == routing_key]


def _fields(response: httpx.Response) -> list[Any]:
    assert response.status_code == 422, response.text
    return [err["loc"][-1] for err in response.json()["detail"]]


# --- authentication ----------------------------------------------------------------------

SOCIAL_ROUTES = [
    ("POST", "/channels"), ("GET", "/channels"), ("GET", "/channels/c1"),
    ("POST", "/channels/c1/members"), ("DELETE", "/channels/c1/members/me"),
    ("GET", "/channels/c1/posts"), ("POST", "/post"), ("POST", "/friend-req"),
    ("POST", "/send_req"), ("GET", "/me/friend-requests"), ("POST", "/friend-req/r1/accept"),
    ("POST", "/friend-req/r1/decline"), ("GET", "/users?handle=ada"),
]


@pytest.mark.parametrize(("method", "path"), SOCIAL_ROUTES)
async def test_every_social_route_needs_a_token(
    api: httpx.AsyncClient, method: str, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        response = await api.request(method, path, headers=headers,
                                     json={} if method == "POST" else None)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"


# --- channels ----------------------------------------------------------------------------


async def test_create_a_channel_and_see_it(api: httpx.AsyncClient, api_settings: Settings) -> None:
    ada_id, ada = await _user(api_settings, "ada")
    bob_id, bob = await _user(api_settings, "bob")
    # When Ada creates a channel with Bob (naming Bob twice and herself too)
    response = await api.post("/channels", headers=ada, json={
        "name": "  general ", "member_ids": [bob_id, bob_id, ada_id]})
    # Then both are members, Ada first
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["is_dm"], body["created_by"], body["member_count"]) == (
        "general", False, ada_id, 2)
    assert body["members"] == [{"id": ada_id, "name": "Ada", "handle": "ada"},
                               {"id": bob_id, "name": "Bob", "handle": "bob"}]
    # And both see it, in their list and by id
    for auth in (ada, bob):
        listed = await api.get("/channels", headers=auth)
        assert listed.status_code == 200, listed.text
        assert listed.json() == [{k: v for k, v in body.items() if k != "members"}]
        detail = await api.get(f"/channels/{body['id']}", headers=auth)
        assert detail.status_code == 200 and detail.json() == body


async def test_channel_list_has_only_mine_with_member_counts(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, ada = await _user(api_settings, "ada")
    bob_id, bob = await _user(api_settings, "bob")
    carol_id, _ = await _user(api_settings, "carol")
    solo = await _channel(api, ada, name="solo")
    trio = await _channel(api, ada, bob_id, carol_id, name="trio")
    other = await _channel(api, bob, name="bobs")
    ada_list = (await api.get("/channels", headers=ada)).json()
    assert {c["id"]: c["member_count"] for c in ada_list} == {solo: 1, trio: 3}
    bob_list = (await api.get("/channels", headers=bob)).json()
    assert {c["id"]: c["member_count"] for c in bob_list} == {trio: 3, other: 1}


async def test_a_channel_is_403_to_non_members_and_404_when_unknown(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, ada = await _user(api_settings, "ada")
    _, bob = await _user(api_settings, "bob")
    channel_id = await _channel(api, ada)
    response = await api.get(f"/channels/{channel_id}", headers=bob)
    assert response.status_code == 403, response.text
    assert response.json() == {"detail": "you are not a member of this channel"}
    response = await api.get(f"/channels/{uuid.uuid4()}", headers=bob)
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "no such channel"}


async def test_an_unknown_member_is_404_naming_it(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, ada = await _user(api_settings, "ada")
    bob_id, _ = await _user(api_settings, "bob")
    ghost = str(uuid.uuid4())
    response = await api.post("/channels", headers=ada,
                              json={"name": "x", "member_ids": [bob_id, ghost]})
    assert response.status_code == 404, response.text
    assert ghost in response.json()["detail"]
    assert (await api.get("/channels", headers=ada)).json() == []


async def test_a_dm_has_exactly_one_other_member(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    ada_id, ada = await _user(api_settings, "ada")
    bob_id, _ = await _user(api_settings, "bob")
    carol_id, _ = await _user(api_settings, "carol")
    for members in ([], [ada_id], [bob_id, carol_id]):
        response = await api.post("/channels", headers=ada,
                                  json={"name": "dm", "member_ids": members, "is_dm": True})
        assert _fields(response) == ["member_ids"], members
    response = await api.post("/channels", headers=ada,
                              json={"name": "dm", "member_ids": [bob_id], "is_dm": True})
    assert response.status_code == 201, response.text
    assert response.json()["is_dm"] is True and response.json()["member_count"] == 2


@pytest.mark.parametrize(("body", "field"), [
    ({"name": ""}, "name"), ({"name": "   "}, "name"), ({"name": "x" * 81}, "name"),
    ({}, "name"), ({"name": "x", "member_ids": "bob"}, "member_ids"),
    ({"name": "x", "owner": "me"}, "owner"),
])
async def test_create_channel_refuses_bad_input(
    api: httpx.AsyncClient, api_settings: Settings, body: dict[str, Any], field: str
) -> None:
    _, ada = await _user(api_settings, "ada")
    assert field in _fields(await api.post("/channels", headers=ada, json=body))


async def test_members_add_members_but_not_to_dms(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    ada_id, ada = await _user(api_settings, "ada")
    bob_id, bob = await _user(api_settings, "bob")
    carol_id, carol = await _user(api_settings, "carol")
    dave_id, _ = await _user(api_settings, "dave")
    channel_id = await _channel(api, ada, bob_id)
    path = f"/channels/{channel_id}/members"
    # A member adds Carol: 201, then again: 200, no duplicate
    response = await api.post(path, headers=bob, json={"user_id": carol_id})
    assert response.status_code == 201, response.text
    assert response.json()["member_count"] == 3
    again = await api.post(path, headers=ada, json={"user_id": carol_id})
    assert again.status_code == 200, again.text
    assert again.json()["member_count"] == 3
    # Carol now sees the channel
    assert (await api.get(f"/channels/{channel_id}", headers=carol)).status_code == 200
    # An unknown user: 404; a non-member adding: 403; an unknown channel: 404
    ghost = str(uuid.uuid4())
    response = await api.post(path, headers=ada, json={"user_id": ghost})
    assert response.status_code == 404 and ghost in response.json()["detail"]
    _, eve = await _user(api_settings, "eve")
    assert (await api.post(path, headers=eve, json={"user_id": dave_id})).status_code == 403
    response = await api.post(f"/channels/{uuid.uuid4()}/members", headers=ada,
                              json={"user_id": dave_id})
    assert response.status_code == 404
    # Bad body: 422
    assert _fields(await api.post(path, headers=ada, json={})) == ["user_id"]
    # A DM's members are fixed
    dm = await _channel(api, ada, bob_id, name="dm", is_dm=True)
    response = await api.post(f"/channels/{dm}/members", headers=ada, json={"user_id": dave_id})
    assert _fields(response) == ["user_id"]
    members: list[ChannelMember] = await rows(api_settings, ChannelMember)
    assert sorted(m.user_id for m in members if m.channel_id == dm) == sorted([bob_id, ada_id])


async def test_leave_a_channel(api: httpx.AsyncClient, api_settings: Settings) -> None:
    _, ada = await _user(api_settings, "ada")
    bob_id, bob = await _user(api_settings, "bob")
    channel_id = await _channel(api, ada, bob_id)
    await api.patch(f"/me/channels/{channel_id}/preferences", headers=bob, json={"muted": True})
    # Bob leaves: 204, then the channel is 403 to him and not in his list
    response = await api.delete(f"/channels/{channel_id}/members/me", headers=bob)
    assert response.status_code == 204, response.text
    assert (await api.get(f"/channels/{channel_id}", headers=bob)).status_code == 403
    assert (await api.get("/channels", headers=bob)).json() == []
    assert (await api.get(f"/channels/{channel_id}", headers=ada)).json()["member_count"] == 1
    # Leaving again: 403 (not a member); an unknown channel: 404
    response = await api.delete(f"/channels/{channel_id}/members/me", headers=bob)
    assert response.status_code == 403
    response = await api.delete(f"/channels/{uuid.uuid4()}/members/me", headers=bob)
    assert response.status_code == 404


# --- posts -------------------------------------------------------------------------------


async def test_a_post_raises_user_post_for_the_other_members(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Given Ada, Bob (with a phone and a locale) and Carol in #general; Dave elsewhere
    ada_id, ada = await _user(api_settings, "ada")
    bob_id, _ = await _user(api_settings, "bob", phone="+14155550100", locale="fr-ca")
    carol_id, _ = await _user(api_settings, "carol")
    await _user(api_settings, "dave")
    channel_id = await _channel(api, ada, bob_id, carol_id)
    # When Ada posts mentioning Bob (twice), herself, Dave (not a member) and @here
    text = "@Bob, @ada and @dave: see https://example.com/@carol @here then @channel @bob."
    response = await api.post("/post", headers=ada, json={"channel_id": channel_id,
                                                          "text": text})
    # Then 201 with the post and the event id
    assert response.status_code == 201, response.text
    body = response.json()
    post = body["post"]
    assert (post["channel_id"], post["author_id"], post["text"], post["thread_id"]) == (
        channel_id, ada_id, text, None)
    [stored] = await rows(api_settings, Post)
    assert stored.id == post["id"]
    # And one user.post event in the outbox with the contract's fields
    [event] = await _outbox(api_settings, "user.post")
    assert event["id"] == body["event_id"]
    assert event["actor"] == {"id": ada_id, "name": "Ada"}
    assert event["recipients"] == [
        {"user_id": bob_id, "email": "bob@example.com", "name": "Bob", "phone": "+14155550100",
         "locale": "fr-ca"},
        {"user_id": carol_id, "email": "carol@example.com", "name": "Carol", "phone": None,
         "locale": "en"}]
    assert event["data"] == {
        "post_id": post["id"], "channel_id": channel_id, "channel_name": "general",
        "is_dm": False, "text": text, "thread_id": None, "mentions": [bob_id],
        "special_mention": "here", "author_name": "Ada"}
    # And Ada follows her own thread
    subs: list[ThreadSubscription] = await rows(api_settings, ThreadSubscription)
    assert [(s.thread_id, s.user_id) for s in subs] == [(post["id"], ada_id)]


async def test_a_dm_post_event_says_so(api: httpx.AsyncClient, api_settings: Settings) -> None:
    _, ada = await _user(api_settings, "ada")
    bob_id, _ = await _user(api_settings, "bob")
    dm = await _channel(api, ada, bob_id, name="ada+bob", is_dm=True)
    response = await api.post("/post", headers=ada, json={"channel_id": dm, "text": "hi"})
    assert response.status_code == 201, response.text
    [event] = await _outbox(api_settings, "user.post")
    assert event["data"]["is_dm"] is True
    assert (event["data"]["mentions"], event["data"]["special_mention"]) == ([], None)
    assert [r["user_id"] for r in event["recipients"]] == [bob_id]


async def test_replies_subscribe_the_replier_once(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    # Given Ada's top-level post in a channel with Bob and Carol
    ada_id, ada = await _user(api_settings, "ada")
    bob_id, bob = await _user(api_settings, "bob")
    carol_id, _ = await _user(api_settings, "carol")
    channel_id = await _channel(api, ada, bob_id, carol_id)
    root = (await api.post("/post", headers=ada, json={"channel_id": channel_id,
                                                       "text": "lunch?"})).json()["post"]
    # When Bob replies twice (mentioning @channel)
    for text in ("yes @channel", "and @ada"):
        response = await api.post("/post", headers=bob, json={
            "channel_id": channel_id, "text": text, "thread_id": root["id"]})
        assert response.status_code == 201, response.text
        assert response.json()["post"]["thread_id"] == root["id"]
    # Then Ada and Bob follow the thread, Bob once
    subs: list[ThreadSubscription] = await rows(api_settings, ThreadSubscription)
    assert sorted((s.thread_id, s.user_id) for s in subs) == sorted(
        [(root["id"], ada_id), (root["id"], bob_id)])
    # And the reply events carry the thread, mentions and special mention
    events = await _outbox(api_settings, "user.post")
    replies = [e for e in events if e["data"]["thread_id"] == root["id"]]
    assert [(e["data"]["special_mention"], e["data"]["mentions"]) for e in replies] == [
        ("channel", []), (None, [ada_id])]
    assert all({r["user_id"] for r in e["recipients"]} == {ada_id, carol_id} for e in replies)


async def test_thread_id_must_be_a_top_level_post_of_the_channel(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, ada = await _user(api_settings, "ada")
    general = await _channel(api, ada)
    random = await _channel(api, ada, name="random")
    root = (await api.post("/post", headers=ada, json={"channel_id": general,
                                                       "text": "root"})).json()["post"]
    reply = (await api.post("/post", headers=ada, json={
        "channel_id": general, "text": "reply", "thread_id": root["id"]})).json()["post"]
    # A reply to a reply, or to a post of another channel: 422 naming thread_id
    for channel_id, thread_id in ((general, reply["id"]), (random, root["id"])):
        response = await api.post("/post", headers=ada, json={
            "channel_id": channel_id, "text": "x", "thread_id": thread_id})
        assert _fields(response) == ["thread_id"]
    # An unknown thread: 404
    response = await api.post("/post", headers=ada, json={
        "channel_id": general, "text": "x", "thread_id": str(uuid.uuid4())})
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "no such thread"}
    assert len(await rows(api_settings, Post)) == 2


async def test_posting_needs_membership_of_a_real_channel(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, ada = await _user(api_settings, "ada")
    _, bob = await _user(api_settings, "bob")
    channel_id = await _channel(api, ada)
    response = await api.post("/post", headers=bob, json={"channel_id": channel_id, "text": "x"})
    assert response.status_code == 403, response.text
    response = await api.post("/post", headers=bob, json={"channel_id": "nope", "text": "x"})
    assert response.status_code == 404, response.text
    assert await rows(api_settings, Post) == []
    assert await rows(api_settings, OutboxEvent) == []


@pytest.mark.parametrize(("body", "field"), [
    ({"text": ""}, "text"), ({"text": " \n\t "}, "text"), ({"text": "x" * 4001}, "text"),
    ({"text": None}, "text"), ({"channel_id": None}, "channel_id"),
    ({"thread_id": ""}, "thread_id"), ({"pinned": True}, "pinned"),
])
async def test_post_refuses_bad_input(
    api: httpx.AsyncClient, api_settings: Settings, body: dict[str, Any], field: str
) -> None:
    _, ada = await _user(api_settings, "ada")
    channel_id = await _channel(api, ada)
    payload = {"channel_id": channel_id, "text": "hello", **body}
    assert field in _fields(await api.post("/post", headers=ada, json=payload))
    assert await rows(api_settings, Post) == []


async def test_a_post_with_nobody_else_in_the_channel_raises_no_event(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    ada_id, ada = await _user(api_settings, "ada")
    channel_id = await _channel(api, ada)
    response = await api.post("/post", headers=ada, json={"channel_id": channel_id,
                                                          "text": "note to self " + "x" * 3980})
    assert response.status_code == 201, response.text
    assert response.json()["event_id"] is None
    assert len(await rows(api_settings, Post)) == 1
    assert await rows(api_settings, OutboxEvent) == []
    subs: list[ThreadSubscription] = await rows(api_settings, ThreadSubscription)
    assert [(s.thread_id, s.user_id) for s in subs] == [(response.json()["post"]["id"], ada_id)]


async def test_a_retried_post_with_an_idempotency_key_posts_once(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    _, ada = await _user(api_settings, "ada")
    bob_id, _ = await _user(api_settings, "bob")
    channel_id = await _channel(api, ada, bob_id)
    headers = {**ada, "Idempotency-Key": str(uuid.uuid4())}
    body = {"channel_id": channel_id, "text": "once"}
    first = await api.post("/post", headers=headers, json=body)
    again = await api.post("/post", headers=headers, json=body)
    assert first.status_code == again.status_code == 201, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert len(await rows(api_settings, Post)) == 1
    assert len(await _outbox(api_settings, "user.post")) == 1
    # The same key with another body is 422; without a token, 401 (never a replay)
    other = await api.post("/post", headers=headers, json={**body, "text": "twice"})
    assert other.status_code == 422, other.text
    anonymous = await api.post("/post", headers={"Idempotency-Key": headers["Idempotency-Key"]},
                               json=body)
    assert anonymous.status_code == 401
    # Another user with Ada's key and body gets their own answer, never Ada's stored one
    _, eve = await _user(api_settings, "eve")
    stolen = await api.post("/post", headers={**eve, "Idempotency-Key": headers["Idempotency-Key"]},
                            json=body)
    assert stolen.status_code == 403, stolen.text
    assert "idempotent-replayed" not in stolen.headers


async def test_posts_page_newest_first(api: httpx.AsyncClient, api_settings: Settings) -> None:
    _, ada = await _user(api_settings, "ada")
    bob_id, bob = await _user(api_settings, "bob")
    channel_id = await _channel(api, ada, bob_id)
    ids = []
    for n in range(5):
        response = await api.post("/post", headers=ada if n % 2 else bob, json={
            "channel_id": channel_id, "text": f"post {n}",
            "thread_id": ids[0] if n == 3 else None})
        ids.append(response.json()["post"]["id"])
    path = f"/channels/{channel_id}/posts"
    # The whole channel, newest first, replies included with their thread_id
    page = await api.get(path, headers=bob)
    assert page.status_code == 200, page.text
    assert [p["id"] for p in page.json()["items"]] == ids[::-1]
    assert [p["thread_id"] for p in page.json()["items"]] == [None, ids[0], None, None, None]
    assert page.json()["next_before"] is None
    # Two at a time
    seen: list[str] = []
    before: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"before": before} if before else {})}
        body = (await api.get(path, headers=ada, params=params)).json()
        seen += [p["id"] for p in body["items"]]
        before = body["next_before"]
        if before is None:
            break
    assert seen == ids[::-1]


async def test_posts_are_members_only(api: httpx.AsyncClient, api_settings: Settings) -> None:
    _, ada = await _user(api_settings, "ada")
    _, bob = await _user(api_settings, "bob")
    channel_id = await _channel(api, ada)
    other = await _channel(api, bob, name="other")
    post_in_other = (await api.post("/post", headers=bob, json={
        "channel_id": other, "text": "x"})).json()["post"]["id"]
    assert (await api.get(f"/channels/{channel_id}/posts", headers=bob)).status_code == 403
    assert (await api.get(f"/channels/{uuid.uuid4()}/posts", headers=bob)).status_code == 404
    # A cursor that is no post of this channel: 422 naming `before`
    for before in (post_in_other, "nope"):
        response = await api.get(f"/channels/{channel_id}/posts", headers=ada,
                                 params={"before": before})
        assert _fields(response) == ["before"]
    for limit in (0, 101):
        response = await api.get(f"/channels/{channel_id}/posts", headers=ada,
                                 params={"limit": limit})
        assert _fields(response) == ["limit"]


# --- friend requests ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/friend-req", "/send_req"])
async def test_a_friend_request_raises_user_send_req(
    api: httpx.AsyncClient, api_settings: Settings, path: str
) -> None:
    ada_id, ada = await _user(api_settings, "ada")
    bob_id, _ = await _user(api_settings, "bob", phone="+14155550100")
    response = await api.post(path, headers=ada, json={"to_user_id": bob_id})
    assert response.status_code == 201, response.text
    body = response.json()
    request = body["request"]
    assert request["from_user"] == {"id": ada_id, "name": "Ada", "handle": "ada"}
    assert request["to_user"] == {"id": bob_id, "name": "Bob", "handle": "bob"}
    assert request["status"] == "pending"
    [event] = await _outbox(api_settings, "user.send_req")
    assert event["id"] == body["event_id"]
    assert event["actor"] == {"id": ada_id, "name": "Ada"}
    assert event["recipients"] == [{"user_id": bob_id, "email": "bob@example.com",
                                    "name": "Bob", "phone": "+14155550100", "locale": "en"}]
    assert event["data"] == {"request_id": request["id"], "from_user_id": ada_id,
                             "from_name": "Ada", "from_handle": "ada"}
    [row] = await rows(api_settings, FriendRequest)
    assert (row.id, row.from_user_id, row.to_user_id, row.status) == (
        request["id"], ada_id, bob_id, "pending")


async def test_friend_request_refusals(api: httpx.AsyncClient, api_settings: Settings) -> None:
    ada_id, ada = await _user(api_settings, "ada")
    bob_id, bob = await _user(api_settings, "bob")
    # To oneself: 422 naming the field; to nobody: 404; bad body: 422
    assert _fields(await api.post("/friend-req", headers=ada,
                                  json={"to_user_id": ada_id})) == ["to_user_id"]
    response = await api.post("/friend-req", headers=ada, json={"to_user_id": "nope"})
    assert response.status_code == 404, response.text
    assert _fields(await api.post("/friend-req", headers=ada, json={})) == ["to_user_id"]
    # A pending one, in either direction: 409
    assert (await api.post("/friend-req", headers=ada,
                           json={"to_user_id": bob_id})).status_code == 201
    for auth, to in ((ada, bob_id), (bob, ada_id)):
        response = await api.post("/send_req", headers=auth, json={"to_user_id": to})
        assert response.status_code == 409, response.text
    assert len(await rows(api_settings, FriendRequest)) == 1
    assert len(await _outbox(api_settings, "user.send_req")) == 1


async def test_answering_friend_requests(api: httpx.AsyncClient, api_settings: Settings) -> None:
    ada_id, ada = await _user(api_settings, "ada")
    bob_id, bob = await _user(api_settings, "bob")
    _, carol = await _user(api_settings, "carol")
    request_id = (await api.post("/friend-req", headers=ada,
                                 json={"to_user_id": bob_id})).json()["request"]["id"]
    # Both see it, on their side
    ada_list = (await api.get("/me/friend-requests", headers=ada)).json()
    bob_list = (await api.get("/me/friend-requests", headers=bob)).json()
    assert ([r["id"] for r in ada_list["outgoing"]], ada_list["incoming"]) == ([request_id], [])
    assert ([r["id"] for r in bob_list["incoming"]], bob_list["outgoing"]) == ([request_id], [])
    assert (await api.get("/me/friend-requests", headers=carol)).json() == {
        "incoming": [], "outgoing": []}
    # Only the target answers: the sender and strangers get 404, as for an unknown id
    for auth in (ada, carol):
        for verb in ("accept", "decline"):
            response = await api.post(f"/friend-req/{request_id}/{verb}", headers=auth)
            assert response.status_code == 404, response.text
    assert (await api.post("/friend-req/nope/accept", headers=bob)).status_code == 404
    # Bob declines; then neither answer is possible any more
    response = await api.post(f"/friend-req/{request_id}/decline", headers=bob)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "declined"
    for verb in ("accept", "decline"):
        response = await api.post(f"/friend-req/{request_id}/{verb}", headers=bob)
        assert response.status_code == 409, response.text
    # Ada may ask again; Bob accepts; then they are friends and a new request is 409
    second = (await api.post("/friend-req", headers=ada, json={"to_user_id": bob_id})).json()
    response = await api.post(f"/friend-req/{second['request']['id']}/accept", headers=bob)
    assert response.status_code == 200 and response.json()["status"] == "accepted"
    response = await api.post("/friend-req", headers=bob, json={"to_user_id": ada_id})
    assert response.status_code == 409
    statuses = sorted(r.status for r in await rows(api_settings, FriendRequest))
    assert statuses == ["accepted", "declined"]


# --- users -------------------------------------------------------------------------------


async def test_find_a_user_by_handle(api: httpx.AsyncClient, api_settings: Settings) -> None:
    _, ada = await _user(api_settings, "ada")
    bob_id, _ = await _user(api_settings, "bob", phone="+14155550100")
    for handle in ("bob", "@BOB", " Bob "):
        response = await api.get("/users", headers=ada, params={"handle": handle})
        assert response.status_code == 200, response.text
        assert response.json() == {"id": bob_id, "name": "Bob", "handle": "bob"}
    response = await api.get("/users", headers=ada, params={"handle": "nobody"})
    assert response.status_code == 404
    assert _fields(await api.get("/users", headers=ada)) == ["handle"]


# --- the whole flow, and the API description ---------------------------------------------


async def test_the_whole_flow_through_signup_and_login(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    tokens = {}
    for name in ("ada", "bob"):
        signup = await api.post("/signup", json={"email": f"{name}@example.com",
                                                 "password": PASSWORD, "name": name.title()})
        assert signup.status_code == 201, signup.text
        login = await api.post("/login", json={"email": f"{name}@example.com",
                                               "password": PASSWORD})
        tokens[name] = {"Authorization": f"Bearer {login.json()['access_token']}"}
    bob = (await api.get("/users", headers=tokens["ada"], params={"handle": "bob"})).json()
    channel_id = await _channel(api, tokens["ada"], bob["id"])
    response = await api.post("/post", headers=tokens["ada"],
                              json={"channel_id": channel_id, "text": "hi @bob"})
    assert response.status_code == 201, response.text
    [event] = await _outbox(api_settings, "user.post")
    assert event["data"]["mentions"] == [bob["id"]]


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method.upper(), path): op for path, item in spec["paths"].items()
            for method, op in item.items()}


async def test_openapi_documents_every_social_route(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    ops = _operations(spec)
    mine = [key for key in ops
            if key[1].split("/")[1] in ("me", "channels", "users", "post", "friend-req",
                                        "send_req")
            and not key[1].startswith(("/me/notifications", "/me/events"))]
    assert ("POST", "/friend-req") in mine and ("POST", "/send_req") in mine
    assert len(mine) >= 23
    schemas = spec["components"]["schemas"]
    for key in mine:
        op = ops[key]
        assert op.get("summary") and op.get("description"), key
        assert "401" in op["responses"], key
        if "{" in key[1]:
            assert "404" in op["responses"], key
        if "requestBody" in op:
            assert "422" in op["responses"], key
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert schemas[ref.rsplit("/", 1)[1]].get("examples"), key
    for key in [("GET", "/channels/{channel_id}"), ("POST", "/post"),
                ("GET", "/me/channels/{channel_id}/preferences")]:
        assert "403" in ops[key]["responses"], key
    for key in [("POST", "/friend-req"), ("POST", "/send_req"), ("PATCH", "/me"),
                ("POST", "/friend-req/{request_id}/accept")]:
        assert "409" in ops[key]["responses"], key
    signup = schemas["SignupIn"]["properties"]
    assert {"handle", "phone", "locale", "timezone"} <= signup.keys()
