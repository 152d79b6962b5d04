"""Email over SMTP (aiosmtplib): plain, STARTTLS or implicit TLS, from one URL."""

from __future__ import annotations

import contextlib
import re
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib

from consumers.providers.base import Gate
from herald.errors import PermanentError, RateLimited, TransientError

# "rate" only at the start of a word: "generated" or "separate" is no rate limit, and a
# reply misread as one would be retried forever without using the retry budget.
_RATE_TEXT = re.compile(r"\brate|too many|throttl|slow down", re.IGNORECASE)
_DEFAULT_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


def classify(code: int, text: str) -> TransientError | PermanentError:
    """SMTP reply → our error: 4xx transient (rate-limit texts: ``RateLimited``), 5xx permanent."""
    reason = f"SMTP {code} {text}".strip()[:500]
    if 400 <= code < 500:
        return RateLimited(reason) if _RATE_TEXT.search(text) else TransientError(reason)
    return PermanentError(reason)


class SmtpProvider:
    """``EmailProvider`` for an SMTP URL.

    ``smtp://`` upgrades to TLS when the server offers STARTTLS,
    ``smtp+starttls://`` requires it, ``smtps://`` is TLS from the first byte.
    """

    name = "smtp"

    def __init__(self, url: str, timeout: float = 10.0) -> None:
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

    async def send(self, message: EmailMessage, gate: Gate | None = None) -> None:
        """Deliver over one SMTP session; raises our error classes only.

        ``gate`` is awaited once the session is up (greeting, TLS, login) and
        before MAIL FROM, so connection set-up time does not bunch deliveries.
        """
        client = aiosmtplib.SMTP(
            hostname=self.host, port=self.port, username=self.username,
            password=self.password, use_tls=self.use_tls, start_tls=self.start_tls,
            timeout=self.timeout)
        try:
            await client.connect()
            try:
                if gate is not None:
                    await gate()
                await client.send_message(message)
            except BaseException:
                # No polite QUIT on failure or cancellation: a hung server would
                # hold a worker's shutdown for a whole SMTP timeout.
                client.close()
                raise
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await client.quit()
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            raise classify(first.code, first.message) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise classify(exc.code, exc.message) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientError(f"SMTP {self.host}:{self.port}: "
                                 f"{type(exc).__name__}: {exc}"[:500]) from None
