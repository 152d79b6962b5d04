"""Live updates over RabbitMQ: new inbox items to every API process, cache invalidations to workers.

INTERFACE STUB (to be implemented): the signatures below are the contract.

Routing keys on ``Names.live`` (a topic exchange):
- ``notification.<user_id>``: body = the inbox item JSON (``NotificationItem``:
  id, event_id, event_type, title, body, read, created_at).
- ``user.<user_id>.changed``: body = ``{"user_id": ...}``; a user's contact details or
  preferences changed, cached copies must be dropped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from herald.settings import Settings


def notification_key(user_id: str) -> str:
    """Routing key of a new inbox item for ``user_id``."""
    return f"notification.{user_id}"


def user_changed_key(user_id: str) -> str:
    """Routing key saying ``user_id``'s contacts or preferences changed."""
    return f"user.{user_id}.changed"


USER_CHANGED_PATTERN = "user.*.changed"


class LiveHub:
    """One lazily opened robust connection per process for publishing and subscribing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def publish(self, routing_key: str, body: dict[str, Any]) -> bool:
        """Publish ``body`` as JSON; False (logged, never raised) when the broker is unreachable."""
        raise NotImplementedError

    def subscribe(self, *binding_keys: str
                  ) -> AbstractAsyncContextManager[AsyncIterator[tuple[str, dict[str, Any]]]]:
        """An exclusive auto-delete queue bound with ``binding_keys``; yields (key, body)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the connection if one was opened."""
