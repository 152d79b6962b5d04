"""What the decision engine needs to know about a recipient, read from the database and cached.

A worker asks :class:`PreferenceStore` for a recipient's :class:`RecipientPrefs`
and devices on every message; the rows behind the preferences (contact
details, preferences, channel preferences) are cached per user for
``HERALD_USER_CACHE_TTL`` and dropped at once when the API says the user
changed them (``user.<id>.changed`` on the live exchange, see
:meth:`PreferenceStore.listen`). Presence (``last_active_at``), thread
subscriptions and devices are read fresh each time: the first two change
often, and a device token may move to another account.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import TypeVar

from cachetools import TTLCache
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from consumers.decide import (
    ChannelPref,
    DeviceKind,
    DndSchedule,
    GlobalPref,
    RecipientPrefs,
)
from herald.models import (
    ChannelPreferences,
    Device,
    ThreadSubscription,
    User,
    UserPreferences,
    as_utc,
)
from topology.live import GAP, USER_CHANGED_PATTERN, LiveHub

log = logging.getLogger("herald.preferences")

#: Device platform → the kind of device the chart asks about (Web Push reaches browsers).
PLATFORM_KIND: Mapping[str, DeviceKind] = {
    "android": DeviceKind.MOBILE, "ios": DeviceKind.MOBILE, "web": DeviceKind.DESKTOP}


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A registered device, as a push worker needs it."""

    id: str
    platform: str
    token: str

    @property
    def kind(self) -> DeviceKind:
        """Mobile for android/ios, desktop for a browser."""
        return PLATFORM_KIND.get(self.platform, DeviceKind.MOBILE)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The cacheable part of a user: contact details and preferences (devices are read fresh)."""

    user: User | None
    prefs: UserPreferences | None
    channels: tuple[ChannelPreferences, ...]


E = TypeVar("E", ChannelPref, GlobalPref)


def _enum(kind: type[E], value: str, default: E) -> E:
    try:
        return kind(value)
    except ValueError:
        log.warning("ignoring unknown preference value %r (using %s)", value, default.value)
        return default


def _clock(value: str | None) -> time | None:
    if not value:
        return None
    try:
        return time.fromisoformat(value)
    except ValueError:
        return None


class PreferenceStore:
    """Reads recipients' preferences and devices, with a per-user TTL cache."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, ttl: float,
                 activity_window: float, mobile_push_threshold: float,
                 maxsize: int = 10_000) -> None:
        self.sessions = sessions
        self.activity_window = timedelta(seconds=activity_window)
        self.threshold = timedelta(seconds=mobile_push_threshold)
        self._cache: TTLCache[str, Snapshot] = TTLCache(maxsize=maxsize, ttl=max(ttl, 0.001))
        self.loads = 0  # snapshots read from the database (for tests and metrics)

    def invalidate(self, user_id: str) -> None:
        """Forget ``user_id``'s cached snapshot (the next read goes to the database)."""
        self._cache.pop(user_id, None)

    async def snapshot(self, user_id: str) -> Snapshot:
        """The user's rows, from the cache when fresh. An unknown user has ``user=None``."""
        cached = self._cache.get(user_id)
        if cached is not None:
            return cached
        async with self.sessions() as session:
            user = await session.get(User, user_id)
            prefs = await session.get(UserPreferences, user_id)
            channels = tuple((await session.exec(select(ChannelPreferences).where(
                col(ChannelPreferences.user_id) == user_id))).all())
        self.loads += 1
        snap = Snapshot(user, prefs, channels)
        self._cache[user_id] = snap
        return snap

    async def last_active(self, user_id: str) -> datetime | None:
        """The user's presence heartbeat, read fresh (never cached)."""
        async with self.sessions() as session:
            value = (await session.exec(select(User.last_active_at).where(
                col(User.id) == user_id))).first()
        return as_utc(value) if value is not None else None

    async def subscribed(self, thread_id: str | None, user_id: str) -> bool:
        """True when ``user_id`` follows the thread rooted at ``thread_id``."""
        if thread_id is None:
            return False
        async with self.sessions() as session:
            row = await session.get(ThreadSubscription, (thread_id, user_id))
        return row is not None

    async def recipient(self, user_id: str) -> RecipientPrefs:
        """What the chart asks about ``user_id`` (defaults for a user herald does not know)."""
        snap = await self.snapshot(user_id)
        last_active = await self.last_active(user_id) if snap.user is not None else None
        return build_prefs(user_id, snap, last_active, self.activity_window, self.threshold)

    async def devices(self, user_id: str) -> tuple[DeviceInfo, ...]:
        """The user's registered push devices, oldest first, read fresh.

        Never from the cache: a token that moved to another account must not
        get this user's notifications for a TTL.
        """
        async with self.sessions() as session:
            rows = (await session.exec(select(Device).where(col(Device.user_id) == user_id)
                                       .order_by(col(Device.created_at)))).all()
        return tuple(DeviceInfo(d.id, d.platform, d.token) for d in rows)

    async def forget_device(self, device_id: str, user_id: str) -> bool:
        """Delete a device whose token the push service declared dead; True if it was there."""
        async with self.sessions() as session:
            row = await session.get(Device, device_id)
            if row is None:
                return False
            await session.delete(row)
            await session.commit()
        self.invalidate(user_id)
        return True

    async def listen(self, hub: LiveHub, ready: asyncio.Event | None = None) -> None:
        """Drop cached users as the API announces changes, until cancelled or ``hub`` closes.

        Reconnects after a broker failure (one warning per attempt); meanwhile
        the TTL bounds staleness. Ends at once when cancelled.
        """
        while not hub.closed:
            try:
                async with hub.subscribe(USER_CHANGED_PATTERN, gaps=True) as changes:
                    if ready is not None:
                        ready.set()
                    async for key, body in changes:
                        if key == GAP:  # invalidations sent while we were cut off are lost
                            self._cache.clear()
                            continue
                        user_id = body.get("user_id")
                        if isinstance(user_id, str):
                            self.invalidate(user_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if hub.closed:
                    return
                log.warning("cache invalidations unavailable (%s); relying on the TTL", exc)
                await asyncio.sleep(5)


def build_prefs(user_id: str, snap: Snapshot, last_active: datetime | None,
                activity_window: timedelta, threshold: timedelta) -> RecipientPrefs:
    """Turn stored rows into the engine's input. Pure; unknown stored values read as defaults."""
    user, prefs = snap.user, snap.prefs
    channel_prefs: dict[tuple[str, DeviceKind], ChannelPref] = {}
    muted: set[str] = set()
    suppressed: set[str] = set()
    for row in snap.channels:
        channel_prefs[(row.channel_id, DeviceKind.DESKTOP)] = _enum(
            ChannelPref, row.desktop, ChannelPref.DEFAULT)
        channel_prefs[(row.channel_id, DeviceKind.MOBILE)] = _enum(
            ChannelPref, row.mobile, ChannelPref.DEFAULT)
        if row.muted:
            muted.add(row.channel_id)
        if row.suppress_channel_mentions:
            suppressed.add(row.channel_id)
    dnd: DndSchedule | None = None
    global_prefs: dict[DeviceKind, GlobalPref] = {}
    words: frozenset[str] = frozenset()
    if prefs is not None:
        start, end = _clock(prefs.dnd_start), _clock(prefs.dnd_end)
        if start is None or end is None:
            start = end = None
        snooze = as_utc(prefs.snooze_until) if prefs.snooze_until else None
        if start is not None or snooze is not None:
            dnd = DndSchedule(start, end, snooze)
        global_prefs = {
            DeviceKind.DESKTOP: _enum(GlobalPref, prefs.desktop, GlobalPref.MENTIONS),
            DeviceKind.MOBILE: _enum(GlobalPref, prefs.mobile, GlobalPref.MENTIONS)}
        try:
            loaded = json.loads(prefs.highlight_words)
        except ValueError:
            loaded = []
        words = frozenset(w for w in loaded if isinstance(w, str)) if isinstance(
            loaded, list) else frozenset()
    timezone = user.timezone if user is not None else "UTC"
    try:
        return _prefs(user_id, timezone, dnd, prefs, muted, suppressed, channel_prefs,
                      global_prefs, words, last_active, activity_window, threshold)
    except ValueError as exc:  # a zone the API accepted but this machine's tzdata lacks
        log.warning("user %s: %s; using UTC", user_id, exc)
        return _prefs(user_id, "UTC", dnd, prefs, muted, suppressed, channel_prefs,
                      global_prefs, words, last_active, activity_window, threshold)


def _prefs(user_id: str, timezone: str, dnd: DndSchedule | None,
           prefs: UserPreferences | None, muted: set[str], suppressed: set[str],
           channel_prefs: dict[tuple[str, DeviceKind], ChannelPref],
           global_prefs: dict[DeviceKind, GlobalPref], words: frozenset[str],
           last_active: datetime | None, activity_window: timedelta,
           threshold: timedelta) -> RecipientPrefs:
    return RecipientPrefs(
        user_id=user_id, timezone=timezone, dnd=dnd,
        dnd_override_allowed=prefs.dnd_override_allowed if prefs is not None else True,
        muted_channels=frozenset(muted), suppress_channel_mentions=frozenset(suppressed),
        channel_prefs=channel_prefs,
        thread_everything=prefs.thread_everything if prefs is not None else False,
        global_prefs=global_prefs, highlight_words=words, last_active_at=last_active,
        activity_window=activity_window, mobile_push_threshold=threshold)
