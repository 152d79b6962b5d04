"""Email over SMTP (aiosmtplib): plain, STARTTLS or implicit TLS, from one URL."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

import aiosmtplib

from consumers.mime import OutgoingEmail
from consumers.providers.base import Gate, Mail
from herald.errors import PermanentError, RateLimited, RecipientError, TransientError

# "rate" only at the start of a word: "generated" or "separate" is no rate limit, and a
# reply misread as one would be retried forever without using the retry budget.
_RATE_TEXT = re.compile(r"\brate|too many|throttl|slow down", re.IGNORECASE)
_DEFAULT_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}
# Servers quote the mailbox ("<ada@example.com>: Recipient address rejected"); reasons
# end up in logs, DLQ headers and delivery records, which must not carry addresses.
_ADDRESS = re.compile(r"<?[^\s<>()\[\]{}\"',;:]+@[^\s<>()\[\]{}\"',;:]+>?")
#: Temporary refusals of one mailbox (busy, greylisted, over quota). herald sends one
#: recipient per message, so at RCPT or DATA they are about that address alone.
_RECIPIENT_CODES = frozenset({450, 451, 452})
#: Authentication required / too weak / credentials invalid (RFC 4954): our account.
_AUTH_CODES = frozenset({530, 534, 535})

#: Where in the session a reply came: ``connect`` is the greeting, EHLO and STARTTLS.
Stage = Literal["connect", "auth", "mail", "rcpt", "data"]


def classify(code: int, text: str, stage: Stage = "rcpt") -> TransientError | PermanentError:
    """SMTP reply → our error, by what it says about whom.

    - about one recipient: 450/451/452 at RCPT or DATA → ``RecipientError`` (the
      ladder retries it; no breaker, no failover: greylisting is not an outage);
    - "slow down" (rate-limit text on any 4xx) → ``RateLimited`` (a wait, no retry used);
    - about the provider: 421 and other 4xx, any refusal of the greeting, EHLO or
      STARTTLS, authentication failures (530/534/535, or anything at AUTH), replies that
      are no SMTP code → ``TransientError`` (counts toward the breaker, fails over);
    - about the message: other 5xx → ``PermanentError``.

    The reason is ``SMTP <code> <text>`` with any address in the text masked.
    """
    reason = _ADDRESS.sub("<address>", f"SMTP {code} {text}".strip())[:500]
    if 400 <= code < 500 and _RATE_TEXT.search(text):
        return RateLimited(reason)
    if stage in ("connect", "auth") or code in _AUTH_CODES:
        return TransientError(reason)
    if code in _RECIPIENT_CODES and stage in ("rcpt", "data"):
        return RecipientError(reason)
    if 500 <= code < 600:
        return PermanentError(reason)
    return TransientError(reason)


def _local_hostname() -> str:
    """This host's name for EHLO, computed once per process.

    aiosmtplib otherwise calls ``socket.getfqdn()`` for every new connection:
    a resolver round trip the profile showed on every message.
    """
    global _HOSTNAME
    if _HOSTNAME is None:
        _HOSTNAME = socket.getfqdn() or "localhost"
    return _HOSTNAME


_HOSTNAME: str | None = None


@dataclass
class _Session:
    client: aiosmtplib.SMTP
    used_at: float


class SmtpProvider:
    """``EmailProvider`` for an SMTP URL, over a pool of open sessions.

    ``smtp://`` upgrades to TLS when the server offers STARTTLS,
    ``smtp+starttls://`` requires it, ``smtps://`` is TLS from the first byte.

    Sessions are kept open between messages (at most ``pool_size`` idle, each
    for at most ``max_idle`` seconds): connecting, EHLO, STARTTLS and AUTH
    cost several round trips, which the profile put at a fifth of the email
    worker's time when paid per message. A session idle for more than two
    seconds is checked with NOOP before it is used (servers drop idle
    clients); one whose transaction was refused has been RSET by aiosmtplib
    and is reused; one that failed otherwise, or was cancelled, is closed.
    """

    name = "smtp"

    def __init__(self, url: str, timeout: float = 10.0, pool_size: int = 10,
                 max_idle: float = 30.0) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.use_tls = parts.scheme == "smtps"
        self.start_tls: bool | None = True if parts.scheme == "smtp+starttls" else None
        if self.use_tls:
            self.start_tls = False
        self.timeout = timeout
        self.pool_size = pool_size
        self.max_idle = max_idle
        self._idle: list[_Session] = []
        #: Sessions opened so far (tests and benchmarks read it).
        self.connections = 0

    def __repr__(self) -> str:
        return f"SmtpProvider({self.host}:{self.port})"

    async def _checkout(self) -> aiosmtplib.SMTP:
        """An open session: an idle one that still answers, or a new one."""
        now = time.monotonic()
        while self._idle:
            session = self._idle.pop()
            age = now - session.used_at
            if age > self.max_idle or not session.client.is_connected:
                session.client.close()
                continue
            if age > 2.0:
                try:
                    await session.client.noop()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    session.client.close()
                    continue
            return session.client
        client = aiosmtplib.SMTP(
            hostname=self.host, port=self.port, username=self.username,
            password=self.password, use_tls=self.use_tls, start_tls=self.start_tls,
            timeout=self.timeout, local_hostname=_local_hostname())
        try:
            await client.connect()
        except BaseException:
            client.close()
            raise
        self.connections += 1
        return client

    def _checkin(self, client: aiosmtplib.SMTP) -> None:
        if client.is_connected and len(self._idle) < self.pool_size:
            self._idle.append(_Session(client, time.monotonic()))
        else:
            client.close()

    async def send(self, message: Mail, gate: Gate | None = None) -> None:
        """Deliver over a pooled SMTP session; raises our error classes only (see
        :func:`classify`).

        An ``OutgoingEmail`` goes as its own bytes (7-bit clean, so no 8BITMIME
        needed), MAIL FROM its sender's address, RCPT TO its recipient's; an
        ``EmailMessage`` is flattened by aiosmtplib, envelope taken from its headers.
        ``gate`` is awaited once the session is up (greeting, TLS, login) and
        before MAIL FROM, so connection set-up time does not bunch deliveries.
        """
        client: aiosmtplib.SMTP | None = None
        try:
            client = await self._checkout()
            if gate is not None:
                await gate()
            if isinstance(message, OutgoingEmail):
                await client.sendmail(message.sender.address, [message.recipient.address],
                                      message.as_bytes())
            else:
                await client.send_message(message)
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as exc:
            # The server answered a transaction command: the session is fine (aiosmtplib
            # sent RSET), except after a 421 (the server is closing it) or a refused
            # greeting or EHLO (raised before ``client`` was ours).
            if client is not None:
                if getattr(exc, "code", None) == 421 or isinstance(
                        exc, (aiosmtplib.SMTPConnectResponseError, aiosmtplib.SMTPHeloError)):
                    client.close()
                else:
                    self._checkin(client)
            raise _translate(exc) from None
        except BaseException as exc:
            # No polite QUIT on failure or cancellation: a hung server would
            # hold a worker's shutdown for a whole SMTP timeout.
            if client is not None:
                client.close()
            if isinstance(exc, (aiosmtplib.SMTPException, OSError, TimeoutError)):
                raise TransientError(f"SMTP {self.host}:{self.port}: "
                                     f"{type(exc).__name__}: {exc}"[:500]) from None
            raise
        self._checkin(client)

    async def aclose(self) -> None:
        """Close every idle session (QUIT, bounded by the timeout)."""
        idle, self._idle = self._idle, []
        for session in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await asyncio.wait_for(session.client.quit(), 2)
            session.client.close()


def _translate(exc: aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused
               ) -> TransientError | PermanentError:
    """An SMTP reply error → our error, by the stage it came at."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        first = exc.recipients[0]
        return classify(first.code, first.message, "rcpt")
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return classify(exc.code, exc.message, "auth")
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
        return classify(exc.code, exc.message, "rcpt")
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return classify(exc.code, exc.message, "mail")
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return classify(exc.code, exc.message, "data")
    # greeting (SMTPConnectResponseError), EHLO (SMTPHeloError), STARTTLS
    return classify(exc.code, exc.message, "connect")
