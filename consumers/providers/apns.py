"""Push to Apple devices over APNs (HTTP/2, token-based authentication) with httpx.

Each request carries a provider token: an ES256 JWT signed with the team's
``.p8`` key (header ``kid``, claims ``iss`` = team id and ``iat``). Apple
rejects tokens older than an hour and refreshes more often than every 20
minutes, so one token is reused for 50 minutes and regenerated early only
when APNs says ``ExpiredProviderToken``. APNs' answer (``{"reason": ...}``)
is translated into herald's error classes; no retry loop here.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from consumers.providers.base import Gate, PushMessage
from consumers.providers.http import mask_token as mask
from consumers.providers.http import retry_after
from herald.errors import (
    ConfigError,
    DeadToken,
    PermanentError,
    RateLimited,
    RecipientError,
    TransientError,
)

log = logging.getLogger("herald.push.apns")

#: Reuse one provider token this long (Apple: refresh at most every 20, at least every 60 min).
TOKEN_REUSE = 50 * 60.0
_HEX = re.compile(r"[0-9A-Fa-f]+")
_MAX_REASON = 300


def load_signing_key(path: Path) -> EllipticCurvePrivateKey:
    """Read an APNs auth key (``AuthKey_<id>.p8``: PKCS#8 PEM, P-256).

    Raises:
        ConfigError: unreadable, not PEM, or not a P-256 key.
    """
    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"APNs key {path}: cannot read ({exc})") from None
    if not isinstance(key, EllipticCurvePrivateKey) or not isinstance(key.curve, SECP256R1):
        raise ConfigError(f"APNs key {path}: not a P-256 (ES256) key")
    return key


def to_apns(message: PushMessage) -> bytes:
    """The JSON payload for ``message``: ``aps`` plus ``data`` keys at the top level (pure).

    A ``data`` key named ``aps`` is dropped: that dictionary belongs to Apple.
    """
    payload: dict[str, Any] = {k: v for k, v in message.data.items() if k != "aps"}
    payload["aps"] = {"alert": {"title": message.title, "body": message.body},
                      "sound": "default"}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _reason_of(response: httpx.Response) -> str:
    try:
        reason = response.json().get("reason")
        if isinstance(reason, str) and reason:
            return reason
    except (ValueError, AttributeError):
        pass
    return response.reason_phrase or "error"


class ApnsProvider:
    """``Provider[PushMessage]`` for APNs over HTTP/2 with a provider token.

    One ``httpx.AsyncClient(http2=True)`` keeps one multiplexed connection to
    APNs for every send, as Apple asks. The constructor reads the ``.p8`` key
    and raises ``ConfigError`` if it or an id is unusable.
    """

    name = "apns"

    def __init__(self, key_file: Path, key_id: str, team_id: str, topic: str,
                 base_url: str = "https://api.push.apple.com", timeout: float = 10.0,
                 verify: ssl.SSLContext | bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        for field, value in (("key_id", key_id), ("team_id", team_id), ("topic", topic)):
            if not value:
                raise ConfigError(f"APNs needs a {field}")
        self._key = load_signing_key(key_file)
        self.key_id = key_id
        self.team_id = team_id
        self.topic = topic
        self.base_url = base_url.rstrip("/")
        self._host = urlsplit(base_url).hostname or base_url
        self.timeout = httpx.Timeout(timeout)
        self._client = httpx.AsyncClient(http2=True, timeout=self.timeout, verify=verify)
        self._clock = clock
        self._jwt: str | None = None
        self._jwt_issued = 0.0

    def __repr__(self) -> str:
        return f"ApnsProvider(url={self.base_url!r}, topic={self.topic!r})"

    async def send(self, message: PushMessage, gate: Gate | None = None) -> None:
        """POST ``message`` to ``/3/device/<token>``; return once APNs answered 200.

        ``gate`` is awaited once, right before the first request. An
        ``ExpiredProviderToken`` answer gets one new provider token and one more attempt.

        Raises:
            DeadToken: 410 (Unregistered, ExpiredToken), 400 BadDeviceToken, or a
                token that is not hexadecimal (no request is made): forget the device.
            PermanentError: another 400 (BadCollapseId, TopicDisallowed …), 413
                PayloadTooLarge, or another 4xx retrying cannot fix.
            RecipientError: 429 TooManyRequests (too many pushes to this one device
                token: retried on the ladder; no breaker, no provider-wide wait).
            RateLimited: another 429 (TooManyProviderTokenUpdates), with
                ``retry_after`` from Retry-After when APNs sends one.
            TransientError: 401/403 (InvalidProviderToken, a second ExpiredProviderToken …:
                our key or team, so the circuit breaker opens and messages wait),
                404/405 (wrong base URL), 5xx, timeouts, connection and HTTP/2 errors.
        """
        device = message.token
        if not _HEX.fullmatch(device):
            raise DeadToken(f"APNs BadDeviceToken: device token {mask(device)} is not hex")
        url = f"{self.base_url}/3/device/{device}"
        payload = to_apns(message)
        headers = {
            "apns-topic": self.topic,
            "apns-push-type": "alert",
            "apns-priority": "10" if message.urgent else "5",
            "apns-expiration": str(int(self._clock()) + message.ttl) if message.ttl > 0 else "0",
            "content-type": "application/json",
        }
        if message.collapse_key:
            headers["apns-collapse-id"] = message.collapse_key
        token = self._provider_token()
        if gate is not None:
            await gate()
        response = await self._post(url, payload, headers, token, device)
        if response.status_code == 403 and _reason_of(response) == "ExpiredProviderToken":
            log.info("APNs says the provider token expired; signing a new one")
            token = self._provider_token(stale=token)
            response = await self._post(url, payload, headers, token, device)
        self._check(response, device)

    async def aclose(self) -> None:
        """Close the HTTP/2 connection (idempotent)."""
        await self._client.aclose()

    async def __aenter__(self) -> ApnsProvider:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def _provider_token(self, stale: str | None = None) -> str:
        """The current provider token; a new one when it is 50 minutes old or ``stale``."""
        now = self._clock()
        if self._jwt is None or self._jwt == stale or now - self._jwt_issued >= TOKEN_REUSE:
            self._jwt = jwt.encode({"iss": self.team_id, "iat": int(now)}, self._key,
                                   algorithm="ES256", headers={"kid": self.key_id})
            self._jwt_issued = now
        return self._jwt

    async def _post(self, url: str, payload: bytes, headers: dict[str, str], token: str,
                    device: str) -> httpx.Response:
        try:
            return await self._client.post(
                url, content=payload, headers={**headers, "authorization": f"bearer {token}"})
        except httpx.TimeoutException as exc:
            raise TransientError(f"APNs {self._host}: timed out ({type(exc).__name__}) "
                                 f"(device {mask(device)})") from None
        except httpx.TransportError as exc:
            text = f"APNs {self._host}: {type(exc).__name__}: {exc}".replace(device, mask(device))
            raise TransientError(text[:_MAX_REASON]) from None

    def _check(self, response: httpx.Response, device: str) -> None:
        status = response.status_code
        if status == 200:
            log.debug("APNs accepted %s as %s", mask(device), response.headers.get("apns-id"))
            return
        code = _reason_of(response)
        reason = f"APNs {status} {code[:100]} (device {mask(device)})"
        if status == 410 or (status == 400 and code == "BadDeviceToken"):
            raise DeadToken(reason)
        if status == 429 and code == "TooManyRequests":
            # Apple: "too many requests were made consecutively to the same device
            # token". Pausing the whole provider for one busy device would hold
            # everybody else's pushes back.
            raise RecipientError(reason,
                                 retry_after=retry_after(response.headers, self._clock()))
        if status == 429:
            raise RateLimited(reason, retry_after=retry_after(response.headers, self._clock()))
        if status >= 500 or status in (401, 403, 404, 405, 408):
            raise TransientError(reason)
        raise PermanentError(reason)
