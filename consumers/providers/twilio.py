"""SMS over Twilio's Programmable Messaging REST API (``POST .../Messages.json``) with httpx.

One form-encoded request per message (To, From, Body; HTTP basic auth with the
account SID and auth token). A ``201`` means Twilio queued it; anything else is
translated into herald's error classes from the HTTP status and Twilio's
``{"code", "message", "more_info", "status"}`` error body. No retry loop here: the
broker's retry ladder and the provider chain decide what happens next.

Twilio asks integrators not to branch on every error code, so the mapping is by
HTTP status first, with a short list of codes that are about our account or
sender (not the message) and a few that mean "slow down".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from consumers.providers.base import Gate, SmsMessage
from consumers.providers.http import PooledClient, retry_after
from consumers.sms_text import mask_number, redact_numbers
from herald.errors import PermanentError, RateLimited, TransientError

log = logging.getLogger("herald.sms.twilio")

_MAX_REASON = 300
#: "Slow down" answers that come with a 4xx other than 429.
RATE_LIMIT_CODES = frozenset({
    20429,   # Too Many Requests
    21611,   # this From number has exceeded the maximum number of queued messages
    14107,   # SMS send rate limit exceeded (between two numbers)
})
#: 4xx codes about our account, sender or set-up, not the message: transient, so the
#: next provider can take the message and the circuit breaker sees a failing provider.
ACCOUNT_CODES = frozenset({
    20003,   # Authenticate (wrong SID or token)
    20005,   # account not active
    20404,   # resource not found (wrong account SID in the URL)
    21212,   # invalid From number
    21603,   # From is required
    21606,   # From is not a message-capable Twilio number for this account / destination
    21608,   # trial account: the To number is not verified
    21659,   # From is not a Twilio number
    21660,   # From does not belong to this account
})


class TwilioProvider(PooledClient):
    """``Provider[SmsMessage]`` for Twilio's 2010-04-01 Messages resource.

    One ``httpx.AsyncClient`` (connection pool) serves every send; pass your own
    to share it, in which case :meth:`aclose` leaves it open.
    """

    name = "twilio"

    def __init__(self, account_sid: str, auth_token: str, from_: str,
                 base_url: str = "https://api.twilio.com", timeout: float = 10.0,
                 client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not account_sid or not auth_token:
            raise ValueError("Twilio needs an account SID and an auth token")
        if not from_:
            raise ValueError("Twilio needs a From number, short code or sender ID")
        self._sid = account_sid
        self._token = auth_token
        self.from_ = from_
        self.url = (f"{base_url.rstrip('/')}/2010-04-01/Accounts/"
                    f"{quote(account_sid, safe='')}/Messages.json")
        self._host = urlsplit(base_url).hostname or base_url
        self.timeout = httpx.Timeout(timeout)
        self._use_client(client, self.timeout)
        self._clock = clock

    def __repr__(self) -> str:
        return f"TwilioProvider(host={self._host!r}, from_={self.from_!r})"  # no token

    async def send(self, message: SmsMessage, gate: Gate | None = None) -> None:
        """POST ``message`` once (after awaiting ``gate``); return when Twilio answered
        2xx (queued for delivery; the handset may still not get it).

        ``message.body`` is sent as is: fitting it to a segment budget is the caller's
        job (``consumers.sms_text.fit``). Reasons carry Twilio's code, with phone
        numbers masked and no credentials.

        Raises:
            PermanentError: a 4xx about the message or recipient: invalid To (21211),
                not a mobile number (21614), recipient opted out (21610), region not
                enabled (21408), empty or too long body (21602, 21617) …
            RateLimited: 429 or code 20429/21611/14107, ``retry_after`` from Retry-After.
            TransientError: 401/403/404 and the account/sender codes in
                :data:`ACCOUNT_CODES` (our set-up, not the message), 408, 5xx,
                timeouts, connection and protocol errors, an unreadable answer.
        """
        form = {"To": message.to, "From": self.from_, "Body": message.body}
        if gate is not None:
            await gate()
        try:
            response = await self._client.post(
                self.url, data=form, auth=httpx.BasicAuth(self._sid, self._token),
                headers={"Accept": "application/json"}, timeout=self.timeout)
        except httpx.TimeoutException as exc:
            raise TransientError(f"Twilio {self._host}: timed out "
                                 f"({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise TransientError(self._redact(
                f"Twilio {self._host}: {type(exc).__name__}: {exc}", message)) from None

        status = response.status_code
        data = _json(response)
        if 200 <= status < 300:
            log.debug("Twilio queued %s for %s as %s (%s, %s segments)", message.reference,
                      mask_number(message.to), data.get("sid"), data.get("status"),
                      data.get("num_segments"))
            return
        code = _int(data.get("code"))
        reason = self._reason(response, data, message)
        if status == 429 or code in RATE_LIMIT_CODES:
            raise RateLimited(reason, retry_after=retry_after(response.headers, self._clock()))
        if status in (401, 403, 404, 408) or status >= 500 or code in ACCOUNT_CODES:
            raise TransientError(reason)
        if 400 <= status < 500:
            raise PermanentError(reason)
        raise TransientError(reason)   # 1xx/3xx: not an answer we can act on

    def _reason(self, response: httpx.Response, data: dict[str, Any],
                message: SmsMessage) -> str:
        """``Twilio <status> code <code>: <message>``, numbers masked, secrets removed."""
        head = f"Twilio {response.status_code}"
        if data.get("code") is not None:
            head += f" code {data['code']}"
        text = str(data.get("message") or "").strip()
        if not text:
            text = response.reason_phrase if data else " ".join(response.text.split())[:200]
        reason = f"{head}: {text}" if text else head
        return self._redact(reason, message)[:_MAX_REASON]

    def _redact(self, text: str, message: SmsMessage) -> str:
        text = text.replace(self._token, "<auth-token>").replace(self._sid, "<account-sid>")
        return redact_numbers(text, message.to)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
