"""One typed ``Settings`` for every herald process, read from ``HERALD_*`` variables.

Build it once with :func:`load_settings` and pass it down; nothing else in the
tree reads ``os.environ``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from herald.amqp import broker_urls
from herald.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$"
)
_RATE_SECONDS = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0,
}
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_duration(text: str) -> float:
    """Parse ``200ms``, ``1s``, ``2m``, ``1h`` or ``1d`` into seconds; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"invalid duration {text!r} (write it like 200ms, 1s, 5m, 1h)")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be greater than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration (``0.2`` → ``200ms``, ``60`` → ``1m``)."""
    ms = round(seconds * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


class Rate:
    """A rate cap such as ``25/s``: ``limit`` events per ``period`` seconds."""

    def __init__(self, limit: int, period: float) -> None:
        self.limit = limit
        self.period = period

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Parse ``25/s``, ``1500/min`` or ``10/h``; raise ValueError otherwise."""
        match = _RATE.match(text)
        if not match:
            raise ValueError(f"invalid rate {text!r} (write it like 25/s or 1500/min)")
        value = float(match.group(1))
        if value <= 0 or value != int(value):
            raise ValueError(f"rate {text!r} needs a whole number of messages above zero")
        return cls(int(value), _RATE_SECONDS[match.group(2)])

    @property
    def per_second(self) -> float:
        """Messages per second."""
        return self.limit / self.period

    def __str__(self) -> str:
        period = format_duration(self.period)
        if period[:1] == "1" and period[1:2].isalpha():
            period = period[1:]  # 25/s rather than 25/1s
        return f"{self.limit}/{period}"

    def __repr__(self) -> str:
        return f"Rate({self})"


def _delays(value: Any) -> Any:
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]
        if not parts:
            raise ValueError("give at least one delay, e.g. 1s,2s,4s")
        return [parse_duration(p) for p in parts]
    return value


def _rate(value: Any) -> Any:
    return Rate.parse(value) if isinstance(value, str) else value


