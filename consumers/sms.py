"""The SMS channel: login alerts by text message, for users who opted in.

The default routing sends ``user.login`` here; a user gets the text only
with ``sms_login_alerts`` on (``PATCH /me/preferences``) and a valid E.164
phone number. Every "no" is recorded with its reason. A body longer than
``HERALD_SMS_MAX_SEGMENTS`` segments is cut (with an ellipsis) rather than
sent as many billable parts; the segment count is recorded in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import phonenumbers

from consumers.deliveries import DeliveryStore
from consumers.policy import Policy
from consumers.preferences import PreferenceStore
from consumers.providers.base import SmsMessage
from consumers.providers.chain import ProviderChain
from consumers.sms_text import fit, mask_number
from consumers.templates import Renderer
from consumers.units import distinct_users, recipient_of
from herald.errors import DeliveryFailure, PermanentError
from herald.metrics import DELIVERIES
from topology.envelope import Envelope, Recipient

log = logging.getLogger("herald.sms")
CHANNEL = "sms"
#: Events a user must opt in to by SMS, and the preference that says so.
OPT_IN: dict[str, str] = {"user.login": "sms_login_alerts"}


def e164(number: str | None) -> str | None:
    """``number`` normalised to E.164 when it is a valid international number, else None."""
    if not number:
        return None
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


class SmsChannel:
    """Texts each recipient who opted in, once per (event, recipient)."""

    name = CHANNEL

    def __init__(self, providers: ProviderChain[SmsMessage], renderer: Renderer,
                 store: DeliveryStore, prefs: PreferenceStore, max_segments: int = 3,
                 policy: Policy | None = None) -> None:
        self.providers = providers
        self.renderer = renderer
        self.store = store
        self.prefs = prefs
        self.max_segments = max_segments
        self.policy = policy or Policy(store, None, digests=False)

    async def unavailable_for(self) -> float:
        """Seconds until some SMS provider may be tried again (0: now)."""
        return await self.providers.unavailable_for()

    def wanted_inflight(self, floor: int, ceiling: int) -> int:
        """Messages in flight that keep the provider at its cap (rate x latency)."""
        return self.providers.wanted_inflight(floor, ceiling)

    async def aclose(self) -> None:
        """Release the providers' connections."""
        await self.providers.aclose()

    async def tick(self) -> None:
        """No periodic work."""

    async def dead_lettered(self, envelope: Envelope, unit: str | None, reason: str) -> None:
        """Record the DLQ reason on that recipient (None: every one not yet texted)."""
        await self.store.dead(envelope.id, CHANNEL, reason, recipient=unit,
                              event_type=envelope.type)

    async def units(self, envelope: Envelope) -> list[str]:
        """One unit per recipient."""
        return distinct_users(envelope)

    async def deliver(self, envelope: Envelope, unit: str) -> None:
        """Text that recipient if they want it; raise after recording a failure."""
        recipient = recipient_of(envelope, unit)
        if recipient is None:
            raise PermanentError(f"unit {unit!r} is not a recipient of this event")
        await self._text(envelope, recipient)

    async def _why_not(self, envelope: Envelope, recipient: Recipient
                       ) -> tuple[str | None, str, list[dict[str, Any]]]:
        """The number to text (None: don't), the reason, the trail."""
        snap = await self.prefs.snapshot(recipient.user_id)
        trail: list[dict[str, Any]] = []
        pref = OPT_IN.get(envelope.type)
        if pref is not None:  # consent: even a critical event needs the opt-in
            on = bool(getattr(snap.prefs, pref, False)) if snap.prefs is not None else False
            trail.append({"node": pref, "label": f"{pref} on? (opt-in, default off)",
                          "answer": "yes" if on else "no"})
            if not on:
                return None, (f"not texted: {pref} is off (opt in with PATCH /me/preferences "
                              f"{{\"{pref}\": true}})"), trail
        given = recipient.phone or (snap.user.phone if snap.user is not None else None)
        number = e164(given)
        trail.append({"node": "phone", "label": "valid E.164 phone number?",
                      "answer": "yes" if number else "no"})
        if number is None:
            why = "no phone number" if not given else f"{mask_number(given)} is not a valid number"
            return None, f"not texted: {why}", trail
        return number, f"texted: {envelope.type}", trail

    async def _text(self, envelope: Envelope, recipient: Recipient) -> None:
        key = (envelope.id, CHANNEL, recipient.user_id)
        if not await self.policy.admit(envelope, CHANNEL, recipient.user_id):
            return
        number, reason, trail = await self._why_not(envelope, recipient)
        trail_json = json.dumps(trail, separators=(",", ":"))
        if number is None:
            await self.store.settle(*key, "suppressed", reason, trail=trail_json)
            DELIVERIES.labels(CHANNEL, "-", "suppressed").inc()
            log.info("event %s not texted to %s: %s", envelope.id, recipient.user_id, reason)
            return
        try:
            context = {"event": envelope, "recipient": recipient, "data": envelope.data,
                       "actor": envelope.actor, "occurred_at": envelope.occurred_at}
            text = self.renderer.render(CHANNEL, envelope.type, "body", context,
                                        locale=recipient.locale)
            body, segments = fit(text, self.max_segments)
            handover = asyncio.Event()
            async with self.store.released_if_cancelled(key, handover):
                provider = await self.providers.send(SmsMessage(
                    to=number, body=body, segments=segments, reference=envelope.id), handover)
        except DeliveryFailure as exc:
            DELIVERIES.labels(CHANNEL, "-", "failed").inc()
            await self.store.failed(*key, exc.reason)
            raise
        await self.store.sent(*key, provider, trail=trail_json)
        DELIVERIES.labels(CHANNEL, provider, "sent").inc()
        log.info("event %s (%s) texted to %s via %s (%d segment(s))", envelope.id,
                 envelope.type, mask_number(number), provider, segments)
