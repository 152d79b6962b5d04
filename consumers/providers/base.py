"""The seam every provider implements."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from typing import Protocol

#: Awaited by a provider right before it hands the message over (after any
#: connection set-up), so a rate limit spaces what the provider receives, not
#: when sessions happen to start.
Gate = Callable[[], Awaitable[None]]


class EmailProvider(Protocol):
    """Sends one email. Raises ``TransientError``/``RateLimited``/``PermanentError``."""

    name: str

    async def send(self, message: EmailMessage, gate: Gate | None = None) -> None:
        """Hand ``message`` to the provider (after awaiting ``gate``); return once accepted."""
