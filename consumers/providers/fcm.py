"""Push over Firebase Cloud Messaging's HTTP v1 API (``messages:send``) with httpx.

Authentication is a Google service account: a JWT assertion signed with its
RSA key (RS256) is traded at ``token_uri`` for an OAuth2 access token, which
is cached until shortly before it expires. FCM's answer is translated into
herald's error classes; there is no retry loop here beyond one token refresh
on a 401 (the broker's retry ladder decides what happens next).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from consumers.providers.base import Gate, PushMessage
from consumers.providers.http import mask_token as mask
from consumers.providers.http import retry_after
from herald.errors import ConfigError, DeadToken, PermanentError, RateLimited, TransientError

log = logging.getLogger("herald.push.fcm")

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
#: FCM keeps a message at most four weeks; a longer ttl is an INVALID_ARGUMENT.
MAX_TTL = 28 * 24 * 3600
#: Refresh the access token this long before Google says it expires, so it never
#: runs out between the check and FCM reading it.
_EARLY = 300.0
_ASSERTION_LIFETIME = 3600  # Google's maximum for a JWT bearer assertion
_MAX_REASON = 300


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The fields of a Google service-account JSON key that FCM needs."""

    project_id: str
    client_email: str
    private_key_id: str
    token_uri: str
    private_key: RSAPrivateKey

    def __repr__(self) -> str:
        return f"ServiceAccount({self.client_email!r}, project={self.project_id!r})"


def load_service_account(path: Path) -> ServiceAccount:
    """Read a service-account JSON key file.

    Raises:
        ConfigError: unreadable, not JSON, a field missing, or the key is not RSA.
    """
    try:
        raw: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"FCM credentials {path}: cannot read ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"FCM credentials {path}: not a service-account JSON object")
    fields = ("project_id", "client_email", "private_key", "private_key_id", "token_uri")
    missing = [f for f in fields if not isinstance(raw.get(f), str) or not raw[f]]
    if missing:
        raise ConfigError(f"FCM credentials {path}: missing {', '.join(missing)}")
    try:
        key = load_pem_private_key(raw["private_key"].encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"FCM credentials {path}: private_key is unreadable ({exc})") from None
    if not isinstance(key, RSAPrivateKey):
        raise ConfigError(f"FCM credentials {path}: private_key is not an RSA key")
    return ServiceAccount(raw["project_id"], raw["client_email"], raw["private_key_id"],
                          raw["token_uri"], key)


def to_fcm(message: PushMessage) -> dict[str, Any]:
    """The v1 ``Message`` object for ``message`` (pure; no I/O).

    ``data`` goes through as given (FCM rejects non-string values with a 400);
    the ttl is clamped to FCM's four-week maximum.
    """
    android: dict[str, Any] = {
        "priority": "HIGH" if message.urgent else "NORMAL",
        "ttl": f"{min(max(message.ttl, 0), MAX_TTL)}s",
    }
    if message.collapse_key:
        android["collapse_key"] = message.collapse_key
    body: dict[str, Any] = {
        "token": message.token,
        "notification": {"title": message.title, "body": message.body},
        "android": android,
    }
    if message.data:
        body["data"] = dict(message.data)
    return body


def _error(response: httpx.Response) -> tuple[str, str]:
    """(FCM error code, message) from a v1 error body; the HTTP phrase when there is none."""
    try:
        error = response.json()["error"]
        text = str(error.get("message") or "")
        code = str(error.get("status") or "")
        for detail in error.get("details") or []:
            if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR:
                code = str(detail.get("errorCode") or code)
        return code or response.reason_phrase, text
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.reason_phrase, " ".join(response.text.split())


