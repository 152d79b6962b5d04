"""The decision engine applied by the real workers: in-app, push per device, SMS opt-in.

Rows are seeded straight into the database (users, channels, preferences,
devices); events go through the real broker the way the relay publishes
them; push and SMS go to the dev sinks (no provider configured), which write
one file per message. Every "no" must come with its reason and trail.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlmodel import SQLModel
from typer.testing import CliRunner

from consumers.decide import DeviceKind, GlobalPref
from herald.cli import app
from herald.db import init_db, make_engine, session_factory
from herald.models import (
    Channel,
    ChannelMember,
    ChannelPreferences,
    Delivery,
    Device,
    Notification,
    Post,
    ThreadSubscription,
    User,
    UserPreferences,
    as_utc,
)
from herald.settings import Settings
from herald.why import explain
from producer.auth import issue_token
from tests.conftest import eventually
from tests.harness import api_client, in_app_worker, push_worker, rows, sms_worker
from tests.test_worker import publish
from topology.envelope import Actor, Envelope, Recipient


@pytest.fixture
def settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    """Dev sinks in tmp_path; a short mobile push threshold so the broker delay is quick."""
    return make_settings(push_dir=tmp_path / "push", sms_dir=tmp_path / "sms",
                         mobile_push_threshold="1500ms", user_cache_ttl="0.001s")


async def seed(settings: Settings, *items: SQLModel) -> None:
    engine = make_engine(settings.database_url)
    try:
        await init_db(engine)
        async with session_factory(engine)() as session:
            for item in items:
                session.add(item)
                await session.flush()  # in order: rows below may point at rows above
            await session.commit()
    finally:
        await engine.dispose()


def people() -> list[SQLModel]:
    """Ada posts; Bob has a phone and two devices (android = mobile, web = desktop)."""
    return [
        User(id="u-ada", email="ada@example.com", name="Ada", password_hash="x", handle="ada"),
        User(id="u-bob", email="bob@example.com", name="Bob", password_hash="x", handle="bob",
             phone="+14155550123", locale="fr"),
        Channel(id="c-1", name="general", created_by="u-ada"),
        ChannelMember(channel_id="c-1", user_id="u-ada"),
        ChannelMember(channel_id="c-1", user_id="u-bob"),
        Device(id="d-phone", user_id="u-bob", platform="android", token="fcm-token-bob-phone",
               token_hash="a" * 64),
        Device(id="d-web", user_id="u-bob", platform="web", token="web-token-bob-browser",
               token_hash="b" * 64),
    ]


def post(text: str = "hello", mentions: Iterable[str] = (), special: str | None = None,
         thread_id: str | None = None, critical: bool = False) -> Envelope:
    return Envelope(
        type="user.post", actor=Actor(id="u-ada", name="Ada"), critical=critical,
        recipients=[Recipient(user_id="u-bob", email="bob@example.com", name="Bob",
                              locale="fr")],
        data={"post_id": "p-1", "channel_id": "c-1", "channel_name": "general",
              "is_dm": False, "text": text, "thread_id": thread_id,
              "mentions": list(mentions), "special_mention": special, "author_name": "Ada"})


async def decisions(settings: Settings, event_id: str, count: int) -> dict[str, Any]:
    """channel or push device → its decision, once ``count`` are final."""
    engine = make_engine(settings.database_url)
    try:
        async def ready() -> dict[str, Any] | None:
            found = await explain(session_factory(engine), event_id, "u-bob")
            done = [d for d in found if d.status not in ("sending", "waiting")]
            return {d.device_id or d.channel: d for d in done} if len(done) >= count else None

        result: dict[str, Any] = await eventually(ready, timeout=15)
        return result
    finally:
        await engine.dispose()


def pushed(settings: Settings) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(settings.push_dir.glob("*.json"))]


def nodes(trail: list[dict[str, Any]]) -> list[str]:
    return [step["node"] for step in trail]


async def test_a_mention_notifies_in_app_and_every_device_the_phone_after_the_threshold(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    settings = topology
    await seed(settings, *people())
    async with in_app_worker(settings), push_worker(settings):
        envelope = post("hey @bob, look", mentions=["u-bob"])  # posted now, workers up
        await publish(connection, settings, envelope)
        found = await decisions(settings, envelope.id, 3)
    # The phone was not pushed before the threshold (it waited in a broker delay tier)
    phone = next(d for d in await rows(settings, Delivery) if d.recipient == "u-bob/d-phone")
    assert phone.sent_at is not None
    assert as_utc(phone.sent_at) - envelope.occurred_at >= timedelta(
        seconds=settings.mobile_push_threshold)
    assert found["in_app"].status == "sent"
    assert found["d-web"].status == "sent" and found["d-phone"].status == "sent"
    # Desktop (web) follows the chart to G4 @mention → YES, no mobile threshold
    assert nodes(found["d-web"].trail)[-4:] == ["G4", "YES1", "M1", "YES2"]
    # The phone passed M2 (threshold) on the second look
    assert nodes(found["d-phone"].trail)[-3:] == ["M1", "M2", "YES2"]
    platforms = sorted(p["platform"] for p in pushed(settings))
    assert platforms == ["android", "web"]
    # The recipient's locale picks the French push template
    assert all(p["data"]["event_id"] == envelope.id for p in pushed(settings))
    inbox = await rows(settings, Notification)
    assert [(n.user_id, n.delivered) for n in inbox] == [("u-bob", True)]


async def test_a_muted_channel_says_no_everywhere_with_the_reason(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    settings = topology
    await seed(settings, *people(), ChannelPreferences(user_id="u-bob", channel_id="c-1",
                                                       muted=True))
    envelope = post("nothing for bob here")
    async with in_app_worker(settings), push_worker(settings):
        await publish(connection, settings, envelope)
        found = await decisions(settings, envelope.id, 3)
    for key in ("in_app", "d-web", "d-phone"):
        assert found[key].status == "suppressed", key
        assert found[key].reason == "not notified: channel muted"
        assert nodes(found[key].trail) == ["A", "B1", "B2", "N1"]
    assert pushed(settings) == []
    # The inbox keeps the "no" (not listed, but explained)
    [row] = await rows(settings, Notification)
    assert row.delivered is False and row.reason == "not notified: channel muted"
    # And Bob can ask why, by event, over the API; Ada cannot see Bob's decisions
    bob, ada = await token_for(settings, "u-bob"), await token_for(settings, "u-ada")
    async with api_client(settings) as client:
        answer = await client.get(f"/me/events/{envelope.id}/why",
                                  headers={"Authorization": f"Bearer {bob}"})
        other = await client.get(f"/me/events/{envelope.id}/why",
                                 headers={"Authorization": f"Bearer {ada}"})
        listed = await client.get("/me/notifications", headers={"Authorization": f"Bearer {bob}"})
    assert answer.status_code == 200, answer.text
    by_where = {(d["channel"], d["device_id"]): d for d in answer.json()["decisions"]}
    assert set(by_where) == {("in_app", None), ("push", "d-phone"), ("push", "d-web")}
    assert by_where[("push", "d-phone")]["reason"] == "not notified: channel muted"
    assert other.status_code == 404
    assert listed.json()["items"] == []  # a "no" is not in the inbox
    # And an operator can ask the CLI
    result = await asyncio.to_thread(CliRunner().invoke, app,
                                     ["why", envelope.id, "--user", "u-bob"],
                                     env=cli_env(settings))
    assert result.exit_code == 0, result.output
    assert "channel muted" in result.output and "Channel muted?" in result.output
    assert "d-phone" in result.output
    missing = await asyncio.to_thread(CliRunner().invoke, app, ["why", "no-such-event"],
                                      env=cli_env(settings))
    assert missing.exit_code == 1 and "nothing recorded" in missing.output


def cli_env(settings: Settings) -> dict[str, str]:
    return {"HERALD_DATABASE_URL": settings.database_url, "HERALD_PREFIX": settings.prefix,
            "HERALD_AMQP_URL": settings.amqp_url}


async def token_for(settings: Settings, user_id: str) -> str:
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session:
            token = issue_token(session, user_id, 3600)
            await session.commit()
        return token
    finally:
        await engine.dispose()


async def test_a_subscribed_thread_gets_through_a_muted_channel(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    settings = topology
    await seed(settings, *people(),
               ChannelPreferences(user_id="u-bob", channel_id="c-1", muted=True),
               Post(id="p-root", channel_id="c-1", author_id="u-ada", text="root"),
               ThreadSubscription(thread_id="p-root", user_id="u-bob"))
    envelope = post("a reply", thread_id="p-root")
    async with in_app_worker(settings):
        await publish(connection, settings, envelope)
        found = await decisions(settings, envelope.id, 1)
    assert found["in_app"].status == "sent"
    assert nodes(found["in_app"].trail)[:3] == ["A", "B1", "C1"]  # B1 yes skips B2


async def test_a_post_read_in_the_inbox_is_not_pushed_to_the_phone(
    database_url: str, make_settings: Callable[..., Settings], tmp_path: Path,
    connection: AbstractRobustConnection
) -> None:
    from tests.conftest import delete_topology
    from topology.declare import declare
    from topology.spec import build

    settings = make_settings(push_dir=tmp_path / "push", mobile_push_threshold="2s",
                             user_cache_ttl="0.001s")
    await declare(connection, build(settings))
    try:
        await seed(settings, *people())
        async with in_app_worker(settings):
            envelope = post("@bob please read", mentions=["u-bob"])
            await publish(connection, settings, envelope)
            # Given Bob reads it in the inbox (before the phone's threshold, or at least
            # before the push worker looks: either way the phone must not get it)
            [row] = await eventually(lambda: rows(settings, Notification))
            await mark_read(settings, row.id)
            async with push_worker(settings):
                found = await decisions(settings, envelope.id, 3)
        assert found["d-web"].status == "sent"
        assert found["d-phone"].status == "suppressed"
        assert found["d-phone"].reason == "not pushed: already read in the inbox"
        assert [p["platform"] for p in pushed(settings)] == ["web"]
    finally:
        await delete_topology(connection, settings)


async def mark_read(settings: Settings, notification_id: int | None) -> None:
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session:
            row = await session.get(Notification, notification_id)
            assert row is not None
            row.read_at = datetime.now(UTC)
            session.add(row)
            await session.commit()
    finally:
        await engine.dispose()


def dnd_now() -> UserPreferences:
    now = datetime.now(UTC)
    start = (now - timedelta(hours=1)).strftime("%H:%M")
    end = (now + timedelta(hours=1)).strftime("%H:%M")
    return UserPreferences(user_id="u-bob", dnd_start=start, dnd_end=end,
                           dnd_override_allowed=True)


async def test_do_not_disturb_holds_back_a_post_and_critical_breaks_through(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    settings = topology
    await seed(settings, *people(), dnd_now())
    quiet = post("@bob ping", mentions=["u-bob"])
    loud = post("@bob the site is down", mentions=["u-bob"], critical=True)
    async with in_app_worker(settings):
        await publish(connection, settings, quiet)
        await publish(connection, settings, loud)
        held = await decisions(settings, quiet.id, 1)
        through = await decisions(settings, loud.id, 1)
    assert held["in_app"].status == "suppressed"
    assert held["in_app"].reason == "not notified: in DnD, no override"
    assert nodes(held["in_app"].trail) == ["A", "B1", "B2", "C1", "C2", "N1"]
    assert through["in_app"].status == "sent"
    assert nodes(through["in_app"].trail)[3:5] == ["C1", "C2"]


async def test_a_friend_request_reaches_every_device_and_a_user_without_devices_is_told_why(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    settings = topology
    await seed(settings, *people())
    to_bob = Envelope(type="user.send_req", actor=Actor(id="u-ada", name="Ada"),
                      recipients=[Recipient(user_id="u-bob", name="Bob")],
                      data={"request_id": "r-1", "from_user_id": "u-ada",
                            "from_name": "Ada", "from_handle": "ada"})
    to_ada = Envelope(type="user.send_req", actor=Actor(id="u-bob", name="Bob"),
                      recipients=[Recipient(user_id="u-ada", name="Ada")],
                      data={"request_id": "r-2", "from_user_id": "u-bob",
                            "from_name": "Bob", "from_handle": "bob"})
    async with push_worker(settings):
        await publish(connection, settings, to_bob)
        await publish(connection, settings, to_ada)
        found = await decisions(settings, to_bob.id, 2)

        async def ada_record() -> Delivery | None:
            return next((d for d in await rows(settings, Delivery)
                         if d.event_id == to_ada.id and d.status == "suppressed"), None)

        none = await eventually(ada_record)
    assert {found["d-web"].status, found["d-phone"].status} == {"sent"}
    assert nodes(found["d-phone"].trail) == ["event", "C1"]  # not a message: DnD only
    assert sorted(p["data"]["request_id"] for p in pushed(settings)) == ["r-1", "r-1"]
    assert none.last_error == "not pushed: no push device registered (POST /me/devices)"


async def test_sms_login_alerts_are_opt_in_and_need_a_valid_number(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    settings = topology
    await seed(settings, *people(),
               User(id="u-cat", email="cat@example.com", name="Cat", password_hash="x",
                    phone="+1555"),
               UserPreferences(user_id="u-bob", sms_login_alerts=True),
               UserPreferences(user_id="u-cat", sms_login_alerts=True))

    def login(user_id: str) -> Envelope:
        return Envelope(type="user.login", actor=Actor(id=user_id),
                        recipients=[Recipient(user_id=user_id)],
                        data={"name": user_id, "ip": "203.0.113.9"})

    events = {u: login(u) for u in ("u-ada", "u-bob", "u-cat")}
    events["u-ada"] = events["u-ada"].model_copy(update={"critical": True})  # still opt-in
    async with sms_worker(settings):
        for envelope in events.values():
            await publish(connection, settings, envelope, routing_key="user.login")

        async def settled() -> dict[str, Delivery] | None:
            found = {d.recipient: d for d in await rows(settings, Delivery)
                     if d.channel == "sms" and d.status != "sending"}
            return found if len(found) == 3 else None

        found = await eventually(settled, timeout=15)
    assert found["u-ada"].status == "suppressed"
    assert "sms_login_alerts is off" in (found["u-ada"].last_error or "")
    assert found["u-cat"].status == "suppressed"
    assert "not a valid number" in (found["u-cat"].last_error or "")
    assert "+1555" not in (found["u-cat"].last_error or "")  # masked
    assert found["u-bob"].status == "sent"
    [text] = sorted(settings.sms_dir.glob("*.txt"))
    assert "0123" not in text.read_text()  # the dev sink masks the number too


async def test_a_post_from_an_integrator_with_bad_data_goes_to_the_dlq_with_the_field(
    database_url: str, topology: Settings, connection: AbstractRobustConnection
) -> None:
    from tests.test_in_app import in_app_dead_letters

    settings = topology
    envelope = Envelope(type="user.post", actor=Actor(id="svc"),
                        recipients=[Recipient(user_id="u-x")],
                        data={"channel_id": "c-9", "mentions": "not-a-list"})
    async with in_app_worker(settings):
        await publish(connection, settings, envelope)
        [dead] = await in_app_dead_letters(connection, settings)
    assert "data.mentions" in dead.reason


async def test_the_worker_cache_drops_a_user_when_the_api_says_it_changed(
    database_url: str, topology: Settings
) -> None:
    from consumers.preferences import PreferenceStore
    from topology.live import LiveHub, user_changed_key

    settings = topology
    await seed(settings, *people())
    engine = make_engine(settings.database_url)
    store = PreferenceStore(session_factory(engine), ttl=3600, activity_window=600,
                            mobile_push_threshold=120)
    listener_hub, api_hub = LiveHub(settings), LiveHub(settings)
    ready = asyncio.Event()
    task = asyncio.create_task(store.listen(listener_hub, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        before = await store.recipient("u-bob")
        assert before.global_pref(DeviceKind.DESKTOP) is GlobalPref.MENTIONS  # the default
        assert store.loads == 1
        await store.recipient("u-bob")
        assert store.loads == 1  # cached
        # When Bob changes his preferences (the API writes, then announces)
        await seed(settings, UserPreferences(user_id="u-bob", desktop="never"))
        assert await api_hub.publish(user_changed_key("u-bob"), {"user_id": "u-bob"})
        # Then the worker reads them again
        await eventually(lambda: "u-bob" not in store._cache)
        after = await store.recipient("u-bob")
        assert store.loads == 2
        assert after.global_pref(DeviceKind.DESKTOP) is GlobalPref.NEVER
    finally:
        task.cancel()
        await listener_hub.aclose()
        await api_hub.aclose()
        await engine.dispose()


async def test_sms_falls_back_from_twilio_to_vonage_and_a_long_text_is_cut_to_the_cap(
    database_url: str, make_settings: Callable[..., Settings], tmp_path: Path,
    connection: AbstractRobustConnection
) -> None:
    from tests.conftest import delete_topology
    from tests.standins.twilio import Fault, TwilioStandIn
    from tests.standins.vonage import VonageStandIn
    from topology.declare import declare
    from topology.spec import build

    # A login SMS template that renders far more than one segment
    templates = tmp_path / "templates"
    shutil.copytree(Path(__file__).parent.parent / "templates", templates)
    (templates / "sms" / "user.login.body.j2").write_text(
        "New sign-in from {{ data.ip }}. " + "Lorem ipsum dolor sit amet. " * 20)
    async with TwilioStandIn("AC" + "1" * 32, "tw-secret") as twilio, \
            VonageStandIn("vg-key", "vg-secret") as vonage:
        settings = make_settings(
            templates_dir=templates,
            sms_providers="twilio,vonage", twilio_account_sid="AC" + "1" * 32,
            twilio_auth_token="tw-secret", twilio_from="+15005550006",
            twilio_url=twilio.url, vonage_api_key="vg-key", vonage_api_secret="vg-secret",
            vonage_from="herald", vonage_url=vonage.url, sms_max_segments=1,
            provider_timeout="2s")
        await declare(connection, build(settings))
        try:
            await seed(settings, *people(), UserPreferences(user_id="u-bob",
                                                            sms_login_alerts=True))
            # Given Twilio is failing (503) for this message
            twilio.faults = [Fault(status=503)]
            envelope = Envelope(
                type="user.login", actor=Actor(id="u-bob"),
                recipients=[Recipient(user_id="u-bob", locale="en")],
                data={"name": "Bob", "ip": "203.0.113.9", "user_agent": "x" * 400})
            async with sms_worker(settings):
                await publish(connection, settings, envelope)
                found = await decisions(settings, envelope.id, 1)
        finally:
            await delete_topology(connection, settings)
    # Then Vonage sent it, once, cut to one segment
    assert found["sms"].status == "sent" and found["sms"].provider == "vonage"
    assert twilio.messages == [] and len(vonage.messages) == 1
    text = vonage.messages[0]["text"]
    from consumers.sms_text import segments

    assert segments(text) == 1 and text.endswith("...")


async def test_real_push_services_by_platform_and_a_dead_token_removes_the_device(
    database_url: str, make_settings: Callable[..., Settings], tmp_path: Path,
    connection: AbstractRobustConnection
) -> None:
    from tests.conftest import delete_topology
    from tests.standins.fcm import FcmStandIn
    from tests.standins.webpush import WebPushStandIn, application_server_key, write_vapid_key
    from topology.declare import declare
    from topology.spec import build

    async with FcmStandIn() as fcm, WebPushStandIn() as webpush:
        vapid = write_vapid_key(tmp_path)
        browser = webpush.subscribe(server_key=application_server_key(vapid))
        phone_token, old_phone_token = fcm.new_token(), fcm.new_token()
        fcm.dead_tokens.add(old_phone_token)  # the app was uninstalled from that phone
        settings = make_settings(
            fcm_credentials_file=fcm.write_service_account(tmp_path), fcm_url=fcm.url,
            vapid_private_key_file=vapid, push_dir=tmp_path / "push",
            mobile_push_threshold="1ms", provider_timeout="5s")
        await declare(connection, build(settings))
        try:
            await seed(settings, *people()[:5],
                       Device(id="d-phone", user_id="u-bob", platform="android",
                              token=phone_token, token_hash="c" * 64),
                       Device(id="d-old", user_id="u-bob", platform="android",
                              token=old_phone_token, token_hash="d" * 64),
                       Device(id="d-web", user_id="u-bob", platform="web",
                              token=browser.token, token_hash="e" * 64))
            async with push_worker(settings):
                envelope = post("@bob hello", mentions=["u-bob"])
                await publish(connection, settings, envelope)
                found = await decisions(settings, envelope.id, 3)
            devices = await rows(settings, Device)
        finally:
            await delete_topology(connection, settings)
    assert found["d-phone"].status == "sent" and found["d-phone"].provider == "fcm"
    assert found["d-web"].status == "sent" and found["d-web"].provider == "webpush"
    assert found["d-old"].status == "suppressed"
    assert "device removed" in found["d-old"].reason and old_phone_token not in (
        found["d-old"].reason)
    assert sorted(d.id for d in devices) == ["d-phone", "d-web"]
    [message] = fcm.messages
    assert message["token"] == phone_token
    [delivery] = webpush.deliveries
    assert delivery.payload["data"]["event_id"] == envelope.id
    assert pushed(settings) == []  # nothing went to the dev sink
