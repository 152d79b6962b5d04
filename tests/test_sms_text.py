"""GSM-7 / UCS-2 detection, segment counting and fitting, and phone-number masking."""

from __future__ import annotations

import random

import pytest

from consumers.sms_text import (
    GSM_BASIC,
    GSM_EXTENSION,
    encoding,
    fit,
    mask_number,
    redact_numbers,
    segments,
    units,
)

FAMILY = "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466"   # 👨‍👩‍👧‍👦, 11 units
FLAGS = "\U0001F1EB\U0001F1F7\U0001F1E9\U0001F1EA"                      # 🇫🇷🇩🇪, 8 units


def test_the_tables_are_gsm_03_38() -> None:
    assert len(GSM_BASIC) == 127            # 128 codes, less the escape
    assert len(GSM_EXTENSION) == 10
    assert not GSM_BASIC & GSM_EXTENSION


@pytest.mark.parametrize(("text", "expected"), [
    ("", "GSM-7"),
    ("Hello, world! 100% @home", "GSM-7"),
    ("Ça coûte 5€ {promo} [x] ~ ^ | \\", "UCS-2"),   # û is not GSM
    ("Ça fait 5€ {promo} [x] ~ ^ | \\", "GSM-7"),    # Ç is, and so is the extension table
    ("\f", "GSM-7"),
    ("ç", "UCS-2"),                                 # only the capital C-cedilla is GSM
    ("ÆØÅæøåÄÖÑÜäöñüàèéùìò¡¿§¤£¥ΔΦΓΛΩΠΨΣΘΞß_", "GSM-7"),
    ("á", "UCS-2"),
    ("tab\there", "UCS-2"),                         # tab is not in GSM 03.38
    ("`backtick`", "UCS-2"),
    ("Привет", "UCS-2"),
    ("ok \U0001F600", "UCS-2"),
])
def test_encoding(text: str, expected: str) -> None:
    assert encoding(text) == expected


@pytest.mark.parametrize(("text", "expected_units", "expected_segments"), [
    ("", 0, 1),
    ("a" * 160, 160, 1),
    ("a" * 161, 161, 2),
    ("a" * 306, 306, 2),
    ("a" * 307, 307, 3),
    ("a" * 459, 459, 3),
    ("a" * 460, 460, 4),
    ("€" * 80, 160, 1),                     # extension chars cost 2 septets
    ("€" * 81, 162, 2),
    ("a" * 158 + "€", 160, 1),
    ("a" * 159 + "€", 161, 2),
    ("a" * 159 + "\f", 161, 2),
    # the escape pair is not split across parts: part 1 stops at 152 septets
    ("a" * 152 + "€" + "a" * 151, 305, 2),
    ("a" * 152 + "€" + "a" * 152, 306, 3),  # a plain ceil(306/153) would say 2
    ("ж" * 70, 70, 1),
    ("ж" * 71, 71, 2),
    ("ж" * 134, 134, 2),
    ("ж" * 135, 135, 3),
    ("a" * 69 + "ж", 70, 1),                # one non-GSM char makes it all UCS-2
    ("a" * 159 + "ж", 160, 3),
    ("\U0001F600" * 35, 70, 1),             # emoji: a surrogate pair, 2 units
    ("\U0001F600" * 36, 72, 2),
    ("ж" * 68 + "\U0001F600", 70, 1),
    ("ж" * 69 + "\U0001F600", 71, 2),
    # the surrogate pair is not split either: part 1 stops at 66 units
    ("ж" * 66 + "\U0001F600" + "ж" * 65, 133, 2),
    ("ж" * 66 + "\U0001F600" + "ж" * 66, 134, 3),
])
def test_units_and_segments(text: str, expected_units: int, expected_segments: int) -> None:
    assert units(text) == expected_units
    assert segments(text) == expected_segments


