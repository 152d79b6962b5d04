"""The push channel: one decision and one push per (event, recipient, device).

The device's platform picks the service (android: FCM, ios: APNs, web: Web
Push), each behind its own breaker and rate limit. The delivery key is
``<user_id>/<device_id>``, so a redelivery never pushes a device twice.

A mobile push that the chart says is not due yet (M2: the mobile push
timing threshold) is not slept on: the delivery is released as ``waiting``
and the message goes back through a broker delay tier (``Deferred``, which
spends no retry). When it comes back the decision is taken again with fresh
presence; a post read in the inbox meanwhile is not pushed, and a user who
was active elsewhere since is not pushed either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from sqlmodel import col, select

from consumers.decide import DeviceKind
from consumers.decisions import MESSAGE_EVENTS, Outcome, decide_for
from consumers.deliveries import DeliveryStore
from consumers.policy import Policy
from consumers.preferences import DeviceInfo, PreferenceStore
from consumers.providers.base import PushMessage
from consumers.providers.chain import ProviderChain
from consumers.templates import Renderer
from consumers.units import distinct_users, recipient_of
from herald.errors import DeadToken, Deferred, DeliveryFailure, PermanentError
from herald.metrics import DELIVERIES
from herald.models import Notification, utcnow
from topology.envelope import Envelope, Recipient

log = logging.getLogger("herald.push")
CHANNEL = "push"


def delivery_key(user_id: str, device_id: str) -> str:
    """The ``recipient`` of a push delivery record: one per device."""
    return f"{user_id}/{device_id}"


class PushChannel:
    """Pushes an envelope to every device of every recipient the decision engine lets through."""

    name = CHANNEL

    def __init__(self, chains: Mapping[str, ProviderChain[PushMessage]], renderer: Renderer,
                 store: DeliveryStore, prefs: PreferenceStore,
                 policy: Policy | None = None) -> None:
        self.chains = chains
        self.renderer = renderer
        self.store = store
        self.prefs = prefs
        self.policy = policy or Policy(store, None, digests=False)

    async def unavailable_for(self) -> float:
        """0 while some platform's service can be tried; else the shortest wait."""
        waits = [await chain.unavailable_for() for chain in self.chains.values()]
        return min(waits) if waits else 0.0

    def wanted_inflight(self, floor: int, ceiling: int) -> int:
        """Messages in flight that keep every platform's service at its cap."""
        return min(ceiling, max([floor, *(chain.wanted_inflight(floor, ceiling)
                                          for chain in self.chains.values())]))

    async def aclose(self) -> None:
        """Release every provider's connections."""
        for chain in self.chains.values():
            await chain.aclose()

    async def tick(self) -> None:
        """No periodic work."""

    async def dead_lettered(self, envelope: Envelope, unit: str | None, reason: str) -> None:
        """Record the DLQ reason on that device (None: every one not yet pushed)."""
        await self.store.dead(envelope.id, CHANNEL, reason, recipient=unit,
                              event_type=envelope.type)

    async def units(self, envelope: Envelope) -> list[str]:
        """One unit per device of each recipient (read fresh); a recipient without
        devices is one unit too (its "no" is recorded)."""
        units: list[str] = []
        for user_id in distinct_users(envelope):
            devices = await self.prefs.devices(user_id)
            units.extend([delivery_key(user_id, d.id) for d in devices] or [user_id])
        return units

    async def deliver(self, envelope: Envelope, unit: str) -> None:
        """Decide and push to that one device; raise after recording a failure.

        Raises ``Deferred`` when a mobile device must wait for the push
        threshold (the delivery is recorded as ``waiting``).
        """
        recipient = recipient_of(envelope, unit)
        if recipient is None:
            raise PermanentError(f"unit {unit!r} is not a recipient of this event")
        user_id, _, device_id = unit.partition("/")
        if not device_id:
            await self._no_devices(envelope, recipient)
            return
        device = next((d for d in await self.prefs.devices(user_id) if d.id == device_id), None)
        if device is None:
            if await self.policy.admit(envelope, CHANNEL, unit):
                await self._skip((envelope.id, CHANNEL, unit), Outcome(
                    False, "not pushed: the device was removed before the push", ()))
            return
        wait = await self._push(envelope, recipient, device)
        if wait is not None:
            raise Deferred("the mobile push waits for the push timing threshold",
                           retry_after=max(wait, 0.05))

    async def _no_devices(self, envelope: Envelope, recipient: Recipient) -> None:
        if await self.policy.admit(envelope, CHANNEL, recipient.user_id):
            reason = "not pushed: no push device registered (POST /me/devices)"
            await self.store.settle(envelope.id, CHANNEL, recipient.user_id, "suppressed",
                                    reason)
            DELIVERIES.labels(CHANNEL, "-", "suppressed").inc()

    async def _push(self, envelope: Envelope, recipient: Recipient,
                    device: DeviceInfo) -> float | None:
        """Decide and push to one device; the seconds to wait when it is not due yet."""
        user_id = recipient.user_id
        key = (envelope.id, CHANNEL, delivery_key(user_id, device.id))
        if not await self.policy.admit(envelope, CHANNEL, key[2]):
            return None
        outcome = await decide_for(self.prefs, envelope, user_id, device.kind, utcnow(),
                                   dnd_for_events=True)
        if outcome.wait is not None and not outcome.active_since:
            reason = f"waiting {outcome.wait:.0f}s for the mobile push timing threshold"
            await self.store.wait(*key, reason, trail=outcome.trail_json())
            return outcome.wait
        if outcome.wait is not None:
            await self._skip(key, Outcome(
                False, "not pushed: the user was active elsewhere since the message",
                outcome.trail))
            return None
        if not outcome.notify:
            await self._skip(key, outcome)
            return None
        if (device.kind is DeviceKind.MOBILE and envelope.type in MESSAGE_EVENTS
                and await self._read_in_app(envelope.id, user_id)):
            await self._skip(key, Outcome(
                False, "not pushed: already read in the inbox", outcome.trail))
            return None
        message = self._compose(envelope, recipient, device)
        chain = self.chains.get(device.platform)
        if chain is None:
            await self._skip(key, Outcome(
                False, f"not pushed: unknown platform {device.platform!r}", outcome.trail))
            return None
        handover = asyncio.Event()
        try:
            async with self.store.released_if_cancelled(key, handover):
                provider = await chain.send(message, handover)
        except DeadToken as exc:
            await self.prefs.forget_device(device.id, user_id)
            log.info("device %s of %s removed: %s", device.id, user_id, exc.reason)
            await self._skip(key, Outcome(
                False, f"not pushed: device token no longer valid, device removed "
                       f"({exc.reason})", outcome.trail))
            return None
        except DeliveryFailure as exc:
            DELIVERIES.labels(CHANNEL, "-", "failed").inc()
            await self.store.failed(*key, exc.reason)
            raise
        await self.store.sent(*key, provider, trail=outcome.trail_json())
        DELIVERIES.labels(CHANNEL, provider, "sent").inc()
        log.info("event %s (%s) pushed to %s's %s device %s via %s", envelope.id,
                 envelope.type, user_id, device.platform, device.id, provider)
        return None

    async def _skip(self, key: tuple[str, str, str], outcome: Outcome) -> None:
        await self.store.settle(*key, "suppressed", outcome.reason, trail=outcome.trail_json())
        DELIVERIES.labels(CHANNEL, "-", "suppressed").inc()
        log.info("event %s not pushed to %s: %s", key[0], key[2], outcome.reason)

    async def _read_in_app(self, event_id: str, user_id: str) -> bool:
        async with self.store.sessions() as session:
            read_at = (await session.exec(select(Notification.read_at).where(
                col(Notification.event_id) == event_id,
                col(Notification.user_id) == user_id))).first()
        return read_at is not None

    def _compose(self, envelope: Envelope, recipient: Recipient,
                 device: DeviceInfo) -> PushMessage:
        context: dict[str, Any] = {"event": envelope, "recipient": recipient,
                                   "data": envelope.data, "actor": envelope.actor,
                                   "occurred_at": envelope.occurred_at}
        title = " ".join(self.renderer.render(CHANNEL, envelope.type, "title", context,
                                              locale=recipient.locale).split())
        body = self.renderer.render(CHANNEL, envelope.type, "body", context,
                                    locale=recipient.locale)
        data = {"event_id": envelope.id, "event_type": envelope.type}
        for name in ("post_id", "channel_id", "thread_id", "request_id"):
            value = envelope.data.get(name)
            if isinstance(value, str):
                data[name] = value
        thread = envelope.data.get("thread_id")
        return PushMessage(token=device.token, title=title, body=body, data=data,
                           collapse_key=thread[:64] if isinstance(thread, str) and thread
                           else None, urgent=envelope.critical)

