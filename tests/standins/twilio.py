"""A local server that speaks Twilio's Messages resource (2010-04-01), with fault knobs.

    async with TwilioStandIn(SID, TOKEN) as tw:
        provider = TwilioProvider(SID, TOKEN, "+15005550006", base_url=tw.url, timeout=2)
        ...
        assert tw.messages[0]["Body"] == "Hello"

It runs uvicorn inside the caller's event loop on a free 127.0.0.1 port.
Behaviour follows the public API reference: ``POST
/2010-04-01/Accounts/{AccountSid}/Messages.json`` with a form body (To, From,
Body) and HTTP basic auth (account SID : auth token) answers ``201`` with the
Message resource as JSON (``status: "queued"``); errors are
``{"code", "message", "more_info", "status"}`` with the HTTP status, e.g. 401 code
20003 ("Authenticate"), 400 codes 21211/21602/21604/21603/21617/21610/21614/21408,
404 code 20404 and 429 code 20429. Like the real API, error messages echo the
phone number: herald must mask it. Every knob is a plain attribute and may be
changed while the server runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from consumers.sms_text import segments
from tests.standins.server import HttpStandIn

_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
MAX_BODY = 1600


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded body as a dict (last value wins); empty for any other content type.

    Parsed by hand: starlette's ``request.form()`` needs python-multipart."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if content_type != "application/x-www-form-urlencoded":
        return {}
    return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


def error(status: int, code: int, message: str,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """Twilio's error body with its HTTP status."""
    return JSONResponse({"code": code, "message": message,
                         "more_info": f"https://www.twilio.com/docs/errors/{code}",
                         "status": status}, status, headers=headers)


@dataclass
class Fault:
    """One scripted answer: ``status`` with Twilio error ``code`` (a raw ``body``
    instead, when given), and ``Retry-After`` when ``retry_after`` is set."""

    status: int = 503
    code: int | None = None
    message: str = "Service Unavailable"
    retry_after: float | str | None = None
    body: str | None = None


@dataclass
class Call:
    """One request the stand-in received (accepted or not)."""

    account_sid: str
    authorization: str | None
    form: dict[str, str]
    status: int = 0
    at: float = field(default_factory=time.monotonic)  #: when it arrived (monotonic)


