"""FastAPI dependencies every route module shares: the settings and the session factory."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.settings import Settings


def get_sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    """The app's session factory (made by the lifespan)."""
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessions
    return factory


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


SessionsDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessions)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
