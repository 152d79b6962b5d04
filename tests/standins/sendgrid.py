"""A local server that speaks SendGrid's v3 Mail Send API, with fault knobs.

    async with SendGridStandIn(require_key="SG.test") as sg:
        provider = SendGridProvider("SG.test", base_url=sg.url, timeout=2)
        ...
        assert sg.messages[0]["subject"] == "Hello"

It runs uvicorn inside the caller's event loop on a free 127.0.0.1 port.
Behaviour follows the public API reference: ``POST /v3/mail/send`` answers
``202 Accepted`` with an empty body and an ``X-Message-Id`` header; errors are
``{"errors": [{"message", "field", "help"}]}`` with 400 (validation), 401 (key),
429 (with ``X-RateLimit-*`` headers), 5xx. Validation messages are SendGrid's
published wording where the docs give it. Every knob is a plain attribute
and may be changed while the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.standins.server import HttpStandIn

SEND_PATH = "/v3/mail/send"
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_RESERVED_HEADERS = ("x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type",
                     "content-transfer-encoding", "to", "from", "subject", "reply-to",
                     "cc", "bcc")
_PHRASES = {400: "bad request", 401: "authorization required", 403: "access forbidden",
            404: "not found", 408: "request timeout", 413: "content too large",
            429: "too many requests", 500: "internal server error",
            502: "bad gateway", 503: "service unavailable", 504: "gateway timeout"}


def errors(*items: tuple[str | None, str]) -> dict[str, Any]:
    """SendGrid's error body: ``{"errors": [{"message", "field", "help"}]}``."""
    return {"errors": [{"message": msg, "field": field, "help": None} for field, msg in items]}


def validate(body: Any) -> list[tuple[str | None, str]]:
    """The (field, message) errors SendGrid would report for a Mail Send body."""
    if not isinstance(body, dict):
        return [(None, "Bad Request")]
    found: list[tuple[str | None, str]] = []
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        found.append(("personalizations", "You must have at least one personalization."))
        personalizations = []
    seen: set[str] = set()
    for i, p in enumerate(personalizations):
        to = p.get("to") if isinstance(p, dict) else None
        if not isinstance(to, list) or not to:
            found.append((f"personalizations.{i}.to",
                          "The to parameter is required for all personalization objects."))
            continue
        for kind in ("to", "cc", "bcc"):
            for j, rcpt in enumerate(p.get(kind) or []):
                email = rcpt.get("email") if isinstance(rcpt, dict) else None
                if not isinstance(email, str) or not _ADDRESS.match(email):
                    found.append((f"personalizations.{i}.{kind}.{j}.email",
                                  "Does not contain a valid address."))
                elif email.lower() in seen:
                    # The real API names the duplicate address: herald must not echo it.
                    found.append((f"personalizations.{i}", (
                        "Each email address in the personalization block should be unique "
                        "between to, cc, and bcc. We found the first duplicate instance of "
                        f"[{email}] in the personalizations.{i}.{kind} field.")))
                else:
                    seen.add(email.lower())
    sender = body.get("from")
    if not isinstance(sender, dict):
        found.append(("from", "The from object must be provided for every email send. It is an "
                              "object that requires the email parameter, but may also contain "
                              "a name parameter."))
    elif not isinstance(sender.get("email"), str) or not _ADDRESS.match(sender["email"]):
        found.append(("from.email", "The from email does not contain a valid address."))
    has_subject = all(isinstance(p, dict) and p.get("subject") for p in personalizations)
    if not body.get("subject") and not (personalizations and has_subject):
        found.append(("subject", "The subject is required. You can get around this requirement "
                                 "if you use a template with a subject defined or if every "
                                 "personalization has a subject defined."))
    content = body.get("content")
    if not isinstance(content, list) or not content:
        found.append(("content", "Unless a valid template_id is provided, the content parameter "
                                 "is required. There must be at least one defined content block. "
                                 "We typically suggest both text/plain and text/html blocks are "
                                 "included, but only one block is required."))
    else:
        for k, c in enumerate(content):
            if not isinstance(c, dict) or not isinstance(c.get("value"), str) or not c["value"]:
                found.append((f"content.{k}.value", "The content value must be a string at "
                                                    "least one character in length."))
        rank = {"text/plain": 0, "text/html": 1}
        ranks = [rank.get(str(c.get("type")) if isinstance(c, dict) else "", 2) for c in content]
        if ranks != sorted(ranks):
            found.append(("content", "If present, text/plain and text/html may only be provided "
                                     "in that order, followed by any other content."))
    headers = body.get("headers") or {}
    if not isinstance(headers, dict):
        found.append(("headers", "Invalid type. Expected: object."))
    else:
        for name, value in headers.items():
            if name.lower() in _RESERVED_HEADERS:
                found.append((f"headers.{name}", f"The {name} header is reserved and cannot "
                                                 "be set in headers."))
            elif not isinstance(value, str):
                found.append((f"headers.{name}", "Invalid type. Expected: string."))
    return found


