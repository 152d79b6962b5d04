"""SMS over Vonage's SMS API (``POST {base}/sms/json``, formerly Nexmo) with httpx.

One form-encoded request per message, credentials in the body (``api_key``,
``api_secret``). The HTTP status is 200 even when the message is refused: the
answer is ``{"message-count", "messages": [{"status", "error-text", ...}]}`` with
one entry per segment Vonage sends, and only ``"status": "0"`` in every entry
means accepted. No retry loop here: the broker's retry ladder and the provider
chain decide what happens next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from consumers.providers.base import Gate, SmsMessage
from consumers.providers.http import PooledClient, retry_after
from consumers.sms_text import encoding, mask_number, redact_numbers
from herald.errors import PermanentError, RateLimited, TransientError

log = logging.getLogger("herald.sms.vonage")

SEND_PATH = "/sms/json"
_MAX_REASON = 300
#: Vonage caps ``client-ref`` at 40 characters.
CLIENT_REF_MAX = 40
#: Seconds to back off after status 1/10, which carry no Retry-After of their own
#: (the default account limit is 30 API requests per second).
THROTTLE_BACKOFF = 1.0

Outcome = Literal["rate", "permanent", "transient"]
#: Vonage SMS API status → (what herald does, Vonage's name for it). Unknown: transient.
STATUSES: dict[str, tuple[Outcome, str]] = {
    "1": ("rate", "Throttled"),
    "2": ("permanent", "Missing Parameters"),         # we always send them: the text/to was empty
    "3": ("permanent", "Invalid Parameters"),
    "4": ("transient", "Invalid Credentials"),        # our key/secret: breaker, fallback
    "5": ("transient", "Internal Error"),
    "6": ("permanent", "Invalid Message"),            # e.g. unrecognised number prefix
    "7": ("permanent", "Number Barred"),              # recipient on the barred list
    "8": ("transient", "Partner Account Barred"),     # our account is suspended
    "9": ("transient", "Partner Quota Violation"),    # out of credit: a top-up fixes it
    "10": ("rate", "Too Many Existing Binds"),        # concurrency cap: back off and retry
    "11": ("transient", "Account Not Enabled For HTTP"),
    "12": ("permanent", "Message Too Long"),
    "14": ("transient", "Invalid Signature"),
    "15": ("permanent", "Invalid Sender Address"),    # sender refused for this destination
    "22": ("permanent", "Invalid Network Code"),
    "23": ("transient", "Invalid Callback URL"),      # account set-up, not the message
    "29": ("permanent", "Non-Whitelisted Destination"),
    "32": ("transient", "Signature And API Secret Disallowed"),
    "33": ("permanent", "Number De-activated"),
}


class VonageProvider(PooledClient):
    """``Provider[SmsMessage]`` for Vonage's SMS API (``rest.nexmo.com``).

    Texts that are not GSM-7 go with ``type=unicode``; ``message.reference`` goes as
    ``client-ref`` (cut to 40 characters) so it shows in delivery receipts. One
    ``httpx.AsyncClient`` serves every send; pass your own to share it, in which
    case :meth:`aclose` leaves it open.
    """

    name = "vonage"

    def __init__(self, api_key: str, api_secret: str, from_: str,
                 base_url: str = "https://rest.nexmo.com", timeout: float = 10.0,
                 client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not api_key or not api_secret:
            raise ValueError("Vonage needs an API key and an API secret")
        if not from_:
            raise ValueError("Vonage needs a from number or sender ID")
        self._key = api_key
        self._secret = api_secret
        # Numbers go without "+" (Vonage wants digits); a sender ID goes as is.
        self.from_ = from_[1:] if from_.startswith("+") and from_[1:].isdigit() else from_
        self.url = base_url.rstrip("/") + SEND_PATH
        self._host = urlsplit(base_url).hostname or base_url
        self.timeout = httpx.Timeout(timeout)
        self._use_client(client, self.timeout)
        self._clock = clock

    def __repr__(self) -> str:
        return f"VonageProvider(host={self._host!r}, from_={self.from_!r})"  # no secret

    def form(self, message: SmsMessage) -> dict[str, str]:
        """The request body for ``message`` (pure; includes the credentials)."""
        form = {"api_key": self._key, "api_secret": self._secret, "from": self.from_,
                "to": message.to.removeprefix("+"), "text": message.body,
                "type": "unicode" if encoding(message.body) == "UCS-2" else "text"}
        if message.reference:
            form["client-ref"] = message.reference[:CLIENT_REF_MAX]
        return form

    async def send(self, message: SmsMessage, gate: Gate | None = None) -> None:
        """POST ``message`` once (after awaiting ``gate``); return when every part
        Vonage reports has status ``"0"`` (accepted; delivery comes later, if at all).

        ``message.body`` is sent as is: fitting it to a segment budget is the caller's
        job (``consumers.sms_text.fit``). Reasons carry Vonage's status, with phone
        numbers masked and no credentials. When some parts were accepted and another
        was not, the failure decides: a retry resends the whole text (a handset cannot
        reassemble a partial one anyway).

        Raises:
            PermanentError: status 2, 3, 6, 7, 12, 15, 22, 29, 33 (see :data:`STATUSES`),
                or an HTTP 4xx other than 401/403/404/408/429.
            RateLimited: status 1 or 10 (``retry_after`` 1 s), or HTTP 429 with Retry-After.
            TransientError: status 4, 5, 8, 9, 11, 14, 23, 32 and unknown ones; HTTP
                401/403/404/408/5xx; timeouts, connection errors, an unreadable answer.
        """
        form = self.form(message)
        if gate is not None:
            await gate()
        try:
            response = await self._client.post(self.url, data=form, timeout=self.timeout,
                                               headers={"Accept": "application/json"})
        except httpx.TimeoutException as exc:
            raise TransientError(f"Vonage {self._host}: timed out "
                                 f"({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise TransientError(self._redact(
                f"Vonage {self._host}: {type(exc).__name__}: {exc}", message)) from None

        status = response.status_code
        if status != 200:
            reason = self._redact(f"Vonage {status} {response.reason_phrase}: "
                                  f"{' '.join(response.text.split())[:200]}".rstrip(": "),
                                  message)[:_MAX_REASON]
            if status == 429:
                raise RateLimited(reason,
                                  retry_after=retry_after(response.headers, self._clock()))
            if 400 <= status < 500 and status not in (401, 403, 404, 408):
                raise PermanentError(reason)
            raise TransientError(reason)

        parts = _parts(response)
        if parts is None:
            raise TransientError(f"Vonage 200: unreadable answer "
                                 f"({' '.join(response.text.split())[:80]!r})")
        failed = [(i, p) for i, p in enumerate(parts, 1) if str(p.get("status")) != "0"]
        if not failed:
            log.debug("Vonage accepted %s for %s in %d part(s): %s", message.reference,
                      mask_number(message.to), len(parts),
                      ", ".join(str(p.get("message-id")) for p in parts))
            return
        index, part = failed[0]
        code = str(part.get("status"))
        outcome, label = STATUSES.get(code, ("transient", "Unknown status"))
        text = " ".join(str(part.get("error-text") or label).split())
        reason = f"Vonage status {code} ({label}): {text}"
        if len(parts) > 1:
            reason += f" (part {index} of {len(parts)}, {len(parts) - len(failed)} accepted)"
        reason = self._redact(reason, message)[:_MAX_REASON]
        if outcome == "rate":
            raise RateLimited(reason, retry_after=THROTTLE_BACKOFF)
        if outcome == "permanent":
            raise PermanentError(reason)
        raise TransientError(reason)

    def _redact(self, text: str, message: SmsMessage) -> str:
        text = text.replace(self._secret, "<api-secret>").replace(self._key, "<api-key>")
        return redact_numbers(text, message.to)


def _parts(response: httpx.Response) -> list[dict[str, Any]] | None:
    """The ``messages`` list of a 200 answer, or None when it is not one."""
    try:
        data = response.json()
    except ValueError:
        return None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not messages:
        return None
    if not all(isinstance(p, dict) for p in messages):
        return None
    return messages
