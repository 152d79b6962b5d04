"""``/events``: any service raises an event, or cancels pending ones, with a bearer token.

For teams not in Python: one JSON POST instead of a client library. Both
routes need ``Authorization: Bearer <HERALD_SERVICE_TOKEN>`` and are off
(503) while the token is unset.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, update
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.models import Cancellation, OutboxEvent, as_utc
from producer import idempotency
from producer.deps import SessionsDep, SettingsDep
from producer.idempotency import Idempotency, IdempotencyDep
from producer.outbox import add_event
from producer.schemas import CancelIn, Cancelled, EventIn, EventQueued
from topology.envelope import Envelope

log = logging.getLogger("herald.api")

_bearer = HTTPBearer(auto_error=False, description="The value of HERALD_SERVICE_TOKEN.")


async def require_service_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Let the request through only with the service token (503 while none is configured)."""
    expected = settings.service_token
    if expected is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "set HERALD_SERVICE_TOKEN to enable /events")
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong service token",
                            headers={"WWW-Authenticate": "Bearer"})


_AUTH_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"description": "missing or wrong bearer token"},
    503: {"description": "HERALD_SERVICE_TOKEN is not set: /events is off"},
}

router = APIRouter(tags=["integrations"], dependencies=[Depends(require_service_token)],
                   responses={**_AUTH_RESPONSES, **idempotency.RESPONSES})


def _envelope(body: EventIn) -> Envelope:
    return Envelope(
        id=str(body.id or uuid.uuid4()), type=body.type, actor=body.actor,
        recipients=body.recipients, data=body.data, critical=body.critical,
        cancel_key=body.cancel_key, digest=body.digest,
    )


async def _write_event(sessions: async_sessionmaker[AsyncSession], envelope: Envelope,
                       given_id: bool, idem: Idempotency) -> int:
    """Stage the event and the key's answer in one transaction; the status it answers."""
    queued = EventQueued(event_id=envelope.id)
    async with sessions() as session, session.begin():
        known = given_id and await session.get(OutboxEvent, envelope.id) is not None
        code = status.HTTP_200_OK if known else status.HTTP_202_ACCEPTED
        if not known:
            add_event(session, envelope)
        await idem.stage(session, queued, code)
    return code


@router.post(
    "/events", status_code=status.HTTP_202_ACCEPTED,
    responses={200: {"model": EventQueued,
                     "description": "an event with this id was accepted before; nothing new "
                                    "is sent"}},
)
async def raise_event(body: EventIn, response: Response, sessions: SessionsDep,
                      idem: IdempotencyDep) -> EventQueued:
    """Queue an event for the relay (202); an ``id`` already in the outbox is 200, sent once."""
    envelope = _envelope(body)
    try:
        code = await _write_event(sessions, envelope, body.id is not None, idem)
    except IntegrityError:
        # A concurrent request took this event id (this second pass sees it and
        # answers 200) or this Idempotency-Key (it raises again and the
        # dependency replays the winner's answer).
        code = await _write_event(sessions, envelope, body.id is not None, idem)
    response.status_code = code
    log.info("event type=%s id=%s recipients=%d new=%s", envelope.type, envelope.id,
             len(envelope.recipients), code == status.HTTP_202_ACCEPTED)
    return EventQueued(event_id=envelope.id)


async def _cancel(sessions: async_sessionmaker[AsyncSession], key: str,
                  idem: Idempotency) -> Cancelled:
    """Insert the cancellation or count one more request for it; stage the key's answer."""
    async with sessions() as session, session.begin():
        bumped = await session.exec(
            update(Cancellation).where(col(Cancellation.key) == key)
            .values(request_count=col(Cancellation.request_count) + 1))
        if bumped.rowcount == 0:
            session.add(Cancellation(key=key))
            await session.flush()
        row = await session.get(Cancellation, key)
        assert row is not None
        cancelled = Cancelled(key=row.key, cancelled_at=as_utc(row.cancelled_at))
        await idem.stage(session, cancelled)
    return cancelled


@router.post("/events/cancel", status_code=status.HTTP_202_ACCEPTED)
async def cancel_events(body: CancelIn, sessions: SessionsDep,
                        idem: IdempotencyDep) -> Cancelled:
    """Cancel what was raised with ``cancel_key`` = ``key`` and is not sent yet.

    Idempotent: cancelling again answers 202 with the first ``cancelled_at``.
    """
    try:
        cancelled = await _cancel(sessions, body.key, idem)
    except IntegrityError:
        # Two first cancellations raced; the second pass counts this one.
        cancelled = await _cancel(sessions, body.key, idem)
    log.info("cancel key=%s", body.key)
    return cancelled
