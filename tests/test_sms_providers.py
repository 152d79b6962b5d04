"""The Twilio and Vonage SMS providers against local servers that speak their APIs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from consumers.providers.base import SmsMessage
from consumers.providers.twilio import TwilioProvider
from consumers.providers.vonage import VonageProvider
from consumers.sms_text import fit, segments
from herald.errors import DeliveryFailure, PermanentError, RateLimited, TransientError
from tests.standins.twilio import Fault as TwilioFault
from tests.standins.twilio import TwilioStandIn
from tests.standins.vonage import Fault as VonageFault
from tests.standins.vonage import VonageStandIn

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "tw-auth-token-s3cret"
TW_FROM = "+15005550006"
KEY = "abcd1234"
SECRET = "abcdef0123456789"
VG_FROM = "herald"
TO = "+14155550100"
MASKED = "+1********00"
UK = "+447700900123"
LONG = ("Your parcel 4417 left the depot at 09:40 and will arrive between 14:00 and "
        "16:00 today. Reply with a new time if nobody is home, or open the app. ") * 4


def sms(body: str = "Your code is 4417", to: str = TO, reference: str = "evt-1") -> SmsMessage:
    return SmsMessage(to=to, body=body, segments=segments(body), reference=reference)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def twilio(token: str = TOKEN, sid: str = SID, timeout: float = 2.0,
                 **knobs: Any) -> AsyncIterator[tuple[TwilioStandIn, TwilioProvider]]:
    async with asyncio.timeout(10):
        async with TwilioStandIn(SID, TOKEN, **knobs) as tw, \
                TwilioProvider(sid, token, TW_FROM, base_url=tw.url, timeout=timeout) as p:
            yield tw, p


@contextlib.asynccontextmanager
async def vonage(secret: str = SECRET, from_: str = VG_FROM, timeout: float = 2.0,
                 **knobs: Any) -> AsyncIterator[tuple[VonageStandIn, VonageProvider]]:
    async with asyncio.timeout(10):
        async with VonageStandIn(KEY, SECRET, **knobs) as vg, \
                VonageProvider(KEY, secret, from_, base_url=vg.url, timeout=timeout) as p:
            yield vg, p


def assert_clean(failure: DeliveryFailure, *numbers: str) -> None:
    """The reason shows no full number and no credential."""
    for number in (*numbers, TO):
        assert number not in failure.reason and number.lstrip("+") not in failure.reason
    for secret in (TOKEN, SECRET, KEY):
        assert secret not in failure.reason


# --- Twilio: accepted -----------------------------------------------------------------------

async def test_twilio_message_arrives_as_sent() -> None:
    async with twilio() as (tw, p):
        await p.send(sms())

        [call] = tw.calls
        assert call.status == 201 and call.account_sid == SID
        assert call.authorization == "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
        assert tw.messages == [{"To": TO, "From": TW_FROM, "Body": "Your code is 4417"}]


async def test_twilio_long_and_unicode_bodies_arrive_whole() -> None:
    body, count = fit("Bientôt chez vous \U0001F600 " + LONG, 3)   # ô, emoji: UCS-2
    async with twilio() as (tw, p):
        await p.send(SmsMessage(to=TO, body=body, segments=count))
        await p.send(sms(LONG[:300]))
        assert [m["Body"] for m in tw.messages] == [body, LONG[:300]]
        assert count == 3 and body.endswith("…")


# --- Twilio: error mapping ------------------------------------------------------------------

@pytest.mark.parametrize(("knob", "to", "body", "code"), [
    ("none", "4155550100", "hi", 21211),        # not E.164: Twilio echoes the number
    ("opted_out", TO, "hi", 21610),             # the recipient replied STOP
    ("landlines", TO, "hi", 21614),             # not a mobile number
    ("blocked_prefixes", UK, "hi", 21408),      # region not enabled; echoes the number
    ("none", TO, "", 21602),                    # no body
    ("none", TO, "x" * 1601, 21617),            # over Twilio's 1600-character cap
])
async def test_twilio_message_problems_are_permanent(knob: str, to: str, body: str,
                                                     code: int) -> None:
    async with twilio() as (tw, p):
        tw.opted_out = {TO} if knob == "opted_out" else set()
        tw.landlines = {TO} if knob == "landlines" else set()
        tw.blocked_prefixes = {"+44"} if knob == "blocked_prefixes" else set()
        with pytest.raises(PermanentError) as caught:
            await p.send(sms(body, to=to))
        assert caught.value.reason.startswith(f"Twilio 400 code {code}: ")
        assert_clean(caught.value, to)
        assert tw.messages == []


async def test_twilio_reasons_mask_the_number_the_api_echoes() -> None:
    async with twilio() as (tw, p):
        tw.blocked_prefixes = {"+1"}
        with pytest.raises(PermanentError) as caught:
            await p.send(sms())
        assert caught.value.reason == (
            "Twilio 400 code 21408: Permission to send an SMS has not been enabled for "
            f"the region indicated by the 'To' number: {MASKED}")


async def test_twilio_429_is_rate_limited_with_retry_after() -> None:
    async with twilio(throttle=1, retry_after=7) as (tw, p):
        with pytest.raises(RateLimited) as caught:
            await p.send(sms())
        assert caught.value.retry_after == 7.0
        assert caught.value.reason == "Twilio 429 code 20429: Too Many Requests"
        assert tw.requests == 1 and tw.messages == []   # no retry of its own

        await p.send(sms())
        assert len(tw.messages) == 1


async def test_twilio_429_with_an_http_date_and_without_retry_after() -> None:
    async with asyncio.timeout(10), TwilioStandIn(SID, TOKEN) as tw:
        tw.faults = [TwilioFault(429, 20429, "Too Many Requests",
                                 retry_after="Thu, 01 Jan 1970 11:46:55 GMT"),
                     TwilioFault(429, 20429, "Too Many Requests")]
        async with TwilioProvider(SID, TOKEN, TW_FROM, base_url=tw.url, timeout=2,
                                  clock=lambda: 42400.0) as p:
            with pytest.raises(RateLimited) as caught:
                await p.send(sms())
            assert caught.value.retry_after == 15.0
            with pytest.raises(RateLimited) as caught:
                await p.send(sms())
            assert caught.value.retry_after is None   # the chain then pauses its default


async def test_twilio_queue_full_code_is_rate_limited_too() -> None:
    async with twilio() as (tw, p):
        tw.faults = [TwilioFault(400, 21611, "This 'From' number has exceeded the maximum "
                                             "number of queued messages")]
        with pytest.raises(RateLimited, match="code 21611"):
            await p.send(sms())


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_twilio_server_errors_are_transient(status: int) -> None:
    async with twilio() as (tw, p):
        tw.faults = [TwilioFault(status, message="Service is down")]
        with pytest.raises(TransientError) as caught:
            await p.send(sms())
        assert type(caught.value) is TransientError
        assert caught.value.reason == f"Twilio {status} code {20000 + status}: Service is down"
        assert caught.value.retry_after is None


async def test_twilio_non_json_error_page_is_transient_and_redacted() -> None:
    async with twilio() as (tw, p):
        tw.faults = [TwilioFault(502, body=f"<html>bad gateway for {TO} ({TOKEN})</html>")]
        with pytest.raises(TransientError) as caught:
            await p.send(sms())
        assert caught.value.reason == (f"Twilio 502: <html>bad gateway for {MASKED} "
                                       "(<auth-token>)</html>")


async def test_twilio_bad_credentials_are_transient_and_stay_out_of_the_reason() -> None:
    # Our token, not the message: the next provider can still send it, the breaker opens.
    async with twilio(token="wrong-token-value") as (tw, p):
        with pytest.raises(TransientError) as caught:
            await p.send(sms())
        assert type(caught.value) is TransientError
        assert caught.value.reason == "Twilio 401 code 20003: Authenticate"
        assert "wrong-token-value" not in repr(p)
        assert tw.calls[0].status == 401 and tw.messages == []


async def test_twilio_wrong_url_is_transient() -> None:
    # A base URL with a stray path: Twilio's 404 (code 20404), a set-up problem.
    async with asyncio.timeout(10), TwilioStandIn(SID, TOKEN) as tw, \
            TwilioProvider(SID, TOKEN, TW_FROM, base_url=tw.url + "/v1", timeout=2) as p:
        with pytest.raises(TransientError) as caught:
            await p.send(sms())
        assert type(caught.value) is TransientError
        assert caught.value.reason.startswith("Twilio 404 code 20404: ")
        assert SID not in caught.value.reason and "<account-sid>" in caught.value.reason


async def test_twilio_unknown_sender_is_transient() -> None:
    async with twilio() as (tw, p):
        tw.senders = {"+15005550007"}
        with pytest.raises(TransientError) as caught:
            await p.send(sms())
        assert type(caught.value) is TransientError
        assert caught.value.reason.startswith("Twilio 400 code 21606: ")


async def test_twilio_hang_is_transient() -> None:
    async with twilio(hang_seconds=30, timeout=0.3) as (tw, p):
        with pytest.raises(TransientError, match="timed out") as caught:
            await p.send(sms())
        assert type(caught.value) is TransientError
        assert tw.messages == []


async def test_twilio_connection_refused_is_transient() -> None:
    async with asyncio.timeout(10), TwilioProvider(
            SID, TOKEN, TW_FROM, base_url=f"http://127.0.0.1:{free_port()}", timeout=2) as p:
        with pytest.raises(TransientError, match="ConnectError") as caught:
            await p.send(sms())
        assert_clean(caught.value)


# --- Vonage: accepted -----------------------------------------------------------------------

async def test_vonage_message_arrives_as_sent() -> None:
    async with vonage() as (vg, p):
        await p.send(sms())

        assert vg.messages == [{"api_key": KEY, "api_secret": SECRET, "from": VG_FROM,
                                "to": "14155550100", "text": "Your code is 4417",
                                "type": "text", "client-ref": "evt-1"}]
        assert vg.calls[0].answer["messages"][0]["status"] == "0"


async def test_vonage_unicode_text_goes_as_unicode_in_parts() -> None:
    body, count = fit("Привет! Ваш заказ готов. " * 6, 3)   # Cyrillic: UCS-2
    assert count == 3
    async with vonage() as (vg, p):
        await p.send(SmsMessage(to=TO, body=body, segments=count, reference="evt-2"))

        [sent] = vg.messages
        assert sent["type"] == "unicode" and sent["text"] == body
        answer = vg.calls[0].answer
        assert answer["message-count"] == "3"
        assert [m["status"] for m in answer["messages"]] == ["0", "0", "0"]
        assert {m["client-ref"] for m in answer["messages"]} == {"evt-2"}


@pytest.mark.parametrize(("body", "kind"), [
    (LONG[:306], "text"),                  # 2 GSM-7 parts
    (LONG[:307], "text"),                  # 3
    ("€" * 81, "text"),                    # extension chars: 162 septets, 2 parts
    ("\U0001F600" * 36, "unicode"),        # emoji: 72 units, 2 parts
])
async def test_vonage_part_count_matches_herald_arithmetic(body: str, kind: str) -> None:
    async with vonage() as (vg, p):
        await p.send(sms(body))
        assert vg.messages[0]["type"] == kind
        assert vg.calls[0].answer["message-count"] == str(segments(body))


async def test_vonage_number_sender_goes_without_plus_and_reference_is_capped() -> None:
    async with vonage(from_="+15005550006") as (vg, p):
        await p.send(sms(reference="r" * 64))
        assert vg.messages[0]["from"] == "15005550006"
        assert vg.messages[0]["client-ref"] == "r" * 40


# --- Vonage: error mapping ------------------------------------------------------------------

@pytest.mark.parametrize(("knob", "to", "status"), [
    ("none", "+1234", "3"),              # too short to be a number
    ("barred", TO, "7"),
    ("whitelist", TO, "29"),             # trial account, destination not whitelisted
    ("unroutable", UK, "6"),             # Vonage echoes the number
    ("senders", TO, "15"),               # sender ID refused for this destination
])
async def test_vonage_message_problems_are_permanent(knob: str, to: str, status: str) -> None:
    async with vonage() as (vg, p):
        vg.barred = {TO.lstrip("+")} if knob == "barred" else set()
        vg.whitelist = {"447700900000"} if knob == "whitelist" else None
        vg.unroutable_prefixes = {"44"} if knob == "unroutable" else set()
        vg.senders = {"AcmeInc"} if knob == "senders" else None
        with pytest.raises(PermanentError) as caught:
            await p.send(sms(to=to))
        assert caught.value.reason.startswith(f"Vonage status {status} (")
        assert_clean(caught.value, to)
        assert vg.messages == []


async def test_vonage_reasons_mask_the_number_the_api_echoes() -> None:
    async with vonage() as (vg, p):
        vg.unroutable_prefixes = {"1"}
        with pytest.raises(PermanentError) as caught:
            await p.send(sms())
        assert caught.value.reason == ("Vonage status 6 (Invalid Message): Unroutable "
                                       f"message - rejected ({MASKED})")


@pytest.mark.parametrize(("status", "expected"), [
    ("1", RateLimited),
    ("2", PermanentError),
    ("3", PermanentError),
    ("4", TransientError),
    ("5", TransientError),
    ("6", PermanentError),
    ("7", PermanentError),
    ("8", TransientError),
    ("9", TransientError),
    ("10", RateLimited),
    ("11", TransientError),
    ("12", PermanentError),
    ("15", PermanentError),
    ("29", PermanentError),
    ("33", PermanentError),
    ("99", TransientError),   # a status we do not know: not the message's fault
])
async def test_vonage_status_table(status: str, expected: type[DeliveryFailure]) -> None:
    async with vonage() as (vg, p):
        vg.faults = [VonageFault(status=status, error_text="Scripted")]
        with pytest.raises(DeliveryFailure) as caught:
            await p.send(sms())
        assert type(caught.value) is expected
        assert caught.value.reason.startswith(f"Vonage status {status} (")
        assert caught.value.reason.endswith(": Scripted")


async def test_vonage_throttled_is_rate_limited_then_accepted() -> None:
    async with vonage(throttle=1) as (vg, p):
        with pytest.raises(RateLimited) as caught:
            await p.send(sms())
        assert caught.value.reason == "Vonage status 1 (Throttled): Throttled"
        assert caught.value.retry_after == 1.0
        await p.send(sms())
        assert vg.requests == 2 and len(vg.messages) == 1


async def test_vonage_http_429_honours_retry_after() -> None:
    async with vonage() as (vg, p):
        vg.faults = [VonageFault(http=429, retry_after=5, body="Too Many Requests")]
        with pytest.raises(RateLimited) as caught:
            await p.send(sms())
        assert caught.value.retry_after == 5.0
        assert caught.value.reason == "Vonage 429 Too Many Requests: Too Many Requests"


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_vonage_server_errors_are_transient(status: int) -> None:
    async with vonage() as (vg, p):
        vg.faults = [VonageFault(http=status)]
        with pytest.raises(TransientError) as caught:
            await p.send(sms())
        assert type(caught.value) is TransientError
        assert caught.value.reason.startswith(f"Vonage {status} ")


async def test_vonage_bad_credentials_are_transient_and_stay_out_of_the_reason() -> None:
    async with vonage(secret="0000wrongsecret0") as (vg, p):
        with pytest.raises(TransientError) as caught:
            await p.send(sms())
        assert type(caught.value) is TransientError
        assert caught.value.reason == "Vonage status 4 (Invalid Credentials): Bad Credentials"
        assert "0000wrongsecret0" not in repr(p)
        assert vg.calls[0].form["api_secret"] == "0000wrongsecret0"


async def test_vonage_out_of_credit_is_transient() -> None:
    async with vonage(balance=0.0) as (_, p):
        with pytest.raises(TransientError) as caught:
            await p.send(sms())
        assert type(caught.value) is TransientError
        assert caught.value.reason.startswith("Vonage status 9 (Partner Quota Violation)")


async def test_vonage_one_failed_part_fails_the_message() -> None:
    async with vonage() as (vg, p):
        vg.faults = [VonageFault(status="5", error_text="Internal Error", part=2)]
        with pytest.raises(TransientError) as caught:
            await p.send(sms(LONG[:400]))     # 3 parts
        assert caught.value.reason == ("Vonage status 5 (Internal Error): Internal Error "
                                       "(part 2 of 3, 2 accepted)")


async def test_vonage_hang_is_transient() -> None:
    async with vonage(hang_seconds=30, timeout=0.3) as (vg, p):
        with pytest.raises(TransientError, match="timed out") as caught:
            await p.send(sms())
        assert type(caught.value) is TransientError
        assert vg.messages == []


async def test_vonage_unreadable_200_is_transient() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>maintenance</html>")

    async with asyncio.timeout(10), httpx.AsyncClient(
            transport=httpx.MockTransport(handler)) as client:
        p = VonageProvider(KEY, SECRET, VG_FROM, base_url="https://vonage.invalid",
                           client=client)
        with pytest.raises(TransientError, match="unreadable answer"):
            await p.send(sms())
        await p.aclose()
        assert not client.is_closed   # a shared client stays open


# --- both: the gate -------------------------------------------------------------------------

@pytest.mark.parametrize("provider", ["twilio", "vonage"])
async def test_gate_is_awaited_right_before_the_request(provider: str) -> None:
    pair = twilio() if provider == "twilio" else vonage()
    async with pair as (standin, p):
        seen: list[int] = []

        async def gate() -> None:
            seen.append(standin.requests)

        await p.send(sms(), gate)
        assert seen == [0] and standin.requests == 1


@pytest.mark.parametrize("provider", ["twilio", "vonage"])
async def test_a_gate_that_refuses_sends_nothing(provider: str) -> None:
    pair = twilio() if provider == "twilio" else vonage()
    async with pair as (standin, p):
        async def gate() -> None:
            raise RateLimited("local limit", retry_after=2.0)

        with pytest.raises(RateLimited, match="local limit"):
            await p.send(sms(), gate)
        assert standin.requests == 0


def test_constructors_refuse_missing_credentials() -> None:
    with pytest.raises(ValueError, match="auth token"):
        TwilioProvider(SID, "", TW_FROM)
    with pytest.raises(ValueError, match="From"):
        TwilioProvider(SID, TOKEN, "")
    with pytest.raises(ValueError, match="API secret"):
        VonageProvider(KEY, "", VG_FROM)
