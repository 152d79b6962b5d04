"""Email over SMTP (aiosmtplib): plain, STARTTLS or implicit TLS, from one URL."""

from __future__ import annotations

import contextlib
import re
from email.message import EmailMessage
from typing import Literal
from urllib.parse import unquote, urlsplit

import aiosmtplib

from consumers.providers.base import Gate
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
        """Deliver over one SMTP session; raises our error classes only (see :func:`classify`).

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
            raise classify(first.code, first.message, "rcpt") from None
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise classify(exc.code, exc.message, "auth") from None
        except aiosmtplib.SMTPRecipientRefused as exc:
            raise classify(exc.code, exc.message, "rcpt") from None
        except aiosmtplib.SMTPSenderRefused as exc:
            raise classify(exc.code, exc.message, "mail") from None
        except aiosmtplib.SMTPDataError as exc:
            raise classify(exc.code, exc.message, "data") from None
        except aiosmtplib.SMTPResponseException as exc:
            # greeting (SMTPConnectResponseError), EHLO (SMTPHeloError), STARTTLS
            raise classify(exc.code, exc.message, "connect") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientError(f"SMTP {self.host}:{self.port}: "
                                 f"{type(exc).__name__}: {exc}"[:500]) from None
