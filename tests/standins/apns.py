"""A local server that speaks APNs' provider API: HTTP/2 over TLS, token authentication.

    async with ApnsStandIn(topic="com.example.herald") as apns:
        key_file = apns.write_key(tmp_path, key_id="KEY1234567", team_id="TEAM123456")
        async with ApnsProvider(key_file, "KEY1234567", "TEAM123456", apns.topic,
                                base_url=apns.url, verify=apns.ssl_context,
                                timeout=2) as provider:
            await provider.send(PushMessage(token=apns.new_token(), title="Hi", body="…"))
        assert apns.notifications[0].payload["aps"]["alert"]["title"] == "Hi"

It runs hypercorn inside the caller's event loop on a free 127.0.0.1 port,
with a certificate from a throwaway ``trustme`` CA (``ssl_context`` trusts
it). Like APNs it answers only HTTP/2 (ALPN ``h2``; anything else gets 505),
verifies the provider token (ES256 JWT: ``kid`` of a key it wrote, ``iss``
= that key's team, signature, ``iat`` under an hour old), checks the
``apns-*`` headers, the device token and the payload, and answers errors as
``{"reason": "..."}`` (410 adds ``timestamp``) with an ``apns-id`` header.
Every knob is a plain attribute and may be changed while the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import socket
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import jwt
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

PUSH_TYPES = {"alert", "background", "location", "voip", "complication", "fileprovider", "mdm",
              "liveactivity", "pushtotalk", "widgets", "controls"}
MAX_PAYLOAD = 4096
_DEVICE = re.compile(r"[0-9a-fA-F]{64}")
#: The canonical ``reason`` for a status, used by a ``Fault`` without one.
_CANONICAL = {400: "BadDeviceToken", 403: "InvalidProviderToken", 404: "BadPath",
              405: "MethodNotAllowed", 410: "Unregistered", 413: "PayloadTooLarge",
              429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable"}


@dataclass
class Fault:
    """One scripted answer: ``status`` with ``{"reason": reason}`` (the canonical reason
    for the status when None) and a ``Retry-After`` header when ``retry_after`` is set."""

    status: int
    reason: str | None = None
    retry_after: str | None = None


@dataclass
class Call:
    """One request as received (accepted or not), with the provider token decoded."""

    method: str
    path: str
    http_version: str
    headers: dict[str, str]
    body: Any
    jwt_header: dict[str, Any]
    jwt_claims: dict[str, Any]
    status: int = 0
    reason: str = ""
    at: float = field(default_factory=time.monotonic)  #: when it arrived (monotonic)

    @property
    def provider_token(self) -> str:
        """The JWT after ``bearer ``, or ``""``."""
        return self.headers.get("authorization", "").partition(" ")[2]


@dataclass
class Notification:
    """One push APNs accepted: device token, ``apns-*`` headers, decoded payload."""

    device: str
    headers: dict[str, str]
    payload: dict[str, Any]
    apns_id: str


class _TlsConfig(Config):
    """hypercorn's config with an in-memory TLS context (no certificate files)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._context = context

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self._context


