"""What herald accepts as names, email addresses, free text and event data.

One set of rules for both ends: the API refuses what the workers could not
deliver or the database could not store, and the workers build messages with
the same functions, so "valid in" means "deliverable out".

Every function is pure, cheap (patterns are compiled once, at import) and
raises ``ValueError`` with a message that says what is wrong without echoing
the value: messages end up in 422 answers and logs, and the value may be
someone's personal data. A message may name a code point (``U+000A``) or a
position, never the text around it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Any

from email_validator import EmailNotValidError, validate_email

#: The ``users.name`` column; a display name is never longer.
MAX_NAME = 200
#: RFC 5321: a forward path is at most 256 octets, two of them the angle brackets.
MAX_EMAIL = 254

# Unicode Cc (C0 controls, DEL, C1 controls), the line and paragraph separators
# (U+2028/2029, line breaks to JavaScript and many renderers) and lone surrogates
# (JSON can carry "\ud800"; no encoder can write it, so the database refuses it).
_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
_NAME_FORBIDDEN = re.compile(f"[{_CONTROLS}<>]")
_LINE_FORBIDDEN = re.compile(f"[{_CONTROLS}]")
# Multi-line text keeps TAB (\x09) and LF (\x0a); CR is normalised away first.
_MULTILINE_FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NEWLINES = re.compile(r"\r\n?")
# What PostgreSQL cannot store in TEXT or JSON: NUL, and text no encoder can write.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _describe(char: str) -> str:
    """A forbidden character by kind and code point (the character may be unprintable)."""
    code = f"U+{ord(char):04X}"
    if char == "\x00":
        return f"a NUL character ({code})"
    if char in "\r\n\u2028\u2029":
        return f"a line break ({code})"
    if char == "\t":
        return f"a tab ({code})"
    if "\ud800" <= char <= "\udfff":
        return f"an unpaired surrogate ({code})"
    if char in "<>":
        return f"'{char}'"
    return f"a control character ({code})"


def display_name(value: str, *, max_length: int = MAX_NAME) -> str:
    """``value`` as a person's or channel's display name: stripped, one line, no ``<`` or ``>``.

    Any other Unicode is kept (accents, scripts, emoji with their joiners), so
    the name fits ``email.headerregistry.Address(display_name=...)`` (which
    encodes it) and a one-line UI label alike. Refused: a blank name, one
    longer than ``max_length`` characters once stripped, any control
    character (CR, LF, TAB, NUL, DEL, C1, U+2028/U+2029), an unpaired
    surrogate, and ``<``/``>`` (which would pass for an address in a header).

    Idempotent: ``display_name(display_name(v)) == display_name(v)``.

    Raises:
        ValueError: saying what is wrong (and where), never echoing the name.
    """
    value = value.strip()
    if not value:
        raise ValueError("name must not be blank")
    if len(value) > max_length:
        raise ValueError(f"name is longer than {max_length} characters")
    bad = _NAME_FORBIDDEN.search(value)
    if bad is not None:
        raise ValueError(f"name must be one line without control characters, '<' or '>': "
                         f"{_describe(bad.group())} at position {bad.start() + 1}")
    return value


@functools.lru_cache(maxsize=4096)
def email_address(value: str) -> str:
    """``value`` as an address herald can deliver to with plain SMTP (no SMTPUTF8).

    Surrounding spaces are stripped. The part before the ``@`` must be ASCII
    (a dot-atom: no quoting, no spaces); the domain may be internationalised
    and is returned in its ASCII (IDNA) form, lowercased, so ``ada@bücher.de``
    becomes ``ada@xn--bcher-kva.de``. The case of the local part is kept
    (callers that compare addresses lowercase them). The result is at most
    :data:`MAX_EMAIL` characters and round-trips through
    ``email.headerregistry.Address(addr_spec=...)`` unchanged.

    Idempotent: ``email_address(email_address(v)) == email_address(v)``. Checking
    costs ~80 µs (half email_validator, half the header round trip), so results are
    cached (4096 addresses): a worker sees the same recipients over and over.

    Raises:
        ValueError: saying what is wrong, never echoing the address.
    """
    value = value.strip()
    if not value:
        raise ValueError("email address must not be blank")
    if len(value) > MAX_EMAIL:
        raise ValueError(f"email address is longer than {MAX_EMAIL} characters")
    bad = _LINE_FORBIDDEN.search(value)
    if bad is not None:
        raise ValueError(f"email address contains {_describe(bad.group())}")
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise ValueError("email address needs a part before and after an @ (ada@example.com)")
    if not local.isascii():
        raise ValueError("the part before the @ must be ASCII: herald sends mail without "
                         "SMTPUTF8, which most servers do not offer")
    try:
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        # email_validator's messages quote the offending characters: ours says what to fix.
        raise ValueError("not a deliverable email address (like ada@example.com: ASCII before "
                         "the @, a registered domain after it)") from None
    address = checked.ascii_email
    if address is None or len(address) > MAX_EMAIL:  # IDNA made the domain longer
        raise ValueError(f"email address is longer than {MAX_EMAIL} characters in ASCII form")
    try:
        round_trip = Address(addr_spec=address).addr_spec
    except (ValueError, IndexError, HeaderParseError):
        round_trip = None
    if round_trip != address:
        raise ValueError("email address cannot be written in a mail header as it is")
    return address


def text(value: str, *, multiline: bool, max_length: int | None = None) -> str:
    """``value`` as free text the database can store and a message can carry; not stripped.

    With ``multiline``, CR LF and lone CR become LF, and LF and TAB are the only
    control characters allowed; without it, none is (not even TAB). NUL, DEL,
    C1 controls, U+2028/U+2029 and unpaired surrogates are always refused.
    ``max_length`` (characters, after newline normalisation) is checked when given.

    Idempotent: ``text(text(v, ...), ...) == text(v, ...)``.

    Raises:
        ValueError: naming the offending character's code point and position, not the text.
    """
    if multiline:
        if "\r" in value:
            value = _NEWLINES.sub("\n", value)
        bad = _MULTILINE_FORBIDDEN.search(value)
        allowed = "LF and TAB are the only control characters allowed"
    else:
        bad = _LINE_FORBIDDEN.search(value)
        allowed = "one line, no control characters"
    if bad is not None:
        raise ValueError(f"text contains {_describe(bad.group())} at position "
                         f"{bad.start() + 1} ({allowed})")
    if max_length is not None and len(value) > max_length:
        raise ValueError(f"text is longer than {max_length} characters")
    return value


def one_line(value: str) -> str:
    """:func:`text` with ``multiline=False``: for ids, labels and other one-line input."""
    return text(value, multiline=False)


def _key_path(path: str, key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}"
    # Keys are field names, shown to say where; still one printable ASCII line, bounded.
    shown = key if len(key) <= 40 else key[:40] + "..."
    return f"{path}[{json.dumps(shown)}]"


def _strings(value: Any, path: str) -> Iterator[tuple[str, str, bool]]:
    """Every string in ``value`` (keys too) as (string, where, is_key); iterative, any depth."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            yield item, where, False
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str):
                    yield key, where, True
                    stack.append((child, _key_path(where, key)))
                else:
                    stack.append((child, f"{where}[{key!r}]"))
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))


def storable_json(value: Any, *, path: str = "data") -> Any:
    """``value`` (JSON: dicts, lists, strings, numbers...) unchanged, if PostgreSQL can store it.

    Walks every string, dict keys included, at any depth, and refuses a NUL
    character (PostgreSQL's TEXT and JSON cannot hold one) or an unpaired
    surrogate (no UTF-8 encoder can write it). Other control characters are
    data and stay. ``path`` names the root in messages.

    Raises:
        ValueError: naming where (``data.items[2].title``, or "a key of
            data.items[2]"), never the offending text.
    """
    for string, where, is_key in _strings(value, path):
        bad = _UNSTORABLE.search(string)
        if bad is not None:
            what = f"a key of {where}" if is_key else where
            raise ValueError(f"{what} contains {_describe(bad.group())}, which cannot be "
                             f"stored")
    return value