class TwilioStandIn(HttpStandIn):
    """Twilio's Messages endpoint on ``127.0.0.1:<free port>`` with fault knobs.

    Knobs (checked in this order for each request):
        hang_seconds: wait this long before answering (released early on exit).
        faults: scripted answers, one popped per request (:class:`Fault`).
        account_sid / auth_token: the credentials basic auth must carry (401 20003);
            a valid login on another account's URL gets 404 20404.
        throttle: the next N requests get 429 code 20429, with ``Retry-After:
            retry_after`` (omitted when None; a str is sent verbatim).
        then validation like the real API (400: 21604, 21603, 21602, 21211, 21617),
        senders: when not None, the only From values accepted (else 21606),
        opted_out: To numbers that replied STOP (21610),
        landlines: To numbers that are not mobiles (21614),
        blocked_prefixes: To prefixes whose region is not enabled (21408),
        else 201 and the message is recorded in ``messages``.
    """

    name = "Twilio"

    def __init__(self, account_sid: str, auth_token: str, *, throttle: int = 0,
                 retry_after: float | str | None = 1, hang_seconds: float = 0.0) -> None:
        super().__init__()
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.faults: list[Fault] = []
        self.throttle = throttle
        self.retry_after = retry_after
        self.hang_seconds = hang_seconds
        self.senders: set[str] | None = None
        self.opted_out: set[str] = set()
        self.landlines: set[str] = set()
        self.blocked_prefixes: set[str] = set()
        self.calls: list[Call] = []
        self.messages: list[dict[str, str]] = []
        self._ids = itertools.count(1)
        self.app = self._starlette(
            Route("/2010-04-01/Accounts/{sid}/Messages.json", self._create, methods=["POST"]),
        )

    @property
    def requests(self) -> int:
        """How many requests arrived at the Messages endpoint (answered or not)."""
        return len(self.calls)

    async def _create(self, request: Request) -> Response:
        sid = request.path_params["sid"]
        auth = request.headers.get("authorization")
        form = await read_form(request)
        call = Call(sid, auth, form)
        self.calls.append(call)
        response = await self._answer(sid, auth, form)
        call.status = response.status_code
        return response

    async def _answer(self, sid: str, auth: str | None, form: dict[str, str]) -> Response:
        if self.hang_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.hang_seconds)
        if self.faults:
            return self._fault(self.faults.pop(0))
        if not self._authenticated(auth):
            return error(401, 20003, "Authenticate",
                         headers={"WWW-Authenticate": 'Basic realm="Twilio API"'})
        if sid != self.account_sid:
            return error(404, 20404, f"The requested resource /2010-04-01/Accounts/{sid}/"
                                     "Messages.json was not found")
        if self.throttle > 0:
            self.throttle -= 1
            return self._fault(Fault(429, 20429, "Too Many Requests", self.retry_after))
        if problem := self._validate(form):
            return problem
        to, sender, body = form["To"], form["From"], form["Body"]
        self.messages.append(form)
        return JSONResponse(self._resource(to, sender, body), 201)

    def _authenticated(self, auth: str | None) -> bool:
        if not auth or not auth.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(auth[6:], validate=True).decode().partition(":")
        except ValueError:
            return False
        return user == self.account_sid and password == self.auth_token

    def _validate(self, form: dict[str, str]) -> Response | None:
        to, sender, body = form.get("To", ""), form.get("From", ""), form.get("Body", "")
        if not to:
            return error(400, 21604, "A 'To' phone number is required.")
        if not sender:
            return error(400, 21603, "A 'From' phone number is required.")
        if not body:
            return error(400, 21602, "Message body is required.")
        if not _E164.match(to):
            return error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if len(body) > MAX_BODY:
            return error(400, 21617, "The concatenated message body exceeds the "
                                     f"{MAX_BODY} character limit.")
        if self.senders is not None and sender not in self.senders:
            return error(400, 21606, f"The From phone number {sender} is not a valid, "
                                     "SMS-capable inbound phone number or short code for "
                                     "your account.")
        if to in self.opted_out:
            return error(400, 21610, "Attempt to send to unsubscribed recipient")
        if to in self.landlines:
            return error(400, 21614, f"'To' number {to} is not a valid mobile number")
        if any(to.startswith(prefix) for prefix in self.blocked_prefixes):
            return error(400, 21408, "Permission to send an SMS has not been enabled for "
                                     f"the region indicated by the 'To' number: {to}")
        return None

    def _resource(self, to: str, sender: str, body: str) -> dict[str, Any]:
        sid = f"SM{next(self._ids):032x}"
        now = formatdate(usegmt=True).replace("GMT", "+0000")
        base = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}"
        return {
            "account_sid": self.account_sid, "api_version": "2010-04-01", "body": body,
            "date_created": now, "date_sent": None, "date_updated": now,
            "direction": "outbound-api", "error_code": None, "error_message": None,
            "from": sender, "messaging_service_sid": None, "num_media": "0",
            "num_segments": str(segments(body)), "price": None, "price_unit": "USD",
            "sid": sid, "status": "queued", "to": to, "uri": f"{base}.json",
            "subresource_uris": {"media": f"{base}/Media.json"},
        }

    def _fault(self, fault: Fault) -> Response:
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            ra = fault.retry_after
            headers["Retry-After"] = ra if isinstance(ra, str) else f"{ra:g}"
        if fault.body is not None:
            return Response(fault.body, fault.status, headers=headers, media_type="text/html")
        return error(fault.status, fault.code if fault.code is not None else 20000 + fault.status,
                     fault.message, headers=headers)

    async def _not_found(self, request: Request) -> Response:
        return error(404, 20404, f"The requested resource {request.url.path} was not found")
