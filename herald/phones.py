"""Phone numbers: what users type in, as the E.164 text SMS providers expect (``+14155550100``)."""

from __future__ import annotations

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat

#: Longer input is not a phone number; refuse it before parsing.
MAX_INPUT = 40

_PARSE_ERRORS = {
    NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    NumberParseException.NOT_A_NUMBER: "not a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short after the country code",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_LONG: "too long",
}


def normalise_phone(text: str) -> str:
    """``text`` (spaces, dashes, dots and brackets allowed) as E.164.

    The number must start with ``+`` and its country code: no region is
    guessed, so ``0612345678`` is refused while ``+33 6 12 34 56 78`` is
    ``+33612345678``. Only numbers ``phonenumbers`` holds valid (a real
    prefix and length for the country) pass.

    Raises:
        ValueError: with a message saying what is wrong (safe to show the user).
    """
    text = text.strip()
    if not text:
        raise ValueError("phone number is empty")
    if len(text) > MAX_INPUT:
        raise ValueError(f"phone number is longer than {MAX_INPUT} characters")
    if not text.startswith("+"):
        raise ValueError("phone number must start with + and the country code "
                         "(E.164, like +14155550100)")
    try:
        number = phonenumbers.parse(text, None)
    except NumberParseException as exc:
        reason = _PARSE_ERRORS.get(exc.error_type, "not a phone number")
        raise ValueError(f"phone number: {reason}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number for its country code")
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)
