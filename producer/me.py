"""The signed-in user's own records: profile, notification preferences, devices and presence.

Every route acts on the bearer token's user only; a device id of someone
else answers 404 exactly like one that does not exist. A change to anything a
worker caches (contacts, preferences, devices) is announced with
:func:`producer.deps.user_changed` after it commits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from datetime import UTC, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Response, status
from pydantic import AfterValidator
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.models import (
    ChannelPreferences,
    Device,
    User,
    UserPreferences,
    as_utc,
    utcnow,
)
from herald.validation import one_line
from producer import auth, social
from producer.auth import CurrentUser
from producer.deps import LiveDep, SessionsDep, user_changed
from producer.mentions import is_valid_handle
from producer.schemas import UserPublic
from producer.social_schemas import (
    ChannelPrefsOut,
    ChannelPrefsUpdate,
    DeviceIn,
    DeviceOut,
    DndWindow,
    MeUpdate,
    PreferencesOut,
    PreferencesUpdate,
    PresenceOut,
    field_error,
)

router = APIRouter(prefix="/me", tags=["me"], responses=auth.RESPONSES)

_HANDLE_TAKEN = "handle already taken"
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"description": _HANDLE_TAKEN}}
_DEVICE_404: dict[int | str, dict[str, Any]] = {404: {"description": "no such device of yours"}}
DeviceId = Annotated[str, Path(max_length=36, description="The device's `id`."),
                     AfterValidator(one_line)]


def public_user(user: User) -> UserPublic:
    """``user`` as the API shows them to themselves (contact details included, no hash)."""
    return UserPublic(id=user.id, email=user.email, name=user.name, handle=user.handle,
                      phone=user.phone, locale=user.locale, timezone=user.timezone)


# --- handles -----------------------------------------------------------------------------


def _handle_base(email: str) -> str:
    local = email.split("@", 1)[0].lower()
    base = re.sub(r"[^a-z0-9._-]+", "", local)
    base = re.sub(r"^[^a-z0-9]+", "", base)[:36].rstrip("._-")
    return base or "user"


async def claim_handle(session: AsyncSession, wanted: str | None, email: str,
                       user_id: str | None = None) -> str:
    """``wanted`` if no other user has it, else 409; without one, a free handle from ``email``.

    The derived handle is the address's local part with what a handle cannot
    hold removed, then ``2``, ``3``, ... appended until free. Another
    transaction may take it before commit: the unique index then refuses
    the insert (``IntegrityError``) and the caller retries.
    """
    if wanted is not None:
        taken = (await session.exec(select(User.id).where(
            col(User.handle) == wanted, col(User.id) != (user_id or "")))).first()
        if taken is not None:
            raise HTTPException(status.HTTP_409_CONFLICT, _HANDLE_TAKEN)
        return wanted
    base = _handle_base(email)
    used = set((await session.exec(select(User.handle).where(
        col(User.handle).startswith(base, autoescape=True)))).all())
    if is_valid_handle(base) and base not in used:
        return base
    n = 2
    while not is_valid_handle(f"{base}{n}") or f"{base}{n}" in used:
        n += 1
    return f"{base}{n}"


# --- profile -----------------------------------------------------------------------------


@router.get("")
async def get_me(user: CurrentUser) -> UserPublic:
    """The user's own record, contact details in full."""
    return public_user(user)


@router.patch("", responses=_CONFLICT)
async def update_me(body: MeUpdate, user: CurrentUser, sessions: SessionsDep,
                    live: LiveDep) -> UserPublic:
    """Change name, handle, phone (``null`` removes it), locale or time zone; others stay."""
    changes = body.model_dump(include=body.model_fields_set)
    try:
        async with sessions() as session, session.begin():
            row = await session.get(User, user.id)
            if row is None:  # deleted since the token was checked
                raise HTTPException(status.HTTP_401_UNAUTHORIZED, "no such user")
            if "handle" in changes:
                await claim_handle(session, changes["handle"], row.email, row.id)
            for name, value in changes.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
            session.add(row)
    except IntegrityError:
        raise HTTPException(status.HTTP_409_CONFLICT, _HANDLE_TAKEN) from None
    if changes:
        await user_changed(live, user.id)
    return public_user(row)


