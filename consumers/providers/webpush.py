"""Push to browsers with the Web Push protocol (RFC 8030), encrypted and signed.

The payload is encrypted for the subscription (RFC 8291, ``aes128gcm``, via
``http_ece``) and the request carries a VAPID JWT (RFC 8292, via
``py_vapid``) whose audience is the push service's origin. The request goes
out with httpx (pywebpush's own sender is synchronous ``requests``). Push
services answer with a status and little else; it is translated into
herald's error classes, and no retry loop here.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import http_ece  # type: ignore[import-untyped]
import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from py_vapid import Vapid, VapidException  # type: ignore[import-untyped]

from consumers.providers.base import Gate, PushMessage
from consumers.providers.http import retry_after
from herald.errors import ConfigError, DeadToken, PermanentError, RateLimited, TransientError

log = logging.getLogger("herald.push.webpush")

#: One aes128gcm record of 4096 octets (what push services must accept) holds
#: this much: 4096 - 86 header - 16 tag - 1 padding delimiter (RFC 8291 §4).
MAX_PAYLOAD = 3993
#: VAPID tokens may live 24 hours (RFC 8292 §2); stay well inside it.
VAPID_LIFETIME = 12 * 3600
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")  # RFC 8030 §5.4: URL-safe base64, ≤ 32
_MAX_REASON = 300


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("not a string")
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


@dataclass(frozen=True, slots=True)
class Subscription:
    """A browser's ``PushSubscription``: where to POST and the keys to encrypt for."""

    endpoint: str
    p256dh: bytes
    auth: bytes

    @property
    def origin(self) -> str:
        """``scheme://host[:port]`` of the endpoint: the VAPID audience."""
        parts = urlsplit(self.endpoint)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def label(self) -> str:
        """The push service's host and the endpoint's last 6 characters, for reasons."""
        return f"{urlsplit(self.endpoint).hostname} ...{self.endpoint[-6:]}"


def parse_subscription(token: str) -> Subscription:
    """The subscription in ``token`` (the browser's ``PushSubscription`` JSON).

    Raises:
        DeadToken: not JSON, no http(s) endpoint, or keys that are not a P-256
            point (``p256dh``) and a 16-byte secret (``auth``); the reason says
            which, without the keys.
    """
    def dead(why: str) -> DeadToken:
        return DeadToken(f"Web Push: unusable subscription ({why})")

    try:
        raw: Any = json.loads(token)
    except ValueError:
        raise dead("not JSON") from None
    if not isinstance(raw, dict):
        raise dead("not a JSON object")
    endpoint = raw.get("endpoint")
    if not isinstance(endpoint, str):
        raise dead("no endpoint")
    try:
        parts = urlsplit(endpoint)
        host = parts.hostname
    except ValueError:
        raise dead("endpoint is not a URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise dead("endpoint is not an http(s) URL")
    keys = raw.get("keys")
    if not isinstance(keys, dict):
        raise dead("no keys")
    try:
        p256dh = _b64(keys.get("p256dh"))
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    except (ValueError, binascii.Error):
        raise dead("keys.p256dh is not a P-256 public key") from None
    try:
        auth = _b64(keys.get("auth"))
    except (ValueError, binascii.Error):
        raise dead("keys.auth is not base64url") from None
    if len(auth) != 16:
        raise dead("keys.auth is not 16 bytes")
    return Subscription(endpoint, p256dh, auth)


def payload_of(message: PushMessage) -> bytes:
    """The plaintext the service worker receives: ``{"title", "body", "data"}`` JSON (pure)."""
    return json.dumps({"title": message.title, "body": message.body, "data": dict(message.data)},
                      separators=(",", ":"), ensure_ascii=False).encode()


def encrypt(plaintext: bytes, subscription: Subscription) -> bytes:
    """``plaintext`` as one RFC 8291 ``aes128gcm`` record for ``subscription``.

    Uses a fresh ephemeral ECDH key and salt on every call.
    """
    sender = ec.generate_private_key(ec.SECP256R1())
    body: bytes = http_ece.encrypt(plaintext, private_key=sender, dh=subscription.p256dh,
                                   auth_secret=subscription.auth, version="aes128gcm")
    return body


def load_vapid(path: Path) -> Any:
    """A ``py_vapid.Vapid`` signer from a PEM private key file (P-256).

    Raises:
        ConfigError: unreadable, or not a P-256 key. (``Vapid.from_file`` is
            not used: it silently creates a new key when the file is missing.)
    """
    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"VAPID key {path}: cannot read ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve,
                                                                         ec.SECP256R1):
        raise ConfigError(f"VAPID key {path}: not a P-256 key")
    return Vapid(private_key=key)