class FcmProvider:
    """``Provider[PushMessage]`` for FCM HTTP v1 (or anything that speaks it).

    One ``httpx.AsyncClient`` serves the token endpoint and every send; one
    access token is shared by concurrent sends and fetched again only when it
    is about to expire or FCM answers 401. The constructor reads the key file
    and raises ``ConfigError`` if it is unusable (no I/O happens until ``send``).
    """

    name = "fcm"

    def __init__(self, credentials_file: Path, base_url: str = "https://fcm.googleapis.com",
                 timeout: float = 10.0, verify: ssl.SSLContext | bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self._account = load_service_account(credentials_file)
        self.url = (f"{base_url.rstrip('/')}/v1/projects/"
                    f"{self._account.project_id}/messages:send")
        self._host = urlsplit(base_url).hostname or base_url
        self.timeout = httpx.Timeout(timeout)
        self._client = httpx.AsyncClient(timeout=self.timeout, verify=verify)
        self._clock = clock
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"FcmProvider(url={self.url!r})"  # no key, no access token

    async def send(self, message: PushMessage, gate: Gate | None = None) -> None:
        """POST ``message`` to FCM; return once FCM accepted it (200 with a message name).

        ``gate`` is awaited once, after the access token is at hand. A 401 gets
        one fresh token and one more attempt.

        Raises:
            DeadToken: UNREGISTERED (404), or a 400 saying the registration token
                is not a valid FCM token: forget the device.
            PermanentError: any other 400 (INVALID_ARGUMENT), 403 SENDER_ID_MISMATCH,
                or another 4xx that retrying cannot fix (409, 413 …).
            RateLimited: 429 QUOTA_EXCEEDED, with ``retry_after`` from Retry-After.
            TransientError: 5xx (with Retry-After if given), 401 again after a fresh
                token, THIRD_PARTY_AUTH_ERROR, other 403/404 (credentials or
                project: configuration, so the circuit breaker opens), 408,
                timeouts, connection errors, and any failure at the token endpoint.
        """
        body = {"message": to_fcm(message)}
        token = await self._access_token()
        if gate is not None:
            await gate()
        response = await self._post(body, token, message.token)
        if response.status_code == 401 and _error(response)[0] != "THIRD_PARTY_AUTH_ERROR":
            log.info("FCM answered 401; fetching a new access token")
            token = await self._access_token(stale=token)
            response = await self._post(body, token, message.token)
        self._check(response, message.token)

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        await self._client.aclose()

    async def __aenter__(self) -> FcmProvider:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def _post(self, body: dict[str, Any], token: str, device: str) -> httpx.Response:
        try:
            return await self._client.post(
                self.url, json=body, headers={"Authorization": f"Bearer {token}"})
        except httpx.TimeoutException as exc:
            raise TransientError(f"FCM {self._host}: timed out ({type(exc).__name__}) "
                                 f"(token {mask(device)})") from None
        except httpx.TransportError as exc:
            raise TransientError(self._redact(
                f"FCM {self._host}: {type(exc).__name__}: {exc}", device)) from None

    def _check(self, response: httpx.Response, device: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            log.debug("FCM accepted %s as %s", mask(device), response.text[:200])
            return
        code, text = _error(response)
        head = f"FCM {status} {code}: {text}" if text else f"FCM {status} {code}"
        reason = self._redact(head, device)[:_MAX_REASON] + f" (token {mask(device)})"
        wait = retry_after(response.headers, self._clock())
        if code == "UNREGISTERED" or (
                status == 400 and "not a valid FCM registration token" in text):
            raise DeadToken(reason)
        if status == 429:
            raise RateLimited(reason, retry_after=wait)
        if status >= 500 or status in (401, 403, 404, 408):
            if code == "SENDER_ID_MISMATCH":
                raise PermanentError(reason)
            raise TransientError(reason, retry_after=wait)
        raise PermanentError(reason)

    async def _access_token(self, stale: str | None = None) -> str:
        """The cached access token, or a new one if it expires soon or is ``stale``."""
        async with self._token_lock:
            fresh = self._clock() < self._token_expires
            if self._token is not None and fresh and self._token != stale:
                return self._token
            self._token, lifetime = await self._fetch_token()
            self._token_expires = self._clock() + lifetime - min(_EARLY, lifetime / 2)
            return self._token

    async def _fetch_token(self) -> tuple[str, float]:
        account = self._account
        now = int(self._clock())
        assertion = jwt.encode(
            {"iss": account.client_email, "scope": SCOPE, "aud": account.token_uri,
             "iat": now, "exp": now + _ASSERTION_LIFETIME},
            account.private_key, algorithm="RS256", headers={"kid": account.private_key_id})
        host = urlsplit(account.token_uri).hostname or account.token_uri
        try:
            response = await self._client.post(
                account.token_uri, data={"grant_type": GRANT_TYPE, "assertion": assertion})
        except httpx.TimeoutException as exc:
            raise TransientError(f"FCM OAuth {host}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise TransientError(f"FCM OAuth {host}: {type(exc).__name__}: {exc}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if response.status_code != 200:
            detail = ": ".join(str(answer[k]) for k in ("error", "error_description")
                               if answer.get(k))
            detail = detail or " ".join(response.text.split())[:200]
            raise TransientError(f"FCM OAuth {response.status_code} {detail}".strip()
                                 [:_MAX_REASON])
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise TransientError(f"FCM OAuth {host}: answer has no access_token")
        try:
            lifetime = float(answer.get("expires_in", 3600))
        except (TypeError, ValueError):
            lifetime = 3600.0
        log.debug("FCM access token for %s valid for %gs", account.client_email, lifetime)
        return token, lifetime

    def _redact(self, text: str, device: str) -> str:
        if device:
            text = text.replace(device, mask(device))
        if self._token:
            text = text.replace(self._token, "<access-token>")
        return text
