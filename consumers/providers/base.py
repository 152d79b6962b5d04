"""The seam every provider implements."""

from __future__ import annotations

from email.message import EmailMessage
from typing import Protocol


class EmailProvider(Protocol):
    """Sends one email. Raises ``TransientError``/``RateLimited``/``PermanentError``."""

    name: str

    async def send(self, message: EmailMessage) -> None:
        """Hand ``message`` to the provider; return once it accepted it."""