@dataclass
class Call:
    """One request the stand-in received (accepted or not)."""

    authorization: str | None
    body: Any
    status: int = 0
    at: float = field(default_factory=time.monotonic)  #: when it arrived (monotonic)


class SendGridStandIn(HttpStandIn):
    """SendGrid's Mail Send endpoint on ``127.0.0.1:<free port>`` with fault knobs.

    Knobs (checked in this order for each request):
        hang_seconds: wait this long before answering (released early on exit).
        require_key: the bearer key every request must carry; 401 otherwise.
        always_status: answer every request with this status.
        rate_limit_first: the first N requests get 429 with ``Retry-After:
            retry_after`` (omitted when None; a str is sent verbatim) and
            ``X-RateLimit-Reset`` = now + ``rate_limit_reset`` (default: retry_after).
        fail_first: the next N requests get ``status`` (a 5xx by default).
        then validation like the real API (400), else 202 Accepted.
    """

    name = "SendGrid"

    def __init__(self, *, require_key: str | None = None, fail_first: int = 0,
                 status: int = 503, rate_limit_first: int = 0,
                 retry_after: float | str | None = 1, rate_limit_reset: float | None = None,
                 rate_limit: int = 600, always_status: int | None = None,
                 hang_seconds: float = 0.0) -> None:
        super().__init__()
        self.require_key = require_key
        self.fail_first = fail_first
        self.status = status
        self.rate_limit_first = rate_limit_first
        self.retry_after = retry_after
        self.rate_limit_reset = rate_limit_reset
        self.rate_limit = rate_limit
        self.always_status = always_status
        self.hang_seconds = hang_seconds
        self.calls: list[Call] = []
        self.messages: list[dict[str, Any]] = []
        self._rate_limited = 0
        self._failed = 0
        self._ids = itertools.count(1)
        self.app = self._starlette(Route(SEND_PATH, self._send, methods=["POST"]))

    @property
    def requests(self) -> int:
        """How many requests arrived at the send endpoint (answered or not)."""
        return len(self.calls)

    async def _send(self, request: Request) -> Response:
        auth = request.headers.get("authorization")
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        call = Call(auth, body)
        self.calls.append(call)
        response = await self._answer(auth, body)
        call.status = response.status_code
        return response

    async def _answer(self, auth: str | None, body: Any) -> Response:
        if self.hang_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.hang_seconds)
        if self.require_key is not None:
            if not auth:
                return JSONResponse(errors((None, "authorization required")), 401)
            if auth != f"Bearer {self.require_key}":
                return JSONResponse(errors(
                    (None, "The provided authorization grant is invalid, expired, or revoked")),
                    401)
        if self.always_status is not None:
            return self._status(self.always_status)
        if self._rate_limited < self.rate_limit_first:
            self._rate_limited += 1
            return self._too_many()
        if self._failed < self.fail_first:
            self._failed += 1
            return self._status(self.status)
        if body is None:
            return JSONResponse(errors((None, "Bad Request")), 400)
        problems = validate(body)
        if problems:
            return JSONResponse(errors(*problems), 400)
        self.messages.append(body)
        return Response(status_code=202, headers={"X-Message-Id": f"standin{next(self._ids)}"})

    def _status(self, status: int) -> Response:
        if status == 429:
            return self._too_many()
        if 200 <= status < 300:
            return Response(status_code=status, headers={"X-Message-Id": "standin-forced"})
        return JSONResponse(errors((None, _PHRASES.get(status, "error"))), status)

    def _too_many(self) -> Response:
        reset_in = self.rate_limit_reset
        if reset_in is None:
            reset_in = float(self.retry_after) if isinstance(self.retry_after, int | float) else 1
        headers = {"X-RateLimit-Limit": str(self.rate_limit), "X-RateLimit-Remaining": "0",
                   "X-RateLimit-Reset": str(math.ceil(time.time() + reset_in))}
        if self.retry_after is not None:
            ra = self.retry_after
            headers["Retry-After"] = ra if isinstance(ra, str) else f"{ra:g}"
        return JSONResponse(errors((None, "too many requests")), 429, headers=headers)

    async def _not_found(self, request: Request) -> Response:
        return JSONResponse(errors((None, "not found")), 404)