# --- global preferences ------------------------------------------------------------------


def _preferences(row: UserPreferences | None) -> PreferencesOut:
    row = row or UserPreferences(user_id="")
    dnd = (DndWindow(start=row.dnd_start, end=row.dnd_end)
           if row.dnd_start and row.dnd_end else None)
    try:
        words = json.loads(row.highlight_words)
    except ValueError:
        words = []
    return PreferencesOut(
        dnd=dnd, snooze_until=as_utc(row.snooze_until) if row.snooze_until else None,
        dnd_override_allowed=row.dnd_override_allowed, thread_everything=row.thread_everything,
        desktop=row.desktop,
        mobile=row.mobile,
        highlight_words=[w for w in words if isinstance(w, str)] if isinstance(words, list)
        else [], sms_login_alerts=row.sms_login_alerts)


@router.get("/preferences")
async def get_preferences(user: CurrentUser, sessions: SessionsDep) -> PreferencesOut:
    """Every global notification setting with its effective value (defaults until changed)."""
    async with sessions() as session:
        return _preferences(await session.get(UserPreferences, user.id))


def _apply_preferences(row: UserPreferences, body: PreferencesUpdate) -> None:
    given = body.model_fields_set
    if "dnd" in given:
        row.dnd_start, row.dnd_end = (body.dnd.start, body.dnd.end) if body.dnd else (None, None)
    if "snooze_until" in given:
        row.snooze_until = body.snooze_until.astimezone(UTC) if body.snooze_until else None
    if body.snooze_minutes is not None:
        row.snooze_until = utcnow() + timedelta(minutes=body.snooze_minutes)
    if body.highlight_words is not None:
        row.highlight_words = json.dumps(body.highlight_words, ensure_ascii=False)
    for name in ("dnd_override_allowed", "thread_everything", "desktop", "mobile",
                 "sms_login_alerts"):
        value = getattr(body, name)
        if value is not None:
            setattr(row, name, value)
    row.updated_at = utcnow()


@router.patch("/preferences")
async def update_preferences(body: PreferencesUpdate, user: CurrentUser, sessions: SessionsDep,
                             live: LiveDep) -> PreferencesOut:
    """Change the settings given; the others keep their value. ``snooze_minutes`` sets
    ``snooze_until`` to now plus that many minutes (not both in one request)."""
    if {"snooze_until", "snooze_minutes"} <= body.model_fields_set:
        raise field_error("snooze_minutes", "give snooze_until or snooze_minutes, not both")
    for attempt in (1, 2):  # the row is made on first write; a concurrent first write wins
        try:
            async with sessions() as session, session.begin():
                row = (await session.get(UserPreferences, user.id)
                       or UserPreferences(user_id=user.id))
                _apply_preferences(row, body)
                session.add(row)
            break
        except IntegrityError:
            if attempt == 2:
                raise
    await user_changed(live, user.id)
    return _preferences(row)


# --- channel preferences -----------------------------------------------------------------


def _channel_prefs(channel_id: str, row: ChannelPreferences | None) -> ChannelPrefsOut:
    row = row or ChannelPreferences(user_id="", channel_id=channel_id)
    return ChannelPrefsOut(
        channel_id=channel_id, muted=row.muted,
        suppress_channel_mentions=row.suppress_channel_mentions,
        desktop=row.desktop,
        mobile=row.mobile)


@router.get("/channels/{channel_id}/preferences", responses=social.MEMBER_RESPONSES)
async def get_channel_preferences(channel_id: social.ChannelId, user: CurrentUser,
                                  sessions: SessionsDep) -> ChannelPrefsOut:
    """The user's settings for a channel they are in (defaults until changed)."""
    async with sessions() as session:
        await social.require_member(session, channel_id, user.id)
        return _channel_prefs(channel_id, await session.get(
            ChannelPreferences, (user.id, channel_id)))


