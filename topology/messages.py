"""How herald messages look on the wire (properties shared by every publisher)."""

from __future__ import annotations

from typing import Any

import aio_pika

from topology.envelope import CONTENT_TYPE


def build_message(
    body: bytes, message_id: str, event_type: str, headers: dict[str, Any] | None = None
) -> aio_pika.Message:
    """A persistent JSON message whose ``message_id`` is the event id."""
    return aio_pika.Message(
        body=body,
        message_id=message_id,
        type=event_type,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers=headers or {},
        app_id="herald",
    )
