"""The FCM, APNs and Web Push providers against local servers that speak each real API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from consumers.providers.apns import ApnsProvider
from consumers.providers.base import PushMessage
from consumers.providers.fcm import FcmProvider
from consumers.providers.webpush import WebPushProvider
from herald.errors import (
    ConfigError,
    DeadToken,
    PermanentError,
    RateLimited,
    RecipientError,
    TransientError,
)
from tests.standins.apns import ApnsStandIn
from tests.standins.apns import Fault as ApnsFault
from tests.standins.fcm import Fault as FcmFault
from tests.standins.fcm import FcmStandIn
from tests.standins.webpush import Fault as PushFault
from tests.standins.webpush import (
    WebPushStandIn,
    application_server_key,
    write_vapid_key,
)

KEY_ID = "KEY1234567"
TEAM_ID = "TEAM123456"
SUBJECT = "mailto:ops@herald.local"
#: A safety net for a wedged test, not a timing assertion (CI machines can be slow).
LIMIT = 30


def push(token: str, **fields: Any) -> PushMessage:
    """A comment notification to ``token``; ``fields`` override the defaults."""
    values: dict[str, Any] = {"title": "Ada commented", "body": "Looks good to me",
                              "data": {"event_id": "evt-1", "url": "/posts/7"}}
    values.update(fields)
    return PushMessage(token=token, **values)


def recording_gate(snapshot: Callable[[], Any]) -> tuple[list[Any], Callable[[], Awaitable[None]]]:
    """A gate that records ``snapshot()`` (the stand-in's state) each time it is awaited."""
    seen: list[Any] = []

    async def gate() -> None:
        seen.append(snapshot())

    return seen, gate


def assert_masked(reason: str, token: str) -> None:
    assert token not in reason
    assert f"...{token[-6:]}" in reason


# --- FCM HTTP v1 ----------------------------------------------------------------------------

def fcm_provider(fcm: FcmStandIn, tmp_path: Path, timeout: float = 5.0) -> FcmProvider:
    return FcmProvider(fcm.write_service_account(tmp_path), base_url=fcm.url, timeout=timeout)


async def test_fcm_push_arrives_as_sent(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            token = fcm.new_token()
            await p.send(push(token, collapse_key="post-7", ttl=3600, urgent=True))

            [got] = fcm.messages
            assert got["token"] == token
            assert got["notification"] == {"title": "Ada commented", "body": "Looks good to me"}
            assert got["data"] == {"event_id": "evt-1", "url": "/posts/7"}
            assert got["android"] == {"priority": "HIGH", "ttl": "3600s",
                                      "collapse_key": "post-7"}
            assert set(got) == {"token", "notification", "data", "android"}

            # The OAuth assertion was signed with the service account's key (the stand-in
            # verified it) and asked for the FCM scope; the send carried the issued token.
            [grant] = fcm.token_calls
            assert grant.status == 200
            assert grant.header["alg"] == "RS256"
            assert grant.claims["iss"] == "herald-push@herald-test.iam.gserviceaccount.com"
            assert grant.claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
            assert grant.claims["aud"] == fcm.token_uri
            assert fcm.calls[0].project == "herald-test"
            assert fcm.calls[0].authorization == f"Bearer {next(iter(fcm.grants))}"


async def test_fcm_one_access_token_for_two_sends(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            await p.send(push(fcm.new_token(), data={}))
            await p.send(push(fcm.new_token()))

            assert fcm.tokens_issued == 1
            assert len(fcm.messages) == 2
            assert fcm.calls[0].authorization == fcm.calls[1].authorization
            first = fcm.messages[0]
            assert first["android"] == {"priority": "NORMAL", "ttl": "86400s"}
            assert "data" not in first


async def test_fcm_401_fetches_a_new_token_once_and_sends(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            await p.send(push(fcm.new_token()))
            fcm.revoke_tokens()   # e.g. the key was rotated: the cached token is refused

            await p.send(push(fcm.new_token()))

            assert [c.status for c in fcm.calls] == [200, 401, 200]
            assert fcm.tokens_issued == 2
            assert fcm.calls[1].authorization != fcm.calls[2].authorization
            assert len(fcm.messages) == 2


async def test_fcm_401_after_a_fresh_token_is_transient(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            fcm.faults.extend([FcmFault(401), FcmFault(401)])
            with pytest.raises(TransientError) as caught:
                await p.send(push(fcm.new_token()))
            assert type(caught.value) is TransientError
            assert caught.value.reason.startswith("FCM 401 UNAUTHENTICATED")
            assert fcm.tokens_issued == 2 and len(fcm.calls) == 2


async def test_fcm_unregistered_is_a_dead_token(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            token = fcm.new_token()
            fcm.dead_tokens.add(token)
            with pytest.raises(DeadToken) as caught:
                await p.send(push(token))
            reason = caught.value.reason
            assert reason.startswith("FCM 404 UNREGISTERED: Requested entity was not found.")
            assert_masked(reason, token)
            assert fcm.messages == []


async def test_fcm_malformed_registration_token_is_a_dead_token(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            with pytest.raises(DeadToken) as caught:
                await p.send(push("not a token"))
            assert caught.value.reason.startswith(
                "FCM 400 INVALID_ARGUMENT: The registration token is not a valid FCM")


@pytest.mark.parametrize(("data", "text"), [
    ({"count": 12}, "Invalid value at 'message.data[0].value' (TYPE_STRING), 12"),
    ({"from": "herald"}, "Request contains an invalid argument."),
])
async def test_fcm_invalid_message_is_permanent(tmp_path: Path, data: dict[str, Any],
                                                text: str) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            token = fcm.new_token()
            with pytest.raises(PermanentError) as caught:
                await p.send(push(token, data=data))
            assert type(caught.value) is PermanentError
            assert caught.value.reason.startswith(f"FCM 400 INVALID_ARGUMENT: {text}")
            assert_masked(caught.value.reason, token)


async def test_fcm_sender_id_mismatch_is_permanent(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            token = fcm.new_token()
            fcm.foreign_tokens.add(token)
            with pytest.raises(PermanentError) as caught:
                await p.send(push(token))
            assert type(caught.value) is PermanentError
            assert caught.value.reason.startswith("FCM 403 SENDER_ID_MISMATCH")


async def test_fcm_quota_exceeded_is_rate_limited_with_retry_after(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            fcm.faults.append(FcmFault(429, retry_after="7"))
            with pytest.raises(RateLimited) as caught:
                await p.send(push(fcm.new_token()))
            assert caught.value.retry_after == 7.0
            assert caught.value.reason.startswith("FCM 429 QUOTA_EXCEEDED")
            assert len(fcm.calls) == 1   # no retry of its own: the broker's ladder decides

            await p.send(push(fcm.new_token()))
            assert len(fcm.messages) == 1


@pytest.mark.parametrize(("status", "code", "retry_after"), [
    (500, "INTERNAL", None), (503, "UNAVAILABLE", "30")])
async def test_fcm_server_errors_are_transient(tmp_path: Path, status: int, code: str,
                                               retry_after: str | None) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            fcm.faults.append(FcmFault(status, retry_after=retry_after))
            with pytest.raises(TransientError) as caught:
                await p.send(push(fcm.new_token()))
            assert type(caught.value) is TransientError
            assert caught.value.reason.startswith(f"FCM {status} {code}")
            assert caught.value.retry_after == (float(retry_after) if retry_after else None)


async def test_fcm_hang_is_transient(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn(hang_seconds=30) as fcm, \
                fcm_provider(fcm, tmp_path, timeout=0.3) as p:
            token = fcm.new_token()
            with pytest.raises(TransientError, match="timed out") as caught:
                await p.send(push(token))
            assert type(caught.value) is TransientError
            assert_masked(caught.value.reason, token)
            assert fcm.messages == []


async def test_fcm_token_endpoint_failure_is_transient(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            fcm.token_faults.append(FcmFault(503))
            with pytest.raises(TransientError) as caught:
                await p.send(push(fcm.new_token()))
            assert type(caught.value) is TransientError
            assert caught.value.reason == "FCM OAuth 503 internal_failure: Backend error."
            assert fcm.calls == []   # nothing reached FCM without a token

            await p.send(push(fcm.new_token()))   # the next send fetches again
            assert fcm.tokens_issued == 1 and len(fcm.messages) == 1


async def test_fcm_assertion_signed_with_another_key_is_refused(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm:
            credentials = fcm.write_service_account(tmp_path)
            account = json.loads(credentials.read_text())
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            account["private_key"] = other.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()).decode()
            credentials.write_text(json.dumps(account))

            async with FcmProvider(credentials, base_url=fcm.url, timeout=5) as p:
                with pytest.raises(TransientError) as caught:
                    await p.send(push(fcm.new_token()))
            assert caught.value.reason == "FCM OAuth 400 invalid_grant: Invalid JWT Signature."
            assert fcm.tokens_issued == 0 and fcm.calls == []


async def test_fcm_project_without_permission_is_transient(tmp_path: Path) -> None:
    # A project the account may not send for is configuration, not the message.
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm:
            credentials = fcm.write_service_account(tmp_path)
            account = json.loads(credentials.read_text())
            account["project_id"] = "someone-elses"
            credentials.write_text(json.dumps(account))

            async with FcmProvider(credentials, base_url=fcm.url, timeout=5) as p:
                with pytest.raises(TransientError) as caught:
                    await p.send(push(fcm.new_token()))
            assert type(caught.value) is TransientError
            assert caught.value.reason.startswith("FCM 403 PERMISSION_DENIED: Permission "
                                                  "'cloudmessaging.messages.create' denied")


async def test_fcm_gate_is_awaited_after_the_token_and_before_the_send(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with FcmStandIn() as fcm, fcm_provider(fcm, tmp_path) as p:
            seen, gate = recording_gate(lambda: (fcm.tokens_issued, len(fcm.calls)))
            await p.send(push(fcm.new_token()), gate)
            assert seen == [(1, 0)]
            assert len(fcm.calls) == 1


def test_fcm_credentials_are_checked_up_front(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        FcmProvider(tmp_path / "missing.json")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"project_id": "p", "client_email": "x@p"}))
    with pytest.raises(ConfigError, match="missing private_key, private_key_id, token_uri"):
        FcmProvider(partial)


# --- APNs -----------------------------------------------------------------------------------

def apns_provider(apns: ApnsStandIn, tmp_path: Path, timeout: float = 5.0,
                  team_id: str = TEAM_ID, **kwargs: Any) -> ApnsProvider:
    key_file = apns.write_key(tmp_path, key_id=KEY_ID, team_id=TEAM_ID)
    return ApnsProvider(key_file, KEY_ID, team_id, apns.topic, base_url=apns.url,
                        verify=apns.ssl_context, timeout=timeout, **kwargs)


async def test_apns_push_arrives_as_sent(tmp_path: Path) -> None:
    now = float(int(time.time()))
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, \
                apns_provider(apns, tmp_path, clock=lambda: now) as p:
            token = apns.new_token()
            await p.send(push(token, collapse_key="post-7", ttl=3600, urgent=True))

            [call] = apns.calls
            assert call.http_version == "2"
            assert call.method == "POST" and call.path == f"/3/device/{token}"
            assert call.headers["authorization"].startswith("bearer ")
            assert call.jwt_header == {"alg": "ES256", "kid": KEY_ID, "typ": "JWT"}
            assert call.jwt_claims == {"iss": TEAM_ID, "iat": int(now)}

            [got] = apns.notifications
            assert got.device == token
            assert got.headers == {"apns-topic": "com.example.herald",
                                   "apns-push-type": "alert", "apns-priority": "10",
                                   "apns-expiration": str(int(now) + 3600),
                                   "apns-collapse-id": "post-7"}
            assert got.payload == {
                "aps": {"alert": {"title": "Ada commented", "body": "Looks good to me"},
                        "sound": "default"},
                "event_id": "evt-1", "url": "/posts/7"}


async def test_apns_normal_priority_without_collapse_id(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, apns_provider(apns, tmp_path) as p:
            await p.send(push(apns.new_token(), ttl=0, data={"aps": "ignored", "k": "v"}))

            [got] = apns.notifications
            assert got.headers["apns-priority"] == "5"
            assert got.headers["apns-expiration"] == "0"
            assert "apns-collapse-id" not in got.headers
            assert got.payload["k"] == "v"
            assert got.payload["aps"]["alert"]["title"] == "Ada commented"


async def test_apns_unregistered_is_a_dead_token(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, apns_provider(apns, tmp_path) as p:
            token = apns.new_token()
            apns.dead_tokens.add(token)
            with pytest.raises(DeadToken) as caught:
                await p.send(push(token))
            assert caught.value.reason.startswith("APNs 410 Unregistered")
            assert_masked(caught.value.reason, token)


async def test_apns_bad_device_token_is_a_dead_token(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, apns_provider(apns, tmp_path) as p:
            short = "ab" * 16   # hex, but not a device token APNs knows the shape of
            with pytest.raises(DeadToken) as caught:
                await p.send(push(short))
            assert caught.value.reason.startswith("APNs 400 BadDeviceToken")
            assert_masked(caught.value.reason, short)

            with pytest.raises(DeadToken, match=r"BadDeviceToken: device token .* is not hex"):
                await p.send(push("not/hex?" + "0" * 60))
            assert len(apns.calls) == 1   # no request for a token that cannot be a path


async def test_apns_too_many_requests_to_one_device_is_a_recipient_error(
        tmp_path: Path) -> None:
    # APNs' TooManyRequests is about one device token: that push retries on the
    # ladder, and the provider is neither paused nor counted as failing.
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, apns_provider(apns, tmp_path) as p:
            apns.faults.append(ApnsFault(429, "TooManyRequests", retry_after="12"))
            with pytest.raises(RecipientError) as caught:
                await p.send(push(apns.new_token()))
            assert caught.value.retry_after == 12.0
            assert caught.value.reason.startswith("APNs 429 TooManyRequests")


async def test_apns_too_many_provider_token_updates_is_rate_limited(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, apns_provider(apns, tmp_path) as p:
            apns.faults.append(ApnsFault(429, "TooManyProviderTokenUpdates", retry_after="5"))
            with pytest.raises(RateLimited) as caught:
                await p.send(push(apns.new_token()))
            assert caught.value.retry_after == 5.0
            assert caught.value.reason.startswith("APNs 429 TooManyProviderTokenUpdates")


@pytest.mark.parametrize(("status", "reason"), [
    (500, "InternalServerError"), (503, "ServiceUnavailable")])
async def test_apns_server_errors_are_transient(tmp_path: Path, status: int,
                                                reason: str) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, apns_provider(apns, tmp_path) as p:
            apns.faults.append(ApnsFault(status))
            with pytest.raises(TransientError) as caught:
                await p.send(push(apns.new_token()))
            assert type(caught.value) is TransientError
            assert caught.value.reason.startswith(f"APNs {status} {reason}")


async def test_apns_hang_is_transient(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn(hang_seconds=30) as apns, \
                apns_provider(apns, tmp_path, timeout=0.3) as p:
            with pytest.raises(TransientError, match="timed out") as caught:
                await p.send(push(apns.new_token()))
            assert type(caught.value) is TransientError
            assert apns.notifications == []


@pytest.mark.parametrize(("fields", "status", "reason"), [
    ({"collapse_key": "c" * 65}, 400, "BadCollapseId"),
    ({"data": {"blob": "x" * 5000}}, 413, "PayloadTooLarge"),
])
async def test_apns_invalid_request_is_permanent(tmp_path: Path, fields: dict[str, Any],
                                                 status: int, reason: str) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, apns_provider(apns, tmp_path) as p:
            with pytest.raises(PermanentError) as caught:
                await p.send(push(apns.new_token(), **fields))
            assert type(caught.value) is PermanentError
            assert caught.value.reason.startswith(f"APNs {status} {reason}")


async def test_apns_topic_the_key_may_not_push_to_is_permanent(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn(topic="com.example.other") as apns:
            key_file = apns.write_key(tmp_path, key_id=KEY_ID, team_id=TEAM_ID)
            async with ApnsProvider(key_file, KEY_ID, TEAM_ID, "com.example.herald",
                                    base_url=apns.url, verify=apns.ssl_context,
                                    timeout=5) as p:
                with pytest.raises(PermanentError, match="APNs 400 TopicDisallowed"):
                    await p.send(push(apns.new_token()))


async def test_apns_expired_provider_token_is_renewed_once_and_sent(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, apns_provider(apns, tmp_path) as p:
            await p.send(push(apns.new_token()))
            apns.expire_provider_tokens()

            await p.send(push(apns.new_token()))

            assert [(c.status, c.reason) for c in apns.calls] == [
                (200, ""), (403, "ExpiredProviderToken"), (200, "")]
            first, refused, renewed = (c.provider_token for c in apns.calls)
            assert first == refused != renewed
            assert len(apns.notifications) == 2


async def test_apns_expired_provider_token_twice_is_transient(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, apns_provider(apns, tmp_path) as p:
            apns.faults.extend([ApnsFault(403, "ExpiredProviderToken")] * 2)
            with pytest.raises(TransientError) as caught:
                await p.send(push(apns.new_token()))
            assert type(caught.value) is TransientError
            assert caught.value.reason.startswith("APNs 403 ExpiredProviderToken")
            assert len(apns.calls) == 2


async def test_apns_invalid_provider_token_is_transient(tmp_path: Path) -> None:
    # A wrong team id is configuration: the breaker opens and messages wait.
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, \
                apns_provider(apns, tmp_path, team_id="OTHERTEAM1") as p:
            with pytest.raises(TransientError) as caught:
                await p.send(push(apns.new_token()))
            assert type(caught.value) is TransientError
            assert caught.value.reason.startswith("APNs 403 InvalidProviderToken")
            assert len(apns.calls) == 1


async def test_apns_provider_token_is_reused_for_50_minutes(tmp_path: Path) -> None:
    started = time.time() - 51 * 60   # first token: 51 minutes old by the third send
    clock = [started]
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, \
                apns_provider(apns, tmp_path, clock=lambda: clock[0]) as p:
            await p.send(push(apns.new_token()))
            await p.send(push(apns.new_token()))
            clock[0] = time.time()
            await p.send(push(apns.new_token()))

            tokens = [c.provider_token for c in apns.calls]
            assert tokens[0] == tokens[1] != tokens[2]
            assert [c.status for c in apns.calls] == [200, 200, 200]
            assert apns.calls[2].jwt_claims["iat"] == int(clock[0])


async def test_apns_gate_is_awaited_right_before_the_request(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, apns_provider(apns, tmp_path) as p:
            seen, gate = recording_gate(lambda: len(apns.calls))
            await p.send(push(apns.new_token()), gate)
            assert seen == [0] and len(apns.calls) == 1


async def test_apns_standin_speaks_only_http2(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT):
        async with ApnsStandIn() as apns, httpx.AsyncClient(verify=apns.ssl_context) as client:
            response = await client.post(f"{apns.url}/3/device/{apns.new_token()}",
                                         content=b"{}")
            assert response.http_version == "HTTP/1.1"
            assert response.status_code == 505
            assert apns.notifications == []


def test_apns_key_is_checked_up_front(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        ApnsProvider(tmp_path / "AuthKey_missing.p8", KEY_ID, TEAM_ID, "com.example.herald")
    with pytest.raises(ConfigError, match="needs a topic"):
        ApnsProvider(tmp_path / "AuthKey_missing.p8", KEY_ID, TEAM_ID, "")


# --- Web Push -------------------------------------------------------------------------------

async def test_webpush_arrives_encrypted_and_signed(tmp_path: Path) -> None:
    vapid_key = write_vapid_key(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with WebPushStandIn() as wp, \
                WebPushProvider(vapid_key, SUBJECT, timeout=5) as p:
            subscription = wp.subscribe(server_key=application_server_key(vapid_key))
            await p.send(push(subscription.token, collapse_key="post-7", ttl=600,
                              urgent=True))

            [got] = wp.deliveries   # the stand-in decrypted it with the subscription's keys
            assert got.subscription == subscription.id
            assert got.payload == {"title": "Ada commented", "body": "Looks good to me",
                                   "data": {"event_id": "evt-1", "url": "/posts/7"}}
            assert got.headers["ttl"] == "600"
            assert got.headers["content-encoding"] == "aes128gcm"
            assert got.headers["urgency"] == "high"
            assert got.headers["topic"] == "post-7"
            assert got.headers["authorization"].startswith("vapid t=")
            assert got.vapid_key == application_server_key(vapid_key)
            assert got.vapid_claims["aud"] == wp.url
            assert got.vapid_claims["sub"] == SUBJECT
            assert got.vapid_claims["exp"] <= time.time() + 24 * 3600


async def test_webpush_normal_urgency_and_no_topic_for_an_invalid_collapse_key(
        tmp_path: Path) -> None:
    vapid_key = write_vapid_key(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with WebPushStandIn() as wp, WebPushProvider(vapid_key, SUBJECT, timeout=5) as p:
            subscription = wp.subscribe()
            await p.send(push(subscription.token, collapse_key="post 7: not a topic",
                              data={}))

            [got] = wp.deliveries
            assert got.headers["urgency"] == "normal"
            assert got.headers["ttl"] == "86400"
            assert "topic" not in got.headers
            assert got.payload["data"] == {}


@pytest.mark.parametrize("gone", ["unsubscribed", "unknown"])
async def test_webpush_gone_subscription_is_a_dead_token(tmp_path: Path, gone: str) -> None:
    vapid_key = write_vapid_key(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with WebPushStandIn() as wp, WebPushProvider(vapid_key, SUBJECT, timeout=5) as p:
            subscription = wp.subscribe()
            if gone == "unsubscribed":
                wp.unsubscribe(subscription)
            else:
                del wp.subscribers[subscription.id]
            with pytest.raises(DeadToken) as caught:
                await p.send(push(subscription.token))
            reason = caught.value.reason
            assert reason.startswith("Web Push 410 Gone errno 103" if gone == "unsubscribed"
                                     else "Web Push 404 Not Found errno 102")
            assert subscription.endpoint not in reason and subscription.p256dh not in reason
            assert reason.endswith(f"(127.0.0.1 ...{subscription.endpoint[-6:]})")


@pytest.mark.parametrize(("token", "why"), [
    ("not json", "not JSON"),
    ('{"keys": {}}', "no endpoint"),
    ('{"endpoint": "ftp://push.example/x", "keys": {}}', "endpoint is not an http(s) URL"),
    ('{"endpoint": "https://push.example/x"}', "no keys"),
    ('{"endpoint": "https://push.example/x", "keys": {"p256dh": "AAAA", "auth": "x"}}',
     "keys.p256dh is not a P-256 public key"),
])
async def test_webpush_unusable_subscription_is_a_dead_token(tmp_path: Path, token: str,
                                                             why: str) -> None:
    vapid_key = write_vapid_key(tmp_path)
    seen, gate = recording_gate(lambda: "gate")
    async with asyncio.timeout(LIMIT):
        async with WebPushProvider(vapid_key, SUBJECT, timeout=5) as p:
            with pytest.raises(DeadToken) as caught:
                await p.send(push(token), gate)
            assert caught.value.reason == f"Web Push: unusable subscription ({why})"
            assert seen == []


async def test_webpush_too_many_requests_is_rate_limited(tmp_path: Path) -> None:
    vapid_key = write_vapid_key(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with WebPushStandIn() as wp, WebPushProvider(vapid_key, SUBJECT, timeout=5) as p:
            wp.faults.append(PushFault(429, retry_after="9"))
            with pytest.raises(RateLimited) as caught:
                await p.send(push(wp.subscribe().token))
            assert caught.value.retry_after == 9.0
            assert caught.value.reason.startswith("Web Push 429 Too Many Requests")


@pytest.mark.parametrize("status", [500, 503])
async def test_webpush_server_errors_are_transient(tmp_path: Path, status: int) -> None:
    vapid_key = write_vapid_key(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with WebPushStandIn() as wp, WebPushProvider(vapid_key, SUBJECT, timeout=5) as p:
            wp.faults.append(PushFault(status, body="<html>upstream trouble</html>"))
            with pytest.raises(TransientError) as caught:
                await p.send(push(wp.subscribe().token))
            assert type(caught.value) is TransientError
            assert caught.value.reason.startswith(f"Web Push {status} ")
            assert "upstream trouble" in caught.value.reason


async def test_webpush_hang_is_transient(tmp_path: Path) -> None:
    vapid_key = write_vapid_key(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with WebPushStandIn(hang_seconds=30) as wp, \
                WebPushProvider(vapid_key, SUBJECT, timeout=0.3) as p:
            with pytest.raises(TransientError, match="timed out") as caught:
                await p.send(push(wp.subscribe().token))
            assert type(caught.value) is TransientError
            assert wp.deliveries == []


async def test_webpush_rejected_request_is_permanent(tmp_path: Path) -> None:
    vapid_key = write_vapid_key(tmp_path)
    other_key = write_vapid_key(tmp_path, "other.pem")
    async with asyncio.timeout(LIMIT):
        async with WebPushStandIn() as wp, WebPushProvider(vapid_key, SUBJECT, timeout=5) as p:
            # Subscribed with another server's key: the push service refuses our VAPID.
            foreign = wp.subscribe(server_key=application_server_key(other_key))
            with pytest.raises(PermanentError) as caught:
                await p.send(push(foreign.token))
            assert type(caught.value) is PermanentError
            assert caught.value.reason.startswith("Web Push 403 Forbidden errno 109")

            wp.faults.append(PushFault(413))
            with pytest.raises(PermanentError, match=r"Web Push 413 .* errno 104"):
                await p.send(push(wp.subscribe().token))


async def test_webpush_refused_vapid_token_is_a_provider_failure(tmp_path: Path) -> None:
    # 401: our VAPID token itself is refused, so every push would be (breaker, failover)
    vapid_key = write_vapid_key(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with WebPushStandIn() as wp, WebPushProvider(
                vapid_key, SUBJECT, timeout=5, clock=lambda: time.time() + 13 * 3600) as p:
            # a clock 13 h ahead signs tokens expiring more than 24 h from the service's now
            with pytest.raises(TransientError) as caught:
                await p.send(push(wp.subscribe().token))
            assert type(caught.value) is TransientError
            assert caught.value.reason.startswith("Web Push 401 Unauthorized errno 109")


async def test_webpush_payload_over_one_record_is_permanent_without_a_request(
        tmp_path: Path) -> None:
    vapid_key = write_vapid_key(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with WebPushStandIn() as wp, WebPushProvider(vapid_key, SUBJECT, timeout=5) as p:
            with pytest.raises(PermanentError, match="more than 3993 fit in one record"):
                await p.send(push(wp.subscribe().token, data={"blob": "x" * 4000}))
            assert wp.calls == []


async def test_webpush_gate_is_awaited_right_before_the_request(tmp_path: Path) -> None:
    vapid_key = write_vapid_key(tmp_path)
    async with asyncio.timeout(LIMIT):
        async with WebPushStandIn() as wp, WebPushProvider(vapid_key, SUBJECT, timeout=5) as p:
            seen, gate = recording_gate(lambda: len(wp.calls))
            await p.send(push(wp.subscribe().token), gate)
            assert seen == [0] and len(wp.deliveries) == 1


def test_webpush_configuration_is_checked_up_front(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        WebPushProvider(tmp_path / "missing.pem", SUBJECT)
    with pytest.raises(ConfigError, match="must be a mailto: address or an https: URL"):
        WebPushProvider(write_vapid_key(tmp_path), "ops@herald.local")