class ApnsStandIn:
    """APNs on ``https://127.0.0.1:<free port>`` (HTTP/2 only) with fault knobs.

    Knobs (checked in this order for each request):
        hang_seconds: wait this long before answering (released early on exit).
        HTTP/2, method, path (505, 405, 404 BadPath) are checked first, then
        faults: scripted answers, one popped per request while any are left;
        then the provider token (403 MissingProviderToken / InvalidProviderToken /
        ExpiredProviderToken; ``expire_provider_tokens()`` marks every token seen
        so far expired), the headers (400 MissingTopic, TopicDisallowed,
        InvalidPushType, BadPriority, BadExpirationDate, BadCollapseId,
        BadMessageId), the device token (400 BadDeviceToken), dead_tokens
        (410 Unregistered), the payload (400 PayloadEmpty, 413 PayloadTooLarge),
        else 200 with an ``apns-id``.
    """

    def __init__(self, *, topic: str = "com.example.herald", hang_seconds: float = 0.0) -> None:
        self.topic = topic
        self.hang_seconds = hang_seconds
        self.faults: deque[Fault] = deque()
        self.dead_tokens: set[str] = set()
        self.calls: list[Call] = []
        self.notifications: list[Notification] = []
        self.keys: dict[str, tuple[str, ec.EllipticCurvePublicKey]] = {}
        self.expired_tokens: set[str] = set()
        self.url = ""
        self._ca = trustme.CA()
        cert = self._ca.issue_cert("127.0.0.1", "localhost")
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(server_context)
        server_context.set_alpn_protocols(["h2"])
        self._config = _TlsConfig(server_context)
        self._config.errorlog = logging.getLogger("tests.standins.apns")
        self._config.graceful_timeout = 2
        #: Trusts the stand-in's certificate: pass it to the provider as ``verify``.
        self.ssl_context = ssl.create_default_context()
        self._ca.configure_trust(self.ssl_context)
        self._release = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.app = Starlette(routes=[
            Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT", "DELETE"]),
        ])

    def write_key(self, directory: Path, key_id: str = "KEY1234567",
                  team_id: str = "TEAM123456") -> Path:
        """Make a P-256 key, trust it for ``team_id``, write ``AuthKey_<key_id>.p8``."""
        key = ec.generate_private_key(ec.SECP256R1())
        self.keys[key_id] = (team_id, key.public_key())
        path = Path(directory) / f"AuthKey_{key_id}.p8"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    @staticmethod
    def new_token() -> str:
        """A device token shaped like Apple's: 32 random bytes in hex."""
        return secrets.token_hex(32)

    def expire_provider_tokens(self) -> None:
        """Answer ExpiredProviderToken from now on to every provider token seen so far."""
        self.expired_tokens.update(c.provider_token for c in self.calls if c.provider_token)

    async def __aenter__(self) -> ApnsStandIn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(100)  # connections wait in the backlog until hypercorn accepts them
        sock.setblocking(False)
        port = sock.getsockname()[1]
        self._task = asyncio.create_task(worker_serve(
            wrap_app(self.app, self._config.wsgi_max_body_size, "asgi"), self._config,
            sockets=Sockets(secure_sockets=[sock], insecure_sockets=[], quic_sockets=[]),
            shutdown_trigger=self._stop.wait))
        await asyncio.sleep(0)
        if self._task.done():
            self._task.result()
            raise RuntimeError("APNs stand-in stopped before it started")
        self.url = f"https://127.0.0.1:{port}"
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._release.set()
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        token = headers.get("authorization", "").partition(" ")[2]
        try:
            jwt_header = jwt.get_unverified_header(token)
            jwt_claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            jwt_header, jwt_claims = {}, {}
        call = Call(request.method, request.url.path, request.scope.get("http_version", ""),
                    headers, body, jwt_header, jwt_claims)
        self.calls.append(call)
        status, reason, extra = await self._answer(call, raw)
        call.status, call.reason = status, reason
        apns_id = headers.get("apns-id") or str(uuid.uuid4())
        response_headers = {"apns-id": apns_id, **extra}
        if status == 200:
            self.notifications.append(Notification(
                call.path.rsplit("/", 1)[-1],
                {k: v for k, v in headers.items() if k.startswith("apns-")}, body, apns_id))
            return Response(b"", 200, headers=response_headers)
        content: dict[str, Any] = {"reason": reason}
        if status == 410:
            content["timestamp"] = int(time.time() * 1000)
        return JSONResponse(content, status, headers=response_headers)

    async def _answer(self, call: Call, raw: bytes) -> tuple[int, str, dict[str, str]]:
        if self.hang_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.hang_seconds)
        if call.http_version != "2":
            return 505, "HTTP/2 required", {}
        if call.method != "POST":
            return 405, "MethodNotAllowed", {}
        if not call.path.startswith("/3/device/"):
            return 404, "BadPath", {}
        if self.faults:
            fault = self.faults.popleft()
            extra = {"retry-after": fault.retry_after} if fault.retry_after is not None else {}
            return fault.status, fault.reason or _CANONICAL.get(fault.status, "Error"), extra
        if problem := self._auth_problem(call):
            return 403, problem, {}
        if problem := self._header_problem(call.headers):
            return 400, problem, {}
        device = call.path.removeprefix("/3/device/")
        if not device:
            return 400, "MissingDeviceToken", {}
        if not _DEVICE.fullmatch(device):
            return 400, "BadDeviceToken", {}
        if device in self.dead_tokens:
            return 410, "Unregistered", {}
        if not raw:
            return 400, "PayloadEmpty", {}
        if len(raw) > MAX_PAYLOAD:
            return 413, "PayloadTooLarge", {}
        if not isinstance(call.body, dict):
            # Apple documents no reason for malformed JSON; the stand-in is stricter.
            return 400, "BadPayload", {}
        return 200, "", {}

    def _auth_problem(self, call: Call) -> str | None:
        auth = call.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not call.provider_token:
            return "MissingProviderToken"
        token = call.provider_token
        if call.jwt_header.get("alg") != "ES256":
            return "InvalidProviderToken"
        known = self.keys.get(str(call.jwt_header.get("kid", "")))
        if known is None:
            return "InvalidProviderToken"
        team_id, public_key = known
        try:
            claims = jwt.decode(token, public_key, algorithms=["ES256"],
                                options={"require": ["iss", "iat"]}, leeway=60)
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        if claims["iss"] != team_id:
            return "InvalidProviderToken"
        if token in self.expired_tokens or time.time() - int(claims["iat"]) > 3600:
            return "ExpiredProviderToken"
        return None

    def _header_problem(self, headers: dict[str, str]) -> str | None:
        topic = headers.get("apns-topic")
        if not topic:
            return "MissingTopic"
        if topic != self.topic:
            return "TopicDisallowed"
        if headers.get("apns-push-type", "alert") not in PUSH_TYPES:
            return "InvalidPushType"
        if headers.get("apns-priority", "10") not in ("10", "5", "1"):
            return "BadPriority"
        if not headers.get("apns-expiration", "0").isdigit():
            return "BadExpirationDate"
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return "BadCollapseId"
        if "apns-id" in headers:
            try:
                uuid.UUID(headers["apns-id"])
            except ValueError:
                return "BadMessageId"
        return None
