"""SMS text arithmetic: which alphabet a text needs, how many segments it costs, and
cutting it down to a segment budget; plus masking of phone numbers for reasons and logs.

A segment is one SMS on the wire. GSM-7 texts carry 160 septets alone or 153 per
part once concatenated (the User Data Header takes the rest); characters of the
extension table (``^{}\\[~]|€`` and form feed) cost two septets (escape + char).
Anything outside GSM 03.38 switches the whole text to UCS-2: 70 UTF-16 code units
alone, 67 per part, and a character outside the BMP (most emoji) costs two units.
Carriers never split an escape pair or a surrogate pair across two parts, so a
part may hold one unit less than its capacity; :func:`segments` counts that way.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

import phonenumbers

# Hand-written: no well-kept PyPI library counts and fits segments (sms-counter is 0.0.1,
# smsutil unmaintained since 2020; gsm0338 is only a codec), and the table is 128 chars.
#: GSM 03.38 default alphabet, in code order (0x1B, the escape to the extension table,
#: is left out: it is not a character of its own).
GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
#: GSM 03.38 extension table: each costs two septets (escape + character).
GSM_EXTENSION = frozenset("\f^{}\\[~]|€")

Encoding = Literal["GSM-7", "UCS-2"]

#: (alone, per part when concatenated), in septets (GSM-7) or UTF-16 code units (UCS-2).
CAPACITY: dict[Encoding, tuple[int, int]] = {"GSM-7": (160, 153), "UCS-2": (70, 67)}
ELLIPSIS: dict[Encoding, str] = {"GSM-7": "...", "UCS-2": "…"}

#: How far back (in characters) ``fit`` looks for a space to cut at instead of mid-word.
WORD_BOUNDARY_REACH = 20
_ZWJ = "\u200d"
_TRAILING_JUNK = " \t\r\n\f,;:-"


def encoding(text: str) -> Encoding:
    """``"GSM-7"`` when every character is in GSM 03.38 (basic or extension table),
    else ``"UCS-2"``. Pure; the empty text is GSM-7."""
    for char in text:
        if char not in GSM_BASIC and char not in GSM_EXTENSION:
            return "UCS-2"
    return "GSM-7"


def _costs(text: str, enc: Encoding) -> list[int]:
    if enc == "GSM-7":
        return [2 if c in GSM_EXTENSION else 1 for c in text]
    return [2 if ord(c) > 0xFFFF else 1 for c in text]


def units(text: str) -> int:
    """Septets (GSM-7) or UTF-16 code units (UCS-2) ``text`` takes, before any splitting."""
    return sum(_costs(text, encoding(text)))


def segments(text: str) -> int:
    """Number of SMS segments ``text`` is sent as (at least 1, also for the empty text).

    Concatenated parts are filled greedily and never end inside an escape pair or a
    surrogate pair, as carriers do, so the count may exceed a plain ``ceil(units/153)``.
    """
    enc = encoding(text)
    costs = _costs(text, enc)
    alone, per_part = CAPACITY[enc]
    if sum(costs) <= alone:
        return 1
    parts, used = 1, 0
    for cost in costs:
        if used + cost > per_part:
            parts += 1
            used = 0
        used += cost
    return parts


def _with_ellipsis(kept: str) -> str:
    return kept + ELLIPSIS[encoding(kept)]


def _joins_previous(char: str) -> bool:
    """True for characters that render as part of the character before them."""
    code = ord(char)
    return (unicodedata.combining(char) != 0 or char == _ZWJ
            or 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF  # variation selectors
            or 0x1F3FB <= code <= 0x1F3FF                               # skin-tone modifiers
            or 0xE0020 <= code <= 0xE007F or code == 0x20E3             # tags, keycap
            or unicodedata.category(char) == "Me")


def _is_regional_indicator(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF


def _safe_cut(text: str, end: int) -> int:
    """The largest index <= ``end`` that does not split a grapheme (emoji sequence,
    combining mark, flag, CRLF)."""
    while 0 < end < len(text):
        char, before = text[end], text[end - 1]
        if _joins_previous(char) or before == _ZWJ or (before == "\r" and char == "\n"):
            end -= 1
            continue
        if _is_regional_indicator(char) and _is_regional_indicator(before):
            run = 0
            while end - 1 - run >= 0 and _is_regional_indicator(text[end - 1 - run]):
                run += 1
            if run % 2:  # an odd run before us: ``before`` is the first half of a flag
                end -= 1
                continue
        break
    return end


def _longest_fitting_prefix(text: str, max_segments: int) -> int:
    """Largest n with ``segments(text[:n] + ellipsis) <= max_segments`` (binary search:
    a longer prefix never costs fewer segments)."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if segments(_with_ellipsis(text[:mid])) <= max_segments:
            low = mid
        else:
            high = mid - 1
    return low