@pytest.mark.parametrize(("text", "max_segments", "expected"), [
    ("a" * 160, 1, "a" * 160),                          # fits: unchanged
    ("a" * 161, 1, "a" * 157 + "..."),                  # 157 + 3 = 160 septets
    ("a" * 400, 2, "a" * 303 + "..."),                  # 2 x 153 = 306
    ("ж" * 100, 1, "ж" * 69 + "…"),                     # 69 + 1 = 70 units
    ("ж" * 300, 2, "ж" * 133 + "…"),                    # 2 x 67 = 134
    ("\U0001F600" * 100, 1, "\U0001F600" * 34 + "…"),   # 68 + 1 units
    ("€" * 100, 1, "€" * 78 + "..."),                   # 156 + 3; a 79th € would need 161
    ("a" * 200 + "ж", 1, "a" * 157 + "..."),            # the cut drops the only non-GSM char
    ("x" * 150 + " " + "y" * 20, 1, "x" * 150 + "..."),           # a space 7 back: cut there
    ("x" * 100 + " " + "y" * 100, 1, "x" * 100 + " " + "y" * 56 + "..."),  # too far back
    ("ж" * 60 + FAMILY * 3, 1, "ж" * 60 + "…"),          # never half a family emoji
    ("ж" * 66 + FLAGS, 1, "ж" * 66 + "…"),              # never half a flag
    ("a" * 68 + "e\u0301" + "bbb", 1, "a" * 68 + "..."),  # nor a base without its accent
])
def test_fit(text: str, max_segments: int, expected: str) -> None:
    fitted, count = fit(text, max_segments)
    assert fitted == expected
    assert count == segments(fitted) <= max_segments


def test_fit_cuts_between_words_and_drops_trailing_punctuation() -> None:
    text = "Your order, the blue one, ships tomorrow; track it online, or call us. " * 5
    fitted, count = fit(text, 1)
    assert count == 1 and fitted.endswith("...")
    kept = fitted.removesuffix("...")
    assert text.startswith(kept)
    assert text[len(kept)] in " ,;."         # the cut ends a word
    assert kept[-1] not in " ,;:-"


def test_fit_refuses_a_zero_budget() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        fit("hello", 0)


def test_fit_results_count_again_within_budget() -> None:
    rng = random.Random(20240611)
    alphabet = ["a", "b", " ", " ", "€", "{", "é", "ж", "\U0001F600", "\u200d", "\u0301",
                "\U0001F1EB", ".", "\n"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 700)))
        for max_segments in (1, 2, 3, 5):
            fitted, count = fit(text, max_segments)
            assert count == segments(fitted) <= max_segments, (text, max_segments)
            if segments(text) <= max_segments:
                assert fitted == text
            else:
                ellipsis = "..." if encoding(fitted) == "GSM-7" else "…"
                assert fitted.endswith(ellipsis)
                kept = fitted.removesuffix(ellipsis)
                assert text.startswith(kept)
                if kept:   # the cut never separates a joiner from what it joins
                    after = text[len(kept)]
                    assert after.isspace() or after in ",;:-" or not (
                        kept.endswith("\u200d") or after in "\u200d\u0301"), (text, kept)


@pytest.mark.parametrize(("number", "masked"), [
    ("+14155550100", "+1********00"),
    ("14155550100", "+1********00"),
    ("+447700900123", "+44********23"),
    ("+33612345678", "+33*******78"),
    ("+8613800138000", "+86*********00"),
    ("+12", "**"),
    ("+1234567", "+1****67"),
    ("+123456", "+****56"),          # too short to keep the country code as well
])
def test_mask_number(number: str, masked: str) -> None:
    assert mask_number(number) == masked


def test_redact_numbers_masks_numbers_only() -> None:
    text = ("The 'To' number +14155550100 is not valid (21211); also 447700900123; "
            "sid SM0123456789abcdef0123456789abcdef, account AC12345678901234567890")
    assert redact_numbers(text) == (
        "The 'To' number +1********00 is not valid (21211); also +44********23; "
        "sid SM0123456789abcdef0123456789abcdef, account AC12345678901234567890")
    assert redact_numbers("to 4155550100 or +4155550100", "+4155550100") == \
        "to +41******00 or +41******00"
