"""Request and response models of the social routes: profile, preferences, devices, channels,
posts and friend requests (``producer.me``, ``producer.social``).

The preference values repeat the decision engine's enums (``consumers.decide``
``GlobalPref``/``ChannelPref``) as literals: the producer never imports the consumers.
"""

from __future__ import annotations

import functools
import json
import re
import zoneinfo
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi.exceptions import RequestValidationError
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from herald.phones import normalise_phone
from herald.validation import display_name, one_line, text
from producer.mentions import HANDLE_PATTERN, SPECIAL, is_valid_handle


def strip_name(value: str) -> str:
    """``value`` by :func:`herald.validation.display_name`: the one rule for user and channel
    names, the one the email worker addresses messages by (stripped, one line, no ``<>``).

    Raises:
        ValueError: blank, too long, a control character, ``<`` or ``>``.
    """
    return display_name(value)


#: H1: a user's global notification pref per device kind (``consumers.decide.GlobalPref``).
GlobalPrefName = Literal["all", "mentions", "dms", "highlight_words", "never"]
#: F1: a member's pref for one channel per device kind (``consumers.decide.ChannelPref``).
ChannelPrefName = Literal["nothing", "everything", "mentions", "default"]
Platform = Literal["android", "ios", "web"]

LOCALE_PATTERN = r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$"
_LOCALE = re.compile(LOCALE_PATTERN)
_HHMM = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"
MAX_HIGHLIGHT_WORDS = 50
MAX_TOKEN = 4096


def _one_line_or_none(value: str | None) -> str | None:
    return None if value is None else one_line(value)


#: A row id in a body (UUID text): bounded like the columns, one line (no NUL: PostgreSQL
#: refuses it in a query, which would be a 500).
RowId = Annotated[str, Field(min_length=1, max_length=36), AfterValidator(one_line)]


def field_error(field: str, message: str, where: str = "body") -> RequestValidationError:
    """A 422 whose ``detail[0].loc`` is ``[where, field]``, for checks a model cannot make alone."""
    return RequestValidationError([{"loc": (where, field), "msg": message, "type": "value_error"}])


def _handle(value: str) -> str:
    value = value.strip().lower()
    if value in SPECIAL:
        raise ValueError(f"@{value} is reserved (it mentions everyone in a channel)")
    if not is_valid_handle(value):
        raise ValueError("a handle is 2-40 characters: lowercase letters, digits, '.', '_' "
                         "and '-', starting with a letter or digit")
    return value


def _locale(value: str) -> str:
    value = value.strip()
    if len(value) > 20 or not _LOCALE.match(value):
        raise ValueError("a locale is a language tag like en, fr or fr-CA (at most 20 "
                         "characters)")
    return value.replace("_", "-").lower()


@functools.cache
def _zones() -> dict[str, str]:
    # Files in the zoneinfo tree that name no place (or this host's own zone).
    not_zones = {"localtime", "posixrules", "factory"}
    return {z.lower(): z for z in zoneinfo.available_timezones() if z.lower() not in not_zones}


def _timezone(value: str) -> str:
    zone = _zones().get(value.strip().lower())
    if zone is None:
        raise ValueError("not an IANA time zone (like Europe/Paris or UTC)")
    return zone


#: Lowercased; :data:`producer.mentions.HANDLE_PATTERN`, not ``channel``/``everyone``/``here``.
Handle = Annotated[str, AfterValidator(_handle), Field(
    max_length=60, description=f"Lowercased, then `{HANDLE_PATTERN}`; what `@handle` matches.",
    examples=["ada"])]
#: E.164 after :func:`herald.phones.normalise_phone`.
Phone = Annotated[str, AfterValidator(normalise_phone), Field(
    max_length=40, description="With + and the country code; stored as E.164.",
    examples=["+14155550100"])]
Locale = Annotated[str, AfterValidator(_locale), Field(
    max_length=40, description="A language tag; stored lowercase with '-' (fr_CA: fr-ca).",
    examples=["fr-CA"])]
TimeZone = Annotated[str, AfterValidator(_timezone), Field(
    max_length=60, description="An IANA time zone; do-not-disturb hours are in this zone.",
    examples=["Europe/Paris"])]


def _not_null(value: Any, info: ValidationInfo) -> Any:
    if value is None:
        raise ValueError(f"{info.field_name} may be left out but not null")
    return value


