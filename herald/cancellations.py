"""Cancellations: the read side workers use before sending (the API writes them).

``POST /events/cancel {key}`` records a key; an event raised with the same
``cancel_key`` must then not notify anyone it has not notified yet.
"""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from herald.models import Cancellation

_S = TypeVar("_S", bound=AsyncSession)


async def is_cancelled(
    session_or_factory: AsyncSession | async_sessionmaker[_S], key: str
) -> bool:
    """Whether ``key`` has been cancelled. Read-only; never raises for an unknown key.

    Pass the caller's session (the read joins its transaction) or a session
    factory (a short session of its own is opened and closed).
    """
    if isinstance(session_or_factory, AsyncSession):
        return await session_or_factory.get(Cancellation, key) is not None
    async with session_or_factory() as session:
        return await session.get(Cancellation, key) is not None
