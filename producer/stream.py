"""The live inbox: ``GET /me/notifications/stream`` (Server-Sent Events) and the ``/inbox`` page.

Each stream reads its own exclusive queue on the live exchange (see
``topology.live``), so an item announced by any worker reaches the API
process that holds the connection, however many processes there are.

The protocol: optional replay, then ``ready``, then live items.
- ``event: notification``, ``id: <notification id>``, ``data: <NotificationItem JSON>``.
- ``Last-Event-ID`` (or ``?after=``): first every delivered notification of the
  user with a greater id, from the database (the newest :data:`REPLAY_LIMIT`),
  so nothing is lost across a reconnect; live items are de-duplicated by id.
- ``event: ready`` once the subscription is live and the replay sent; its
  ``retry`` field asks clients to wait 3 s before reconnecting.
- a ``: ping`` comment every 15 s keeps proxies from closing an idle stream.
- a broker reconnect inside the API replays from the database what the gap may
  have lost, like a client reconnect does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, HTTPException, Query, status
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from herald.models import Notification
from producer import auth
from producer.auth import CurrentUser
from producer.deps import LiveDep, SessionsDep
from producer.inbox import _item
from producer.schemas import MAX_DB_INT, NotificationItem
from topology.live import CLOSE_TIMEOUT, GAP, LiveUnavailable, Subscription, notification_key

log = logging.getLogger("herald.api")

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: At most this many missed notifications are replayed (the newest); clients
#: that were away longer reload the list.
REPLAY_LIMIT = 200
PING_SECONDS = 15
#: A client that does not take an event within this many seconds is dropped.
SEND_TIMEOUT = 30.0
RETRY_MS = 3000
#: Seconds a stream gets to end by itself when the server stops, before it is cut.
SHUTDOWN_GRACE = 2.0
#: Ids already sent on one stream, remembered to drop duplicates (bounded).
SEEN_LIMIT = 1000

_EXAMPLE = (
    "event: ready\r\ndata: {\"after\":41}\r\nretry: 3000\r\n\r\n"
    ": ping - 2025-05-01 12:29:45.000000+00:00\r\n\r\n"
    "id: 42\r\nevent: notification\r\n"
    "data: {\"id\":42,\"event_id\":\"5b0f7a1e-0c59-4b8a-9d0e-2f4f1f0a9c11\","
    "\"event_type\":\"user.login\",\"title\":\"New sign-in\","
    "\"body\":\"You signed in from Firefox on Linux.\",\"read\":false,"
    "\"created_at\":\"2025-05-01T12:30:00Z\"}\r\n\r\n"
)

_PAGE_HEADERS = {
    # Defence in depth: the page inserts text with textContent only; no inline
    # script or handler could run even if some markup slipped in.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; form-action 'self'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_ASSETS = {"inbox.js": "text/javascript; charset=utf-8", "inbox.css": "text/css; charset=utf-8"}

router = APIRouter(tags=["inbox"])


class _Seen:
    """The ids sent on one stream, forgetting the oldest past :data:`SEEN_LIMIT`."""

    def __init__(self) -> None:
        self._ids: dict[int, None] = {}

    def add(self, notification_id: int) -> bool:
        """Remember ``notification_id``; False when it was already sent."""
        if notification_id in self._ids:
            return False
        self._ids[notification_id] = None
        if len(self._ids) > SEEN_LIMIT:
            del self._ids[next(iter(self._ids))]
        return True


async def _latest_id(sessions: async_sessionmaker[AsyncSession], user_id: str) -> int:
    async with sessions() as session:
        latest = (await session.exec(select(func.max(Notification.id)).where(
            col(Notification.user_id) == user_id,
            col(Notification.delivered).is_(True)))).one()
    return int(latest or 0)


async def _missed(sessions: async_sessionmaker[AsyncSession], user_id: str,
                  after: int) -> list[NotificationItem]:
    """The user's delivered notifications with an id above ``after``, oldest first."""
    async with sessions() as session:
        rows = (await session.exec(
            select(Notification).where(col(Notification.user_id) == user_id,
                                       col(Notification.delivered).is_(True),
                                       col(Notification.id) > after)
            .order_by(col(Notification.id).desc()).limit(REPLAY_LIMIT))).all()
    return [_item(row) for row in reversed(rows)]


def _event(item: NotificationItem) -> ServerSentEvent:
    return ServerSentEvent(item.model_dump_json(), event="notification", id=str(item.id))