@router.patch("/channels/{channel_id}/preferences", responses=social.MEMBER_RESPONSES)
async def update_channel_preferences(
    channel_id: social.ChannelId, body: ChannelPrefsUpdate, user: CurrentUser,
    sessions: SessionsDep, live: LiveDep,
) -> ChannelPrefsOut:
    """Change the settings given for a channel the user is in; the others keep their value."""
    for attempt in (1, 2):
        try:
            async with sessions() as session, session.begin():
                await social.require_member(session, channel_id, user.id)
                row = (await session.get(ChannelPreferences, (user.id, channel_id))
                       or ChannelPreferences(user_id=user.id, channel_id=channel_id))
                for name, value in body.model_dump(exclude_none=True).items():
                    setattr(row, name, value)
                row.updated_at = utcnow()
                session.add(row)
            break
        except IntegrityError:
            if attempt == 2:
                raise
    await user_changed(live, user.id)
    return _channel_prefs(channel_id, row)


# --- devices -----------------------------------------------------------------------------


def _device(row: Device) -> DeviceOut:
    shown = row.token
    if row.platform == "web":
        with contextlib.suppress(ValueError, KeyError, TypeError):
            shown = str(json.loads(row.token)["endpoint"])
    return DeviceOut(id=row.id, platform=row.platform, token=f"…{shown[-6:]}", name=row.name,
                     created_at=as_utc(row.created_at))


@router.post("/devices", status_code=status.HTTP_201_CREATED, responses={
    200: {"description": "the token was registered already (by you, or by another account "
                         "it now moves from)", "model": DeviceOut}})
async def add_device(body: DeviceIn, user: CurrentUser, sessions: SessionsDep, live: LiveDep,
                     response: Response) -> DeviceOut:
    """Register a device for push notifications (201).

    A token registered before (same platform and token) belongs to whoever
    registered it last: it moves to this user, the other account's row is
    deleted, and the answer is 200.
    """
    assert isinstance(body.token, str)  # DeviceIn's validator made it canonical text
    token_hash = hashlib.sha256(body.token.encode()).hexdigest()
    for attempt in (1, 2):  # a concurrent registration of the same token: look again
        try:
            async with sessions() as session, session.begin():
                existing = (await session.exec(select(Device).where(
                    col(Device.platform) == body.platform,
                    col(Device.token_hash) == token_hash))).first()
                previous = existing.user_id if existing else None
                if existing is not None and existing.user_id == user.id:
                    row = existing
                    row.name = body.name if body.name is not None else row.name
                else:
                    if existing is not None:
                        await session.delete(existing)
                        await session.flush()  # the unique key is free before the insert
                    row = Device(user_id=user.id, platform=body.platform, token=body.token,
                                 token_hash=token_hash, name=body.name)
                session.add(row)
            break
        except IntegrityError:
            if attempt == 2:
                raise
    if previous is not None:
        response.status_code = status.HTTP_200_OK
    await user_changed(live, user.id)
    if previous is not None and previous != user.id:
        await user_changed(live, previous)
    return _device(row)


@router.get("/devices")
async def list_devices(user: CurrentUser, sessions: SessionsDep) -> list[DeviceOut]:
    """The user's devices, oldest first, tokens masked."""
    async with sessions() as session:
        found = (await session.exec(select(Device).where(col(Device.user_id) == user.id)
                                    .order_by(col(Device.created_at), col(Device.id)))).all()
    return [_device(row) for row in found]


@router.delete("/devices/{device_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses=_DEVICE_404)
async def delete_device(device_id: DeviceId, user: CurrentUser, sessions: SessionsDep,
                        live: LiveDep) -> None:
    """Stop pushing to a device of the user's."""
    async with sessions() as session, session.begin():
        row = await session.get(Device, device_id)
        if row is None or row.user_id != user.id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such device")
        await session.delete(row)
    await user_changed(live, user.id)


# --- presence ----------------------------------------------------------------------------


@router.post("/presence")
async def heartbeat(user: CurrentUser, sessions: SessionsDep) -> PresenceOut:
    """Record that the user is active now (clients call it every minute or so while in use)."""
    now = utcnow()
    async with sessions() as session, session.begin():
        await session.exec(update(User).where(col(User.id) == user.id)
                           .values(last_active_at=now))
    return PresenceOut(last_active_at=now)


@router.get("/presence")
async def get_presence(user: CurrentUser) -> PresenceOut:
    """The user's last heartbeat (``null`` before the first)."""
    return PresenceOut(
        last_active_at=as_utc(user.last_active_at) if user.last_active_at else None)
