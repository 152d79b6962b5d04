"""Should this device of this recipient be notified of this message? Slack's chart, node for node.

The chart is "a use case of slack" in the seed notes (notification-system.md).
``NODES`` holds its nodes under the chart's own ids (A, B1, ..., YES2) and
wording, ``EDGES`` its arrows; :func:`decide` starts at A, asks each node's
question, follows the arrow for the answer and stops at NO (N1) or the final
YES (YES2). The trail it returns names every node passed, so a person can see
why. Pure: no I/O, no clock (``now`` is passed in).

Where the chart is ambiguous, the reading taken:

- A "Should we send a notification?": yes unless the author is the recipient
  (no self-notification). Nothing else is checked there.
- E1 "Channel notification pref is 'Nothing'" does not say "for this device"
  while F1 does, and if both read the same pref F1's "Nothing" (F2a) could
  never happen. So E1 is yes when the channel is 'Nothing' on *every* device
  kind (the channel is switched off; not even subscribed threads get through),
  F1 reads this device's pref (F2a: off here only; E2/E3 still let threads in).
- E2 "thread_everything pref on?" is asked as written: when on, any message
  that gets there notifies (the chart writes compound questions out, as in
  B1, so this is not read as "thread message && ..."). It is one global bool.
- H2b "DMs (mobile)" and H2c "Highlight Words (mobile)" exist on mobile only:
  on desktop a global pref of ``dms`` or ``highlight_words`` is read as
  ``mentions`` (H2a; Slack's desktop "DMs, mentions & keywords"), and the H1
  step carries a note saying so.
- H2c leads to G4 "@mention?", not to J4: taken literally, the highlight-words
  pref never looks at highlight words (only ``all`` does, at J4).
- G5 "Comment on file owned by user (desktop)": yes only on desktop.
- J3 "@here" is yes for any @here message, whatever the recipient's presence;
  so with global pref ``all`` an @here gets through even in a channel where
  @channel mentions are suppressed (D2 yes only skips the shortcut to YES).
- D2 no goes straight to YES: an unsuppressed @channel/@everyone/@here
  notifies even when the channel pref is 'Nothing' (a muted channel or DnD
  still stop it earlier).
- B1 yes skips B2: a subscribed thread message passes a muted channel.
- C1 "User in DnD?": inside the daily window in the user's own time zone
  (``[start, end)``, wrapping midnight when end < start, empty when equal;
  local wall-clock time, so the window follows DST) or before
  ``snooze_until``. C2 "DnD Override?": the message asks to break through
  (``Message.dnd_override``) and the user allows it.
- J5 "User presence active?": last activity within ``activity_window``.
- M2 "Past mobile push timing threshold?": the message has waited, and the
  user been inactive since, for at least ``mobile_push_threshold``. A caller
  that gets "not yet" asks again later; the engine keeps no state.
- Dead arrows. Some questions repeat one already answered on every way in,
  so their other answer cannot happen: G2/J2 "User subscribed?" yes (a
  subscribed thread message already left at E3), J6 "Thread message?" yes
  (J1 sent threads elsewhere) and therefore J7. They stay in the tables, are
  listed in ``DEAD_EDGES``, and the tests prove no input takes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class DeviceKind(StrEnum):
    """The kind of device a notification would go to."""

    DESKTOP = "desktop"
    MOBILE = "mobile"


class ChannelPref(StrEnum):
    """A user's notification pref for one channel on one device kind (F2a-F2d)."""

    NOTHING = "nothing"
    EVERYTHING = "everything"
    MENTIONS = "mentions"
    DEFAULT = "default"


class GlobalPref(StrEnum):
    """A user's global notification pref for one device kind (H2a-H2e)."""

    ALL = "all"
    MENTIONS = "mentions"
    DMS = "dms"
    HIGHLIGHT_WORDS = "highlight_words"
    NEVER = "never"


class SpecialMention(StrEnum):
    """A mention of everybody in the channel (D1)."""

    CHANNEL = "channel"
    EVERYONE = "everyone"
    HERE = "here"


def _require_aware(value: datetime | None, name: str) -> None:
    if value is not None and value.utcoffset() is None:
        raise ValueError(f"{name}: needs a time zone (got naive {value.isoformat()})")


@dataclass(frozen=True, slots=True)
class DndSchedule:
    """Do-not-disturb: a daily ``[start, end)`` window in local time, and/or a snooze.

    Raises ValueError when only one end of the window is given or a time is naive.
    """

    start: time | None = None
    end: time | None = None
    snooze_until: datetime | None = None

    def __post_init__(self) -> None:
        if (self.start is None) != (self.end is None):
            raise ValueError("dnd: give both start and end of the window, or neither")
        _require_aware(self.snooze_until, "dnd.snooze_until")

    def active(self, now: datetime, zone: ZoneInfo) -> bool:
        """True when ``now`` is before the snooze end or inside the window in ``zone``."""
        if self.snooze_until is not None and now < self.snooze_until:
            return True
        if self.start is None or self.end is None:
            return False
        local = now.astimezone(zone).time()
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


