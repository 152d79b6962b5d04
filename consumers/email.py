"""The email channel: render the event's templates into a multipart email and send it."""

from __future__ import annotations

import logging
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate

from consumers.deliveries import Claim, DeliveryStore
from consumers.providers.chain import ProviderChain
from consumers.templates import Renderer
from herald.errors import DeliveryFailure, PermanentError
from herald.metrics import DELIVERIES
from topology.envelope import Envelope, Recipient

log = logging.getLogger("herald.email")
CHANNEL = "email"


class EmailChannel:
    """Delivers an envelope to each recipient's address, once per (event, recipient)."""

    name = CHANNEL

    def __init__(self, providers: ProviderChain, renderer: Renderer, store: DeliveryStore,
                 sender: str) -> None:
        self.providers = providers
        self.renderer = renderer
        self.store = store
        self.sender = sender

    async def unavailable_for(self) -> float:
        """Seconds until some provider may be tried again (0: now)."""
        return await self.providers.unavailable_for()

    async def aclose(self) -> None:
        """Release the providers' connections."""
        await self.providers.aclose()

    def compose(self, envelope: Envelope, recipient: Recipient) -> EmailMessage:
        """The multipart (text + HTML) email; raises ``PermanentError`` if it cannot be built."""
        context = {
            "event": envelope, "recipient": recipient, "data": envelope.data,
            "actor": envelope.actor, "occurred_at": envelope.occurred_at,
        }
        subject = self.renderer.render(CHANNEL, envelope.type, "subject", context)
        text = self.renderer.render(CHANNEL, envelope.type, "txt", context)
        message = EmailMessage()
        message["Subject"] = " ".join(subject.split())
        message["From"] = self.sender
        try:
            message["To"] = Address(display_name=recipient.name or "",
                                    addr_spec=str(recipient.email))
        except (ValueError, IndexError) as exc:
            raise PermanentError(f"cannot address {recipient.user_id}: {exc}") from None
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = f"<{envelope.id}.{recipient.user_id}@herald>"
        message["X-Herald-Event"] = f"{envelope.type} {envelope.id}"
        message.set_content(text)
        if self.renderer.has(CHANNEL, envelope.type, "html"):
            message.add_alternative(
                self.renderer.render(CHANNEL, envelope.type, "html", context), subtype="html")
        return message

    async def dead_lettered(self, envelope: Envelope, reason: str) -> None:
        """Record the DLQ reason on every recipient not yet emailed."""
        await self.store.dead(envelope.id, CHANNEL, reason)

    async def deliver(self, envelope: Envelope) -> None:
        """Send to every recipient not yet sent; raise the first failure after recording it."""
        for recipient in envelope.recipients:
            if not recipient.email:
                log.warning("event %s: recipient %s has no email address; not emailed",
                            envelope.id, recipient.user_id)
                continue
            key = (envelope.id, CHANNEL, recipient.user_id)
            if await self.store.claim(envelope.id, envelope.type, CHANNEL,
                                      recipient.user_id) is Claim.ALREADY_SENT:
                log.info("event %s already emailed to %s; skipped", envelope.id,
                         recipient.user_id)
                DELIVERIES.labels(CHANNEL, "-", "duplicate").inc()
                continue
            try:
                message = self.compose(envelope, recipient)
                provider = await self.providers.send(message)
            except DeliveryFailure as exc:
                DELIVERIES.labels(CHANNEL, "-", "failed").inc()
                await self.store.failed(*key, exc.reason)
                raise
            await self.store.sent(*key, provider)
            DELIVERIES.labels(CHANNEL, provider, "sent").inc()
            log.info("event %s (%s) emailed to %s via %s", envelope.id, envelope.type,
                     recipient.email, provider)
