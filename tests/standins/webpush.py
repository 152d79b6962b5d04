"""A local push service that speaks the Web Push protocol (RFC 8030 / 8291 / 8292).

    async with WebPushStandIn() as push:
        vapid_key = write_vapid_key(tmp_path)
        subscription = push.subscribe(server_key=application_server_key(vapid_key))
        async with WebPushProvider(vapid_key, "mailto:ops@herald.local", timeout=2) as p:
            await p.send(PushMessage(token=subscription.token, title="Hi", body="…"))
        assert push.deliveries[0].payload == {"title": "Hi", "body": "…", "data": {}}

It runs uvicorn inside the caller's event loop on a free 127.0.0.1 port and
plays both sides a real push proves: the push service (a ``TTL`` header is
required, ``Urgency``/``Topic`` must be valid, the body must fit one
4096-octet record, the VAPID JWT must be signed by the ``k=`` key, name this
origin as ``aud``, expire within 24 hours and carry a ``sub``, and match
the subscription's ``applicationServerKey`` if it has one) and the browser
(it decrypts the ``aes128gcm`` body with the subscription's private key and
auth secret, and answers 400 if that fails: a real service would accept and
the browser would drop the push silently). Errors are autopush-style JSON
``{"code", "errno", "error", "message"}``. Every knob is a plain attribute
and may be changed while the server runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import secrets
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import http_ece  # type: ignore[import-untyped]
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from py_vapid import Vapid  # type: ignore[import-untyped]
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.standins.server import HttpStandIn

PUSH_PATH = "/wpush/v2/"
MAX_BODY = 4096
URGENCIES = ("very-low", "low", "normal", "high")
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
_SUBJECT = re.compile(r"(mailto:.+@.+|https://.+)")
#: The canonical (errno, message) for a status, used by a ``Fault`` without a body.
_CANONICAL = {400: (110, "Invalid crypto keys specified"),
              401: (109, "Invalid authentication"),
              404: (102, "Invalid URL endpoint"),
              410: (103, "Subscription is no longer valid"),
              413: (104, "Data payload too large"),
              429: (999, "Too many requests"),
              500: (999, "Internal server error"),
              503: (201, "Service unavailable")}


def b64url(data: bytes) -> str:
    """Unpadded base64url, as Web Push keys travel."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    """The bytes of unpadded (or padded) base64url ``text``."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def error_body(status: int, errno: int, message: str) -> dict[str, Any]:
    """An autopush-style error body."""
    return {"code": status, "errno": errno, "error": HTTPStatus(status).phrase,
            "message": message}


def write_vapid_key(directory: Path, name: str = "vapid_private.pem") -> Path:
    """Generate a VAPID key pair with py_vapid and save the private key as PEM."""
    vapid = Vapid()
    vapid.generate_keys()
    path = Path(directory) / name
    vapid.save_key(str(path))
    return path


def application_server_key(vapid_private_key_file: Path) -> str:
    """The public half of a VAPID PEM as a browser's ``applicationServerKey`` (base64url)."""
    key = load_pem_private_key(Path(vapid_private_key_file).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return b64url(key.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint))


@dataclass
class Subscriber:
    """One browser subscription: what the page sends the server (``token``) and the
    secrets only the browser holds (``private_key``, ``auth``)."""

    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    server_key: str | None = None

    @property
    def p256dh(self) -> str:
        """The subscription's public key, base64url (``keys.p256dh``)."""
        return b64url(self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))

    @property
    def token(self) -> str:
        """``PushSubscription.toJSON()`` as a string: herald's ``PushMessage.token``."""
        return json.dumps({"endpoint": self.endpoint, "expirationTime": None,
                           "keys": {"p256dh": self.p256dh, "auth": b64url(self.auth)}})


@dataclass
class Fault:
    """One scripted answer: ``status`` with ``body`` (autopush's canonical error for the
    status when None) and a ``Retry-After`` header when ``retry_after`` is set."""

    status: int
    body: Any = None
    retry_after: str | None = None


@dataclass
class Delivery:
    """One push the service accepted, as the browser decrypted it."""

    subscription: str
    headers: dict[str, str]
    payload: Any
    vapid_claims: dict[str, Any]
    vapid_key: str


@dataclass
class Call:
    """One request as received (accepted or not)."""

    subscription: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    message: str = ""
    at: float = field(default_factory=time.monotonic)  #: when it arrived (monotonic)


class _Reject(Exception):
    def __init__(self, status: int, errno: int, message: str) -> None:
        super().__init__(message)
        self.status, self.errno, self.message = status, errno, message


