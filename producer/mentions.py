"""``@handle`` mentions in a post's text: pure parsing, no database.

Rules (Slack's, as far as handles go):

- a mention is ``@`` at the start of a word: at the start of the text or
  after a character that cannot be part of an address (space, ``(``, ``,``,
  ...). So ``ada@example.com`` and ``https://example.com/@bob`` mention no one;
  URLs are removed before scanning, whatever they contain;
- the handle is what follows, as :data:`HANDLE_PATTERN` allows, lowercased;
  trailing ``.``, ``-`` and ``_`` are sentence punctuation, not handle
  (``@bob.`` is ``bob``, ``@bob.smith`` is ``bob.smith``), so a handle that
  ends in one of them cannot be mentioned;
- ``@channel``, ``@everyone`` and ``@here`` are :data:`SPECIAL`: they are not
  handles (sign-up refuses them) and the first one in the text is reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

#: A valid handle (already lowercased): 2-40 characters.
HANDLE_PATTERN = r"^[a-z0-9][a-z0-9._-]{1,39}$"
_HANDLE = re.compile(HANDLE_PATTERN)

SpecialMention = Literal["channel", "everyone", "here"]
#: Mentions of everybody in the channel; reserved, never a user's handle.
SPECIAL: tuple[SpecialMention, ...] = ("channel", "everyone", "here")

#: A URL (with a scheme, or starting ``www.``), up to the next space.
_URL = re.compile(r"(?i)\b(?:[a-z][a-z0-9+.-]*://|www\.)\S+")
#: ``@`` not glued to something that makes it part of an address or a path.
_MENTION = re.compile(r"(?<![\w.+\-/:@=?&#%~])@([A-Za-z0-9][A-Za-z0-9._-]*)(?![A-Za-z0-9._@-])")
_TRAILING = "._-"


@dataclass(frozen=True)
class Mentions:
    """What a text mentions: handles in order of first appearance, and the first special one."""

    handles: tuple[str, ...] = ()
    special: SpecialMention | None = None


def is_valid_handle(handle: str) -> bool:
    """``handle`` (lowercase) matches :data:`HANDLE_PATTERN` and is not :data:`SPECIAL`."""
    return bool(_HANDLE.match(handle)) and handle not in SPECIAL


def parse(text: str) -> Mentions:
    """The mentions in ``text``; handles deduplicated, lowercased. Never raises."""
    text = _URL.sub(" ", text)
    handles: list[str] = []
    special: SpecialMention | None = None
    for match in _MENTION.finditer(text):
        word = match.group(1).lower().rstrip(_TRAILING)
        if word in SPECIAL:
            if special is None:
                special = next(s for s in SPECIAL if s == word)
        elif _HANDLE.match(word) and word not in handles:
            handles.append(word)
    return Mentions(handles=tuple(handles), special=special)