def _database_url(url: str) -> str:
    """Map the URL a user writes to the async driver SQLAlchemy needs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a URL: {url!r} (e.g. sqlite:///var/herald.db)")
    base = scheme.split("+", 1)[0]
    if base == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    if base in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    raise ValueError(f"unsupported database {scheme!r}: use sqlite:/// or postgresql://")


def _smtp_url(url: str | None) -> str | None:
    if url is None or url == "":
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps", "smtp+starttls"):
        raise ValueError(f"scheme must be smtp, smtps or smtp+starttls, not {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("needs a host, e.g. smtp://user:pass@smtp.example.com:587")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"bad port in SMTP URL: {exc}") from None
    return url


def _http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL such as https://api.sendgrid.com, not {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"bad port in URL {url!r}: {exc}") from None
    return url


EMAIL_PROVIDERS = ("smtp", "sendgrid")
SMS_PROVIDERS = ("twilio", "vonage")


def _provider_list(known: tuple[str, ...], allow_empty: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, str):
            value = [p.strip().lower() for p in value.split(",") if p.strip()]
        if isinstance(value, list):
            if not value and not allow_empty:
                raise ValueError(f"name at least one provider, e.g. {','.join(known)}")
            unknown = [p for p in value if p not in known]
            if unknown:
                raise ValueError(f"unknown provider {unknown[0]!r}; known: {', '.join(known)}")
            if len(set(value)) != len(value):
                raise ValueError("a provider is listed twice")
        return value
    return check


_providers = _provider_list(EMAIL_PROVIDERS)


def _amqp_url(url: str) -> str:
    """One broker, or several for failover (``amqp://u:p@h1:5672,h2:5673/vhost``)."""
    broker_urls(url)  # raises ValueError naming the bad host entry, never the password
    return url


def _prefix(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", value):
        raise ValueError("letters, digits, '.', '-', '_' only (at most 64)")
    return value


Delays = Annotated[list[float], NoDecode, BeforeValidator(_delays)]
#: A duration setting written with a unit (``10s``, ``200ms``); plain numbers are seconds.
Duration = Annotated[float, NoDecode, BeforeValidator(
    lambda v: parse_duration(v) if isinstance(v, str) and not v.strip().replace(".", "", 1)
    .isdigit() else v)]
RateSetting = Annotated[Rate, NoDecode, BeforeValidator(_rate)]


def default_delays() -> list[float]:
    """1s doubling, one per retry: 1s, 2s, 4s … 512s for the default max_retry of 10."""
    return [float(2**i) for i in range(10)]


class Settings(BaseSettings):
    """Every knob herald has. Environment variables are ``HERALD_`` + the field name."""

    model_config = SettingsConfigDict(
        env_prefix="HERALD_",
        env_file=".env",
        extra="ignore",
        arbitrary_types_allowed=True,
    )

    #: Several brokers (a cluster's nodes) fail over in order from a random one:
    #: ``amqp://user:pass@host1:5672,host2:5672,host3/vhost`` (see ``herald.amqp``).
    amqp_url: Annotated[str, AfterValidator(_amqp_url)] = "amqp://guest:guest@localhost:5672/"
    database_url: str = "sqlite:///var/herald.db"
    prefix: Annotated[str, AfterValidator(_prefix)] = "herald"
    max_retry: int = Field(default=10, ge=0, le=1000)
    retry_delays: Delays = Field(default_factory=default_delays)
    delivery_limit: int = Field(default=5, ge=1, le=1000)
    max_defer: Duration = 86400.0

    smtp_url: Annotated[str | None, AfterValidator(_smtp_url)] = None
    smtp_timeout: Duration = 10.0
    email_from: str = "herald <no-reply@herald.local>"
    sendgrid_api_key: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    sendgrid_url: Annotated[str, AfterValidator(_http_url)] = "https://api.sendgrid.com"
    email_rate_limit: RateSetting = Field(default_factory=lambda: Rate(25, 1.0))
    sendgrid_rate_limit: Annotated[Rate | None, NoDecode, BeforeValidator(_rate)] = None
    email_providers: Annotated[list[str], NoDecode, BeforeValidator(_providers)] = Field(
        default_factory=lambda: ["smtp"])
    recipient_limit: Annotated[Rate | None, NoDecode, BeforeValidator(
        lambda v: None if v in ("", "0", "off", None) else _rate(v))] = None
    digest_interval: Duration = 60.0
    breaker_threshold: int = Field(default=5, ge=1, le=1000)
    breaker_cooldown: Duration = 30.0
    redis_url: str | None = None

    #: SMS providers in fallback order; empty: the dev sink (files under ``sms_dir``).
    sms_providers: Annotated[list[str], NoDecode, BeforeValidator(
        _provider_list(SMS_PROVIDERS, allow_empty=True))] = Field(default_factory=list)
    sms_rate_limit: RateSetting = Field(default_factory=lambda: Rate(10, 1.0))
    #: A longer text is cut at this many segments (with an ellipsis), never split further.
    sms_max_segments: int = Field(default=3, ge=1, le=10)
    twilio_account_sid: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    twilio_auth_token: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    twilio_from: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    twilio_url: Annotated[str, AfterValidator(_http_url)] = "https://api.twilio.com"
    vonage_api_key: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    vonage_api_secret: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    vonage_from: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    vonage_url: Annotated[str, AfterValidator(_http_url)] = "https://rest.nexmo.com"
    provider_timeout: Duration = 10.0

    #: Push: a platform without its provider configured goes to the dev sink (``push_dir``).
    push_rate_limit: RateSetting = Field(default_factory=lambda: Rate(100, 1.0))
    fcm_credentials_file: Path | None = None
    fcm_url: Annotated[str, AfterValidator(_http_url)] = "https://fcm.googleapis.com"
    apns_key_file: Path | None = None
    apns_key_id: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    apns_team_id: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    apns_topic: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    apns_url: Annotated[str, AfterValidator(_http_url)] = "https://api.push.apple.com"
    vapid_private_key_file: Path | None = None
    vapid_subject: str = "mailto:admin@herald.local"
    #: The chart's M2: a mobile push waits this long for the user to see it elsewhere.
    mobile_push_threshold: Duration = 120.0
    #: J5: a user active within this window counts as present.
    activity_window: Duration = 600.0
    #: How long a worker trusts a cached user (prefs, contacts) without an invalidation.
    user_cache_ttl: Duration = 30.0

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    #: Bearer token of ``POST /events`` (service integrations); unset disables the route.
    service_token: Annotated[str | None, AfterValidator(lambda v: v or None)] = None
    #: How long an ``Idempotency-Key`` answer is replayed; after that the key is free again.
    idempotency_ttl: Duration = 86400.0
    #: How long a bearer token from ``POST /login`` is accepted.
    token_ttl: Duration = 86400.0
    #: argon2id parameters of new password hashes (default: OWASP's minimum). Old hashes
    #: keep verifying (their parameters are in them) and are upgraded at login. The floor
    #: is OWASP's smallest recommended memory (7 MiB, with t=5).
    argon2_memory_kib: int = Field(default=19456, ge=7168, le=1_048_576)
    argon2_time_cost: int = Field(default=2, ge=1, le=100)
    argon2_parallelism: int = Field(default=1, ge=1, le=64)
    #: The longest a signup or login waits for a hashing slot (one per CPU), then 503.
    hash_wait: Duration = Field(default=2.0, gt=0, le=3600)
    prefetch: int = Field(default=10, ge=1, le=10_000)
    concurrency: int = Field(default=10, ge=1, le=10_000)
    #: The most messages a worker handles at once when a slow provider needs more than
    #: ``concurrency`` to reach its rate cap (in flight = rate x latency).
    max_concurrency: int = Field(default=200, ge=1, le=10_000)
    shutdown_timeout: Duration = 10.0
    relay_interval: Duration = 0.2
    relay_batch: int = Field(default=100, ge=1, le=10_000)
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)

    templates_dir: Path = REPO_ROOT / "templates"
    mail_dir: Path = Path("var/mail")
    push_dir: Path = Path("var/push")
    sms_dir: Path = Path("var/sms")
    mailsink_port: int = Field(default=1025, ge=1, le=65535)
    log_level: str = "INFO"
    sentry_dsn: str | None = None

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        return _database_url(value)

    @model_validator(mode="after")
    def _providers_configured(self) -> Settings:
        if "sendgrid" in self.email_providers and not self.sendgrid_api_key:
            raise ValueError("HERALD_SENDGRID_API_KEY: required when HERALD_EMAIL_PROVIDERS "
                             "includes sendgrid")
        required = {
            "twilio": ("twilio_account_sid", "twilio_auth_token", "twilio_from"),
            "vonage": ("vonage_api_key", "vonage_api_secret", "vonage_from"),
        }
        for provider in self.sms_providers:
            for name in required[provider]:
                if not getattr(self, name):
                    raise ValueError(f"HERALD_{name.upper()}: required when "
                                     f"HERALD_SMS_PROVIDERS includes {provider}")
        apns = ("apns_key_id", "apns_team_id", "apns_topic")
        if self.apns_key_file is not None:
            for name in apns:
                if not getattr(self, name):
                    raise ValueError(f"HERALD_{name.upper()}: required when "
                                     "HERALD_APNS_KEY_FILE is set")
        for name in ("fcm_credentials_file", "apns_key_file", "vapid_private_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"HERALD_{name.upper()}: no such file {str(path)!r}")
        return self

    def rate_for(self, provider: str) -> Rate:
        """The cap of a provider: its own setting, else its channel's rate limit."""
        if provider in SMS_PROVIDERS:
            return self.sms_rate_limit
        if provider in ("fcm", "apns", "webpush"):
            return self.push_rate_limit
        own = self.sendgrid_rate_limit if provider == "sendgrid" else None
        return own or self.email_rate_limit

    def retry_delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based); the last delay repeats."""
        return self.retry_delays[min(retry, len(self.retry_delays)) - 1]

    def tier_delays(self) -> list[float]:
        """The distinct delays used by retries 1..max_retry, in order (never empty).

        The first delay is always there: a rate-limited message waits in a
        tier even when ``max_retry`` is 0.
        """
        seen: list[float] = [self.retry_delay(1)]
        for retry in range(1, self.max_retry + 1):
            delay = self.retry_delay(retry)
            if delay not in seen:
                seen.append(delay)
        return seen


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment (and ``overrides``).

    Raises:
        ConfigError: one line naming the first invalid ``HERALD_`` variable.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"]:  # a check across fields names its variables itself
            raise ConfigError(msg) from None
        raise ConfigError(f"HERALD_{str(err['loc'][0]).upper()}: {msg}") from None
