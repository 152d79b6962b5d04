"""Who a failure is about: one recipient, the message, or the provider.

Recipient-level failures (SMTP 450/451/452, greylisting) retry on the ladder but
never count toward a circuit breaker and never fail over; provider-level ones
(421, other 4xx, connection refused, timeouts, auth) do both. The SMTP cases run
the real ``SmtpProvider`` against the aiosmtpd sink; the backup is the real
``SendGridProvider`` against its stand-in.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from consumers.providers.chain import ProviderChain
from consumers.providers.sendgrid import SendGridProvider
from consumers.providers.smtp import SmtpProvider, Stage, classify
from consumers.ratelimit import TokenBucketLimiter
from herald.errors import (
    ChannelDown,
    DeliveryFailure,
    PermanentError,
    RateLimited,
    RecipientError,
    TransientError,
)
from herald.mailsink import Faults, MailSink, start_sink
from tests.standins.sendgrid import SendGridStandIn
from tests.tcpproxy import free_port

KEY = "SG.test.key"
LIMIT = 30  # a safety net for a wedged test, not a timing assertion


# --- classify: the table ---------------------------------------------------------------

CASES: list[tuple[int, str, Stage, type[DeliveryFailure]]] = [
    # one recipient, for now: the ladder retries it, nothing else notices
    (450, "4.2.0 Recipient address rejected: Greylisted", "rcpt", RecipientError),
    (451, "4.7.1 Greylisted, please try again later", "rcpt", RecipientError),
    (452, "4.2.2 Mailbox full", "rcpt", RecipientError),
    (450, "4.2.1 Mailbox busy, try again later", "data", RecipientError),
    (451, "4.3.0 Temporary failure, try again", "data", RecipientError),
    (452, "4.3.1 Insufficient system storage", "data", RecipientError),
    # "rate" inside another word is no rate limit
    (451, "4.3.0 Temporary failure while the message was generated", "data", RecipientError),
    # "slow down", whatever the code: a wait, not a failure
    (451, "4.7.1 Too many messages, slow down", "rcpt", RateLimited),
    (450, "4.2.1 receiving mail at a rate that prevents additional messages", "rcpt",
     RateLimited),
    (421, "4.7.0 Rate limit exceeded, too many messages", "data", RateLimited),
    (421, "4.7.0 Too many connections", "connect", RateLimited),
    # the provider: breaker and failover
    (421, "4.4.2 Service shutting down", "rcpt", TransientError),
    (421, "4.3.0 Service not available", "data", TransientError),
    (421, "4.3.2 Service not available", "connect", TransientError),
    (454, "4.7.0 TLS not available due to temporary reason", "connect", TransientError),
    (454, "4.3.0 Temporary service failure", "data", TransientError),
    (451, "4.3.0 Local error in processing", "mail", TransientError),  # MAIL: our sender
    (554, "5.7.1 No SMTP service here", "connect", TransientError),  # greeting refused
    (535, "5.7.8 Authentication credentials invalid", "auth", TransientError),
    (534, "5.7.9 Authentication mechanism is too weak", "auth", TransientError),
    (530, "5.7.0 Authentication required", "auth", TransientError),
    (530, "5.7.0 Authentication required", "mail", TransientError),
    (454, "4.7.0 Temporary authentication failure", "auth", TransientError),
    (-1, "Malformed SMTP response line", "data", TransientError),  # no SMTP code at all
    # the message or the address: no retry can help
    (550, "5.1.1 No such user", "rcpt", PermanentError),
    (553, "5.1.3 Bad recipient address syntax", "rcpt", PermanentError),
    (552, "5.3.4 Message too big", "data", PermanentError),
    (554, "5.7.1 Message rejected", "data", PermanentError),
    (550, "5.7.1 Sender rejected", "mail", PermanentError),
]


@pytest.mark.parametrize(("code", "text", "stage", "expected"), CASES)
def test_smtp_reply_classification(code: int, text: str, stage: Stage,
                                   expected: type[DeliveryFailure]) -> None:
    error = classify(code, text, stage)
    assert type(error) is expected
    assert error.reason == f"SMTP {code} {text}"


def test_smtp_reasons_mask_the_mailbox() -> None:
    error = classify(450, "4.2.0 <ada@example.com>: Recipient address rejected: Greylisted")
    assert isinstance(error, RecipientError)
    assert error.reason == "SMTP 450 4.2.0 <address>: Recipient address rejected: Greylisted"


# --- the real provider against the real sink: each stage maps as the table says -------


def compose(to: str = "ada@example.com") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "herald@example.com"
    message["To"] = to
    message["Subject"] = "Welcome"
    message.set_content("Hello")
    return message


@pytest.fixture
async def sink() -> AsyncIterator[MailSink]:
    sink = MailSink(faults=Faults())
    server = await start_sink(sink)
    sink.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    yield sink
    server.close()
    await server.wait_closed()


def smtp(sink: MailSink) -> SmtpProvider:
    return SmtpProvider(f"smtp://127.0.0.1:{sink.port}", timeout=5)  # type: ignore[attr-defined]


async def test_a_greylisted_rcpt_is_a_recipient_error_then_accepted(sink: MailSink) -> None:
    sink.faults.greylist_seconds = 1.0
    provider = smtp(sink)
    async with asyncio.timeout(LIMIT):
        for _ in range(2):  # the first attempt and one inside the window
            with pytest.raises(RecipientError, match=r"SMTP 451 4\.7\.1 Greylisted"):
                await provider.send(compose())
        await asyncio.sleep(1.1)
        await provider.send(compose())  # past the window: accepted
        with pytest.raises(RecipientError):  # another address has a window of its own
            await provider.send(compose("carol@example.com"))
    assert sink.greylisted == 3
    assert len(sink.messages) == 1
    assert sink.received == 1  # refused at RCPT: DATA never came for the others


async def test_a_4xx_at_data_is_a_recipient_error_and_421_a_provider_one(
        sink: MailSink) -> None:
    provider = smtp(sink)
    async with asyncio.timeout(LIMIT):
        sink.faults.refuse_always = "451 4.3.0 Temporary failure, try again"
        with pytest.raises(RecipientError):
            await provider.send(compose())
        sink.faults.refuse_always = "421 4.3.0 Service not available, closing channel"
        with pytest.raises(TransientError) as caught:
            await provider.send(compose())
    assert type(caught.value) is TransientError


class _RefusingSender(MailSink):
    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        return "451 4.3.0 Local error in processing"


async def test_a_4xx_at_mail_from_is_a_provider_failure() -> None:
    refusing = _RefusingSender()
    server = await start_sink(refusing)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(LIMIT):
            with pytest.raises(TransientError) as caught:
                await SmtpProvider(f"smtp://127.0.0.1:{port}", timeout=5).send(compose())
    finally:
        server.close()
        await server.wait_closed()
    assert type(caught.value) is TransientError
    assert caught.value.reason.startswith("SMTP 451 4.3.0 Local error")


async def test_refused_credentials_are_a_provider_failure() -> None:
    def deny(server: Any, session: Any, envelope: Any, mechanism: str,
             auth_data: Any) -> AuthResult:
        return AuthResult(success=False, handled=False)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(MailSink(), hostname="herald-mailsink", authenticator=deny,
                     auth_require_tls=False), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = SmtpProvider(f"smtp://herald:wrong-password@127.0.0.1:{port}", timeout=5)
    try:
        async with asyncio.timeout(LIMIT):
            with pytest.raises(TransientError) as caught:
                await provider.send(compose())
    finally:
        server.close()
        await server.wait_closed()
    assert type(caught.value) is TransientError
    assert caught.value.reason.startswith("SMTP 535")
    assert "wrong-password" not in caught.value.reason


async def test_connection_refused_is_a_provider_failure() -> None:
    provider = SmtpProvider(f"smtp://127.0.0.1:{free_port()}", timeout=2)
    async with asyncio.timeout(LIMIT):
        with pytest.raises(TransientError) as caught:
            await provider.send(compose())
    assert type(caught.value) is TransientError


# --- the chain: recipient-level failures stay with the message ------------------------

THRESHOLD = 3


@pytest.fixture
async def backup() -> AsyncIterator[SendGridStandIn]:
    async with SendGridStandIn(require_key=KEY) as sg:
        yield sg


def chain(primary: SmtpProvider, backup: SendGridStandIn) -> ProviderChain[EmailMessage]:
    limiter = TokenBucketLimiter({}, f"t-{uuid.uuid4().hex[:8]}")
    return ProviderChain("email", [primary, SendGridProvider(KEY, base_url=backup.url,
                                                             timeout=5)],
                         limiter, threshold=THRESHOLD, cooldown=60)


async def test_recipient_errors_neither_fail_over_nor_open_the_breaker(
        sink: MailSink, backup: SendGridStandIn) -> None:
    # Given a greylisting primary (a window longer than the test) and a healthy backup
    sink.faults.greylist_seconds = 3600
    providers = chain(smtp(sink), backup)
    try:
        async with asyncio.timeout(LIMIT):
            # When twice the threshold of recipients are greylisted in a row
            for i in range(THRESHOLD * 2):
                with pytest.raises(RecipientError):
                    await providers.send(compose(f"u{i}@example.com"))
            # Then the backup was never asked, and the primary's circuit is still closed
            assert backup.requests == 0
            assert await providers.states() == {"smtp": "closed", "sendgrid": "closed"}
            assert await providers.unavailable_for() == 0
            # And the next recipient, past the greylist, goes by the primary
            sink.faults.greylist_seconds = None
            assert await providers.send(compose("new@example.com")) == "smtp"
    finally:
        await providers.aclose()
    assert sink.greylisted == THRESHOLD * 2 and len(sink.messages) == 1


@pytest.mark.parametrize("outage", ["421", "connection refused"])
async def test_provider_failures_fail_over_and_open_the_breaker(
        sink: MailSink, backup: SendGridStandIn, outage: str) -> None:
    # Given a primary that answers 421 (or is not there at all) and a healthy backup
    if outage == "421":
        sink.faults.refuse_always = "421 4.3.0 Service not available, closing channel"
        primary = smtp(sink)
    else:
        primary = SmtpProvider(f"smtp://127.0.0.1:{free_port()}", timeout=2)
    providers = chain(primary, backup)
    try:
        async with asyncio.timeout(LIMIT):
            # When threshold messages are sent
            for i in range(THRESHOLD):
                assert await providers.send(compose(f"u{i}@example.com")) == "sendgrid"
            # Then each failed over on the same attempt, and the primary's circuit opened
            assert backup.requests == THRESHOLD
            assert (await providers.states())["smtp"] == "opened"
            # And the next goes straight to the backup, without trying the primary
            attempts = sink.received
            assert await providers.send(compose("next@example.com")) == "sendgrid"
            assert sink.received == attempts
            # And once the backup's circuit opens too, the channel is down (the worker pauses)
            backup.always_status = 503
            seen: list[type[DeliveryFailure]] = []
            for _ in range(THRESHOLD):
                with pytest.raises(TransientError) as failed:
                    await providers.send(compose("late@example.com"))
                seen.append(type(failed.value))
            assert seen == [TransientError] * (THRESHOLD - 1) + [ChannelDown]
            assert await providers.unavailable_for() > 0
    finally:
        await providers.aclose()
