"""The SendGrid provider against a local server that speaks the v3 Mail Send API."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import time
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import httpx
import pytest

from consumers.email import EmailChannel
from consumers.mime import OutgoingEmail
from consumers.providers.http import retry_after
from consumers.providers.sendgrid import SendGridProvider, to_sendgrid
from consumers.templates import Renderer
from herald.errors import ConfigError, PermanentError, RateLimited, TransientError
from herald.settings import REPO_ROOT, load_settings
from tests.standins.sendgrid import SendGridStandIn
from topology.envelope import Actor, Envelope, Recipient

KEY = "SG.test-key.s3cret-part"
ADA = "ada@example.com"


def compose(subject_override: str | None = None, cc: str | None = None, *,
            parsed: bool = False) -> OutgoingEmail | EmailMessage:
    """The multipart email the email channel builds for a user.signup event: as built
    (an ``OutgoingEmail``), or parsed from its bytes into an ``EmailMessage`` to change."""
    channel = EmailChannel(providers=None,  # type: ignore[arg-type]
                           renderer=Renderer(REPO_ROOT / "templates"),
                           store=None,  # type: ignore[arg-type]
                           sender="herald <no-reply@herald.local>")
    envelope = Envelope(id="evt-123", type="user.signup", actor=Actor(id="u1"),
                        recipients=[Recipient(user_id="u1", email=ADA, name="Ada Lovelace")])
    outgoing = channel.compose(envelope, envelope.recipients[0])
    if subject_override is None and cc is None and not parsed:
        return outgoing
    message = email.message_from_bytes(outgoing.as_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    if subject_override is not None:
        message.replace_header("Subject", subject_override)
    if cc is not None:
        message["Cc"] = cc
    return message


def provider(sg: SendGridStandIn, key: str = KEY, timeout: float = 2.0) -> SendGridProvider:
    return SendGridProvider(key, base_url=sg.url, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the JSON body --------------------------------------------------------------------------

def test_body_carries_everything_the_channel_put_in_the_email() -> None:
    body = to_sendgrid(compose())

    assert body["from"] == {"email": "no-reply@herald.local", "name": "herald"}
    assert body["personalizations"] == [{
        "to": [{"email": ADA, "name": "Ada Lovelace"}],
        "custom_args": {"herald_event_type": "user.signup", "herald_event_id": "evt-123"},
    }]
    assert body["subject"] == "Welcome to herald, Ada Lovelace"
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert body["content"][0]["value"].startswith("Hi Ada Lovelace,")
    assert "<strong>ada@example.com</strong>" in body["content"][1]["value"]
    assert body["headers"] == {"Message-ID": "<evt-123.u1@herald>",
                               "X-Herald-Event": "user.signup evt-123"}
    assert "attachments" not in body


def test_text_only_email_and_cc() -> None:
    message = EmailMessage()
    message["From"] = "no-reply@herald.local"
    message["To"] = "Bob <bob@example.com>"
    message["Cc"] = "carol@example.com"
    message["Subject"] = "Hi"
    message.set_content("plain only")

    body = to_sendgrid(message)

    assert body["from"] == {"email": "no-reply@herald.local"}
    assert body["personalizations"] == [{"to": [{"email": "bob@example.com", "name": "Bob"}],
                                         "cc": [{"email": "carol@example.com"}]}]
    assert body["content"] == [{"type": "text/plain", "value": "plain only\n"}]
    assert "headers" not in body


def test_attachments_are_base64() -> None:
    message = compose(parsed=True)
    assert isinstance(message, EmailMessage)
    message.add_attachment(b"%PDF-1", maintype="application", subtype="pdf",
                           filename="receipt.pdf")

    body = to_sendgrid(message)

    assert body["attachments"] == [{"content": "JVBERi0x", "type": "application/pdf",
                                    "filename": "receipt.pdf", "disposition": "attachment"}]
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]


def test_message_without_recipient_is_permanent() -> None:
    message = EmailMessage()
    message["From"] = "no-reply@herald.local"
    message["Subject"] = "Hi"
    message.set_content("x")
    with pytest.raises(PermanentError, match="no To address"):
        to_sendgrid(message)


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Retry-After": "7"}, 7.0),
    ({"Retry-After": "1.5", "X-RateLimit-Reset": "1000090"}, 1.5),
    ({"Retry-After": "Thu, 01 Jan 1970 11:46:55 GMT"}, 15.0),   # epoch 42415 - now 42400
    ({"X-RateLimit-Reset": "42430"}, 30.0),
    ({"Retry-After": "soon", "X-RateLimit-Reset": "42410"}, 10.0),
    ({"X-RateLimit-Reset": "42000"}, 0.0),                     # already past: no wait
    ({"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0"}, None),
])
def test_retry_after_parsing(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(httpx.Headers(headers), now=42400.0) == expected


def test_sendgrid_url_setting_is_validated() -> None:
    assert load_settings().sendgrid_url == "https://api.sendgrid.com"
    assert load_settings(sendgrid_api_key="").sendgrid_api_key is None
    with pytest.raises(ConfigError, match=r"HERALD_SENDGRID_URL: must be an http\(s\) URL"):
        load_settings(sendgrid_url="api.sendgrid.com")


# --- against the stand-in -------------------------------------------------------------------

async def test_multipart_email_arrives_as_sent() -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn(require_key=KEY) as sg, provider(sg) as p:
            await p.send(compose())

            assert sg.requests == 1
            assert sg.calls[0].authorization == f"Bearer {KEY}"
            [got] = sg.messages
            assert got["from"] == {"email": "no-reply@herald.local", "name": "herald"}
            assert got["personalizations"][0]["to"] == [{"email": ADA, "name": "Ada Lovelace"}]
            assert got["personalizations"][0]["custom_args"]["herald_event_id"] == "evt-123"
            assert got["subject"] == "Welcome to herald, Ada Lovelace"
            assert [c["type"] for c in got["content"]] == ["text/plain", "text/html"]
            assert "You signed up with ada@example.com." in got["content"][0]["value"]
            assert got["content"][1]["value"].startswith("<!doctype html>")
            assert got["headers"]["Message-ID"] == "<evt-123.u1@herald>"
            assert got["headers"]["X-Herald-Event"] == "user.signup evt-123"


async def test_429_is_rate_limited_with_retry_after_and_no_retry_of_its_own() -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn(rate_limit_first=1, retry_after=7) as sg, provider(sg) as p:
            with pytest.raises(RateLimited) as caught:
                await p.send(compose())
            assert caught.value.retry_after == 7.0
            assert "429" in caught.value.reason and "too many requests" in caught.value.reason
            assert sg.requests == 1 and sg.messages == []   # the broker ladder retries, not us

            await p.send(compose())
            assert len(sg.messages) == 1


async def test_429_with_http_date_retry_after() -> None:
    async with asyncio.timeout(10):
        when = formatdate(time.time() + 20, usegmt=True)
        async with SendGridStandIn(rate_limit_first=1, retry_after=when) as sg, provider(sg) as p:
            with pytest.raises(RateLimited) as caught:
                await p.send(compose())
            assert caught.value.retry_after is not None
            assert 18.0 <= caught.value.retry_after <= 20.5


async def test_429_without_retry_after_uses_ratelimit_reset() -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn(rate_limit_first=1, retry_after=None,
                                   rate_limit_reset=30) as sg, provider(sg) as p:
            with pytest.raises(RateLimited) as caught:
                await p.send(compose())
            assert caught.value.retry_after is not None
            assert 29.0 <= caught.value.retry_after <= 31.5


@pytest.mark.parametrize("status", [500, 502, 503, 408])
async def test_server_errors_are_transient(status: int) -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn(always_status=status) as sg, provider(sg) as p:
            with pytest.raises(TransientError) as caught:
                await p.send(compose())
            assert type(caught.value) is TransientError   # not RateLimited, not permanent
            assert caught.value.reason.startswith(f"SendGrid {status}")
            assert caught.value.retry_after is None


async def test_fail_first_then_accepts() -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn(fail_first=2, status=503) as sg, provider(sg) as p:
            for _ in range(2):
                with pytest.raises(TransientError, match="503"):
                    await p.send(compose())
            await p.send(compose())
            assert sg.requests == 3 and len(sg.messages) == 1


async def test_hang_is_transient_within_the_timeout() -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn(hang_seconds=30) as sg, provider(sg, timeout=0.3) as p:
            started = time.monotonic()
            with pytest.raises(TransientError, match="timed out") as caught:
                await p.send(compose())
            assert time.monotonic() - started < 2.0
            assert type(caught.value) is TransientError
            assert sg.messages == []


async def test_400_is_permanent_and_names_sendgrids_message() -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn() as sg, provider(sg) as p:
            with pytest.raises(PermanentError) as caught:
                await p.send(compose(subject_override=""))
            assert caught.value.reason.startswith("SendGrid 400")
            assert "The subject is required" in caught.value.reason
            assert "(field subject)" in caught.value.reason
            assert sg.messages == []


async def test_400_reason_never_shows_the_recipient_address() -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn() as sg, provider(sg) as p:
            with pytest.raises(PermanentError) as caught:
                await p.send(compose(cc=ADA))   # SendGrid echoes the duplicate address
            reason = caught.value.reason
            assert "should be unique" in reason and "<address>" in reason
            assert ADA not in reason and "ada@" not in reason


async def test_wrong_key_is_transient_and_the_key_stays_out_of_the_reason() -> None:
    # The key is ours, not the message's: a fallback provider may still send it.
    async with asyncio.timeout(10):
        async with SendGridStandIn(require_key=KEY) as sg, provider(sg, key="SG.wrong.key") as p:
            with pytest.raises(TransientError) as caught:
                await p.send(compose())
            reason = caught.value.reason
            assert reason.startswith("SendGrid 401")
            assert "authorization grant is invalid" in reason
            assert type(caught.value) is TransientError
            assert "SG.wrong.key" not in reason and KEY not in reason
            assert "SG.wrong.key" not in repr(p)
            assert sg.calls[0].authorization == "Bearer SG.wrong.key"


async def test_forbidden_is_transient() -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn(always_status=403) as sg, provider(sg) as p:
            with pytest.raises(TransientError) as caught:
                await p.send(compose())
            assert type(caught.value) is TransientError
            assert caught.value.reason.startswith("SendGrid 403 ")


@pytest.mark.parametrize(("status", "text"), [(404, "not found"), (413, "content too large")])
async def test_other_client_errors_are_permanent(status: int, text: str) -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn(always_status=status) as sg, provider(sg) as p:
            with pytest.raises(PermanentError) as caught:
                await p.send(compose())
            reason = caught.value.reason
            assert reason.startswith(f"SendGrid {status} ") and reason.endswith(f": {text}")
            assert type(caught.value) is PermanentError


async def test_connection_refused_is_transient() -> None:
    async with asyncio.timeout(10):
        async with SendGridProvider(KEY, base_url=f"http://127.0.0.1:{free_port()}",
                                    timeout=2) as p:
            with pytest.raises(TransientError, match="ConnectError") as caught:
                await p.send(compose())
            assert type(caught.value) is TransientError
            assert KEY not in caught.value.reason


async def test_non_json_error_body_and_echoed_key_are_redacted() -> None:
    key = "plain-secret-without-sg-shape"   # only the literal-key redaction can catch it

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == f"Bearer {key}"
        return httpx.Response(502, text=f"<html>bad gateway {key} for {ADA}</html>")

    async with asyncio.timeout(10):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            p = SendGridProvider(key, base_url="https://sg.invalid", timeout=2, client=client)
            with pytest.raises(TransientError) as caught:
                await p.send(compose())
            reason = caught.value.reason
            assert reason == "SendGrid 502 Bad Gateway: <html>bad gateway <api-key> for " \
                             "<address></html>"


async def test_shared_client_is_reused_and_left_open() -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn() as sg, httpx.AsyncClient() as client:
            p = SendGridProvider(KEY, base_url=sg.url, timeout=2, client=client)
            await p.send(compose())
            await p.send(compose())
            await p.aclose()
            assert not client.is_closed
            assert len(sg.messages) == 2

        own = SendGridProvider(KEY, base_url="http://127.0.0.1:9", timeout=1)
        await own.aclose()
        assert own._client.is_closed


async def test_standin_validates_like_the_real_api() -> None:
    async with asyncio.timeout(10):
        async with SendGridStandIn() as sg, httpx.AsyncClient(base_url=sg.url) as client:
            r = await client.post("/v3/mail/send", json={})
            assert r.status_code == 400
            fields = {e["field"] for e in r.json()["errors"]}
            assert fields == {"personalizations", "from", "subject", "content"}

            good: dict[str, Any] = {
                "personalizations": [{"to": [{"email": "x@example.com"}]}],
                "from": {"email": "a@example.com"}, "subject": "s",
                "content": [{"type": "text/html", "value": "<p>h</p>"},
                            {"type": "text/plain", "value": "p"}],
            }
            r = await client.post("/v3/mail/send", json=good)
            assert r.status_code == 400 and r.json()["errors"][0]["field"] == "content"

            good["content"].reverse()
            r = await client.post("/v3/mail/send", json=good)
            assert r.status_code == 202 and r.content == b""
            assert r.headers["X-Message-Id"]
            assert sg.messages == [good]
