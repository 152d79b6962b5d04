"""Templates and their localisation: pure logic, no broker.

Every (event, channel) that ``topology.spec.ROUTES`` delivers has every part
in every shipped locale, renders with full and with bare data, and picks the
recipient's locale with a fallback to English.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from consumers.templates import Renderer, format_datetime, locale_chain
from herald.errors import PermanentError
from topology.envelope import Actor, Envelope, Recipient
from topology.spec import ROUTES

ROOT = Path(__file__).resolve().parent.parent / "templates"
LOCALES = ("en", "fr")
PARTS: dict[str, tuple[str, ...]] = {
    "email": ("subject", "txt", "html"),
    "in_app": ("title", "body"),
    "push": ("title", "body"),
    "sms": ("body",),
}
#: What the channels render: the routes, plus the in-app request (the channel may be
#: published to directly) and the email digest (no event of its own).
PAIRS: list[tuple[str, str]] = sorted(
    {(channel, event) for event, channels in ROUTES.items() for channel in channels}
    | {("in_app", "user.send_req")})
WHEN = datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))  # 12:30 UTC

FULL: dict[str, dict[str, Any]] = {
    "user.signup": {"name": "Ada"},
    "user.login": {"name": "Ada", "ip": "203.0.113.7", "user_agent": "Firefox/126.0"},
    "user.post": {"post_id": "p1", "channel_id": "c1", "channel_name": "general",
                  "is_dm": False, "text": "Ship it on Friday?", "thread_id": "t1",
                  "mentions": ["u-ada"], "special_mention": "here", "author_name": "Grace"},
    "user.send_req": {"request_id": "r1", "from_user_id": "u-grace", "from_name": "Grace",
                      "from_handle": "grace"},
}
#: Only the keys the data contracts require.
REQUIRED: dict[str, dict[str, Any]] = {
    "user.signup": {"name": "Ada"},
    "user.login": {"name": "Ada"},
    "user.post": {"post_id": "p1", "channel_id": "c1", "is_dm": False, "text": "hi",
                  "thread_id": None, "mentions": [], "special_mention": None},
    "user.send_req": {"request_id": "r1", "from_user_id": "u-grace"},
}
#: What an integrator may send through POST /events: keys missing or of the wrong type.
ODD: dict[str, Any] = {"ip": 7, "user_agent": ["x"], "text": 12345, "is_dm": "false",
                       "mentions": 5, "special_mention": "nobody", "channel_name": 42,
                       "thread_id": "", "from_name": None, "from_handle": 3}


def _context(event: str, data: dict[str, Any], *, name: str | None = "Ada",
             actor_name: str | None = "Grace Hopper", locale: str = "en") -> dict[str, Any]:
    envelope = Envelope(type=event, occurred_at=WHEN, actor=Actor(id="u-grace", name=actor_name),
                        recipients=[Recipient(user_id="u-ada", email="ada@example.com", name=name,
                                              locale=locale)],
                        data=data)
    return {"event": envelope, "recipient": envelope.recipients[0], "data": envelope.data,
            "actor": envelope.actor, "occurred_at": envelope.occurred_at}


def _digest(count: int) -> dict[str, Any]:
    return {"count": count, "items": [
        {"summary": f"item <b>{n}</b>", "event_type": "user.signup",
         "at": datetime(2024, 5, 1, 12, n)} for n in range(count)]}


@pytest.fixture(scope="module")
def shipped() -> Renderer:
    return Renderer(ROOT)


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    shutil.copytree(ROOT, root)
    return root


def _write(path: Path, text: str, *, later: float = 0) -> None:
    """Write ``text``; ``later`` pushes the mtime forward (a coarse clock cannot hide the edit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.stat().st_mtime if path.exists() else None
    path.write_text(text)
    if before is not None and later:
        os.utime(path, (before + later, before + later))


# --- every event x channel x part x locale ---------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize(("channel", "event"), [*PAIRS, ("email", "digest")])
def test_every_part_exists_in_every_shipped_locale(shipped: Renderer, channel: str, event: str,
                                                   locale: str) -> None:
    for part in PARTS[channel]:
        folder = "" if locale == "en" else f"{locale}/"
        assert shipped.resolve(channel, event, part, locale) == (
            f"{channel}/{folder}{event}.{part}.j2")
        assert shipped.has(channel, event, part, locale)


def test_every_english_template_has_a_french_one_and_back() -> None:
    for channel in PARTS:
        english = {p.name for p in (ROOT / channel).glob("*.j2")}
        french = {p.name for p in (ROOT / channel / "fr").glob("*.j2")}
        assert english and english == french, channel


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("sample", ["full", "required", "empty", "odd"])
@pytest.mark.parametrize(("channel", "event"), PAIRS)
def test_every_part_renders_with_full_or_bare_data(shipped: Renderer, channel: str, event: str,
                                                   sample: str, locale: str) -> None:
    data = {"full": FULL[event], "required": REQUIRED[event], "empty": {}, "odd": ODD}[sample]
    bare = sample in ("empty", "odd")
    context = _context(event, data, name=None if bare else "Ada",
                       actor_name=None if bare else "Grace Hopper")
    for part in PARTS[channel]:
        text = shipped.render(channel, event, part, context, locale)
        assert text, (channel, event, part)
        assert "None" not in text and "[]" not in text, text


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("count", [1, 3])
def test_the_digest_renders_in_every_locale(shipped: Renderer, count: int, locale: str) -> None:
    for part in PARTS["email"]:
        assert shipped.render("email", "digest", part, _digest(count), locale)
    html = shipped.render("email", "digest", "html", _digest(count), locale)
    assert "item &lt;b&gt;0&lt;/b&gt;" in html
    text = shipped.render("email", "digest", "txt", _digest(count), locale)
    assert text.count("item <b>") == count


def test_french_digest_agrees_in_number(shipped: Renderer) -> None:
    assert shipped.render("email", "digest", "subject", _digest(1), "fr") == (
        "1 notification manquée")
    assert shipped.render("email", "digest", "subject", _digest(3), "fr") == (
        "3 notifications manquées")


def test_without_a_locale_the_renderer_speaks_english_as_before(shipped: Renderer) -> None:
    context = _context("user.login", FULL["user.login"])
    assert shipped.render("in_app", "user.login", "title", context) == "New sign-in"
    assert shipped.has("email", "user.login", "html")
    assert shipped.render("email", "user.signup", "subject",
                          _context("user.signup", {}, name='Ada & "L"')) == (
        'Welcome to herald, Ada & "L"')


# --- locale lookup ---------------------------------------------------------------------


@pytest.mark.parametrize(("locale", "expected"), [
    ("fr", "in_app/fr/user.login.title.j2"),
    ("fr-CA", "in_app/fr/user.login.title.j2"),
    ("FR_fr", "in_app/fr/user.login.title.j2"),
    (" fr ", "in_app/fr/user.login.title.j2"),
    ("en", "in_app/user.login.title.j2"),
    ("en-GB", "in_app/user.login.title.j2"),
    ("de", "in_app/user.login.title.j2"),
    ("../../etc", "in_app/user.login.title.j2"),
    ("fr/../..", "in_app/user.login.title.j2"),
    ("fr-ca/../../x", "in_app/user.login.title.j2"),
    ("", "in_app/user.login.title.j2"),
    (None, "in_app/user.login.title.j2"),
    ("f", "in_app/user.login.title.j2"),
    ("fr-" + "x" * 40, "in_app/user.login.title.j2"),
])
def test_the_locale_picks_the_template(shipped: Renderer, locale: str | None,
                                       expected: str) -> None:
    assert shipped.resolve("in_app", "user.login", "title", locale) == expected


@pytest.mark.parametrize(("locale", "chain"), [
    ("fr_CA", ["fr-ca", "fr"]),
    ("zh-Hant-TW", ["zh-hant-tw", "zh-hant", "zh"]),
    ("pt-BR", ["pt-br", "pt"]),
    ("en-GB", ["en-gb"]),
    ("en", []),
    ("..", []),
    ("fr.UTF-8", []),
    ("fr\n", ["fr"]),
    ("fr\nx", []),
    ("x" * 100, []),
])
def test_locale_chain_normalises_and_refuses_what_is_not_a_tag(locale: str,
                                                               chain: list[str]) -> None:
    assert locale_chain(locale) == chain


def test_a_regional_translation_wins_over_the_language(copied: Path) -> None:
    # Given a Canadian French title next to the French one
    _write(copied / "in_app" / "fr-ca" / "user.login.title.j2", "Nouvelle ouverture de session")
    renderer = Renderer(copied)
    context = _context("user.login", {})
    # Then fr-CA gets it, fr-FR and fr get the French one, and a part without a regional
    # version falls back to French
    assert renderer.render("in_app", "user.login", "title", context, "fr-CA") == (
        "Nouvelle ouverture de session")
    assert renderer.render("in_app", "user.login", "title", context, "fr-FR") == (
        "Nouvelle connexion")
    assert renderer.resolve("in_app", "user.login", "body", "fr_CA") == (
        "in_app/fr/user.login.body.j2")


def test_a_part_missing_in_a_locale_falls_back_to_english(copied: Path) -> None:
    (copied / "push" / "fr" / "user.post.body.j2").unlink()
    renderer = Renderer(copied)
    assert renderer.resolve("push", "user.post", "body", "fr") == "push/user.post.body.j2"
    assert renderer.resolve("push", "user.post", "title", "fr") == "push/fr/user.post.title.j2"


def test_a_missing_template_is_permanent_and_names_the_english_one(shipped: Renderer) -> None:
    assert not shipped.has("push", "user.nothing", "title", "fr")
    with pytest.raises(PermanentError, match=r"no template push/user\.nothing\.title\.j2"):
        shipped.render("push", "user.nothing", "title", {}, "fr-CA")


def test_a_locale_cannot_reach_outside_the_channel(copied: Path) -> None:
    # Given a file a traversal would reach
    _write(copied / "secret" / "user.login.title.j2", "leaked")
    renderer = Renderer(copied)
    for locale in ("../secret", "..\\secret", "../../templates/secret", "%2e%2e"):
        assert renderer.render("in_app", "user.login", "title", {}, locale) == "New sign-in"


# --- escaping, strictness, sandbox -----------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
def test_html_parts_escape_data_and_text_parts_keep_it(shipped: Renderer, locale: str) -> None:
    script = "<script>alert(1)</script>"
    context = _context("user.login", {"ip": "203.0.113.7", "user_agent": script},
                       name='Ada & "L"')
    html = shipped.render("email", "user.login", "html", context, locale)
    assert script not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'Ada & "L"' not in html and "Ada &amp; &#34;L&#34;" in html
    assert script in shipped.render("email", "user.login", "txt", context, locale)
    assert script in shipped.render("in_app", "user.login", "body", context, locale)
    post = _context("user.post", {**FULL["user.post"], "text": script})
    assert script in shipped.render("push", "user.post", "body", post, locale)
    signup = _context("user.signup", {}, name='Ada & "L"')
    assert "Ada &amp; &#34;L&#34;" in shipped.render("email", "user.signup", "html", signup,
                                                     locale)


@pytest.mark.parametrize("locale", LOCALES)
def test_a_missing_context_variable_is_permanent_and_names_the_template(
        shipped: Renderer, locale: str) -> None:
    context = _context("user.login", {})
    del context["recipient"]
    with pytest.raises(PermanentError) as caught:
        shipped.render("email", "user.login", "txt", context, locale)
    folder = "" if locale == "en" else f"{locale}/"
    assert f"email/{folder}user.login.txt.j2" in caught.value.reason
    assert "recipient" in caught.value.reason


def test_strict_undefined_in_a_translation(copied: Path) -> None:
    _write(copied / "email" / "fr" / "user.undefined.txt.j2", "Bonjour {{ nobody.name }}")
    with pytest.raises(PermanentError, match=r"email/fr/user\.undefined\.txt\.j2.*nobody"):
        Renderer(copied).render("email", "user.undefined", "txt", {}, "fr-CA")


def test_data_a_template_cannot_handle_is_permanent(copied: Path) -> None:
    _write(copied / "push" / "user.sum.body.j2", "{{ data.n + 1 }}")
    with pytest.raises(PermanentError, match=r"push/user\.sum\.body\.j2.*TypeError"):
        Renderer(copied).render("push", "user.sum", "body", {"data": {"n": "x"}})


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ data.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
@pytest.mark.parametrize("locale", LOCALES)
def test_the_sandbox_blocks_python_internals(copied: Path, source: str, locale: str) -> None:
    folder = copied / "sms" / ("" if locale == "en" else locale)
    _write(folder / "user.evil.body.j2", source)
    with pytest.raises(PermanentError) as caught:
        Renderer(copied).render("sms", "user.evil", "body", {"data": {}}, locale)
    assert "user.evil.body.j2" in caught.value.reason
    assert "unsafe" in caught.value.reason


# --- caching and reloading -------------------------------------------------------------


def test_an_edited_template_is_picked_up_without_a_new_renderer(copied: Path) -> None:
    # Given a renderer that has already rendered the French title (so it is cached)
    renderer = Renderer(copied)
    context = _context("user.login", {})
    assert renderer.render("in_app", "user.login", "title", context, "fr") == "Nouvelle connexion"
    # When the file is rewritten with a later mtime
    _write(copied / "in_app" / "fr" / "user.login.title.j2", "Connexion détectée", later=10)
    # Then the next render uses the new text
    assert renderer.render("in_app", "user.login", "title", context, "fr") == (
        "Connexion détectée")


def test_an_added_translation_is_picked_up(copied: Path) -> None:
    renderer = Renderer(copied)
    assert renderer.render("in_app", "user.login", "title", {}, "pt-BR") == "New sign-in"
    _write(copied / "in_app" / "pt" / "user.login.title.j2", "Novo acesso")
    assert renderer.render("in_app", "user.login", "title", {}, "pt-BR") == "Novo acesso"


def test_an_edited_shared_macro_file_is_picked_up(copied: Path) -> None:
    renderer = Renderer(copied)
    context = _context("user.post", {"text": "hi"}, actor_name=None)
    assert renderer.render("in_app", "user.post", "title", context) == "Someone posted"
    lib = copied / "_lib" / "user.post.j2"
    _write(lib, lib.read_text().replace('or actor.name or ""', 'or actor.name or "A bot"'),
           later=10)
    assert renderer.render("in_app", "user.post", "title", context) == "A bot posted"


def test_an_unchanged_template_is_compiled_once(shipped: Renderer) -> None:
    env = shipped._env
    name = shipped.resolve("push", "user.post", "title", "fr")
    assert env.get_template(name) is env.get_template(name)


# --- wording the channels rely on ------------------------------------------------------


@pytest.mark.parametrize(("data", "en", "fr"), [
    ({"is_dm": True, "text": "hi", "channel_name": "dm-ada"},
     "Grace sent you a message", "Grace vous a envoyé un message"),
    ({"channel_name": "general"}, "Grace posted in #general", "Grace a publié dans #general"),
    ({"channel_name": "#general"}, "Grace posted in #general", "Grace a publié dans #general"),
    ({}, "Grace posted", "Grace a publié un message"),
    ({"channel_name": "general", "thread_id": "t1"},
     "Grace replied in a thread in #general", "Grace a répondu dans un fil de #general"),
    ({"thread_id": "t1"}, "Grace replied in a thread", "Grace a répondu dans un fil"),
    ({"channel_name": "general", "mentions": ["u-ada"]},
     "Grace mentioned you in #general", "Grace vous a mentionné dans #general"),
    ({"channel_name": "general", "mentions": ["u-bob"], "special_mention": "channel"},
     "Grace mentioned @channel in #general", "Grace a mentionné @channel dans #general"),
])
def test_post_titles_say_where_it_happened(shipped: Renderer, data: dict[str, Any], en: str,
                                           fr: str) -> None:
    context = _context("user.post", {"author_name": "Grace", **data})
    assert shipped.render("in_app", "user.post", "title", context, "en") == en
    assert shipped.render("in_app", "user.post", "title", context, "fr") == fr


def test_a_dm_push_is_titled_by_its_author(shipped: Renderer) -> None:
    context = _context("user.post", {"is_dm": True, "text": "lunch?"}, actor_name="Grace")
    assert shipped.render("push", "user.post", "title", context) == "Grace"
    assert shipped.render("push", "user.post", "body", context) == "lunch?"


def test_the_author_falls_back_from_data_to_actor_to_someone(shipped: Renderer) -> None:
    assert shipped.render("in_app", "user.post", "body",
                          _context("user.post", {"text": "hi"}, actor_name="Bot")) == "Bot: hi"
    assert shipped.render("in_app", "user.post", "body",
                          _context("user.post", {}, actor_name=None)) == (
        "Someone posted something new.")
    assert shipped.render("in_app", "user.post", "body",
                          _context("user.post", {}, actor_name=None), "fr") == (
        "Quelqu'un a publié un nouveau message.")


def test_login_wording_the_other_tests_rely_on(shipped: Renderer) -> None:
    context = _context("user.login", {"ip": "203.0.113.7", "user_agent": "Firefox"})
    assert shipped.render("in_app", "user.login", "title", context) == "New sign-in"
    body = shipped.render("in_app", "user.login", "body", context)
    assert "203.0.113.7" in body and "Firefox" in body
    assert "2024-05-01 12:30 UTC" in shipped.render("email", "user.login", "html", context)
    assert shipped.render("email", "user.login", "subject", context) == (
        "New sign-in to your account")
    assert "01/05/2024 à 12:30 UTC" in shipped.render("email", "user.login", "txt", context, "fr")


@pytest.mark.parametrize("locale", LOCALES)
def test_push_stays_short(shipped: Renderer, locale: str) -> None:
    long = "word " * 400
    post = _context("user.post", {**FULL["user.post"], "text": long, "channel_name": "c" * 200,
                                  "author_name": "A" * 200})
    request = _context("user.send_req", {**FULL["user.send_req"], "text": long,
                                         "from_name": "G" * 200, "from_handle": "h" * 200})
    for context, event in ((post, "user.post"), (request, "user.send_req")):
        assert len(shipped.render("push", event, "title", context, locale)) <= 120
        assert len(shipped.render("push", event, "body", context, locale)) <= 180


#: The GSM 03.38 basic character set (one SMS segment = 160 of these).
GSM7 = set("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
           "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")


@pytest.mark.parametrize("locale", LOCALES)
def test_the_login_sms_is_one_gsm7_segment_and_says_what_to_do(shipped: Renderer,
                                                               locale: str) -> None:
    context = _context("user.login", FULL["user.login"], name="Ada Lovelace")
    text = shipped.render("sms", "user.login", "body", context, locale)
    assert set(text) <= GSM7, set(text) - GSM7
    assert len(text) <= 160, len(text)
    assert "203.0.113.7" in text and "Ada Lovelace" in text
    assert ("change your password" if locale == "en" else "changez votre mot de passe") in text


# --- the datetime filter ---------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (WHEN, "2024-05-01 12:30 UTC"),
    (datetime(2024, 5, 1, 12, 30), "2024-05-01 12:30 UTC"),  # naive: already UTC
    (datetime(2024, 5, 1, 12, 30, tzinfo=UTC), "2024-05-01 12:30 UTC"),
    ("2024-05-01T14:30:00+02:00", "2024-05-01 12:30 UTC"),
    ("yesterday", "yesterday"),
    (None, "None"),
])
def test_the_datetime_filter_shows_utc(value: Any, expected: str) -> None:
    assert format_datetime(value) == expected


def test_the_datetime_filter_takes_a_format() -> None:
    assert format_datetime(WHEN, "%d/%m/%Y à %H:%M UTC") == "01/05/2024 à 12:30 UTC"