class WebPushProvider:
    """``Provider[PushMessage]`` for Web Push: ``message.token`` is the subscription JSON.

    One ``httpx.AsyncClient`` serves every push service (FCM, Mozilla autopush,
    Apple, WNS …); the endpoint's origin decides where each push goes. The
    constructor reads the VAPID key and raises ``ConfigError`` if it or the
    subject (``mailto:`` or ``https:``) is unusable.
    """

    name = "webpush"

    def __init__(self, vapid_private_key_file: Path, subject: str, timeout: float = 10.0,
                 verify: ssl.SSLContext | bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self._vapid = load_vapid(vapid_private_key_file)
        self.subject = subject
        self._clock = clock
        try:  # py_vapid's own rule: a mailto: address or an https: URL
            self._vapid_header("https://push.example", 0)
        except VapidException:
            raise ConfigError(f"VAPID subject {subject!r} must be a mailto: address "
                              "or an https: URL") from None
        self.timeout = httpx.Timeout(timeout)
        self._client = httpx.AsyncClient(timeout=self.timeout, verify=verify)

    def __repr__(self) -> str:
        return f"WebPushProvider(subject={self.subject!r})"

    async def send(self, message: PushMessage, gate: Gate | None = None) -> None:
        """Encrypt ``message`` for its subscription and POST it to the endpoint.

        Returns once the push service answered 200/201/202 (accepted).

        Raises:
            DeadToken: the subscription JSON is unusable (no request is made), or
                the push service answered 404/410 (gone): forget the subscription.
            PermanentError: the payload exceeds one 4096-octet record (no request),
                413, 403 (the subscription was made with another VAPID key: about
                this subscription only), or another 4xx (400 bad headers …).
            RateLimited: 429, with ``retry_after`` from Retry-After.
            TransientError: 401 (our VAPID token refused: every push would be, so the
                breaker counts it), 5xx (with Retry-After if given), timeouts,
                connection errors.
        """
        subscription = parse_subscription(message.token)
        plaintext = payload_of(message)
        if len(plaintext) > MAX_PAYLOAD:
            raise PermanentError(f"Web Push: payload is {len(plaintext)} bytes, more than "
                                 f"{MAX_PAYLOAD} fit in one record ({subscription.label})")
        body = encrypt(plaintext, subscription)
        headers = {
            "TTL": str(max(message.ttl, 0)),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Urgency": "high" if message.urgent else "normal",
            "Authorization": self._vapid_header(subscription.origin, self._clock()),
        }
        if message.collapse_key:
            if _TOPIC.fullmatch(message.collapse_key):
                headers["Topic"] = message.collapse_key
            else:
                log.debug("collapse key %r is not a valid Web Push Topic; sent without",
                          message.collapse_key)
        if gate is not None:
            await gate()
        try:
            response = await self._client.post(subscription.endpoint, content=body,
                                               headers=headers)
        except httpx.TimeoutException as exc:
            raise TransientError(f"Web Push {subscription.label}: timed out "
                                 f"({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            text = f"Web Push {subscription.label}: {type(exc).__name__}: {exc}"
            raise TransientError(text.replace(subscription.endpoint, "<endpoint>")
                                 [:_MAX_REASON]) from None
        self._check(response, subscription)

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        await self._client.aclose()

    async def __aenter__(self) -> WebPushProvider:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def _vapid_header(self, audience: str, now: float) -> str:
        """``vapid t=<JWT>,k=<public key>`` for ``audience``, valid ``VAPID_LIFETIME``."""
        signed = self._vapid.sign({"aud": audience, "sub": self.subject,
                                   "exp": int(now) + VAPID_LIFETIME})
        return str(signed["Authorization"])

    def _check(self, response: httpx.Response, subscription: Subscription) -> None:
        status = response.status_code
        if status in (200, 201, 202):
            log.debug("push service accepted %s as %s", subscription.label,
                      response.headers.get("Location", "")[-12:])
            return
        reason = self._reason(response, subscription)
        if status in (404, 410):
            raise DeadToken(reason)
        if status == 429:
            raise RateLimited(reason, retry_after=retry_after(response.headers, self._clock()))
        if status >= 500 or status == 401:
            raise TransientError(reason,
                                 retry_after=retry_after(response.headers, self._clock()))
        # 403 included: RFC 8292 says a push service answers 403 when the subscription
        # was created with another application server key, which is one subscription's
        # trouble; counting it would let a few stale subscriptions pause every push.
        raise PermanentError(reason)

    def _reason(self, response: httpx.Response, subscription: Subscription) -> str:
        """``Web Push <status> <phrase> [errno N]: <message> (<host> ...<endpoint tail>)``."""
        head = f"Web Push {response.status_code} {response.reason_phrase}".strip()
        detail = ""
        try:
            answer = response.json()
            if isinstance(answer, dict):
                if answer.get("errno") is not None:
                    head += f" errno {answer['errno']}"
                detail = str(answer.get("message") or answer.get("error") or "")
        except ValueError:
            detail = " ".join(response.text.split())
        reason = f"{head}: {detail}" if detail else head
        reason = reason.replace(subscription.endpoint, "<endpoint>")
        return f"{reason[:_MAX_REASON]} ({subscription.label})"