class UserRef(BaseModel):
    """Another user as the social routes show them: no contact details."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "0b5d3c1e-8f0a-4e8e-9a57-3f1b2c4d5e6f", "name": "Bob", "handle": "bob"}]})

    id: str
    name: str
    handle: str | None


# --- profile -----------------------------------------------------------------------------


class MeUpdate(BaseModel):
    """``PATCH /me`` body: only the fields given change; ``phone: null`` removes the number."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"handle": "ada.l", "phone": "+44 20 7946 0958", "locale": "en-GB",
         "timezone": "Europe/London"},
        {"phone": None}]})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    handle: Handle | None = None
    phone: Phone | None = None
    locale: Locale | None = None
    timezone: TimeZone | None = None

    _required = field_validator("name", "handle", "locale", "timezone")(_not_null)

    _name = field_validator("name")(strip_name)


class PresenceOut(BaseModel):
    """The user's last heartbeat (``null``: never)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"last_active_at": "2025-05-01T12:30:00Z"}]})

    last_active_at: datetime | None


# --- preferences -------------------------------------------------------------------------


class DndWindow(BaseModel):
    """A daily do-not-disturb window in the user's time zone; wraps midnight when end < start."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"start": "22:00", "end": "07:00"}]})

    start: str = Field(pattern=_HHMM, description="HH:MM, 24-hour clock.")
    end: str = Field(pattern=_HHMM, description="HH:MM, 24-hour clock; not equal to start.")

    @model_validator(mode="after")
    def _not_empty(self) -> DndWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty "
                             "(send dnd: null to turn do-not-disturb off)")
        return self


class PreferencesOut(BaseModel):
    """Every global notification setting with its effective value (defaults until changed)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "dnd": {"start": "22:00", "end": "07:00"}, "snooze_until": None,
        "dnd_override_allowed": True, "thread_everything": False, "desktop": "all",
        "mobile": "mentions", "highlight_words": ["deploy", "outage"],
        "sms_login_alerts": False}]})

    dnd: DndWindow | None
    snooze_until: datetime | None
    dnd_override_allowed: bool
    thread_everything: bool
    desktop: GlobalPrefName
    mobile: GlobalPrefName
    highlight_words: list[str]
    sms_login_alerts: bool


class PreferencesUpdate(BaseModel):
    """``PATCH /me/preferences`` body: fields left out keep their value."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"dnd": {"start": "22:00", "end": "07:00"}, "desktop": "all",
         "highlight_words": ["deploy", "outage"]},
        {"snooze_minutes": 60},
        {"dnd": None, "snooze_until": None}]})

    dnd: DndWindow | None = Field(default=None, description="null: no daily window.")
    snooze_until: AwareDatetime | None = Field(
        default=None, description="Pause notifications until then (with a time zone); null: "
                                  "resume. Not with `snooze_minutes`.")
    snooze_minutes: int | None = Field(
        default=None, ge=1, le=1440, description="Pause notifications for this many minutes "
                                                 "from now (sets `snooze_until`).")
    dnd_override_allowed: bool | None = Field(
        default=None, description="Let critical events break through do-not-disturb.")
    thread_everything: bool | None = None
    desktop: GlobalPrefName | None = None
    mobile: GlobalPrefName | None = None
    highlight_words: list[str] | None = Field(
        default=None, max_length=MAX_HIGHLIGHT_WORDS,
        description=f"At most {MAX_HIGHLIGHT_WORDS} words of 1-50 characters; "
                    "duplicates (ignoring case) are dropped.")
    sms_login_alerts: bool | None = None

    _required = field_validator(
        "snooze_minutes", "dnd_override_allowed", "thread_everything", "desktop", "mobile",
        "highlight_words", "sms_login_alerts")(_not_null)

    @field_validator("highlight_words")
    @classmethod
    def _words(cls, value: list[str]) -> list[str]:
        words: list[str] = []
        seen: set[str] = set()
        for raw in value:
            word = one_line(raw.strip())
            if not 1 <= len(word) <= 50:
                raise ValueError("each highlight word is 1-50 characters (after stripping)")
            if word.casefold() not in seen:
                seen.add(word.casefold())
                words.append(word)
        return words


class ChannelPrefsOut(BaseModel):
    """One member's settings for one channel, with their effective values."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "channel_id": "3f2a9c4e-1b7d-4e0a-8c55-6d9e0f1a2b3c", "muted": False,
        "suppress_channel_mentions": True, "desktop": "everything", "mobile": "default"}]})

    channel_id: str
    muted: bool
    suppress_channel_mentions: bool
    desktop: ChannelPrefName
    mobile: ChannelPrefName


class ChannelPrefsUpdate(BaseModel):
    """``PATCH /me/channels/{channel_id}/preferences`` body: fields left out keep their value."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"muted": True}, {"suppress_channel_mentions": True, "mobile": "mentions"}]})

    muted: bool | None = None
    suppress_channel_mentions: bool | None = Field(
        default=None, description="@channel/@everyone/@here here do not notify by themselves.")
    desktop: ChannelPrefName | None = None
    mobile: ChannelPrefName | None = None

    _required = field_validator(
        "muted", "suppress_channel_mentions", "desktop", "mobile")(_not_null)


