"""The email channel: render the event's templates into a multipart email and send it."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from consumers.deliveries import DeliveryStore
from consumers.mime import Mailbox, OutgoingEmail, date_header
from consumers.policy import Policy
from consumers.providers.base import Mail
from consumers.providers.chain import ProviderChain
from consumers.templates import Renderer
from consumers.units import distinct_users, recipient_of
from herald.errors import ConfigError, DeliveryFailure, PermanentError
from herald.metrics import DELIVERIES
from topology.envelope import Envelope, Recipient

log = logging.getLogger("herald.email")
CHANNEL = "email"


class EmailChannel:
    """Delivers an envelope to each recipient's address, once per (event, recipient)."""

    name = CHANNEL

    def __init__(self, providers: ProviderChain[Mail], renderer: Renderer,
                 store: DeliveryStore, sender: str, policy: Policy | None = None) -> None:
        self.providers = providers
        self.renderer = renderer
        self.store = store
        self.sender = sender
        try:
            self._from = Mailbox.parse(sender)
        except ValueError as exc:
            raise ConfigError(f"HERALD_EMAIL_FROM: {exc}") from None
        self.policy = policy or Policy(store, None)

    async def unavailable_for(self) -> float:
        """Seconds until some provider may be tried again (0: now)."""
        return await self.providers.unavailable_for()

    def wanted_inflight(self, floor: int, ceiling: int) -> int:
        """Messages in flight that keep the provider at its cap (rate x latency)."""
        return self.providers.wanted_inflight(floor, ceiling)

    async def aclose(self) -> None:
        """Release the providers' connections."""
        await self.providers.aclose()

    def compose(self, envelope: Envelope, recipient: Recipient) -> OutgoingEmail:
        """The email (text, and HTML when the template has it); raises ``PermanentError``
        if it cannot be built."""
        return self._render(envelope.type, self._context(envelope, recipient),
                            recipient.name or "", str(recipient.email), recipient.user_id,
                            (("Message-ID", f"<{envelope.id}.{recipient.user_id}@herald>"),
                             ("X-Herald-Event", f"{envelope.type} {envelope.id}")))

    @staticmethod
    def _context(envelope: Envelope, recipient: Recipient) -> dict[str, Any]:
        return {"event": envelope, "recipient": recipient, "data": envelope.data,
                "actor": envelope.actor, "occurred_at": envelope.occurred_at}

    def _render(self, template: str, context: dict[str, Any], name: str, address: str,
                who: str, headers: tuple[tuple[str, str], ...]) -> OutgoingEmail:
        subject = self.renderer.render(CHANNEL, template, "subject", context)
        text = self.renderer.render(CHANNEL, template, "txt", context)
        html = (self.renderer.render(CHANNEL, template, "html", context)
                if self.renderer.has(CHANNEL, template, "html") else None)
        try:
            # OutgoingEmail instead of EmailMessage: the default policy's header objects,
            # set_content and flattening were 14-23% of the worker's time in the profile.
            return OutgoingEmail(sender=self._from, recipient=Mailbox(address, name),
                                 subject=subject, text=text, html=html,
                                 headers=(date_header(), *headers))
        except ValueError as exc:
            raise PermanentError(f"cannot build the email to {who}: {exc}") from None

    async def tick(self) -> None:
        """Send a digest to each recipient whose held notifications may go out now."""
        for recipient in await self.store.held_recipients(CHANNEL):
            if await self.policy.over_limit(CHANNEL, recipient) is not None:
                continue  # still over the limit: keep holding
            token = f"digest:{uuid.uuid4().hex}"
            items = await self.store.take_held(CHANNEL, recipient, token)
            if not items:
                continue  # another worker took them
            context = {"count": len(items), "items": [
                {"summary": d.summary or d.event_type, "event_type": d.event_type,
                 "at": d.created_at} for d in items]}
            provider: str | None = None
            try:
                message = self._render(
                    "digest", context, "", str(items[0].address), recipient,
                    (("Message-ID", f"<{token.split(':')[1]}.{recipient}@herald>"),))
                provider = await self.providers.send(message)
                log.info("digest of %d sent to %s via %s", len(items), recipient, provider)
            except DeliveryFailure as exc:
                log.warning("digest for %s not sent (%s); kept for the next round",
                            recipient, exc.reason)
            finally:
                await self.store.finish_digest(token, provider)

    async def dead_lettered(self, envelope: Envelope, unit: str | None, reason: str) -> None:
        """Record the DLQ reason on that recipient (None: every one not yet emailed)."""
        await self.store.dead(envelope.id, CHANNEL, reason, recipient=unit,
                              event_type=envelope.type)

    async def units(self, envelope: Envelope) -> list[str]:
        """One unit per recipient."""
        return distinct_users(envelope)

    async def deliver(self, envelope: Envelope, unit: str) -> None:
        """Email that one recipient unless settled before; raise after recording a failure."""
        recipient = recipient_of(envelope, unit)
        if recipient is None:
            raise PermanentError(f"unit {unit!r} is not a recipient of this event")
        key = (envelope.id, CHANNEL, recipient.user_id)
        context = self._context(envelope, recipient)

        def subject(context: dict[str, Any] = context) -> str:
            return self.renderer.render(CHANNEL, envelope.type, "subject", context)

        address = str(recipient.email) if recipient.email else None
        if not await self.policy.admit(envelope, CHANNEL, recipient.user_id, subject,
                                       address=address):
            return
        if address is None:
            reason = "not emailed: the event gave no email address for this recipient"
            await self.store.settle(*key, "suppressed", reason)
            DELIVERIES.labels(CHANNEL, "-", "suppressed").inc()
            log.info("event %s: recipient %s has no email address; not emailed",
                     envelope.id, recipient.user_id)
            return
        try:
            message = self.compose(envelope, recipient)
            handover = asyncio.Event()
            async with self.store.released_if_cancelled(key, handover):
                provider = await self.providers.send(message, handover)
        except DeliveryFailure as exc:
            DELIVERIES.labels(CHANNEL, "-", "failed").inc()
            await self.store.failed(*key, exc.reason)
            raise
        await self.store.sent(*key, provider)
        DELIVERIES.labels(CHANNEL, provider, "sent").inc()
        log.info("event %s (%s) emailed to %s via %s", envelope.id, envelope.type,
                 recipient.user_id, provider)
