"""A local server that speaks FCM's HTTP v1 API and Google's OAuth2 token endpoint.

    async with FcmStandIn() as fcm:
        credentials = fcm.write_service_account(tmp_path)   # token_uri points here
        async with FcmProvider(credentials, base_url=fcm.url, timeout=2) as provider:
            await provider.send(PushMessage(token=fcm.new_token(), title="Hi", body="…"))
        assert fcm.messages[0]["notification"] == {"title": "Hi", "body": "…"}

It runs uvicorn inside the caller's event loop on a free 127.0.0.1 port and
checks what Google checks: ``POST /token`` takes a JWT-bearer assertion and
verifies its RS256 signature with the service account's public key (plus
``aud``, ``exp - iat`` ≤ 1 h, scope), then issues an access token;
``POST /v1/projects/{project}/messages:send`` wants that token (401
UNAUTHENTICATED otherwise), the project it was issued for (403
PERMISSION_DENIED) and a valid ``Message`` (400 INVALID_ARGUMENT with FCM's
``details``). Error bodies follow the v1 reference: ``{"error": {"code",
"message", "status", "details": [{"@type": "...FcmError", "errorCode"}]}}``.
Every knob is a plain attribute and may be changed while the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.standins.server import HttpStandIn

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_:-]{32,4096}")
_DURATION = re.compile(r"(\d+)(\.\d{1,9})?s")
_MESSAGE_FIELDS = {"name", "data", "notification", "android", "webpush", "apns", "fcm_options",
                   "fcmOptions", "token", "topic", "condition"}
_NOTIFICATION_FIELDS = {"title", "body", "image"}
_ANDROID_FIELDS = {"collapse_key", "collapseKey", "priority", "ttl", "restricted_package_name",
                   "restrictedPackageName", "data", "notification", "fcm_options", "fcmOptions",
                   "direct_boot_ok", "directBootOk"}
_UNAUTHENTICATED = ("Request had invalid authentication credentials. Expected OAuth 2 access "
                    "token, login cookie or other valid authentication credential. See "
                    "https://developers.google.com/identity/sign-in/web/devconsole-project.")
#: The canonical answer for a status, used by a ``Fault`` without a body: (status, message, code).
_CANONICAL = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument.", "INVALID_ARGUMENT"),
    401: ("UNAUTHENTICATED", _UNAUTHENTICATED, None),
    403: ("PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH"),
    404: ("NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"),
    429: ("RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests'.",
          "QUOTA_EXCEEDED"),
    500: ("INTERNAL", "Internal error encountered.", "INTERNAL"),
    503: ("UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE"),
}


def error_body(code: int, status: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    """FCM v1's error body (a ``google.rpc.Status``)."""
    body: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        body["details"] = list(details)
    return {"error": body}


def fcm_error(error_code: str) -> dict[str, Any]:
    """An ``FcmError`` detail carrying FCM's ``errorCode`` (UNREGISTERED …)."""
    return {"@type": FCM_ERROR, "errorCode": error_code}


def field_violation(field_path: str, description: str) -> dict[str, Any]:
    """A ``google.rpc.BadRequest`` detail naming the offending field."""
    return {"@type": BAD_REQUEST,
            "fieldViolations": [{"field": field_path, "description": description}]}


def canonical(status: int) -> dict[str, Any]:
    """The body FCM sends with ``status`` in the common case (429 QUOTA_EXCEEDED …)."""
    name, message, error_code = _CANONICAL.get(status, ("UNKNOWN", "Unknown error.", None))
    return error_body(status, name, message, *([fcm_error(error_code)] if error_code else []))


def _invalid(message: str, *details: dict[str, Any]) -> dict[str, Any]:
    return error_body(400, "INVALID_ARGUMENT", message, *details)


def _unknown_name(name: str, where: str) -> dict[str, Any]:
    text = f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': " \
           "Cannot find field."
    return _invalid(text, field_violation(where, text))


