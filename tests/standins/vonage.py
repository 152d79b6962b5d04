"""A local server that speaks Vonage's SMS API (``POST /sms/json``), with fault knobs.

    async with VonageStandIn(KEY, SECRET) as vg:
        provider = VonageProvider(KEY, SECRET, "herald", base_url=vg.url, timeout=2)
        ...
        assert vg.messages[0]["text"] == "Hello"

It runs uvicorn inside the caller's event loop on a free 127.0.0.1 port.
Behaviour follows the public API reference: a form body carrying ``api_key``,
``api_secret``, ``from``, ``to`` (7-15 digits), ``text``, optional ``type``
(``text``/``unicode``) and ``client-ref`` (up to 40 characters); the answer is
HTTP 200 even when refused, ``{"message-count": "N", "messages": [...]}`` with one
entry per segment on success (``to``, ``message-id``, ``status: "0"``,
``remaining-balance``, ``message-price``, ``network``, ``client-ref``) and a
single ``{"status", "error-text"}`` entry on failure. Statuses follow Vonage's
table (1 Throttled, 2 Missing Parameters, 3 Invalid Parameters, 4 Invalid
Credentials, 6 Invalid Message, 7 Number Barred, 9 Partner Quota Violation, 15
Invalid Sender Address, 29 Non-Whitelisted Destination …). Segments are counted
here on their own (from ``type``, a plain ceiling), not with herald's arithmetic.
Every knob is a plain attribute and may be changed while the server runs.
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
from tests.standins.twilio import read_form

SEND_PATH = "/sms/json"
_TO = re.compile(r"^\d{7,15}$")
_GSM_EXTENSION = set("\f^{}\\[~]|€")
PRICE = 0.0333


def parts_for(text: str, kind: str) -> int:
    """Segments Vonage bills for ``text`` sent as ``kind`` (``text`` or ``unicode``)."""
    if kind == "unicode":
        units, alone, per_part = len(text.encode("utf-16-le")) // 2, 70, 67
    else:
        units, alone, per_part = sum(2 if c in _GSM_EXTENSION else 1 for c in text), 160, 153
    return 1 if units <= alone else math.ceil(units / per_part)


def refused(status: str, text: str) -> JSONResponse:
    """Vonage's answer for a refused message: HTTP 200, one entry with the status."""
    return JSONResponse({"message-count": "1",
                         "messages": [{"status": status, "error-text": text}]})


@dataclass
class Fault:
    """One scripted answer. ``http`` other than 200: that HTTP status (with ``body``
    or a short text, and ``Retry-After`` when set). Else Vonage ``status`` with
    ``error_text``: for the whole request, or when ``part`` is set, for that part
    (1-based) of an otherwise accepted multi-part answer."""

    http: int = 200
    status: str = "5"
    error_text: str = "Internal Error"
    part: int | None = None
    retry_after: float | str | None = None
    body: str | None = None


@dataclass
class Call:
    """One request the stand-in received (accepted or not)."""

    form: dict[str, str]
    answer: Any = None   #: the JSON answered (None for non-JSON answers)
    at: float = field(default_factory=time.monotonic)  #: when it arrived (monotonic)


