"""Pure logic, no services: settings, retry planning, templates, log masking, SMTP replies."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from consumers.providers.smtp import SmtpProvider, classify
from consumers.retry import DeadLetter, Retry, plan
from consumers.templates import Renderer
from herald.errors import (
    ConfigError,
    DeliveryInProgress,
    PermanentError,
    RateLimited,
    RecipientError,
    TransientError,
)
from herald.logs import MaskingFilter, mask
from herald.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def _no_herald_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Defaults are defaults: no ``HERALD_*`` variable or ``.env`` of the machine leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("HERALD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # Settings reads ./.env


def _settings(**overrides: Any) -> Settings:
    return load_settings(**overrides)


# --- settings --------------------------------------------------------------------------


def test_retry_delays_parse_durations_and_the_last_repeats() -> None:
    s = _settings(retry_delays="200ms,1s,2s,4s", max_retry=6)
    assert s.retry_delays == [0.2, 1.0, 2.0, 4.0]
    assert [s.retry_delay(n) for n in range(1, 7)] == [0.2, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert s.tier_delays() == [0.2, 1.0, 2.0, 4.0]


def test_retry_delays_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_RETRY_DELAYS", "200ms, 1s ,2s,4s")
    monkeypatch.setenv("HERALD_MAX_RETRY", "3")
    s = load_settings()
    assert s.retry_delays == [0.2, 1.0, 2.0, 4.0]
    assert s.max_retry == 3
    # Only the delays retries 1..3 use get a tier queue.
    assert s.tier_delays() == [0.2, 1.0, 2.0]


def test_default_delays_double_from_1s_to_512s() -> None:
    s = _settings()
    assert s.max_retry == 10
    assert s.retry_delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert s.retry_delay(1) == 1.0
    assert s.retry_delay(10) == 512.0
    assert s.retry_delay(11) == 512.0


def test_tier_delays_keep_the_first_delay_even_without_retries() -> None:
    s = _settings(retry_delays="300ms,600ms", max_retry=0)
    assert s.tier_delays() == [0.3]


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"retry_delays": "1s,fast"}, "HERALD_RETRY_DELAYS"),
        ({"retry_delays": "1x"}, "HERALD_RETRY_DELAYS"),
        ({"retry_delays": "0s"}, "HERALD_RETRY_DELAYS"),
        ({"retry_delays": " , "}, "HERALD_RETRY_DELAYS"),
        ({"max_retry": -1}, "HERALD_MAX_RETRY"),
        ({"max_retry": "many"}, "HERALD_MAX_RETRY"),
        ({"delivery_limit": 0}, "HERALD_DELIVERY_LIMIT"),
        ({"smtp_timeout": "soon"}, "HERALD_SMTP_TIMEOUT"),
        ({"email_rate_limit": "fast"}, "HERALD_EMAIL_RATE_LIMIT"),
        ({"email_rate_limit": "2.5/s"}, "HERALD_EMAIL_RATE_LIMIT"),
        ({"database_url": "mysql://root@db/herald"}, "HERALD_DATABASE_URL"),
        ({"database_url": "herald.db"}, "HERALD_DATABASE_URL"),
        ({"smtp_url": "http://mail.example.com"}, "HERALD_SMTP_URL"),
        ({"smtp_url": "smtp://"}, "HERALD_SMTP_URL"),
        ({"smtp_url": "smtp://mail.example.com:99999"}, "HERALD_SMTP_URL"),
        ({"amqp_url": "http://localhost:5672/"}, "HERALD_AMQP_URL"),
        ({"prefix": "has space"}, "HERALD_PREFIX"),
        ({"api_port": 70000}, "HERALD_API_PORT"),
    ],
)
def test_invalid_values_name_the_variable(overrides: dict[str, Any], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings(**overrides)
    message = str(caught.value)
    assert message.startswith(f"{variable}: "), message
    assert "\n" not in message  # one line


def test_invalid_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_RETRY_DELAYS", "1s,2 seconds")
    with pytest.raises(ConfigError, match=r"^HERALD_RETRY_DELAYS: invalid duration '2 seconds'"):
        load_settings()


@pytest.mark.parametrize(
    ("written", "driver_url"),
    [
        ("sqlite:///var/herald.db", "sqlite+aiosqlite:///var/herald.db"),
        ("sqlite:////abs/path/h.db", "sqlite+aiosqlite:////abs/path/h.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql://u:p@db:5432/herald", "postgresql+asyncpg://u:p@db:5432/herald"),
        ("postgres://u@db/herald", "postgresql+asyncpg://u@db/herald"),
        ("postgresql+psycopg2://u@db/herald", "postgresql+asyncpg://u@db/herald"),
    ],
)
def test_database_url_maps_to_the_async_driver(written: str, driver_url: str) -> None:
    assert _settings(database_url=written).database_url == driver_url


@pytest.mark.parametrize(
    ("url", "port", "use_tls", "start_tls"),
    [
        ("smtp://mail.example.com", 25, False, None),
        ("smtp://u:p@mail.example.com:2525", 2525, False, None),
        ("smtp+starttls://u:p@mail.example.com", 587, False, True),
        ("smtps://mail.example.com", 465, True, False),
    ],
)
def test_smtp_url_schemes(url: str, port: int, use_tls: bool, start_tls: bool | None) -> None:
    s = _settings(smtp_url=url)
    assert s.smtp_url == url
    assert s.smtp_url is not None
    provider = SmtpProvider(s.smtp_url)
    assert (provider.host, provider.port) == ("mail.example.com", port)
    assert provider.use_tls is use_tls
    assert provider.start_tls is start_tls


def test_smtp_url_credentials_are_unquoted() -> None:
    provider = SmtpProvider("smtp+starttls://me%40example.com:p%2Fss@mail.example.com:587")
    assert provider.username == "me@example.com"
    assert provider.password == "p/ss"


def test_empty_smtp_url_means_unset() -> None:
    assert _settings(smtp_url="").smtp_url is None


# --- retry planning --------------------------------------------------------------------


@pytest.fixture
def ladder() -> Settings:
    return _settings(retry_delays="200ms,1s,2s,4s", max_retry=5)


def test_permanent_error_goes_straight_to_the_dlq(ladder: Settings) -> None:
    step = plan(ladder, 0, PermanentError("SMTP 550 5.1.1 no such user"))
    assert isinstance(step, DeadLetter)
    assert step.reason.startswith("permanent")
    assert "550 5.1.1 no such user" in step.reason


@pytest.mark.parametrize(
    ("retries_done", "delay"), [(0, 0.2), (1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0)]
)
def test_transient_error_climbs_the_ladder(ladder: Settings, retries_done: int,
                                           delay: float) -> None:
    step = plan(ladder, retries_done, TransientError("SMTP 451 try later"))
    assert step == Retry(delay=delay, retries=retries_done + 1)


def test_after_max_retry_the_message_is_dead_lettered(ladder: Settings) -> None:
    step = plan(ladder, 5, TransientError("SMTP 451 try later"))
    assert isinstance(step, DeadLetter)
    assert step.reason.startswith("retries exhausted")
    assert "5 retries" in step.reason and "SMTP 451 try later" in step.reason


def test_zero_max_retry_dead_letters_the_first_transient_failure() -> None:
    s = _settings(retry_delays="1s", max_retry=0)
    assert isinstance(plan(s, 0, TransientError("boom")), DeadLetter)


@pytest.mark.parametrize("error_type", [RateLimited, DeliveryInProgress])
def test_deferrals_do_not_use_a_retry(ladder: Settings, error_type: type[TransientError]) -> None:
    for done in (0, 3, 5):  # even with the budget spent
        step = plan(ladder, done, error_type("slow down"))
        assert isinstance(step, Retry)
        assert step.retries == done
        assert step.delay == 0.2  # no retry_after: the first tier


@pytest.mark.parametrize(
    ("retry_after", "tier"), [(0.1, 0.2), (0.2, 0.2), (0.5, 1.0), (1.5, 2.0), (4.0, 4.0)]
)
def test_deferral_waits_in_the_first_tier_at_least_retry_after(
    ladder: Settings, retry_after: float, tier: float
) -> None:
    step = plan(ladder, 2, RateLimited("429", retry_after=retry_after))
    assert step == Retry(delay=tier, retries=2)
    assert step.delay >= retry_after


def test_deferral_longer_than_every_tier_takes_the_longest(ladder: Settings) -> None:
    step = plan(ladder, 1, DeliveryInProgress("claimed", retry_after=60))
    assert step == Retry(delay=4.0, retries=1)


def test_deferral_ends_in_the_dlq_after_max_defer(ladder: Settings) -> None:
    within = plan(ladder, 0, RateLimited("slow", retry_after=1), waited=ladder.max_defer - 1)
    assert isinstance(within, Retry)
    past = plan(ladder, 0, RateLimited("slow", retry_after=1), waited=ladder.max_defer + 1)
    assert isinstance(past, DeadLetter) and "HERALD_MAX_DEFER" in past.reason
    # a real retry is governed by max_retry, not by the deferral cap
    assert isinstance(plan(ladder, 0, TransientError("451"), waited=10**9), Retry)


def test_durations_accept_plain_seconds() -> None:
    s = _settings(max_defer="90", shutdown_timeout="2.5", smtp_timeout="1m")
    assert (s.max_defer, s.shutdown_timeout, s.smtp_timeout) == (90.0, 2.5, 60.0)


def test_deferral_only_uses_tiers_that_exist() -> None:
    # max_retry=2 declares tiers 200ms and 1s only; 2s/4s queues do not exist.
    s = _settings(retry_delays="200ms,1s,2s,4s", max_retry=2)
    step = plan(s, 0, RateLimited("slow", retry_after=1.5))
    assert isinstance(step, Retry)
    assert step.delay in s.tier_delays()


# --- templates -------------------------------------------------------------------------


def _write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    _write(root, "email/user.test.html.j2", "<p>Hi {{ name }}</p>")
    _write(root, "email/user.test.txt.j2", "Hi {{ name }}")
    _write(root, "email/user.undefined.txt.j2", "Hi {{ nobody.name }}")
    _write(root, "email/user.mro.txt.j2", "{{ ''.__class__.__mro__ }}")
    _write(root, "email/user.subclasses.txt.j2",
           "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    _write(root, "email/user.globals.html.j2",
           "{{ cycler.__init__.__globals__.os.popen('id').read() }}")
    return root


def test_html_is_autoescaped_and_text_is_not(templates: Path) -> None:
    renderer = Renderer(templates)
    context = {"name": "<b>Ada</b> & co"}
    assert renderer.render("email", "user.test", "html", context) == (
        "<p>Hi &lt;b&gt;Ada&lt;/b&gt; &amp; co</p>")
    assert renderer.render("email", "user.test", "txt", context) == "Hi <b>Ada</b> & co"


def test_missing_template_is_permanent_and_named(templates: Path) -> None:
    renderer = Renderer(templates)
    assert not renderer.has("email", "user.nothing", "txt")
    assert renderer.has("email", "user.test", "txt")
    with pytest.raises(PermanentError, match=r"email/user\.nothing\.txt\.j2"):
        renderer.render("email", "user.nothing", "txt", {})


def test_undefined_variable_is_permanent_and_names_the_template(templates: Path) -> None:
    with pytest.raises(PermanentError) as caught:
        Renderer(templates).render("email", "user.undefined", "txt", {"name": "Ada"})
    assert "email/user.undefined.txt.j2" in caught.value.reason
    assert "nobody" in caught.value.reason


@pytest.mark.parametrize(("event", "part"), [
    ("user.mro", "txt"), ("user.subclasses", "txt"), ("user.globals", "html")])
def test_sandbox_blocks_python_internals(templates: Path, event: str, part: str) -> None:
    with pytest.raises(PermanentError) as caught:
        Renderer(templates).render("email", event, part, {"name": "Ada"})
    assert f"email/{event}.{part}.j2" in caught.value.reason
    assert "unsafe" in caught.value.reason


@pytest.mark.parametrize("data", [{}, {"ip": "10.0.0.1", "user_agent": "<curl>"}])
def test_shipped_templates_render_with_or_without_optional_data(data: dict[str, Any]) -> None:
    # An event raised elsewhere than the API may carry no ip / user agent.
    from datetime import UTC, datetime

    from topology.envelope import Recipient

    renderer = Renderer(_settings().templates_dir)
    context = {"recipient": Recipient(user_id="u1", email="ada@example.com", name="Ada"),
               "data": data, "occurred_at": datetime(2024, 5, 1, 12, 30, tzinfo=UTC)}
    for event in ("user.signup", "user.login"):
        for part in ("subject", "txt", "html"):
            assert renderer.render("email", event, part, context)
    html = renderer.render("email", "user.login", "html", context)
    assert "2024-05-01 12:30 UTC" in html
    assert ("from 10.0.0.1" in html) is bool(data)
    assert "<curl>" not in html


# --- log masking -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("mail to alice@example.com sent", ["alice", "example"]),
        ("to Bob.Smith+news@mail.example.co.uk", ["Bob.Smith", "news", "mail.example"]),
        ("sms +14155550123 queued", ["4155550123", "+1415"]),
        ("sms to +44 20 7946 0958.", ["7946", "+44 20"]),
    ],
)
def test_mask_hides_emails_and_phone_numbers(text: str, hidden: list[str]) -> None:
    masked = mask(text)
    assert "***" in masked
    for part in hidden:
        assert part not in masked


def test_mask_keeps_a_hint() -> None:
    assert mask("alice@example.com") == "a***@e***.com"
    assert mask("+14155550123") == "***23"


@pytest.mark.parametrize(
    "text",
    [
        "retry at 2024-05-01 12:30:00",
        "occurred_at=2024-05-01T12:30:00+00:00 took 1234567 us",
        "event 5f0c2d1e-1b2a-4c3d-9e8f-0a1b2c3d4e5f attempts=3",
        "20240501 1234567890",
    ],
)
def test_mask_leaves_dates_ids_and_plain_numbers(text: str) -> None:
    assert mask(text) == text


def test_masking_filter_masks_formatted_arguments() -> None:
    record = logging.LogRecord("herald", logging.INFO, __file__, 1, "mail to %s at %s",
                               ("alice@example.com", "+14155550123"), None)
    assert MaskingFilter().filter(record)
    assert record.getMessage() == "mail to a***@e***.com at ***23"


# --- SMTP replies ----------------------------------------------------------------------


@pytest.mark.parametrize(("code", "text", "expected"), [
    (450, "4.2.1 Mailbox busy, try again later", RecipientError),
    (451, "4.3.0 Temporary failure, try again", RecipientError),
    (452, "4.3.1 Insufficient system storage", RecipientError),
    (421, "4.4.2 Service shutting down", TransientError),
    # "rate" inside another word is not a rate limit
    (451, "4.3.0 Temporary failure while the message was generated", RecipientError),
    (450, "4.7.1 Could not operate on a separate spool", RecipientError),
])
def test_4xx_is_transient(code: int, text: str, expected: type[TransientError]) -> None:
    error = classify(code, text)
    assert type(error) is expected
    assert str(code) in error.reason and text in error.reason


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (421, "4.7.0 Rate limit exceeded, too many messages"),
        (451, "4.7.1 Too many messages, slow down"),
        (451, "4.7.0 Throttled: sending rate exceeded"),
        (421, "4.7.28 ratelimited, try later"),
        (450, "4.2.1 receiving mail at a rate that prevents additional messages"),
    ],
)
def test_4xx_with_rate_text_is_rate_limited(code: int, text: str) -> None:
    error = classify(code, text)
    assert isinstance(error, RateLimited)
    assert str(code) in error.reason


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (550, "5.1.1 No such user"),
        (553, "5.1.3 Bad recipient address syntax"),
        (554, "5.7.1 Message rejected"),
        (552, "5.3.4 Message too big"),
    ],
)
def test_5xx_is_permanent(code: int, text: str) -> None:
    error = classify(code, text)
    assert isinstance(error, PermanentError)
    assert f"SMTP {code} {text}" == error.reason