# --- devices -----------------------------------------------------------------------------


def _ios_token(token: object) -> str:
    if not isinstance(token, str) or not re.fullmatch(r"[0-9A-Fa-f]{64,200}", token.strip()):
        raise ValueError("an iOS (APNs) device token is 64 or more hex characters")
    return token.strip().lower()


def _android_token(token: object) -> str:
    if not isinstance(token, str) or not token.strip():
        raise ValueError("an Android (FCM) registration token is a non-empty string")
    token = token.strip()
    if len(token) > MAX_TOKEN or any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"an FCM token has no spaces or control characters and at most "
                         f"{MAX_TOKEN} characters")
    return token


def _web_endpoint(endpoint: object) -> str:
    if not isinstance(endpoint, str) or len(endpoint) > 2048:
        raise ValueError("the push subscription needs an endpoint URL")
    one_line(endpoint)  # a NUL or line break in a URL we will POST to: refused
    url = urlsplit(endpoint)
    local = url.hostname in ("127.0.0.1", "localhost")
    if not url.hostname or not (url.scheme == "https" or (url.scheme == "http" and local)):
        raise ValueError("the push subscription's endpoint must be an https URL "
                         "(http only for 127.0.0.1 or localhost)")
    return endpoint


def _web_token(token: object) -> str:
    if isinstance(token, str):
        if len(token) > MAX_TOKEN:
            raise ValueError(f"the push subscription is longer than {MAX_TOKEN} characters")
        try:
            token = json.loads(token)
        except ValueError:
            raise ValueError("a web token is the browser's PushSubscription JSON "
                             "(an object or its JSON text)") from None
    if not isinstance(token, dict):
        raise ValueError("a web token is the browser's PushSubscription JSON: "
                         "{endpoint, keys: {p256dh, auth}}")
    endpoint = _web_endpoint(token.get("endpoint"))
    keys = token.get("keys")
    if not isinstance(keys, dict):
        raise ValueError("the push subscription needs keys {p256dh, auth}")
    for name in ("p256dh", "auth"):
        key = keys.get(name)
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,200}={0,2}", key):
            raise ValueError(f"keys.{name} must be a base64url string")
    subscription = {"endpoint": endpoint, "keys": {"p256dh": keys["p256dh"],
                                                   "auth": keys["auth"]}}
    return json.dumps(subscription, separators=(",", ":"))


_TOKEN_CHECKS = {"ios": _ios_token, "android": _android_token, "web": _web_token}


class DeviceIn(BaseModel):
    """``POST /me/devices`` body: where push notifications for this user go."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"platform": "android", "token": "fcm-registration-token-from-the-app", "name": "Pixel"},
        {"platform": "ios", "token": "a1" * 32, "name": "iPhone"},
        {"platform": "web", "name": "Firefox", "token": {
            "endpoint": "https://updates.push.services.mozilla.com/wpush/v2/gAAAA",
            "keys": {"p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-"
                               "Ts1XbjhazAkj7I99e8QcYP7DkM", "auth": "tBHItJI5svbpez7KI4CCXg"}}},
    ]})

    platform: Platform
    token: str | dict[str, Any] = Field(description=(
        "ios: the APNs device token (hex); android: the FCM registration token; web: the "
        "browser's PushSubscription ({endpoint, keys: {p256dh, auth}}) as an object or "
        "JSON text."))
    name: str | None = Field(default=None, max_length=100, description="For the device list.")

    _name = field_validator("name")(_one_line_or_none)

    @field_validator("token")
    @classmethod
    def _token(cls, value: str | dict[str, Any], info: ValidationInfo) -> str:
        platform = info.data.get("platform")
        if platform is None:  # already refused: the platform decides what a token is
            return str(value)
        return _TOKEN_CHECKS[platform](value)


class DeviceOut(BaseModel):
    """A registered device; the token shows only its last 6 characters."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f", "platform": "android",
        "token": "…9fKx2Q", "name": "Pixel", "created_at": "2025-05-01T12:30:00Z"}]})

    id: str
    platform: str
    token: str = Field(description="Masked: the last 6 characters (web: of the endpoint).")
    name: str | None
    created_at: datetime


# --- channels and posts ------------------------------------------------------------------


