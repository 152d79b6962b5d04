"""Helpers every HTTP provider adapter shares: reading ``Retry-After``, masking tokens."""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Self

import httpx


class PooledClient:
    """An ``httpx.AsyncClient`` a provider owns (closed by :meth:`aclose`) or borrows.

    Subclasses call :meth:`_use_client` in ``__init__``; the provider is then
    also an async context manager that closes what it owns on exit.
    """

    _client: httpx.AsyncClient
    _own_client: bool

    def _use_client(self, client: httpx.AsyncClient | None, timeout: httpx.Timeout) -> None:
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        """Close the connection pool if this provider created it (idempotent)."""
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


def retry_after(headers: httpx.Headers, now: float) -> float | None:
    """Seconds to wait from a 429's ``Retry-After`` (seconds or HTTP date), else from
    ``X-RateLimit-Reset`` (epoch seconds); ``None`` when neither is usable. Never negative."""
    value = headers.get("Retry-After", "").strip()
    if value:
        try:
            return max(float(value), 0.0)
        except ValueError:
            pass
        try:
            return max(parsedate_to_datetime(value).timestamp() - now, 0.0)
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    reset = headers.get("X-RateLimit-Reset", "").strip()
    if reset:
        try:
            return max(float(reset) - now, 0.0)
        except ValueError:
            pass
    return None


def mask_token(token: str) -> str:
    """The last 6 characters of a device token, for logs and error reasons."""
    return f"...{token[-6:]}"
