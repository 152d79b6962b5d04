"""User bearer tokens: issued by ``POST /login``, checked by :data:`CurrentUser`.

A token is 32 random bytes (``secrets.token_urlsafe``); only its SHA-256 is
stored, so a copy of the database does not hold usable tokens. A fast hash is
enough here (unlike passwords): the input has 256 bits of entropy.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.models import ApiToken, User, as_utc, utcnow
from producer.deps import SessionsDep

#: Documents the scheme in OpenAPI; ``auto_error=False`` so every failure is our own 401.
_bearer = HTTPBearer(auto_error=False, description="The `access_token` from `POST /login`.")

#: ``responses=`` entry of every route that needs a user.
RESPONSES: dict[int | str, dict[str, str]] = {
    401: {"description": "missing, unknown or expired bearer token"}}


def hash_token(token: str) -> str:
    """The SHA-256 hex digest under which ``token`` is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(session: AsyncSession, user_id: str, ttl: float) -> str:
    """Add a new token of ``user_id`` valid ``ttl`` seconds to ``session``; return it in clear.

    The row commits or rolls back with the caller's transaction.
    """
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(ApiToken(token_hash=hash_token(token), user_id=user_id, created_at=now,
                         expires_at=now + timedelta(seconds=ttl)))
    return token


def _unauthorized() -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, "missing, invalid or expired token",
                         headers={"WWW-Authenticate": "Bearer"})


async def current_user(
    sessions: SessionsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    """The user whose unexpired token is in ``Authorization: Bearer``.

    Raises:
        HTTPException: 401 with ``WWW-Authenticate: Bearer`` when the header is
            missing or not Bearer, or the token is unknown or expired (one
            answer for all, so it tells nothing about which tokens exist).
    """
    if credentials is None or not credentials.credentials:
        raise _unauthorized()
    async with sessions() as session:
        found = (await session.exec(
            select(User, ApiToken.expires_at)
            .join(ApiToken, col(ApiToken.user_id) == col(User.id))
            .where(col(ApiToken.token_hash) == hash_token(credentials.credentials)))).first()
    if found is None or as_utc(found[1]) <= utcnow():
        raise _unauthorized()
    return found[0]


#: The authenticated user of the request (401 otherwise).
CurrentUser = Annotated[User, Depends(current_user)]
