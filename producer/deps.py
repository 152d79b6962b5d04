"""FastAPI dependencies every route module shares: the settings and the session factory."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.errors import DatabaseUnavailable
from herald.settings import Settings
from topology.live import LiveHub, user_changed_key


def get_sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    """The app's session factory (made by the lifespan).

    Raises:
        DatabaseUnavailable: the database was unreachable at start-up and the
            schema is not set up yet (the API answers 503).
    """
    factory: async_sessionmaker[AsyncSession] | None = getattr(
        request.app.state, "sessions", None)
    if factory is None:
        raise DatabaseUnavailable("the database schema is not set up yet")
    return factory


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


SessionsDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessions)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_live(request: Request) -> LiveHub:
    """The app's live hub (SSE fan-out and cache invalidations through RabbitMQ)."""
    hub: LiveHub = request.app.state.live
    return hub


LiveDep = Annotated[LiveHub, Depends(get_live)]


async def user_changed(live: LiveHub, user_id: str) -> None:
    """Tell every worker that ``user_id``'s contacts or preferences changed (after commit).

    Best effort: when the broker is unreachable, workers still drop the cached
    copy after ``HERALD_USER_CACHE_TTL``.
    """
    await live.publish(user_changed_key(user_id), {"user_id": user_id})