class VonageStandIn(HttpStandIn):
    """Vonage's ``/sms/json`` on ``127.0.0.1:<free port>`` with fault knobs.

    Knobs (checked in this order for each request):
        hang_seconds: wait this long before answering (released early on exit).
        faults: scripted answers, one popped per request (:class:`Fault`).
        api_key / api_secret: the credentials the body must carry (2 if missing,
            4 "Bad Credentials" if wrong).
        throttle: the next N requests get status 1 "Throttled".
        then validation like the real API (2 for a missing from/to/text, 3 for a
            bad ``to``, ``type`` or ``client-ref``),
        whitelist: when not None, the only destinations a trial account reaches (29),
        barred: destinations on the barred list (7),
        unroutable_prefixes: destination prefixes no network serves (6),
        senders: when not None, the only ``from`` values allowed (15),
        balance: account credit; a message costing more gets 9,
        else one ``status: "0"`` entry per segment, recorded in ``messages``.
    """

    name = "Vonage"

    def __init__(self, api_key: str, api_secret: str, *, throttle: int = 0,
                 hang_seconds: float = 0.0, balance: float = 10.0) -> None:
        super().__init__()
        self.api_key = api_key
        self.api_secret = api_secret
        self.faults: list[Fault] = []
        self.throttle = throttle
        self.hang_seconds = hang_seconds
        self.balance = balance
        self.whitelist: set[str] | None = None
        self.barred: set[str] = set()
        self.unroutable_prefixes: set[str] = set()
        self.senders: set[str] | None = None
        self.calls: list[Call] = []
        self.messages: list[dict[str, str]] = []
        self._ids = itertools.count(0x0C000000217B7F02)
        self.app = self._starlette(Route(SEND_PATH, self._send, methods=["POST"]))

    @property
    def requests(self) -> int:
        """How many requests arrived at the send endpoint (answered or not)."""
        return len(self.calls)

    async def _send(self, request: Request) -> Response:
        call = Call(await read_form(request))
        self.calls.append(call)
        response = await self._answer(call.form)
        if isinstance(response, JSONResponse):
            call.answer = json.loads(bytes(response.body))
        return response

    async def _answer(self, form: dict[str, str]) -> Response:
        if self.hang_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.hang_seconds)
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None and fault.http != 200:
            headers: dict[str, str] = {}
            if fault.retry_after is not None:
                ra = fault.retry_after
                headers["Retry-After"] = ra if isinstance(ra, str) else f"{ra:g}"
            return Response(fault.body if fault.body is not None else f"HTTP {fault.http}",
                            fault.http, headers=headers, media_type="text/plain")
        if fault is not None and fault.part is None:
            return refused(fault.status, fault.error_text)
        if "api_key" not in form:
            return refused("2", "Missing api_key")
        if "api_secret" not in form:
            return refused("2", "Missing api_secret")
        if form["api_key"] != self.api_key or form["api_secret"] != self.api_secret:
            return refused("4", "Bad Credentials")
        if self.throttle > 0:
            self.throttle -= 1
            return refused("1", "Throttled")
        if problem := self._validate(form):
            return problem
        to, kind, text = form["to"], form.get("type", "text"), form["text"]
        count = parts_for(text, kind)
        if self.balance < count * PRICE:
            return refused("9", "Quota Exceeded - rejected")
        entries: list[dict[str, str]] = []
        for n in range(1, count + 1):
            if fault is not None and fault.part == n:
                entries.append({"status": fault.status, "error-text": fault.error_text})
                continue
            self.balance -= PRICE
            entry = {"to": to, "message-id": f"{next(self._ids):016X}", "status": "0",
                     "remaining-balance": f"{self.balance:.8f}",
                     "message-price": f"{PRICE:.8f}", "network": "23410"}
            if "client-ref" in form:
                entry["client-ref"] = form["client-ref"]
            entries.append(entry)
        if fault is None:
            self.messages.append(form)
        return JSONResponse({"message-count": str(count), "messages": entries})

    def _validate(self, form: dict[str, str]) -> Response | None:
        for name in ("from", "to"):
            if not form.get(name):
                return refused("2", f"Missing {name} param")
        kind = form.get("type", "text")
        if kind not in ("text", "unicode", "binary", "wappush", "vcal", "vcard"):
            return refused("3", "Invalid type param")
        if kind in ("text", "unicode") and not form.get("text"):
            return refused("2", "Missing text param")
        to = form["to"]
        if not _TO.match(to):
            return refused("3", f"Invalid to param: {to}")
        if len(form.get("client-ref", "")) > 40:
            return refused("3", "Invalid client-ref param")
        if self.whitelist is not None and to not in self.whitelist:
            return refused("29", "Non White-listed Destination - rejected")
        if to in self.barred:
            return refused("7", "Number barred")
        if any(to.startswith(prefix) for prefix in self.unroutable_prefixes):
            return refused("6", f"Unroutable message - rejected ({to})")
        if self.senders is not None and form["from"] not in self.senders:
            return refused("15", "Illegal Sender Address - rejected")
        return None

    async def _not_found(self, request: Request) -> Response:
        return Response("Not Found", 404, media_type="text/plain")
