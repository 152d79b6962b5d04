"""``Idempotency-Key`` on POST routes: a retried request gets the first answer, not a new effect.

Modelled on Stripe's idempotent requests and the IETF draft "The
Idempotency-Key HTTP Header Field" (draft-ietf-httpapi-idempotency-key-header):

- same key, same body: the stored answer, status and body byte for byte, with
  ``Idempotent-Replayed: true``; nothing runs again;
- same key, another body: 422;
- what is stored is what the route answered, success or 4xx (a 409, a 401);
  never a 5xx (retrying may work) and never a request that failed validation
  or authentication (the route never ran: fix it and retry with the same key);
- the answer is written in the same transaction as the route's rows, so two
  concurrent requests with one key cannot both take effect: the loser replays
  the winner's answer (or gets 409 while none is stored);
- keys are scoped per route and caller (the ``Authorization`` header) and
  expire after ``HERALD_IDEMPOTENCY_TTL``; an expired key is treated as unseen
  and its row replaced;
- an answer that carries a secret (:data:`SEALED_FIELDS`: the bearer token of
  ``POST /login``) is stored with that value sealed by a key derived (scrypt)
  from the request's own password, and unsealed on replay. So a retry gets
  the same token byte for byte (never a second valid one), while the
  database holds neither the token nor anything that yields it without the
  password.

Routes take :data:`IdempotencyDep` and call :meth:`Idempotency.stage` in the
transaction that writes their effect; without the header that is a no-op.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.models import IdempotencyKey, as_utc, utcnow
from producer.deps import get_sessions, get_settings

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
#: Body fields that only ever enter the fingerprint through a slow salted hash:
#: the stored fingerprint of a login must not be a fast hash of the password.
SECRET_FIELDS = frozenset({"password"})
#: Answer fields stored sealed with a key derived from the request's :data:`SECRET_FIELDS`.
SEALED_FIELDS = frozenset({"access_token"})
_SEALED = re.compile(r'"sealed:([0-9a-f]+)"')

#: ``responses=`` entries every idempotent route documents.
RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"description": "a request with this Idempotency-Key is still in progress"},
    422: {"description": "invalid body or header, or the Idempotency-Key was already used "
                         "with another body"},
}

_KEY_DOC = (
    "Any unique string (a UUID v4 is best), 1-255 printable ASCII characters; "
    "a quoted string as in the IETF draft is accepted. Retrying with the same key and "
    "the same body replays the first answer (header `Idempotent-Replayed: true`) "
    "without a second effect; the same key with another body is 422. Keys are per "
    "route and expire after HERALD_IDEMPOTENCY_TTL (24h by default)."
)


class IdempotentReplay(Exception):  # control flow, not an error
    """Raised to answer a request with the stored answer of an earlier one with its key."""

    def __init__(self, row: IdempotencyKey) -> None:
        super().__init__(f"replay of {row.route} key")
        self.row = row


@dataclass
class Idempotency:
    """One request's key (``None`` without the header) and how to store its answer."""

    key: str | None
    route: str
    fingerprint: str
    ttl: float
    default_status: int = status.HTTP_200_OK
    #: Key of :data:`SEALED_FIELDS`, from the request's secret fields (None without any).
    seal: bytes | None = None

    async def stage(self, session: AsyncSession, body: BaseModel,
                    status_code: int | None = None) -> None:
        """Add the answer (``body``, ``status_code`` or the route's) to the caller's transaction.

        It commits or rolls back with the route's own rows. A concurrent
        request that stored the same key first makes the commit raise
        ``IntegrityError``; let it propagate and the dependency replays the
        winner's answer. No-op without a key.
        """
        if self.key is None:
            return
        raw = body.model_dump_json()
        for name in SEALED_FIELDS:
            value = getattr(body, name, None)
            if isinstance(value, str):
                if self.seal is None:
                    raise RuntimeError(f"no secret in the request to seal {name!r} with; "
                                       "refusing to store it in clear")
                sealed = _xor(value.encode(), self.seal).hex()
                raw = raw.replace(json.dumps(value), f'"sealed:{sealed}"')
        await self._replace_expired(session)
        session.add(self._row(status_code or self.default_status, raw.encode(), {}))

    async def lookup(self, sessions: async_sessionmaker[AsyncSession]) -> IdempotencyKey | None:
        """The stored answer for this key, unless there is none or it expired."""
        async with sessions() as session:
            row = (await session.exec(select(IdempotencyKey).where(
                col(IdempotencyKey.route) == self.route,
                col(IdempotencyKey.key) == self.key))).first()
        if row is None or as_utc(row.created_at) <= self._cutoff():
            return None
        return row

    def check(self, row: IdempotencyKey) -> None:
        """Raise :class:`IdempotentReplay` for the same body, HTTP 422 for another."""
        if row.request_hash != self.fingerprint:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"this {HEADER} was already used with another request body on "
                f"{self.route.split(' @')[0]}; send a new key for a new request")
        seal = self.seal
        if seal is not None:  # same fingerprint, so the same password: the same seal
            row.response_body = _SEALED.sub(
                lambda m: json.dumps(_xor(bytes.fromhex(m.group(1)), seal).decode()),
                row.response_body)
        raise IdempotentReplay(row)

    async def store_failure(self, sessions: async_sessionmaker[AsyncSession],
                            exc: HTTPException) -> None:
        """Store a 4xx answer on its own (the route wrote nothing); replay a concurrent winner."""
        body = JSONResponse({"detail": exc.detail}).body
        try:
            async with sessions() as session, session.begin():
                await self._replace_expired(session)
                session.add(self._row(exc.status_code, bytes(body), dict(exc.headers or {})))
        except IntegrityError:
            await self.resolve_conflict(sessions)

    async def resolve_conflict(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """After the key's insert collided: replay the stored answer, 422, or 409 (in progress).

        Always raises.
        """
        row = await self.lookup(sessions)
        if row is None:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"a request with this {HEADER} is in progress; retry later")
        self.check(row)

    def _cutoff(self) -> datetime:
        return utcnow() - timedelta(seconds=self.ttl)

    async def _replace_expired(self, session: AsyncSession) -> None:
        await session.exec(delete(IdempotencyKey).where(
            col(IdempotencyKey.route) == self.route, col(IdempotencyKey.key) == self.key,
            col(IdempotencyKey.created_at) <= self._cutoff()))

    def _row(self, status_code: int, body: bytes, headers: dict[str, str]) -> IdempotencyKey:
        assert self.key is not None
        return IdempotencyKey(
            route=self.route, key=self.key, request_hash=self.fingerprint,
            status_code=status_code, response_body=body.decode(),
            response_headers=json.dumps(headers))