def fit(text: str, max_segments: int) -> tuple[str, int]:
    """``text`` cut to at most ``max_segments`` segments, and the segments it now takes.

    A text that fits comes back unchanged. Otherwise it is cut at a space when one
    lies within :data:`WORD_BOUNDARY_REACH` characters of the hard limit (else at the
    limit, but never inside an emoji sequence, combining mark or flag), trailing
    spaces and ``,;:-`` are dropped, and ``...`` (GSM-7) or ``…`` (UCS-2) is appended;
    the ellipsis is chosen for the kept text, so a cut that drops the only non-GSM
    characters comes back as cheaper GSM-7. The returned count is ``segments()`` of the
    returned text. Pure.

    Raises:
        ValueError: ``max_segments`` is below 1.
    """
    if max_segments < 1:
        raise ValueError(f"max_segments must be at least 1, got {max_segments}")
    count = segments(text)
    if count <= max_segments:
        return text, count

    hard = _safe_cut(text, _longest_fitting_prefix(text, max_segments))
    cut = hard
    if not text[hard].isspace():
        space = max((i for i in range(hard - 1, max(hard - WORD_BOUNDARY_REACH, 0) - 1, -1)
                     if text[i].isspace()), default=-1)
        if space > 0:
            cut = space
    kept = text[:cut].rstrip(_TRAILING_JUNK) or text[:hard].rstrip(_TRAILING_JUNK)
    fitted = _with_ellipsis(kept)
    while segments(fitted) > max_segments and kept:   # defensive: cannot happen by the
        kept = kept[:_safe_cut(kept, len(kept) - 1)]   # bisection above, but never lie
        fitted = _with_ellipsis(kept)
    return fitted, segments(fitted)


# --- phone numbers in reasons and logs ---------------------------------------------------

_NUMBER = re.compile(r"(?<![\w+])\+?\d{7,15}(?!\w)")


def _country_code(digits: str) -> str:
    for length in (1, 2, 3):   # country calling codes are prefix-free
        if int(digits[:length] or "0") in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return digits[:length]
    return ""


def mask_number(number: str) -> str:
    """``+14155550100`` → ``+1********00``: the country code and last two digits stay,
    every other digit becomes ``*``. Accepts digits with or without ``+``; never
    returns more than those digits of the input."""
    digits = "".join(c for c in number if c.isdigit())
    if len(digits) <= 4:
        return "*" * len(digits)
    code = _country_code(digits)
    hidden = len(digits) - len(code) - 2
    if hidden < 4:   # too short to show the code as well
        code, hidden = "", len(digits) - 2
    return f"+{code}{'*' * hidden}{digits[-2:]}"


def redact_numbers(text: str, *known: str) -> str:
    """``text`` with the ``known`` numbers (with or without their ``+``) and every other
    phone-number-like run of 7-15 digits (``+`` optional) masked by :func:`mask_number`."""
    for number in known:
        digits = number.removeprefix("+")
        if digits.isdigit() and len(digits) >= 4:
            text = text.replace("+" + digits, mask_number(digits))
            text = text.replace(digits, mask_number(digits))
    return _NUMBER.sub(lambda m: mask_number(m.group()), text)