def validate(body: Any) -> dict[str, Any] | None:
    """The 400 body FCM would answer for a ``messages:send`` body, or None when it is valid."""
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        return _invalid("Request contains an invalid argument.")
    if extra := set(body) - {"message", "validate_only", "validateOnly"}:
        return _unknown_name(sorted(extra)[0], "")
    message = body["message"]
    if extra := set(message) - _MESSAGE_FIELDS:
        return _unknown_name(sorted(extra)[0], "message")
    targets = [k for k in ("token", "topic", "condition") if k in message]
    if not targets:
        return _invalid("Recipient of the message is not set.", fcm_error("INVALID_ARGUMENT"))
    if len(targets) > 1:
        return _invalid("Request contains an invalid argument.", fcm_error("INVALID_ARGUMENT"))
    token = message.get("token")
    if "token" in message and (not isinstance(token, str) or not _TOKEN_SHAPE.fullmatch(token)):
        return _invalid("The registration token is not a valid FCM registration token",
                        fcm_error("INVALID_ARGUMENT"))
    notification = message.get("notification", {})
    if not isinstance(notification, dict):
        return _invalid("Request contains an invalid argument.")
    if extra := set(notification) - _NOTIFICATION_FIELDS:
        return _unknown_name(sorted(extra)[0], "message.notification")
    data = message.get("data", {})
    if not isinstance(data, dict):
        return _invalid("Request contains an invalid argument.")
    for i, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            text = f"Invalid value at 'message.data[{i}].value' (TYPE_STRING), " \
                   f"{json.dumps(value)}"
            return _invalid(text, field_violation(f"message.data[{i}].value", text))
        if key in ("from", "message_type") or key.startswith(("google", "gcm")):
            return _invalid("Request contains an invalid argument.",
                            fcm_error("INVALID_ARGUMENT"))
    android = message.get("android", {})
    if not isinstance(android, dict):
        return _invalid("Request contains an invalid argument.")
    if extra := set(android) - _ANDROID_FIELDS:
        return _unknown_name(sorted(extra)[0], "message.android")
    priority = android.get("priority", "NORMAL")
    if priority not in ("NORMAL", "HIGH"):
        text = "Invalid value at 'message.android.priority' " \
               f"(type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), " \
               f"{json.dumps(priority)}"
        return _invalid(text, field_violation("message.android.priority", text))
    ttl = android.get("ttl", "0s")
    match = _DURATION.fullmatch(ttl) if isinstance(ttl, str) else None
    if match is None:
        text = "Invalid value at 'message.android.ttl' (type.googleapis.com/" \
               f"google.protobuf.Duration), {json.dumps(ttl)}"
        return _invalid(text, field_violation("message.android.ttl", text))
    if int(match.group(1)) > 28 * 24 * 3600:
        return _invalid("Request contains an invalid argument.", fcm_error("INVALID_ARGUMENT"))
    size = len(json.dumps(data)) + len(json.dumps(notification))
    if size > 4096:
        return _invalid("Request contains an invalid argument.", fcm_error("INVALID_ARGUMENT"))
    return None


@dataclass
class Fault:
    """One scripted answer: ``status`` with ``body`` (FCM's canonical error body for
    the status when None) and a ``Retry-After`` header when ``retry_after`` is set."""

    status: int
    body: Any = None
    retry_after: str | None = None


@dataclass
class Account:
    """A service account the stand-in knows (it wrote the key file)."""

    project_id: str
    client_email: str
    private_key_id: str
    public_key: rsa.RSAPublicKey


@dataclass
class Grant:
    """An access token the stand-in issued."""

    account: Account
    scopes: tuple[str, ...]
    expires_at: float


@dataclass
class TokenCall:
    """One request to the OAuth token endpoint, with the assertion as decoded (unverified)."""

    header: dict[str, Any]
    claims: dict[str, Any]
    status: int = 0
    error: str = ""


@dataclass
class Call:
    """One request to ``messages:send`` (accepted or not)."""

    project: str
    authorization: str | None
    body: Any
    status: int = 0
    at: float = field(default_factory=time.monotonic)  #: when it arrived (monotonic)