@dataclass(frozen=True, slots=True)
class RecipientPrefs:
    """Everything about the recipient the chart asks. Missing prefs mean the defaults.

    ``channel_prefs`` misses mean ``default``; ``global_prefs`` misses mean
    ``mentions``. Raises ValueError for an unknown IANA ``timezone``, a naive
    ``last_active_at``, a negative threshold or a non-positive activity window.
    """

    user_id: str
    timezone: str = "UTC"
    dnd: DndSchedule | None = None
    dnd_override_allowed: bool = False
    muted_channels: frozenset[str] = frozenset()
    suppress_channel_mentions: frozenset[str] = frozenset()
    channel_prefs: Mapping[tuple[str, DeviceKind], ChannelPref] = field(default_factory=dict)
    thread_everything: bool = False
    global_prefs: Mapping[DeviceKind, GlobalPref] = field(default_factory=dict)
    highlight_words: frozenset[str] = frozenset()
    last_active_at: datetime | None = None
    activity_window: timedelta = timedelta(minutes=10)
    mobile_push_threshold: timedelta = timedelta(minutes=2)

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: unknown IANA zone {self.timezone!r}") from None
        _require_aware(self.last_active_at, "last_active_at")
        if self.mobile_push_threshold < timedelta(0):
            raise ValueError("mobile_push_threshold: must not be negative")
        if self.activity_window <= timedelta(0):
            raise ValueError("activity_window: must be positive")

    def in_dnd(self, now: datetime) -> bool:
        """True when do-not-disturb is on at ``now`` (C1)."""
        return self.dnd is not None and self.dnd.active(now, ZoneInfo(self.timezone))

    def channel_pref(self, channel_id: str, kind: DeviceKind) -> ChannelPref:
        """The pref for ``channel_id`` on ``kind`` (``default`` when unset)."""
        return self.channel_prefs.get((channel_id, kind), ChannelPref.DEFAULT)

    def global_pref(self, kind: DeviceKind) -> GlobalPref:
        """The global pref on ``kind`` (``mentions`` when unset)."""
        return self.global_prefs.get(kind, GlobalPref.MENTIONS)

    def active(self, now: datetime) -> bool:
        """True when the user was active within ``activity_window`` before ``now`` (J5)."""
        return self.last_active_at is not None and now - self.last_active_at < self.activity_window

    def matches_highlight(self, text: str) -> bool:
        """True when ``text`` holds a highlight word: whole word, any case (J4)."""
        return any(
            re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE)
            for word in self.highlight_words if word.strip()
        )


@dataclass(frozen=True, slots=True)
class Device:
    """The device a notification would go to."""

    kind: DeviceKind


@dataclass(frozen=True, slots=True)
class Message:
    """The message, as seen by one recipient (``user_subscribed_to_thread`` is theirs).

    ``thread_id`` is None for a message outside a thread. Raises ValueError
    when ``created_at`` is naive.
    """

    author_id: str
    channel_id: str
    created_at: datetime
    text: str = ""
    is_dm: bool = False
    thread_id: str | None = None
    user_subscribed_to_thread: bool = False
    mentions: frozenset[str] = frozenset()
    special_mention: SpecialMention | None = None
    file_owner_id: str | None = None
    dnd_override: bool = False

    def __post_init__(self) -> None:
        _require_aware(self.created_at, "created_at")


