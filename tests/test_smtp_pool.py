"""The SMTP provider keeps sessions open between messages, and knows when not to."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from email.message import EmailMessage

import pytest
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from consumers.providers.smtp import SmtpProvider
from herald.errors import PermanentError
from herald.mailsink import Faults, MailSink, start_sink


class CountingSink(MailSink):
    """Counts SMTP sessions (EHLOs) and refuses one address at RCPT."""

    def __init__(self) -> None:
        super().__init__(faults=Faults())
        self.sessions = 0
        self.resets = 0
        self.server_sides: list[SMTP] = []
        self.noops = 0
        self.sleepy = False
        self.ehlo_names: list[str] = []

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to the hook
        self.server_sides.append(server)
        self.sessions += 1
        self.ehlo_names.append(hostname)
        return responses

    async def handle_NOOP(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          arg: str) -> str:
        self.noops += 1
        return "421 4.4.2 Idle too long, closing connection" if self.sleepy else "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session,
                          envelope: SmtpEnvelope) -> str:
        self.resets += 1
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address == "nobody@example.com":
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
async def sink() -> AsyncIterator[tuple[CountingSink, asyncio.Server]]:
    sink = CountingSink()
    server = await start_sink(sink)
    yield sink, server
    server.close()
    await server.wait_closed()


def mail(to: str = "ada@example.com") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "herald <no-reply@herald.local>"
    message["To"] = to
    message["Subject"] = "hi"
    message.set_content("hello")
    return message


def url(server: asyncio.Server) -> str:
    return f"smtp://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_one_session_carries_many_messages(
        sink: tuple[CountingSink, asyncio.Server]) -> None:
    counting, server = sink
    provider = SmtpProvider(url(server), timeout=5)
    try:
        for _ in range(5):
            await provider.send(mail())
    finally:
        await provider.aclose()
    assert len(counting.messages) == 5
    assert counting.sessions == 1 and provider.connections == 1
    # the local name is worked out once, not looked up per connection
    assert counting.ehlo_names and counting.ehlo_names[0]


async def test_concurrent_sends_use_their_own_sessions_and_keep_them(
        sink: tuple[CountingSink, asyncio.Server]) -> None:
    counting, server = sink
    provider = SmtpProvider(url(server), timeout=5, pool_size=3)
    try:
        await asyncio.gather(*(provider.send(mail()) for _ in range(3)))
        await asyncio.gather(*(provider.send(mail()) for _ in range(3)))
    finally:
        await provider.aclose()
    assert len(counting.messages) == 6
    assert provider.connections == 3


async def test_a_refused_recipient_leaves_the_session_usable(
        sink: tuple[CountingSink, asyncio.Server]) -> None:
    counting, server = sink
    provider = SmtpProvider(url(server), timeout=5)
    try:
        with pytest.raises(PermanentError, match="550"):
            await provider.send(mail("nobody@example.com"))
        await provider.send(mail())
    finally:
        await provider.aclose()
    assert len(counting.messages) == 1
    assert provider.connections == 1 and counting.resets >= 1


async def test_sessions_idle_too_long_are_replaced(
        sink: tuple[CountingSink, asyncio.Server]) -> None:
    counting, server = sink
    provider = SmtpProvider(url(server), timeout=5, max_idle=0.2)
    try:
        await provider.send(mail())
        await asyncio.sleep(0.3)
        await provider.send(mail())
    finally:
        await provider.aclose()
    assert provider.connections == 2 and len(counting.messages) == 2


async def test_a_session_idle_a_while_is_checked_with_noop_first(
        sink: tuple[CountingSink, asyncio.Server]) -> None:
    # Given a pooled session idle for a few seconds, which the server no longer wants
    counting, server = sink
    provider = SmtpProvider(url(server), timeout=5)
    try:
        await provider.send(mail())
        provider._idle[0].used_at -= 5
        counting.sleepy = True
        # When the next message goes, NOOP finds out and a new session carries it
        await provider.send(mail())
        # and a session used a moment ago is not checked at all
        counting.sleepy = False
        await provider.send(mail())
    finally:
        await provider.aclose()
    assert counting.noops == 1
    assert provider.connections == 2 and len(counting.messages) == 3


async def test_a_session_the_server_dropped_is_noticed_before_use(
        sink: tuple[CountingSink, asyncio.Server]) -> None:
    # Given a pooled session that the server then closed (as servers do with idle clients)
    counting, server = sink
    provider = SmtpProvider(url(server), timeout=5)
    try:
        await provider.send(mail())
        for session in provider._idle:
            session.used_at -= 5  # idle long enough to be checked with NOOP
        for side in counting.server_sides:
            side.transport.close()  # the server hangs up on its idle client
        await asyncio.sleep(0.1)
        # When the next message goes, it goes over a new session, not into an error
        await provider.send(mail())
    finally:
        await provider.aclose()
    assert provider.connections == 2 and len(counting.messages) == 2