class WebPushStandIn(HttpStandIn):
    """A push service on ``127.0.0.1:<free port>`` with fault knobs.

    Knobs (checked in this order for each request):
        hang_seconds: wait this long before answering (released early on exit).
        faults: scripted answers, one popped per request while any are left.
        then the subscription (404 unknown, 410 if in dead_tokens, the ids of
        ``unsubscribe``d subscriptions), VAPID (401, 403 key mismatch), headers
        (400), size (413), decryption (400), else 201 Created.
    """

    name = "Web Push"

    def __init__(self, *, hang_seconds: float = 0.0) -> None:
        super().__init__()
        self.hang_seconds = hang_seconds
        self.faults: deque[Fault] = deque()
        self.dead_tokens: set[str] = set()
        self.subscribers: dict[str, Subscriber] = {}
        self.calls: list[Call] = []
        self.deliveries: list[Delivery] = []
        self._ids = itertools.count(1)
        self.app = self._starlette(Route(PUSH_PATH + "{sub}", self._push, methods=["POST"]))

    def subscribe(self, server_key: str | None = None) -> Subscriber:
        """A new subscription on this service, as ``PushManager.subscribe`` makes one.

        ``server_key`` is the ``applicationServerKey`` (base64url VAPID public
        key); when given, pushes signed with another key are refused (403).
        """
        if not self.url:
            raise RuntimeError("enter the stand-in before subscribing")
        sub_id = secrets.token_urlsafe(24)
        subscriber = Subscriber(sub_id, f"{self.url}{PUSH_PATH}{sub_id}",
                                ec.generate_private_key(ec.SECP256R1()),
                                secrets.token_bytes(16), server_key)
        self.subscribers[sub_id] = subscriber
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """The user revoked permission: pushes to it get 410 Gone from now on."""
        self.dead_tokens.add(subscriber.id)

    async def _push(self, request: Request) -> Response:
        sub_id = request.path_params["sub"]
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = await request.body()
        call = Call(sub_id, headers, body)
        self.calls.append(call)
        if self.hang_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.hang_seconds)
        if self.faults:
            fault = self.faults.popleft()
            call.status = fault.status
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            content = fault.body if fault.body is not None else error_body(
                fault.status, *_CANONICAL.get(fault.status, (999, "Error")))
            if isinstance(content, (dict, list)):
                return JSONResponse(content, fault.status, headers=extra)
            return Response(str(content), fault.status, headers=extra, media_type="text/plain")
        try:
            delivery = self._accept(sub_id, headers, body)
        except _Reject as reject:
            call.status, call.message = reject.status, reject.message
            return JSONResponse(error_body(reject.status, reject.errno, reject.message),
                                reject.status)
        self.deliveries.append(delivery)
        call.status = 201
        ttl = headers["ttl"]
        return Response(b"", 201, headers={
            "Location": f"{self.url}/m/{next(self._ids)}{secrets.token_hex(8)}", "TTL": ttl})

    def _accept(self, sub_id: str, headers: dict[str, str], body: bytes) -> Delivery:
        subscriber = self.subscribers.get(sub_id)
        if subscriber is None:
            raise _Reject(404, 102, "Invalid URL endpoint")
        if sub_id in self.dead_tokens:
            raise _Reject(410, 103, "Subscription is no longer valid")
        claims, key = self._vapid(headers.get("authorization", ""), subscriber)
        ttl = headers.get("ttl")
        if ttl is None:
            raise _Reject(400, 111, "Missing TTL header")
        if not ttl.isdigit():
            raise _Reject(400, 112, "Invalid TTL header value")
        if headers.get("urgency", "normal") not in URGENCIES:
            raise _Reject(400, 999, "Invalid Urgency header")
        if "topic" in headers and not _TOPIC.fullmatch(headers["topic"]):
            raise _Reject(400, 999, "Invalid Topic header")
        if len(body) > MAX_BODY:
            raise _Reject(413, 104, "Data payload too large")
        payload: Any = None
        if body:
            if headers.get("content-encoding") != "aes128gcm":
                raise _Reject(400, 110, "Unknown Content-Encoding")
            payload = self._decrypt(body, subscriber)
        return Delivery(sub_id, headers, payload, claims, key)

    def _vapid(self, authorization: str, subscriber: Subscriber) -> tuple[dict[str, Any], str]:
        """The verified claims and ``k`` of a ``vapid t=…,k=…`` header (RFC 8292)."""
        scheme, _, params = authorization.partition(" ")
        parts = dict(p.strip().split("=", 1) for p in params.split(",") if "=" in p)
        if scheme.lower() != "vapid" or "t" not in parts or "k" not in parts:
            raise _Reject(401, 109, "Missing or malformed VAPID Authorization header")
        try:
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), unb64url(parts["k"]))
            claims = jwt.decode(parts["t"], public_key, algorithms=["ES256"],
                                audience=self.url, options={"require": ["aud", "exp", "sub"]})
        except (ValueError, jwt.PyJWTError) as exc:
            raise _Reject(401, 109, f"Invalid VAPID token: {exc}") from None
        if int(claims["exp"]) > time.time() + 24 * 3600:
            raise _Reject(401, 109, "Invalid VAPID token: exp more than 24 hours ahead")
        if not _SUBJECT.fullmatch(str(claims["sub"])):
            raise _Reject(401, 109, "Invalid VAPID token: sub is not mailto: or https:")
        if subscriber.server_key is not None and parts["k"] != subscriber.server_key:
            raise _Reject(403, 109, "VAPID key does not match the subscription's "
                                    "applicationServerKey")
        return claims, parts["k"]

    @staticmethod
    def _decrypt(body: bytes, subscriber: Subscriber) -> Any:
        """Decrypt like the browser would (one record, RFC 8291), then parse JSON if it is."""
        if len(body) < 21 or body[20] != 65:
            raise _Reject(400, 110, "aes128gcm header keyid is not a P-256 public key")
        record_size = struct.unpack("!L", body[16:20])[0]
        if len(body) - 86 > record_size:
            raise _Reject(400, 110, "more than one aes128gcm record")
        try:
            plaintext: bytes = http_ece.decrypt(body, private_key=subscriber.private_key,
                                                auth_secret=subscriber.auth,
                                                version="aes128gcm")
        except Exception as exc:  # ECEException, InvalidTag, bad point …
            raise _Reject(400, 110, f"Decryption failed: {exc}") from None
        try:
            return json.loads(plaintext)
        except ValueError:
            return plaintext

    async def _not_found(self, request: Request) -> Response:
        return JSONResponse(error_body(404, 102, "Invalid URL endpoint"), 404)