@dataclass(frozen=True, slots=True)
class Step:
    """One node passed: its chart id and wording, the answer taken (None: no question)."""

    node_id: str
    label: str
    answer: str | None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome and the nodes that led to it, from A to N1 (NO) or YES2 (YES)."""

    notify: bool
    trail: tuple[Step, ...]

    @property
    def node_ids(self) -> tuple[str, ...]:
        """The chart ids of the trail, in order."""
        return tuple(step.node_id for step in self.trail)

    @property
    def reason(self) -> str:
        """Why, for a person: "notified: @mention", "not notified: channel muted", ..."""
        ids = self.node_ids
        first = next(i for i, node in enumerate(ids) if node in ("N1", "YES1"))
        cause = _CAUSES[(ids[first - 1], self.trail[first - 1].answer)]
        if ids[first] == "N1":
            return f"not notified: {cause}"
        if "M2" not in ids:
            return f"notified: {cause}"
        if self.notify:
            return f"notified: {cause} (mobile push threshold passed)"
        return f"not notified: {cause}, but mobile push threshold not yet passed"


NODES: Mapping[str, str] = {
    "A": "Should we send a notification?", "B1": "Thread message && User subscribed?",
    "B2": "Channel muted?", "C1": "User in DnD?", "C2": "DnD Override?",
    "D1": "@channel/@everyone/@here message?", "D2": "@channel mentions suppressed?",
    "E1": "Channel notification pref is 'Nothing'", "E2": "thread_everything pref on?",
    "E3": "Thread message && User subscribed?",
    "F1": "What is the user's channel notification pref for this device?",
    "F2a": "Nothing", "F2b": "Everything", "F2c": "Mentions", "F2d": "Default",
    "G1": "Thread message?", "G2": "User subscribed?", "G3": "DM?", "G4": "@mention?",
    "G5": "Comment on file owned by user (desktop)",
    "H1": "What is the user's global notification pref for this device?",
    "H2a": "Mentions", "H2b": "DMs (mobile)", "H2c": "Highlight Words (mobile)",
    "H2d": "All", "H2e": "Never",
    "J1": "Thread message?", "J2": "User subscribed?", "J3": "@here", "J4": "Highlight word?",
    "J5": "User presence active?", "J6": "Thread message?", "J7": "User subscribed?",
    "YES1": "YES", "M1": "Mobile?", "M2": "Past mobile push timing threshold?",
    "YES2": "YES", "N1": "NO",
}
"""Every node of the chart: id -> the chart's wording (ASCII apostrophes)."""

EDGES: Mapping[str, Mapping[str | None, str]] = {
    "A": {"no": "N1", "yes": "B1"}, "B1": {"no": "B2", "yes": "C1"},
    "B2": {"yes": "N1", "no": "C1"}, "C1": {"yes": "C2", "no": "D1"},
    "C2": {"no": "N1", "yes": "D1"}, "D1": {"yes": "D2", "no": "E1"},
    "D2": {"yes": "E1", "no": "YES1"}, "E1": {"yes": "N1", "no": "E2"},
    "E2": {"yes": "YES1", "no": "E3"}, "E3": {"yes": "YES1", "no": "F1"},
    "F1": {"nothing": "F2a", "everything": "F2b", "mentions": "F2c", "default": "F2d"},
    "F2a": {None: "N1"}, "F2b": {None: "YES1"}, "F2c": {None: "G1"}, "F2d": {None: "H1"},
    "G1": {"yes": "G2", "no": "G3"}, "G2": {"yes": "YES1", "no": "N1"},
    "G3": {"yes": "YES1", "no": "G4"}, "G4": {"yes": "YES1", "no": "G5"},
    "G5": {"yes": "YES1", "no": "N1"},
    "H1": {"mentions": "H2a", "dms": "H2b", "highlight_words": "H2c", "all": "H2d",
           "never": "H2e"},
    "H2a": {None: "G1"}, "H2b": {None: "G3"}, "H2c": {None: "G4"}, "H2d": {None: "J1"},
    "H2e": {None: "N1"},
    "J1": {"yes": "J2", "no": "J3"}, "J2": {"yes": "YES1", "no": "N1"},
    "J3": {"yes": "YES1", "no": "J4"}, "J4": {"yes": "YES1", "no": "J5"},
    "J5": {"no": "YES1", "yes": "J6"}, "J6": {"yes": "J7", "no": "N1"},
    "J7": {"yes": "YES1", "no": "N1"},
    "YES1": {None: "M1"}, "M1": {"yes": "M2", "no": "YES2"}, "M2": {"yes": "YES2", "no": "N1"},
}
"""The chart's arrows: node -> answer -> next node. N1 and YES2 are the ends."""

DEAD_EDGES: frozenset[tuple[str, str | None]] = frozenset({
    ("G2", "yes"), ("J2", "yes"), ("J6", "yes"), ("J7", "yes"), ("J7", "no"),
})
"""Arrows no input can take: their question was already answered the other way."""


@dataclass(frozen=True, slots=True)
class _Case:
    prefs: RecipientPrefs
    device: DeviceKind
    message: Message
    now: datetime


def _yn(flag: bool, note: str = "") -> tuple[str, str]:
    return ("yes" if flag else "no"), note


def _subscribed_thread(c: _Case) -> tuple[str, str]:
    return _yn(c.message.thread_id is not None and c.message.user_subscribed_to_thread)


def _channel_off_everywhere(c: _Case) -> tuple[str, str]:
    return _yn(all(c.prefs.channel_pref(c.message.channel_id, kind) is ChannelPref.NOTHING
                   for kind in DeviceKind), "on every device")