async def _events(subscription: Subscription, sessions: async_sessionmaker[AsyncSession],
                  user_id: str, after: int | None) -> AsyncIterator[ServerSentEvent]:
    """Replay, ``ready``, then live items until the client leaves or the server stops."""
    seen = _Seen()
    try:
        if after is None:
            cursor, replay = await _latest_id(sessions, user_id), []
        else:
            cursor, replay = after, await _missed(sessions, user_id, after)
        for item in replay:
            seen.add(item.id)
            cursor = max(cursor, item.id)
            yield _event(item)
        yield ServerSentEvent(json.dumps({"after": cursor}, separators=(",", ":")), event="ready",
                              retry=RETRY_MS)
        async for key, body in subscription:
            if key == GAP:
                # The queue was re-created after a broker reconnect: what was
                # announced meanwhile is lost on the wire but not in the database.
                replay = await _missed(sessions, user_id, cursor)
            else:
                try:
                    replay = [NotificationItem.model_validate(body)]
                except ValidationError as exc:
                    log.warning("live item for %s is malformed; skipped: %s", user_id,
                                exc.errors()[:1])
                    continue
            for item in replay:
                if seen.add(item.id):
                    cursor = max(cursor, item.id)
                    yield _event(item)
    finally:
        # Cancelled on disconnect; the shield lets the queue be deleted now
        # rather than when the connection closes.
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await subscription.aclose()


_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    **auth.RESPONSES,
    200: {
        "description": "A `text/event-stream` that stays open: `notification` events "
                       "(`id` = the notification id, `data` = a NotificationItem as JSON), "
                       "one `ready` event after the replay, and a `: ping` comment every "
                       f"{PING_SECONDS} s.",
        "content": {"text/event-stream": {"schema": {"type": "string"},
                                          "example": _EXAMPLE}},
    },
    503: {"description": "the message broker cannot be reached: no live updates right now; "
                         "retry after `Retry-After` seconds"},
}


@router.get("/me/notifications/stream", response_class=EventSourceResponse,
            summary="Stream new notifications (Server-Sent Events)",
            responses=_STREAM_RESPONSES)
async def stream(
    user: CurrentUser,
    sessions: SessionsDep,
    live: LiveDep,
    after: Annotated[int | None, Query(
        ge=0, le=MAX_DB_INT, description="Replay delivered notifications with a greater id first "
                          "(for clients that cannot set `Last-Event-ID`).")] = None,
    last_event_id: Annotated[int | None, Header(
        ge=0, le=MAX_DB_INT, description="The id of the last `notification` event received; takes "
                          "precedence over `after`.")] = None,
) -> EventSourceResponse:
    """New inbox items of the signed-in user, live, as Server-Sent Events.

    Works behind any number of API processes: items fan out through RabbitMQ.
    Send `Authorization: Bearer` (browsers: read it with `fetch()`, since
    `EventSource` cannot send headers). On reconnect send `Last-Event-ID`:
    missed notifications are replayed from the database, then live ones
    follow, each id at most once per stream.
    """
    try:
        subscription = await live.listen(notification_key(user.id), gaps=True)
    except LiveUnavailable as exc:
        log.warning("live stream for %s refused: %s", user.id, exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "live updates are unavailable: the message broker cannot be "
                            "reached; retry later", headers={"Retry-After": "5"}) from None
    since = last_event_id if last_event_id is not None else after
    shutdown = anyio.Event()

    async def end_on_shutdown() -> None:
        # Ending the subscription ends the body, so the response completes
        # properly instead of being cut when the server stops.
        await shutdown.wait()
        await subscription.aclose()

    return EventSourceResponse(
        _events(subscription, sessions, user.id, since), ping=PING_SECONDS,
        send_timeout=SEND_TIMEOUT, shutdown_event=shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE, data_sender_callable=end_on_shutdown,
        # Also closes the subscription when the body never started streaming.
        background=BackgroundTask(subscription.aclose))


@router.get("/inbox", include_in_schema=False)
async def inbox_page() -> FileResponse:
    """The inbox web page (sign-in form, list and live updates); no auth on the page itself."""
    return FileResponse(STATIC_DIR / "inbox.html", media_type="text/html; charset=utf-8",
                        headers=_PAGE_HEADERS)


@router.get("/inbox/{asset}", include_in_schema=False)
async def inbox_asset(asset: str) -> FileResponse:
    """The page's script and style sheet (a fixed list: nothing else under ``static/``)."""
    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Not Found")
    return FileResponse(STATIC_DIR / asset, media_type=media_type,
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
