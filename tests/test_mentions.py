"""``producer.mentions.parse``: pure, table-driven."""

from __future__ import annotations

import pytest

from producer.mentions import Mentions, is_valid_handle, parse


@pytest.mark.parametrize(("text", "handles", "special"), [
    # plain mentions, at the start, in the middle, at the end
    ("@bob lunch?", ("bob",), None),
    ("lunch, @bob?", ("bob",), None),
    ("ask @bob", ("bob",), None),
    # trailing punctuation is not part of the handle
    ("@bob, hi", ("bob",), None),
    ("thanks @bob.", ("bob",), None),
    ("@bob... really?", ("bob",), None),
    ("@bob! @carol? @dave; @erin:", ("bob", "carol", "dave", "erin"), None),
    ("(@bob) [@carol] {@dave} '@erin' \"@frank\"", ("bob", "carol", "dave", "erin", "frank"),
     None),
    ("@bob-", ("bob",), None),
    # dots, dashes and underscores inside a handle belong to it
    ("@bob.smith said", ("bob.smith",), None),
    ("@bob.smith.", ("bob.smith",), None),
    ("@ada_l and @ada-l", ("ada_l", "ada-l"), None),
    # case-insensitive, deduplicated, in order of first appearance
    ("@Bob @bob @ALICE @bob", ("bob", "alice"), None),
    # not a mention: inside an email address
    ("mail ada@example.com", (), None),
    ("mail bob@here.com", (), None),
    ("@bob@example.com", (), None),
    # not a mention: inside a URL
    ("see https://medium.com/@bob today", (), None),
    ("see http://example.com/?u=@bob&x=1", (), None),
    ("www.example.com/@bob", (), None),
    ("see https://example.com/@bob and @carol", ("carol",), None),
    # not a mention: glued to a word, doubled, or not a valid handle
    ("x@bob", (), None),
    ("@@bob", (), None),
    ("@b", (), None),
    ("@", (), None),
    ("@ bob", (), None),
    ("@-bob", (), None),
    ("@" + "a" * 41, (), None),
    ("@" + "a" * 40, ("a" * 40,), None),
    # special mentions: reported, never handles; the first one wins
    ("@channel standup", (), "channel"),
    ("@everyone", (), "everyone"),
    ("hey @here!", (), "here"),
    ("@HERE", (), "here"),
    ("@here and @channel", (), "here"),
    ("@bob @channel @here", ("bob",), "channel"),
    ("@channel.", (), "channel"),
    # but longer handles that start like one are handles
    ("@channel-ops", ("channel-ops",), None),
    ("@heres", ("heres",), None),
    ("me@here", (), None),
    # nothing
    ("", (), None),
    ("no mentions at all", (), None),
])
def test_parse(text: str, handles: tuple[str, ...], special: str | None) -> None:
    assert parse(text) == Mentions(handles=handles, special=special)  # type: ignore[arg-type]


@pytest.mark.parametrize(("handle", "valid"), [
    ("ada", True), ("a1", True), ("ada.lovelace", True), ("ada_l-2", True),
    ("a" * 40, True), ("a" * 41, False), ("a", False), ("", False), ("_ada", False),
    (".ada", False), ("Ada", False), ("ada lovelace", False), ("ada@x", False),
    ("channel", False), ("everyone", False), ("here", False), ("channels", True),
])
def test_is_valid_handle(handle: str, valid: bool) -> None:
    assert is_valid_handle(handle) is valid
