"""A local SMTP server (aiosmtpd) that keeps what it receives.

``herald run`` starts it when no ``HERALD_SMTP_URL`` is set, so the main job
works with zero configuration: each email is saved as an ``.eml`` file. Tests
and benchmarks use the same server with faults switched on (refuse the first
N messages, refuse all, cap the rate, hang, greylist each recipient), speaking
real SMTP throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("herald.mailsink")


@dataclass
class Faults:
    """What the sink does wrong, on purpose (all off by default)."""

    refuse_first: int = 0  #: refuse this many DATA commands …
    refuse_code: str = "451 4.3.0 Temporary failure, try again"  #: … with this reply
    refuse_always: str | None = None  #: refuse every message with this reply
    rate_cap: int | None = None  #: accept at most this many per rolling second …
    rate_reply: str = "421 4.7.0 Rate limit exceeded, too many messages"  #: … then say this
    hang_first: int = 0  #: stall on DATA for the first N messages …
    hang_seconds: float = 3600.0  #: … this long
    #: Greylist: refuse each RCPT TO address until this long after its first attempt …
    greylist_seconds: float | None = None
    greylist_reply: str = "451 4.7.1 Greylisted, please try again later"  #: … with this


@dataclass
class MailSink:
    """Receives mail over SMTP; keeps it in ``messages`` and, if ``directory`` is set, on disk."""

    directory: Path | None = None
    faults: Faults = field(default_factory=Faults)
    messages: list[EmailMessage] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    attempted_at: list[float] = field(default_factory=list)  #: monotonic time of every DATA
    refused: int = 0
    received: int = 0
    greylisted: int = 0  #: RCPT TO commands refused by the greylist
    _recent: deque[float] = field(default_factory=deque)
    _first_seen: dict[str, float] = field(default_factory=dict)  #: address → first RCPT
    _arrived: asyncio.Condition | None = None

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        """aiosmtpd hook: accept a recipient, or greylist it.

        Greylisting as real servers do it, keyed by address only: the first
        attempt for an address is refused, and so is every later one until
        ``greylist_seconds`` have passed since that first attempt; then it is
        accepted from then on. Being the hook, it adds accepted addresses to
        the envelope itself.
        """
        seconds = self.faults.greylist_seconds
        if seconds is not None:
            now = time.monotonic()
            first = self._first_seen.setdefault(address.lower(), now)
            if now - first < seconds:
                self.greylisted += 1
                return self.faults.greylist_reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """aiosmtpd hook: accept, refuse or stall one message."""
        self.received += 1
        self.attempted_at.append(time.monotonic())
        f = self.faults
        if self.received <= f.hang_first:
            await asyncio.sleep(f.hang_seconds)
        if f.refuse_always:
            self.refused += 1
            return f.refuse_always
        if self.received <= f.refuse_first:
            self.refused += 1
            return f.refuse_code
        now = time.monotonic()
        if f.rate_cap is not None:
            while self._recent and now - self._recent[0] >= 1.0:
                self._recent.popleft()
            if len(self._recent) >= f.rate_cap:
                self.refused += 1
                return f.rate_reply
            self._recent.append(now)
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode()
        message = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        self.accepted_at.append(now)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.eml"
            (self.directory / name).write_bytes(data)
        log.info("mail to %s: %s", ", ".join(envelope.rcpt_tos), message.get("Subject", ""))
        if self._arrived is not None:
            async with self._arrived:
                self._arrived.notify_all()
        return "250 2.0.0 OK: queued"

    async def wait_for(self, count: int) -> list[EmailMessage]:
        """Wait until ``count`` messages were accepted (wrap in ``asyncio.timeout``)."""
        if self._arrived is None:
            self._arrived = asyncio.Condition()
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.messages) >= count)
        return self.messages


async def start_sink(sink: MailSink, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Serve ``sink`` on ``host:port`` (0 picks a free port: ``server.sockets[0]``)."""
    loop = asyncio.get_running_loop()
    sink._arrived = asyncio.Condition()

    def factory() -> Any:
        return SMTP(sink, hostname="herald-mailsink", ident="herald mailsink")

    return await loop.create_server(factory, host, port)


async def serve_forever(directory: Path, port: int) -> None:
    """Run the dev sink until cancelled (``python -m herald.mailsink``)."""
    server = await start_sink(MailSink(directory=directory), "127.0.0.1", port)
    log.info("dev mail sink on 127.0.0.1:%d, saving to %s/", port, directory)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Entry point used by ``herald run``."""
    from herald.logs import setup_logging
    from herald.settings import load_settings
    from herald.supervisor import die_with_parent

    die_with_parent()
    settings = load_settings()
    setup_logging(settings.log_level, "mailsink")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(settings.mail_dir, settings.mailsink_port))


__all__ = ["Faults", "MailSink", "main", "start_sink"]

if __name__ == "__main__":
    main()
