"""Rendering: one sandboxed jinja2 environment for every template, built once per process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound
from jinja2.sandbox import SandboxedEnvironment

from herald.errors import PermanentError


class Renderer:
    """Renders ``templates/<channel>/<event>.<part>.j2``.

    Sandboxed (templates cannot reach Python internals), ``StrictUndefined``
    (a missing variable is an error, not an empty string), HTML parts
    autoescaped. Compiled templates are cached by jinja2.
    """

    def __init__(self, root: Path) -> None:
        loader = FileSystemLoader(str(root))
        common: dict[str, Any] = {"loader": loader, "undefined": StrictUndefined,
                                  "keep_trailing_newline": False, "auto_reload": False}
        self._html = SandboxedEnvironment(autoescape=True, **common)
        self._text = SandboxedEnvironment(autoescape=False, **common)

    def has(self, channel: str, event: str, part: str) -> bool:
        """True when the template for that part exists."""
        try:
            self._text.get_template(f"{channel}/{event}.{part}.j2")
        except TemplateNotFound:
            return False
        return True

    def render(self, channel: str, event: str, part: str, context: dict[str, Any]) -> str:
        """The rendered part; raises ``PermanentError`` naming the template when it cannot."""
        name = f"{channel}/{event}.{part}.j2"
        env = self._html if part == "html" else self._text
        try:
            return env.get_template(name).render(context).strip()
        except TemplateNotFound:
            raise PermanentError(f"no template {name}") from None
        except TemplateError as exc:
            raise PermanentError(f"template {name}: {exc}") from None