def _global_pref(c: _Case) -> tuple[str, str]:
    pref = c.prefs.global_pref(c.device)
    if c.device is DeviceKind.DESKTOP and pref in (GlobalPref.DMS, GlobalPref.HIGHLIGHT_WORDS):
        return GlobalPref.MENTIONS.value, f"{pref.value!r} is mobile-only; desktop reads mentions"
    return pref.value, ""


def _file_comment(c: _Case) -> tuple[str, str]:
    if c.device is not DeviceKind.DESKTOP:
        return _yn(False, "desktop only")
    return _yn(c.message.file_owner_id == c.prefs.user_id)


def _past_push_threshold(c: _Case) -> tuple[str, str]:
    last = c.prefs.last_active_at
    quiet_since = c.message.created_at if last is None else max(c.message.created_at, last)
    return _yn(c.now - quiet_since >= c.prefs.mobile_push_threshold)


def _is_thread(c: _Case) -> tuple[str, str]:
    return _yn(c.message.thread_id is not None)


def _subscribed(c: _Case) -> tuple[str, str]:
    return _yn(c.message.user_subscribed_to_thread)


_QUESTIONS: Mapping[str, Callable[[_Case], tuple[str, str]]] = {
    "A": lambda c: _yn(c.message.author_id != c.prefs.user_id),
    "B1": _subscribed_thread,
    "B2": lambda c: _yn(c.message.channel_id in c.prefs.muted_channels),
    "C1": lambda c: _yn(c.prefs.in_dnd(c.now)),
    "C2": lambda c: _yn(c.message.dnd_override and c.prefs.dnd_override_allowed),
    "D1": lambda c: _yn(c.message.special_mention is not None),
    "D2": lambda c: _yn(c.message.channel_id in c.prefs.suppress_channel_mentions),
    "E1": _channel_off_everywhere,
    "E2": lambda c: _yn(c.prefs.thread_everything),
    "E3": _subscribed_thread,
    "F1": lambda c: (c.prefs.channel_pref(c.message.channel_id, c.device).value, ""),
    "G1": _is_thread, "G2": _subscribed,
    "G3": lambda c: _yn(c.message.is_dm),
    "G4": lambda c: _yn(c.prefs.user_id in c.message.mentions),
    "G5": _file_comment,
    "H1": _global_pref,
    "J1": _is_thread, "J2": _subscribed,
    "J3": lambda c: _yn(c.message.special_mention is SpecialMention.HERE),
    "J4": lambda c: _yn(c.prefs.matches_highlight(c.message.text)),
    "J5": lambda c: _yn(c.prefs.active(c.now)),
    "J6": _is_thread, "J7": _subscribed,
    "M1": lambda c: _yn(c.device is DeviceKind.MOBILE),
    "M2": _past_push_threshold,
}

_CAUSES: Mapping[tuple[str, str | None], str] = {
    ("A", "no"): "self-message (the author is the recipient)", ("B2", "yes"): "channel muted",
    ("C2", "no"): "in DnD, no override", ("D2", "no"): "@channel/@everyone/@here",
    ("E1", "yes"): "channel pref is 'Nothing' on every device",
    ("E2", "yes"): "thread_everything pref on", ("E3", "yes"): "subscribed thread message",
    ("F2a", None): "channel pref is 'Nothing' for this device",
    ("F2b", None): "channel pref is 'Everything'",
    ("G2", "yes"): "subscribed thread message", ("G2", "no"): "thread not subscribed",
    ("G3", "yes"): "DM", ("G4", "yes"): "@mention",
    ("G5", "yes"): "comment on a file the user owns",
    ("G5", "no"): "no DM, @mention or comment on the user's file",
    ("H2e", None): "global pref is 'Never' for this device",
    ("J2", "yes"): "subscribed thread message", ("J2", "no"): "thread not subscribed",
    ("J3", "yes"): "@here", ("J4", "yes"): "highlight word", ("J5", "no"): "user not active",
    ("J6", "no"): "user active, not a thread message",
    ("J7", "yes"): "user active, subscribed thread", ("J7", "no"): "user active, not subscribed",
}
"""Why, by the step just before the first NO or YES: what ``Decision.reason`` says."""


def decide(recipient: RecipientPrefs, device: Device, message: Message,
           now: datetime) -> Decision:
    """Walk the chart from A for this recipient, device and message at ``now``.

    Deterministic and side-effect free. Raises ValueError when ``now`` is naive.
    """
    _require_aware(now, "now")
    case = _Case(recipient, device.kind, message, now)
    trail: list[Step] = []
    node = "A"
    while True:
        question = _QUESTIONS.get(node)
        answer, note = question(case) if question else (None, "")
        trail.append(Step(node, NODES[node], answer, note))
        arrows = EDGES.get(node)
        if arrows is None:
            return Decision(notify=node == "YES2", trail=tuple(trail))
        node = arrows[answer]
