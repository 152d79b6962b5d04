"""Development stand-ins for push and SMS services: each message becomes a file and a log line.

``herald run`` with no push or SMS provider configured uses these, so a new
user sees every notification herald would send (``var/push/``,
``var/sms/``) without accounts at Google, Apple or Twilio. Never used when
a real provider is configured for that platform or channel.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anyio

from consumers.providers.base import Gate, PushMessage, SmsMessage
from herald.logs import mask

log = logging.getLogger("herald.devsink")


def _name(prefix: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
    return f"{stamp}-{prefix}-{uuid.uuid4().hex[:8]}"


class DevPushSink:
    """Writes each push to ``<directory>/<time>-<platform>-<id>.json``."""

    def __init__(self, platform: str, directory: Path) -> None:
        self.name = f"dev-{platform}"
        self.platform = platform
        self.directory = directory

    async def send(self, message: PushMessage, gate: Gate | None = None) -> None:
        """Write the push (token shortened to its last 6 characters); never fails."""
        if gate is not None:
            await gate()
        body = {"platform": self.platform, "token": f"...{message.token[-6:]}",
                "title": message.title, "body": message.body, "data": dict(message.data),
                "collapse_key": message.collapse_key, "urgent": message.urgent}
        path = anyio.Path(self.directory) / f"{_name(self.platform)}.json"
        await path.parent.mkdir(parents=True, exist_ok=True)
        await path.write_text(json.dumps(body, indent=2, ensure_ascii=False))
        log.info("push to a %s device saved to %s: %s", self.platform, path, message.title)


class DevSmsSink:
    """Writes each text message to ``<directory>/<time>-sms-<id>.txt``."""

    name = "dev-sms"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, message: SmsMessage, gate: Gate | None = None) -> None:
        """Write the message with its masked number and segment count; never fails."""
        if gate is not None:
            await gate()
        path = anyio.Path(self.directory) / f"{_name('sms')}.txt"
        await path.parent.mkdir(parents=True, exist_ok=True)
        await path.write_text(f"To: {mask(message.to)}\nSegments: {message.segments}\n"
                              f"\n{message.body}\n")
        log.info("SMS to %s (%d segment(s)) saved to %s", mask(message.to),
                 message.segments, path)