class FcmStandIn(HttpStandIn):
    """FCM HTTP v1 and Google OAuth on ``127.0.0.1:<free port>`` with fault knobs.

    Knobs (send endpoint, checked in this order):
        hang_seconds: wait this long before answering (released early on exit).
        faults: scripted answers, one popped per request while any are left.
        then the bearer token (401), its project (403), the body (400),
        dead_tokens (404 UNREGISTERED), foreign_tokens (403 SENDER_ID_MISMATCH),
        else 200 with a message name.
    Token endpoint: token_faults (scripted answers), then the assertion checks;
    token_lifetime is the ``expires_in`` it grants. ``revoke_tokens()`` makes
    every access token issued so far invalid (as after a key rotation).
    """

    name = "FCM"

    def __init__(self, *, hang_seconds: float = 0.0, token_lifetime: int = 3599) -> None:
        super().__init__()
        self.hang_seconds = hang_seconds
        self.token_lifetime = token_lifetime
        self.faults: deque[Fault] = deque()
        self.token_faults: deque[Fault] = deque()
        self.dead_tokens: set[str] = set()
        self.foreign_tokens: set[str] = set()
        self.calls: list[Call] = []
        self.token_calls: list[TokenCall] = []
        self.messages: list[dict[str, Any]] = []
        self.accounts: dict[str, Account] = {}
        self.grants: dict[str, Grant] = {}
        self._ids = itertools.count(1)
        self.app = self._starlette(
            Route("/token", self._token, methods=["POST"]),
            Route("/v1/projects/{project}/messages:send", self._send, methods=["POST"]),
        )

    @property
    def token_uri(self) -> str:
        """Where the service accounts written by this stand-in fetch access tokens."""
        return f"{self.url}/token"

    @property
    def tokens_issued(self) -> int:
        """How many access tokens the token endpoint handed out."""
        return sum(1 for c in self.token_calls if c.status == 200)

    def write_service_account(self, directory: Path, project_id: str = "herald-test",
                              name: str = "herald-push") -> Path:
        """Make an RSA key, register its public half, write ``<name>.json`` in ``directory``.

        The file is a Google service-account key whose ``token_uri`` is this
        stand-in; call it after entering the context (the URL is known then).
        """
        if not self.url:
            raise RuntimeError("enter the stand-in before writing a service account")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = f"{name}@{project_id}.iam.gserviceaccount.com"
        account = Account(project_id, email, secrets.token_hex(20), key.public_key())
        self.accounts[email] = account
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        path = Path(directory) / f"{name}.json"
        path.write_text(json.dumps({
            "type": "service_account", "project_id": project_id,
            "private_key_id": account.private_key_id, "private_key": pem,
            "client_email": email, "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
        }, indent=2), encoding="utf-8")
        return path

    @staticmethod
    def new_token() -> str:
        """A registration token shaped like FCM's (``<instance id>:APA91b<…>``)."""
        return f"{secrets.token_urlsafe(16)}:APA91b{secrets.token_urlsafe(100)}"

    def revoke_tokens(self) -> None:
        """Forget every access token issued so far: the next send with one gets 401."""
        self.grants.clear()

    # --- OAuth2 token endpoint --------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        assertion = (form.get("assertion") or [""])[0]
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            header, claims = {}, {}
        call = TokenCall(header, claims)
        self.token_calls.append(call)
        response = self._grant(form, assertion, header, claims)
        call.status = response.status_code
        if call.status != 200:
            call.error = json.loads(response.body).get("error_description", "")
        return response

    def _grant(self, form: dict[str, list[str]], assertion: str, header: dict[str, Any],
               claims: dict[str, Any]) -> Response:
        if self.token_faults:
            fault = self.token_faults.popleft()
            body = fault.body if fault.body is not None else {
                "error": "internal_failure", "error_description": "Backend error."}
            return self._fault_response(fault, body)
        if (form.get("grant_type") or [""])[0] != GRANT_TYPE:
            return _oauth_error("unsupported_grant_type", "Invalid grant_type: "
                                + (form.get("grant_type") or [""])[0])
        account = self.accounts.get(str(claims.get("iss", "")))
        if account is None:
            return _oauth_error("invalid_grant", "Invalid grant: account not found")
        if header.get("kid") not in (None, account.private_key_id):
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        try:
            verified = jwt.decode(assertion, account.public_key, algorithms=["RS256"],
                                  audience=self.token_uri,
                                  options={"require": ["iss", "aud", "iat", "exp"]})
        except jwt.InvalidSignatureError:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        except jwt.InvalidAudienceError:
            return _oauth_error("invalid_grant", "Invalid JWT: Failed audience check. The "
                                f"expected audience is {self.token_uri}.")
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
            return _oauth_error("invalid_grant", _SHORT_LIVED)
        except jwt.PyJWTError as exc:
            return _oauth_error("invalid_grant", f"Invalid JWT: {exc}")
        if int(verified["exp"]) - int(verified["iat"]) > 3600:
            return _oauth_error("invalid_grant", _SHORT_LIVED)
        scopes = tuple(str(verified.get("scope", "")).split())
        if not scopes:
            return _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience "
                                                 "provided.")
        token = f"ya29.standin-{next(self._ids)}-{secrets.token_urlsafe(24)}"
        self.grants[token] = Grant(account, scopes, time.time() + self.token_lifetime)
        return JSONResponse({"access_token": token, "expires_in": self.token_lifetime,
                             "token_type": "Bearer"})

    # --- messages:send ----------------------------------------------------------------------

    async def _send(self, request: Request) -> Response:
        project = request.path_params["project"]
        auth = request.headers.get("authorization")
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        call = Call(project, auth, body)
        self.calls.append(call)
        response = await self._answer(project, auth, body, raw)
        call.status = response.status_code
        return response

    async def _answer(self, project: str, auth: str | None, body: Any, raw: bytes) -> Response:
        if self.hang_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.hang_seconds)
        if self.faults:
            fault = self.faults.popleft()
            return self._fault_response(
                fault, fault.body if fault.body is not None else canonical(fault.status))
        grant = None
        if auth is not None and auth.startswith("Bearer "):
            grant = self.grants.get(auth.removeprefix("Bearer "))
        if grant is None or grant.expires_at < time.time():
            return JSONResponse(error_body(401, "UNAUTHENTICATED", _UNAUTHENTICATED), 401)
        if not {SCOPE, "https://www.googleapis.com/auth/cloud-platform"} & set(grant.scopes):
            return JSONResponse(error_body(403, "PERMISSION_DENIED",
                                           "Request had insufficient authentication scopes."),
                                403)
        if grant.account.project_id != project:
            return JSONResponse(error_body(
                403, "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                "(or it may not exist)."), 403)
        if body is None:
            text = f"Invalid JSON payload received. Unexpected token.\n{raw[:40]!r}"
            return JSONResponse(_invalid(text), 400)
        if problem := validate(body):
            return JSONResponse(problem, 400)
        message = body["message"]
        token = message.get("token")
        if token in self.dead_tokens:
            return JSONResponse(canonical(404), 404)
        if token in self.foreign_tokens:
            return JSONResponse(canonical(403), 403)
        self.messages.append(message)
        return JSONResponse({"name": f"projects/{project}/messages/0:{next(self._ids)}"
                                     f"%{secrets.token_hex(8)}"})

    @staticmethod
    def _fault_response(fault: Fault, body: Any) -> Response:
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        if isinstance(body, (dict, list)):
            return JSONResponse(body, fault.status, headers=headers)
        return Response(str(body), fault.status, headers=headers, media_type="text/html")

    async def _not_found(self, request: Request) -> Response:
        return JSONResponse(error_body(404, "NOT_FOUND", "Requested entity was not found."), 404)


_SHORT_LIVED = ("Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.")


def _oauth_error(error: str, description: str, status: int = 400) -> Response:
    return JSONResponse({"error": error, "error_description": description}, status)
