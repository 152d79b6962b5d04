"""Rendering: one sandboxed jinja2 environment for every template, built once per process.

Layout under the templates root::

    <channel>/<event>.<part>.j2            English, the default and the last fallback
    <channel>/<locale>/<event>.<part>.j2   a translation (``fr``, ``pt-br``: lowercase tags)

A recipient's locale picks the most specific translation that exists, part by
part: ``fr-CA`` tries ``fr-ca``, then ``fr``, then English.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound
from jinja2.sandbox import SandboxedEnvironment

from herald.errors import PermanentError

DEFAULT_LOCALE = "en"
#: A normalised locale tag we look up: language, then optional subtags (``pt-br``, ``zh-hant-tw``).
_LOCALE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})*$")
#: Longer tags are not real BCP 47 in practice; refusing them bounds the lookups per render.
_LOCALE_MAX = 35
#: What a template's own data can do wrong (a number where a text was expected, say):
#: deterministic, so retrying cannot help.
_DATA_ERRORS = (TypeError, ValueError, LookupError, AttributeError, ArithmeticError)


def locale_chain(locale: str | None) -> list[str]:
    """The translation folders to try for ``locale``, most specific first; English is implied.

    The tag is untrusted (it comes from user profiles and integrators): it is
    lowercased with ``_`` read as ``-``, and anything that is not a plain
    ``xx(-subtag)*`` tag gives ``[]`` (English only), so it can never name a
    path. ``"fr_CA"`` → ``["fr-ca", "fr"]``; ``"en-GB"`` → ``["en-gb"]``
    (English itself lives at the root, not in an ``en/`` folder).
    """
    tag = (locale or "").strip().lower().replace("_", "-")
    if len(tag) > _LOCALE_MAX or not _LOCALE.fullmatch(tag):
        return []
    parts = tag.split("-")
    chain = ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]
    return [candidate for candidate in chain if candidate != DEFAULT_LOCALE]


def format_datetime(value: Any, fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
    """The ``datetime`` filter: ``value`` in UTC (naive means UTC already) formatted with ``fmt``.

    Also takes an ISO 8601 string (data sent by integrators); anything else is
    shown as it is rather than failing the notification.
    """
    when: object = value
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return value
    if not isinstance(when, datetime):
        return str(when)
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime(fmt)


def _autoescape(name: str | None) -> bool:
    return name is not None and name.endswith(".html.j2")


class Renderer:
    """Renders ``templates/<channel>/[<locale>/]<event>.<part>.j2`` (see the module docstring).

    Sandboxed (templates cannot reach Python internals), ``StrictUndefined``
    (a missing variable is an error, not an empty string), ``html`` parts
    autoescaped and every other part plain text. ``trim_blocks`` and
    ``lstrip_blocks`` are on, so a ``{% if %}`` on its own line leaves no
    blank line behind; the result is stripped.

    Compiled templates are cached by jinja2 for the life of the process, with
    ``auto_reload``: each use compares the file's mtime with the cached
    copy's, so an edited template is picked up without a restart (a stat per
    use; nothing is recompiled unless the file changed). A translation added
    later is found too: which file a (locale, part) resolves to is looked up
    on every render, not remembered.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._env = SandboxedEnvironment(
            loader=FileSystemLoader(str(root)), undefined=StrictUndefined,
            autoescape=_autoescape, auto_reload=True, keep_trailing_newline=False,
            trim_blocks=True, lstrip_blocks=True)
        self._env.filters["datetime"] = format_datetime

    @staticmethod
    def _names(channel: str, event: str, part: str, locale: str | None) -> Iterator[str]:
        for tag in locale_chain(locale):
            yield f"{channel}/{tag}/{event}.{part}.j2"
        yield f"{channel}/{event}.{part}.j2"

    def resolve(self, channel: str, event: str, part: str, locale: str | None = DEFAULT_LOCALE
                ) -> str:
        """The name of the template ``render`` would use (``"email/fr/user.login.txt.j2"``).

        Raises ``PermanentError`` naming the English template when no
        candidate exists; a template that exists but does not compile
        resolves (``render`` reports its syntax error).
        """
        for name in self._names(channel, event, part, locale):
            try:
                self._env.get_template(name)
            except TemplateNotFound:
                continue
            except TemplateError:
                pass  # it exists but does not compile: render reports why
            return name
        raise PermanentError(f"no template {channel}/{event}.{part}.j2")

    def has(self, channel: str, event: str, part: str, locale: str | None = DEFAULT_LOCALE
            ) -> bool:
        """True when some template for that part exists, in ``locale`` or in English."""
        try:
            self.resolve(channel, event, part, locale)
        except PermanentError:
            return False
        return True

    def render(self, channel: str, event: str, part: str, context: dict[str, Any],
               locale: str | None = DEFAULT_LOCALE) -> str:
        """The rendered part in ``locale`` (falling back to English), stripped.

        Raises ``PermanentError`` naming the template when there is none, it
        does not compile, uses an undefined variable, trips the sandbox, or
        chokes on the data it was given.
        """
        name = self.resolve(channel, event, part, locale)
        try:
            return self._env.get_template(name).render(context).strip()
        except TemplateError as exc:
            raise PermanentError(f"template {name}: {exc}") from None
        except _DATA_ERRORS as exc:
            raise PermanentError(f"template {name}: {type(exc).__name__}: {exc}") from None
