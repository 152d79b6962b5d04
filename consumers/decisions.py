"""From an envelope to a decision a person can read: the glue between workers and the chart.

``user.post`` is a message: it goes through :func:`consumers.decide.decide`
node for node. Other events are not messages, so the chart does not apply;
for them the channels ask only what still makes sense (do-not-disturb for a
push, the opt-in for an SMS login alert), and the trail says so. Either way
the result carries a reason and a JSON trail to store with the delivery.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from consumers.decide import (
    NODES,
    Decision,
    Device,
    DeviceKind,
    Message,
    RecipientPrefs,
    SpecialMention,
    decide,
)
from consumers.preferences import PreferenceStore
from herald.errors import PermanentError
from topology.envelope import Envelope

MESSAGE_EVENTS = ("user.post",)


class PostData(BaseModel):
    """What the chart reads of a ``user.post``'s ``data`` (integrators may omit any of it)."""

    model_config = ConfigDict(extra="allow")

    channel_id: str = ""
    text: str = ""
    is_dm: bool = False
    thread_id: str | None = None
    mentions: list[str] = []
    special_mention: SpecialMention | None = None
    file_owner_id: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """Notify or not, why, the trail, and for a mobile push not yet due, how long to wait."""

    notify: bool
    reason: str
    trail: tuple[dict[str, Any], ...]
    wait: float | None = None
    #: For a mobile push not yet due: the user was active after the message was posted.
    active_since: bool = False

    def trail_json(self) -> str:
        """The trail as stored on a notification or delivery row."""
        return json.dumps(list(self.trail), separators=(",", ":"))


def _steps(decision: Decision) -> tuple[dict[str, Any], ...]:
    return tuple({"node": s.node_id, "label": s.label, "answer": s.answer,
                  **({"note": s.note} if s.note else {})} for s in decision.trail)


def post_data(envelope: Envelope) -> PostData:
    """The chart's view of a ``user.post``; raises ``PermanentError`` naming a bad field."""
    try:
        return PostData.model_validate(envelope.data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise PermanentError(f"user.post data.{field}: {err['msg']}") from None


async def message_for(store: PreferenceStore, envelope: Envelope, user_id: str,
                      now: datetime) -> Message:
    """The post as ``user_id`` sees it (their thread subscription looked up now).

    A post dated in the future (a skewed client clock) counts as posted ``now``.
    """
    data = post_data(envelope)
    return Message(
        author_id=envelope.actor.id, channel_id=data.channel_id,
        created_at=min(envelope.occurred_at, now), text=data.text, is_dm=data.is_dm,
        thread_id=data.thread_id,
        user_subscribed_to_thread=await store.subscribed(data.thread_id, user_id),
        mentions=frozenset(data.mentions), special_mention=data.special_mention,
        file_owner_id=data.file_owner_id, dnd_override=envelope.critical)


def chart(prefs: RecipientPrefs, kind: DeviceKind, message: Message, now: datetime) -> Outcome:
    """Walk the chart; for a mobile "not yet past the threshold", also say how long to wait."""
    decision = decide(prefs, Device(kind), message, now)
    wait: float | None = None
    active_since = False
    last = decision.trail[-2] if len(decision.trail) > 1 else None
    if not decision.notify and last is not None and last.node_id == "M2":
        active_since = (prefs.last_active_at is not None
                        and prefs.last_active_at > message.created_at)
        quiet_since = prefs.last_active_at if active_since else message.created_at
        assert quiet_since is not None
        wait = max((prefs.mobile_push_threshold - (now - quiet_since)).total_seconds(), 0.0)
    return Outcome(decision.notify, decision.reason, _steps(decision), wait, active_since)


def not_a_message(envelope: Envelope, prefs: RecipientPrefs, now: datetime,
                  dnd: bool) -> Outcome:
    """Events other than posts: notify, unless ``dnd`` and the user is in do-not-disturb."""
    steps: list[dict[str, Any]] = [{
        "node": "event", "answer": None,
        "label": f"{envelope.type} is not a message: the Slack chart applies to user.post"}]
    if dnd:
        in_dnd = prefs.in_dnd(now)
        steps.append({"node": "C1", "label": NODES["C1"], "answer": "yes" if in_dnd else "no"})
        if in_dnd:
            override = envelope.critical and prefs.dnd_override_allowed
            steps.append({"node": "C2", "label": NODES["C2"],
                          "answer": "yes" if override else "no"})
            if not override:
                return Outcome(False, "not notified: in DnD, no override", tuple(steps))
    return Outcome(True, f"notified: {envelope.type}", tuple(steps))


async def decide_for(store: PreferenceStore, envelope: Envelope, user_id: str,
                     kind: DeviceKind, now: datetime, dnd_for_events: bool) -> Outcome:
    """The decision for ``user_id`` on a device of ``kind`` at ``now``.

    Raises ``PermanentError`` for a ``user.post`` whose data cannot be read.
    """
    prefs = await store.recipient(user_id)
    if envelope.type in MESSAGE_EVENTS:
        return chart(prefs, kind, await message_for(store, envelope, user_id, now), now)
    return not_a_message(envelope, prefs, now, dnd_for_events)
