"""Helpers every HTTP provider adapter shares: reading ``Retry-After``, masking tokens."""

from __future__ import annotations

from email.utils import parsedate_to_datetime

import httpx


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
