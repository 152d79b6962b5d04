"""The in-app inbox of the signed-in user: list, mark read, and "why was I (not) notified".

Every query is filtered by the current user's id, so another user's
notification id answers 404 exactly like an id that does not exist.
Only ``delivered`` rows are in the inbox; ``/why`` also explains the others.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import AfterValidator
from sqlalchemy import CursorResult
from sqlmodel import col, func, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.models import Notification, utcnow
from herald.validation import one_line
from herald.why import explain
from producer import auth
from producer.auth import CurrentUser
from producer.deps import SessionsDep
from producer.schemas import (
    MAX_DB_INT,
    ChannelDecisionOut,
    EventWhy,
    MarkedRead,
    NotificationItem,
    NotificationPage,
    NotificationWhy,
)

router = APIRouter(prefix="/me/notifications", tags=["inbox"], responses=auth.RESPONSES)

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such notification"}}
#: ``notifications.id`` is an INTEGER: past :data:`MAX_DB_INT` is 422, not a database error.
NotificationId = Annotated[int, Path(ge=1, le=MAX_DB_INT,
                                     description="The notification's `id`.")]


def _item(row: Notification) -> NotificationItem:
    assert row.id is not None
    return NotificationItem(id=row.id, event_id=row.event_id, event_type=row.event_type,
                            title=row.title, body=row.body, read=row.read_at is not None,
                            created_at=row.created_at)


async def _own(session: AsyncSession, user_id: str, notification_id: int,
               delivered_only: bool) -> Notification:
    query = select(Notification).where(col(Notification.id) == notification_id,
                                       col(Notification.user_id) == user_id)
    if delivered_only:
        query = query.where(col(Notification.delivered).is_(True))
    row = (await session.exec(query)).first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such notification")
    return row


@router.get("")
async def list_notifications(
    user: CurrentUser,
    sessions: SessionsDep,
    unread: Annotated[bool | None, Query(
        description="true: only unread; false: only read; absent: both.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    before: Annotated[int | None, Query(
        ge=1, le=MAX_DB_INT,
        description="Only ids below this (the previous page's `next_before`).")] = None,
) -> NotificationPage:
    """The user's delivered notifications, newest first, a page at a time (keyset by id)."""
    mine = (col(Notification.user_id) == user.id, col(Notification.delivered).is_(True))
    query = select(Notification).where(*mine)
    if unread is not None:
        read_at = col(Notification.read_at)
        query = query.where(read_at.is_(None) if unread else read_at.is_not(None))
    if before is not None:
        query = query.where(col(Notification.id) < before)
    async with sessions() as session:
        found = list((await session.exec(
            query.order_by(col(Notification.id).desc()).limit(limit + 1))).all())
        unread_count = (await session.exec(select(func.count()).select_from(Notification).where(
            *mine, col(Notification.read_at).is_(None)))).one()
    page = found[:limit]
    more = len(found) > limit
    return NotificationPage(items=[_item(r) for r in page], unread_count=unread_count,
                            next_before=page[-1].id if more else None)


@router.post("/read-all")
async def read_all(user: CurrentUser, sessions: SessionsDep) -> MarkedRead:
    """Mark every unread delivered notification read; ``marked`` counts only those it changed."""
    async with sessions() as session, session.begin():
        result = await session.exec(update(Notification).where(
            col(Notification.user_id) == user.id, col(Notification.delivered).is_(True),
            col(Notification.read_at).is_(None)).values(read_at=utcnow()))
        assert isinstance(result, CursorResult)
        return MarkedRead(marked=result.rowcount)


@router.post("/{notification_id}/read", responses=_NOT_FOUND)
async def read_one(notification_id: NotificationId, user: CurrentUser,
                   sessions: SessionsDep) -> NotificationItem:
    """Mark one notification read and return it; idempotent (the first read time is kept)."""
    async with sessions() as session, session.begin():
        row = await _own(session, user.id, notification_id, delivered_only=True)
        if row.read_at is None:
            row.read_at = utcnow()
            session.add(row)
        return _item(row)


@router.get("/{notification_id}/why", responses=_NOT_FOUND)
async def why(notification_id: NotificationId, user: CurrentUser,
              sessions: SessionsDep) -> NotificationWhy:
    """Why a notification was shown, or why not (for rows the decision engine held back too)."""
    async with sessions() as session:
        row = await _own(session, user.id, notification_id, delivered_only=False)
    try:
        trail = json.loads(row.trail)
    except ValueError:
        trail = []
    if not isinstance(trail, list):
        trail = []
    channels = await explain(sessions, row.event_id, user.id)
    return NotificationWhy(delivered=row.delivered, reason=row.reason,
                           trail=[step for step in trail if isinstance(step, dict)],
                           channels=[ChannelDecisionOut(**d.as_dict()) for d in channels])


events_router = APIRouter(prefix="/me/events", tags=["inbox"], responses=auth.RESPONSES)


@events_router.get("/{event_id}/why", responses={
    404: {"description": "nothing recorded for this event and user (yet)"}})
async def event_why(
    event_id: Annotated[str, Path(max_length=36, description="`event_id` from POST /post etc."),
                        AfterValidator(one_line)],
    user: CurrentUser, sessions: SessionsDep,
) -> EventWhy:
    """Every decision about this event for you: per channel, and for push per device.

    The notification id is not needed: a post the decision engine held back
    has no inbox entry, but its decision is here with the reason and trail.
    """
    decisions = await explain(sessions, event_id, user.id)
    if not decisions:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            "nothing recorded for this event (unknown, or not handled yet)")
    return EventWhy(event_id=event_id,
                    decisions=[ChannelDecisionOut(**d.as_dict()) for d in decisions])
