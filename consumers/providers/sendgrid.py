"""Email over the SendGrid v3 Mail Send API (``POST /v3/mail/send``) with httpx.

The ``OutgoingEmail`` the email channel composes (or any ``EmailMessage``) is
translated into SendGrid's JSON body; the HTTP outcome is translated into
herald's error classes. There is no retry loop here: a failed send raises, and
the broker's retry ladder (or the fallback chain) decides what happens next.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Callable
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import httpx

from consumers.mime import Mailbox, OutgoingEmail
from consumers.providers.base import Gate, Mail
from consumers.providers.http import PooledClient, retry_after
from herald.errors import PermanentError, RateLimited, TransientError

log = logging.getLogger("herald.email.sendgrid")

SEND_PATH = "/v3/mail/send"
# Headers SendGrid builds itself or refuses in ``headers`` (its API reference lists
# x-sg-id … BCC as not overridable); the rest of the set is carried by other fields
# (from, personalizations, subject, content) or is per-part MIME plumbing.
_NOT_FORWARDED = frozenset({
    "x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type",
    "content-transfer-encoding", "content-disposition", "mime-version", "to", "from",
    "subject", "reply-to", "cc", "bcc", "date",
})
_EMAIL = re.compile(r"[^\s<>()\[\]{}\"',;:]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_SENDGRID_KEY = re.compile(r"SG\.[\w-]+\.[\w-]+")
_MAX_REASON = 500


def _address(addr: Address) -> dict[str, str]:
    entry = {"email": addr.addr_spec}
    if addr.display_name:
        entry["name"] = addr.display_name
    return entry


def _addresses(message: EmailMessage, header: str) -> list[dict[str, str]]:
    value = message[header]
    if value is None:
        return []
    addresses: tuple[Address, ...] = getattr(value, "addresses", ())
    return [_address(a) for a in addresses if a.addr_spec and a.addr_spec != "<>"]


def _attachment(part: EmailMessage) -> dict[str, str]:
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    return {
        "content": base64.b64encode(data).decode("ascii"),
        "type": part.get_content_type(),
        "filename": part.get_filename() or "attachment",
        "disposition": "inline" if part.get_content_disposition() == "inline" else "attachment",
    }


def _custom_args(herald_event: str) -> dict[str, str] | None:
    parts = herald_event.split()
    if len(parts) != 2:
        return None
    return {"herald_event_type": parts[0], "herald_event_id": parts[1]}


def _mailbox(mailbox: Mailbox) -> dict[str, str]:
    entry = {"email": mailbox.address}
    if mailbox.name:
        entry["name"] = mailbox.name
    return entry


def _outgoing_body(message: OutgoingEmail) -> dict[str, Any]:
    """The JSON body straight from the fields: no MIME to write or parse."""
    content = [{"type": "text/plain", "value": message.plain}]
    if (html := message.html_body) is not None:
        content.append({"type": "text/html", "value": html})
    personalization: dict[str, Any] = {"to": [_mailbox(message.recipient)]}
    if (args := _custom_args(message.header("X-Herald-Event") or "")) is not None:
        personalization["custom_args"] = args
    body: dict[str, Any] = {
        "personalizations": [personalization],
        "from": _mailbox(message.sender),
        "subject": message.subject,
        "content": content,
    }
    headers = {name: value for name, value in message.headers
               if name.lower() not in _NOT_FORWARDED}
    if headers:
        body["headers"] = headers
    return body


def to_sendgrid(message: Mail) -> dict[str, Any]:
    """The v3 Mail Send JSON body for ``message`` (pure; no I/O).

    text/plain comes before text/html (SendGrid rejects any other order);
    other headers (Message-ID, X-Herald-Event …) go to ``headers``; the herald
    event id and type, taken from ``X-Herald-Event``, go to ``custom_args`` so
    they show up in SendGrid's event webhooks. An ``OutgoingEmail`` is read
    from its fields (the same body its MIME form would give, for less work).

    Raises:
        PermanentError: the message has no sender, no recipient or no body.
    """
    if isinstance(message, OutgoingEmail):
        return _outgoing_body(message)
    senders = _addresses(message, "From")
    recipients = _addresses(message, "To")
    if not senders:
        raise PermanentError("SendGrid: message has no From address")
    if not recipients:
        raise PermanentError("SendGrid: message has no To address")

    content: list[dict[str, str]] = []
    for subtype in ("plain", "html"):
        part = message.get_body(preferencelist=(subtype,))
        if isinstance(part, EmailMessage) and part.get_content_subtype() == subtype:
            text = part.get_content()
            if text:
                content.append({"type": f"text/{subtype}", "value": text})
    if not content:
        raise PermanentError("SendGrid: message has no text/plain or text/html body")

    personalization: dict[str, Any] = {"to": recipients}
    for header in ("Cc", "Bcc"):
        if extra := _addresses(message, header):
            personalization[header.lower()] = extra
    if (args := _custom_args(str(message.get("X-Herald-Event", "")))) is not None:
        personalization["custom_args"] = args

    body: dict[str, Any] = {
        "personalizations": [personalization],
        "from": senders[0],
        "subject": str(message.get("Subject", "")),
        "content": content,
    }
    if reply_to := _addresses(message, "Reply-To"):
        body["reply_to"] = reply_to[0]
    headers = {name: str(value) for name, value in message.items()
               if name.lower() not in _NOT_FORWARDED}
    if headers:
        body["headers"] = headers
    attachments = [_attachment(part) for part in message.iter_attachments()
                   if isinstance(part, EmailMessage)]
    if attachments:
        body["attachments"] = attachments
    return body




class SendGridProvider(PooledClient):
    """``EmailProvider`` for SendGrid's v3 Web API (or anything that speaks it).

    One ``httpx.AsyncClient`` (connection pool) serves every send; pass your
    own to share it, in which case :meth:`aclose` leaves it open.
    """

    name = "sendgrid"

    def __init__(self, api_key: str, base_url: str = "https://api.sendgrid.com",
                 timeout: float = 10.0, client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not api_key:
            raise ValueError("SendGrid needs an API key")
        self._api_key = api_key
        self.url = base_url.rstrip("/") + SEND_PATH
        self._host = urlsplit(base_url).hostname or base_url
        self.timeout = httpx.Timeout(timeout)
        self._use_client(client, self.timeout)
        self._clock = clock

    def __repr__(self) -> str:
        return f"SendGridProvider(url={self.url!r})"  # the key stays out of logs and tracebacks

    async def send(self, message: Mail, gate: Gate | None = None) -> None:
        """POST ``message`` once; return when SendGrid answered 2xx (accepted for delivery).

        Raises:
            PermanentError: the message cannot be converted, or a 4xx other than
                401/403/408/429 (bad request, not found, too large …).
            RateLimited: 429, with ``retry_after`` from Retry-After or X-RateLimit-Reset.
            TransientError: 401/403 (our key or account, not the message: a fallback
                provider can still send it, and the circuit breaker opens), 408, 5xx,
                connection errors, timeouts, protocol errors.
        """
        body = to_sendgrid(message)
        if gate is not None:
            await gate()
        try:
            response = await self._client.post(
                self.url, json=body, timeout=self.timeout,
                headers={"Authorization": f"Bearer {self._api_key}",
                         "Accept": "application/json"},
            )
        except httpx.TimeoutException as exc:
            raise TransientError(f"SendGrid {self._host}: timed out "
                                 f"({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise TransientError(self._redact(
                f"SendGrid {self._host}: {type(exc).__name__}: {exc}")) from None
        status = response.status_code
        if 200 <= status < 300:
            message_id = (message.header("Message-ID") if isinstance(message, OutgoingEmail)
                          else message.get("Message-ID"))
            log.debug("SendGrid accepted %s as %s", message_id,
                      response.headers.get("X-Message-Id"))
            return
        reason = self._reason(response)
        if status == 429:
            raise RateLimited(reason, retry_after=retry_after(response.headers, self._clock()))
        if 400 <= status < 500 and status not in (401, 403, 408):
            raise PermanentError(reason)
        raise TransientError(reason)

    def _reason(self, response: httpx.Response) -> str:
        """``SendGrid <status> <phrase>: <messages>`` with addresses and keys masked."""
        head = f"SendGrid {response.status_code} {response.reason_phrase}".strip()
        details: list[str] = []
        try:
            errors = response.json().get("errors") or []
            for err in errors:
                text = str(err.get("message") or "").strip()
                field = err.get("field")
                if field and field != "null":
                    text = f"{text} (field {field})"
                if text:
                    details.append(text)
        except (ValueError, AttributeError, TypeError):
            if text := " ".join(response.text.split())[:200]:
                details.append(text)
        reason = f"{head}: {'; '.join(details)}" if details else head
        return self._redact(reason)[:_MAX_REASON]

    def _redact(self, text: str) -> str:
        text = text.replace(self._api_key, "<api-key>")
        text = _SENDGRID_KEY.sub("<api-key>", text)
        return _EMAIL.sub("<address>", text)