def _scrypt(secret: str, salt: bytes) -> str:
    return hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32).hex()


def _xor(data: bytes, seal: bytes) -> bytes:
    # SHAKE-256 of the seal as a keystream. Written by hand rather than with
    # `cryptography`'s AEAD because the key is single-use (unique to route, key
    # and password; it seals one answer) and the value is one short token: the
    # stdlib suffices without a new native dependency. No integrity is claimed:
    # whoever can write the table can already replace the stored answer.
    pad = hashlib.shake_256(seal).digest(len(data))
    return bytes(a ^ b for a, b in zip(data, pad, strict=True))


async def seal_key(raw: bytes, route: str, key: str) -> bytes | None:
    """The key that seals this request's answer: scrypt of its :data:`SECRET_FIELDS`.

    ``None`` when the body has none. Salted apart from :func:`fingerprint`,
    so the stored fingerprint says nothing about it.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    found = [doc[name] for name in sorted(SECRET_FIELDS & doc.keys())
             if isinstance(doc[name], str)]
    if not found:
        return None
    salt = f"{route}\n{key}\nseal".encode()
    return bytes.fromhex(await asyncio.to_thread(_scrypt, "\n".join(found), salt))


async def fingerprint(raw: bytes, route: str, key: str) -> str:
    """SHA-256 of the body as canonical JSON (sorted keys, no spaces); of the raw bytes otherwise.

    Whitespace and key order do not make two bodies different. Values of
    :data:`SECRET_FIELDS` enter as a scrypt digest salted with route and key.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return hashlib.sha256(raw).hexdigest()
    if isinstance(doc, dict):
        salt = f"{route}\n{key}".encode()
        for name in SECRET_FIELDS & doc.keys():
            if isinstance(doc[name], str):
                doc[name] = await asyncio.to_thread(_scrypt, doc[name], salt)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _unquote(key: str) -> str:
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"the {HEADER} header is empty")
    return key


async def _idempotency(
    request: Request,
    key: Annotated[str | None, Header(
        alias=HEADER, min_length=1, max_length=MAX_KEY_LENGTH, pattern=r"^[!-~]([ -~]*[!-~])?$",
        description=_KEY_DOC, examples=["8e03978e-40d5-43e8-bc93-6894a57f9324"])] = None,
) -> AsyncIterator[Idempotency]:
    """The request's key: replays a stored answer up front, stores 4xx answers on the way out."""
    route_obj = request.scope.get("route")
    route = f"{request.method} {getattr(route_obj, 'path', request.url.path)}"
    credentials = request.headers.get("authorization")
    if credentials:
        # Keys belong to the caller: another user's token with the same key and body
        # must not be handed the first caller's stored answer.
        route += f" @{hashlib.sha256(credentials.encode()).hexdigest()[:16]}"
    default_status = getattr(route_obj, "status_code", None) or status.HTTP_200_OK
    ttl = get_settings(request).idempotency_ttl
    if key is None:
        yield Idempotency(None, route, "", ttl, default_status)
        return
    key = _unquote(key)
    sessions = get_sessions(request)
    raw = await request.body()
    idem = Idempotency(key, route, await fingerprint(raw, route, key), ttl, default_status,
                       await seal_key(raw, route, key))
    stored = await idem.lookup(sessions)
    if stored is not None:
        idem.check(stored)
    try:
        yield idem
    except HTTPException as exc:
        if status.HTTP_400_BAD_REQUEST <= exc.status_code < status.HTTP_500_INTERNAL_SERVER_ERROR:
            await idem.store_failure(sessions, exc)
        raise
    except IntegrityError:
        await idem.resolve_conflict(sessions)
        raise


#: The request's :class:`Idempotency`; documents the ``Idempotency-Key`` header on the route.
IdempotencyDep = Annotated[Idempotency, Depends(_idempotency, scope="function")]


async def _replay(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, IdempotentReplay)
    row = exc.row
    headers = {**json.loads(row.response_headers), REPLAYED_HEADER: "true"}
    return Response(row.response_body.encode(), status_code=row.status_code,
                    media_type="application/json", headers=headers)


def install(app: FastAPI) -> None:
    """Register the handler that turns :class:`IdempotentReplay` into the stored response."""
    app.add_exception_handler(IdempotentReplay, _replay)