class ChannelIn(BaseModel):
    """``POST /channels`` body; the creator is always a member."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "general", "member_ids": ["0b5d3c1e-8f0a-4e8e-9a57-3f1b2c4d5e6f"]},
        {"name": "ada & bob", "member_ids": ["0b5d3c1e-8f0a-4e8e-9a57-3f1b2c4d5e6f"],
         "is_dm": True}]})

    name: str = Field(min_length=1, max_length=80)
    member_ids: list[Annotated[str, Field(max_length=36), AfterValidator(one_line)]] = Field(
        default_factory=list, max_length=1000, description="Other members' user ids.")
    is_dm: bool = Field(default=False, description="A direct message: exactly one other member.")

    _name = field_validator("name")(strip_name)


class MemberIn(BaseModel):
    """``POST /channels/{channel_id}/members`` body."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"user_id": "0b5d3c1e-8f0a-4e8e-9a57-3f1b2c4d5e6f"}]})

    user_id: RowId


class ChannelSummary(BaseModel):
    """A channel the user is in."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3f2a9c4e-1b7d-4e0a-8c55-6d9e0f1a2b3c", "name": "general", "is_dm": False,
        "created_by": "0b5d3c1e-8f0a-4e8e-9a57-3f1b2c4d5e6f",
        "created_at": "2025-05-01T12:30:00Z", "member_count": 2}]})

    id: str
    name: str
    is_dm: bool
    created_by: str
    created_at: datetime
    member_count: int


class ChannelDetail(ChannelSummary):
    """A channel with its members."""

    members: list[UserRef]


class PostIn(BaseModel):
    """``POST /post`` body: a message, or a reply when ``thread_id`` names a top-level post."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"channel_id": "3f2a9c4e-1b7d-4e0a-8c55-6d9e0f1a2b3c", "text": "@bob lunch?"},
        {"channel_id": "3f2a9c4e-1b7d-4e0a-8c55-6d9e0f1a2b3c", "text": "yes!",
         "thread_id": "9d8c7b6a-5f4e-4d3c-2b1a-0f9e8d7c6b5a"}]})

    channel_id: RowId
    text: str = Field(min_length=1, max_length=4000, description=(
        "Line breaks (CR LF, CR: stored as LF) and tabs; no other control characters."))
    thread_id: RowId | None = None

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = text(value, multiline=True)
        if not value.strip():
            raise ValueError("text must not be blank")
        return value


class PostOut(BaseModel):
    """A post; ``thread_id`` is its thread's root post (null: top level)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "9d8c7b6a-5f4e-4d3c-2b1a-0f9e8d7c6b5a",
        "channel_id": "3f2a9c4e-1b7d-4e0a-8c55-6d9e0f1a2b3c",
        "author_id": "0b5d3c1e-8f0a-4e8e-9a57-3f1b2c4d5e6f", "text": "@bob lunch?",
        "thread_id": None, "created_at": "2025-05-01T12:30:00Z"}]})

    id: str
    channel_id: str
    author_id: str
    text: str
    thread_id: str | None
    created_at: datetime


class PostAccepted(BaseModel):
    """What ``POST /post`` answers; ``event_id`` is null when nobody else is in the channel."""

    post: PostOut
    event_id: str | None


class PostPage(BaseModel):
    """Posts newest first; pass ``next_before`` as ``before`` for the next page."""

    items: list[PostOut]
    next_before: str | None = Field(description="null on the last page.")


# --- friend requests ---------------------------------------------------------------------


class FriendRequestIn(BaseModel):
    """``POST /friend-req`` (alias ``/send_req``) body."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"to_user_id": "0b5d3c1e-8f0a-4e8e-9a57-3f1b2c4d5e6f"}]})

    to_user_id: RowId


class FriendRequestOut(BaseModel):
    """A friend request: pending, accepted or declined."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "1e2d3c4b-5a69-4788-97a6-b5c4d3e2f1a0",
        "from_user": {"id": "0b5d3c1e-8f0a-4e8e-9a57-3f1b2c4d5e6f", "name": "Ada",
                      "handle": "ada"},
        "to_user": {"id": "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d", "name": "Bob",
                    "handle": "bob"},
        "status": "pending", "created_at": "2025-05-01T12:30:00Z"}]})

    id: str
    from_user: UserRef
    to_user: UserRef
    status: Literal["pending", "accepted", "declined"]
    created_at: datetime


class FriendRequestAccepted(BaseModel):
    """What ``POST /friend-req`` answers: the request and its ``user.send_req`` event."""

    request: FriendRequestOut
    event_id: str


class FriendRequestList(BaseModel):
    """``GET /me/friend-requests``: to the user and from them, newest first."""

    incoming: list[FriendRequestOut]
    outgoing: list[FriendRequestOut]
