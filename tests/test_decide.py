"""The notification decision engine against the Slack chart: every path, by its node ids."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest

from consumers.decide import (
    DEAD_EDGES,
    EDGES,
    NODES,
    ChannelPref,
    Decision,
    Device,
    DeviceKind,
    DndSchedule,
    GlobalPref,
    Message,
    RecipientPrefs,
    SpecialMention,
    decide,
)

ME, OTHER, CHAN = "U-me", "U-other", "C-general"
NOW = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)
DESKTOP, MOBILE = Device(DeviceKind.DESKTOP), Device(DeviceKind.MOBILE)
D, M = DeviceKind.DESKTOP, DeviceKind.MOBILE

# Trail pieces: the plain way in (no thread, not muted, no DnD, no @channel), the
# channel/global pref forks, and the three endings after YES1.
IN = ("A", "B1", "B2", "C1", "D1")
TO_F1 = (*IN, "E1", "E2", "E3", "F1")
TO_H1 = (*TO_F1, "F2d", "H1")
OUT_DESKTOP = ("YES1", "M1", "YES2")
OUT_PUSH = ("YES1", "M1", "M2", "YES2")
OUT_WAIT = ("YES1", "M1", "M2", "N1")
NO = ("N1",)


def prefs(**kw: Any) -> RecipientPrefs:
    """The recipient: defaults to channel pref 'default' and global 'mentions' everywhere."""
    return RecipientPrefs(user_id=ME, **kw)


def msg(**kw: Any) -> Message:
    """A plain channel message from someone else, five minutes old (past the push threshold)."""
    kw = {"author_id": OTHER, "channel_id": CHAN, "created_at": NOW - timedelta(minutes=5), **kw}
    return Message(**kw)


def glob(pref: GlobalPref) -> dict[str, Any]:
    return {"global_prefs": {D: pref, M: pref}}


def chan(pref: ChannelPref, *kinds: DeviceKind) -> dict[str, Any]:
    return {"channel_prefs": {(CHAN, kind): pref for kind in kinds or (D, M)}}


SNOOZED = DndSchedule(snooze_until=NOW + timedelta(hours=1))
SUB_THREAD = {"thread_id": "T1", "user_subscribed_to_thread": True}
UNSUB_THREAD = {"thread_id": "T1", "user_subscribed_to_thread": False}
ACTIVE = {"last_active_at": NOW - timedelta(minutes=1)}


@dataclass(frozen=True)
class Row:
    """One path: who, which device, which message, and the exact trail expected."""

    id: str
    path: tuple[str, ...]
    prefs: dict[str, Any] = field(default_factory=dict)
    message: dict[str, Any] = field(default_factory=dict)
    device: Device = DESKTOP

    def run(self) -> Decision:
        return decide(prefs(**self.prefs), self.device, msg(**self.message), NOW)


ROWS = [
    # A, B: self-message, muted channel, and a subscribed thread passing a muted channel
    Row("self-message", ("A", *NO), message={"author_id": ME}),
    Row("channel-muted", ("A", "B1", "B2", *NO), prefs={"muted_channels": frozenset({CHAN})}),
    Row("subscribed-thread-skips-mute", ("A", "B1", "C1", "D1", "E1", "E2", "E3", *OUT_DESKTOP),
        prefs={"muted_channels": frozenset({CHAN})}, message=SUB_THREAD),
    Row("subscribed-thread-mobile", ("A", "B1", "C1", "D1", "E1", "E2", "E3", *OUT_PUSH),
        message=SUB_THREAD, device=MOBILE),
    # C: DnD and its override
    Row("dnd-no-override", ("A", "B1", "B2", "C1", "C2", *NO), prefs={"dnd": SNOOZED}),
    Row("dnd-override-not-allowed", ("A", "B1", "B2", "C1", "C2", *NO),
        prefs={"dnd": SNOOZED}, message={"dnd_override": True}),
    Row("dnd-allowed-not-asked", ("A", "B1", "B2", "C1", "C2", *NO),
        prefs={"dnd": SNOOZED, "dnd_override_allowed": True}),
    Row("dnd-override", ("A", "B1", "B2", "C1", "C2", "D1", "E1", "E2", "E3", "F1", "F2b",
                         *OUT_DESKTOP),
        prefs={"dnd": SNOOZED, "dnd_override_allowed": True, **chan(ChannelPref.EVERYTHING)},
        message={"dnd_override": True}),
    # D: @channel / @everyone / @here
    Row("at-channel", (*IN, "D2", *OUT_DESKTOP),
        message={"special_mention": SpecialMention.CHANNEL}),
    Row("at-channel-beats-pref-nothing", (*IN, "D2", *OUT_DESKTOP),
        prefs=chan(ChannelPref.NOTHING), message={"special_mention": SpecialMention.CHANNEL}),
    Row("at-everyone-mobile-waiting", (*IN, "D2", *OUT_WAIT),
        message={"special_mention": SpecialMention.EVERYONE, "created_at": NOW},
        device=MOBILE),
    Row("at-everyone-suppressed", (*IN, "D2", "E1", "E2", "E3", "F1", "F2d", "H1", "H2a", "G1",
                                   "G3", "G4", "G5", *NO),
        prefs={"suppress_channel_mentions": frozenset({CHAN})},
        message={"special_mention": SpecialMention.EVERYONE}),
    # E: channel off everywhere, thread_everything, subscribed thread
    Row("channel-nothing-everywhere", (*IN, "E1", *NO), prefs=chan(ChannelPref.NOTHING)),
    Row("channel-nothing-stops-subscribed-thread", ("A", "B1", "C1", "D1", "E1", *NO),
        prefs=chan(ChannelPref.NOTHING), message=SUB_THREAD),
    Row("thread-everything", (*IN, "E1", "E2", *OUT_DESKTOP), prefs={"thread_everything": True}),
    Row("thread-everything-mobile", (*IN, "E1", "E2", *OUT_PUSH),
        prefs={"thread_everything": True}, device=MOBILE),
    # F: the channel pref for this device
    Row("channel-nothing-this-device", (*TO_F1, "F2a", *NO), prefs=chan(ChannelPref.NOTHING, M),
        device=MOBILE),
    Row("channel-everything", (*TO_F1, "F2b", *OUT_DESKTOP), prefs=chan(ChannelPref.EVERYTHING)),
    Row("channel-everything-mobile-waiting", (*TO_F1, "F2b", *OUT_WAIT),
        prefs=chan(ChannelPref.EVERYTHING), message={"created_at": NOW}, device=MOBILE),
    # G via F2c: channel pref 'mentions'
    Row("mentions-unsubscribed-thread", (*TO_F1, "F2c", "G1", "G2", *NO),
        prefs=chan(ChannelPref.MENTIONS), message=UNSUB_THREAD),
    Row("mentions-dm", (*TO_F1, "F2c", "G1", "G3", *OUT_DESKTOP),
        prefs=chan(ChannelPref.MENTIONS), message={"is_dm": True}),
    Row("mentions-at-mention", (*TO_F1, "F2c", "G1", "G3", "G4", *OUT_DESKTOP),
        prefs=chan(ChannelPref.MENTIONS), message={"mentions": frozenset({ME})}),
    Row("mentions-file-comment-desktop", (*TO_F1, "F2c", "G1", "G3", "G4", "G5", *OUT_DESKTOP),
        prefs=chan(ChannelPref.MENTIONS), message={"file_owner_id": ME}),
    Row("mentions-file-comment-mobile", (*TO_F1, "F2c", "G1", "G3", "G4", "G5", *NO),
        prefs=chan(ChannelPref.MENTIONS), message={"file_owner_id": ME}, device=MOBILE),
    Row("mentions-other-users-file", (*TO_F1, "F2c", "G1", "G3", "G4", "G5", *NO),
        prefs=chan(ChannelPref.MENTIONS), message={"file_owner_id": OTHER}),
    # H: channel pref 'default' -> global pref for this device
    Row("global-never", (*TO_H1, "H2e", *NO), prefs=glob(GlobalPref.NEVER)),
    Row("global-mentions-at-mention", (*TO_H1, "H2a", "G1", "G3", "G4", *OUT_DESKTOP),
        prefs=glob(GlobalPref.MENTIONS), message={"mentions": frozenset({ME})}),
    Row("global-mentions-unsubscribed-thread", (*TO_H1, "H2a", "G1", "G2", *NO),
        prefs=glob(GlobalPref.MENTIONS), message=UNSUB_THREAD),
    Row("global-dms-mobile-dm", (*TO_H1, "H2b", "G3", *OUT_PUSH),
        prefs=glob(GlobalPref.DMS), message={"is_dm": True}, device=MOBILE),
    Row("global-dms-mobile-at-mention", (*TO_H1, "H2b", "G3", "G4", *OUT_PUSH),
        prefs=glob(GlobalPref.DMS), message={"mentions": frozenset({ME})}, device=MOBILE),
    Row("global-dms-mobile-plain", (*TO_H1, "H2b", "G3", "G4", "G5", *NO),
        prefs=glob(GlobalPref.DMS), device=MOBILE),
    Row("global-dms-desktop-reads-mentions", (*TO_H1, "H2a", "G1", "G3", *OUT_DESKTOP),
        prefs=glob(GlobalPref.DMS), message={"is_dm": True}),
    Row("global-highlight-mobile-at-mention", (*TO_H1, "H2c", "G4", *OUT_PUSH),
        prefs=glob(GlobalPref.HIGHLIGHT_WORDS), message={"mentions": frozenset({ME})},
        device=MOBILE),
    Row("global-highlight-mobile-word-is-not-asked", (*TO_H1, "H2c", "G4", "G5", *NO),
        prefs={**glob(GlobalPref.HIGHLIGHT_WORDS), "highlight_words": frozenset({"deploy"})},
        message={"text": "deploy now"}, device=MOBILE),
    Row("global-highlight-desktop-reads-mentions", (*TO_H1, "H2a", "G1", "G3", "G4", "G5", *NO),
        prefs={**glob(GlobalPref.HIGHLIGHT_WORDS), "highlight_words": frozenset({"deploy"})},
        message={"text": "deploy now"}),
    # J: global pref 'all'
    Row("all-unsubscribed-thread", (*TO_H1, "H2d", "J1", "J2", *NO),
        prefs=glob(GlobalPref.ALL), message=UNSUB_THREAD),
    Row("all-at-here-suppressed-active-user", (*IN, "D2", "E1", "E2", "E3", "F1", "F2d", "H1",
                                               "H2d", "J1", "J3", *OUT_DESKTOP),
        prefs={**glob(GlobalPref.ALL), **ACTIVE, "suppress_channel_mentions": frozenset({CHAN})},
        message={"special_mention": SpecialMention.HERE}),
    Row("all-highlight-word-active-user", (*TO_H1, "H2d", "J1", "J3", "J4", *OUT_DESKTOP),
        prefs={**glob(GlobalPref.ALL), **ACTIVE, "highlight_words": frozenset({"Deploy"})},
        message={"text": "who can DEPLOY today?"}),
    Row("all-inactive-user", (*TO_H1, "H2d", "J1", "J3", "J4", "J5", *OUT_DESKTOP),
        prefs=glob(GlobalPref.ALL)),
    Row("all-inactive-user-mobile", (*TO_H1, "H2d", "J1", "J3", "J4", "J5", *OUT_PUSH),
        prefs=glob(GlobalPref.ALL), device=MOBILE),
    Row("all-active-user", (*TO_H1, "H2d", "J1", "J3", "J4", "J5", "J6", *NO),
        prefs={**glob(GlobalPref.ALL), **ACTIVE}),
    # M2: user came back after the message (but is idle again): the threshold counts from then
    Row("mobile-threshold-counts-from-last-activity", (*TO_F1, "F2b", *OUT_WAIT),
        prefs={**chan(ChannelPref.EVERYTHING), "last_active_at": NOW - timedelta(seconds=30),
               "activity_window": timedelta(seconds=10)}, device=MOBILE),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_path(row: Row) -> None:
    decision = row.run()
    assert decision.node_ids == row.path
    assert decision.notify is (row.path[-1] == "YES2")
    assert [s.label for s in decision.trail] == [NODES[n] for n in row.path]


def _edges(decision: Decision) -> set[tuple[str, str | None]]:
    return {(s.node_id, s.answer) for s in decision.trail if s.node_id in EDGES}


LIVE_EDGES = {(n, a) for n, arrows in EDGES.items() for a in arrows} - DEAD_EDGES


def _reachable() -> set[str]:
    seen, todo = {"A"}, ["A"]
    while todo:
        node = todo.pop()
        for answer, nxt in EDGES.get(node, {}).items():
            if (node, answer) not in DEAD_EDGES and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_node_of_the_chart_is_on_some_row() -> None:
    visited = {n for row in ROWS for n in row.run().node_ids}
    assert visited == set(NODES) - {"J7"}
    assert visited == _reachable()


def test_every_live_arrow_is_taken_by_some_row() -> None:
    taken = set().union(*(_edges(row.run()) for row in ROWS))
    assert taken == LIVE_EDGES


def test_the_tables_name_only_chart_nodes() -> None:
    targets = {nxt for arrows in EDGES.values() for nxt in arrows.values()}
    assert set(EDGES) | targets == set(NODES)
    assert set(NODES) - set(EDGES) == {"N1", "YES2"}
    all_edges = {(n, a) for n, arrows in EDGES.items() for a in arrows}
    assert all_edges >= DEAD_EDGES


def test_dead_arrows_stay_dead_over_every_input() -> None:
    # Given every combination of the facts asked from E1 on (thread, @here/@channel reaching
    # E1 through suppression, prefs on both devices, DM, mention, file, words, presence,
    # device, message age): 57,600 decisions
    threads = [{}, SUB_THREAD, UNSUB_THREAD]
    specials = [None, SpecialMention.HERE, SpecialMention.CHANNEL]
    channel = [chan(ChannelPref.NOTHING), chan(ChannelPref.NOTHING, M), *(
        chan(p) for p in (ChannelPref.EVERYTHING, ChannelPref.MENTIONS, ChannelPref.DEFAULT))]
    bools = [False, True]
    taken: set[tuple[str, str | None]] = set()
    base = prefs(suppress_channel_mentions=frozenset({CHAN}), highlight_words=frozenset({"x"}))
    message_facts = itertools.product(threads, specials, bools, bools, bools, bools)
    recipient_facts = list(
        itertools.product(channel, bools, GlobalPref, bools, [DESKTOP, MOBILE], bools))
    for (thread, special, dm, mention, file, word), (ch, te, gp, active, device, late) in (
            itertools.product(message_facts, recipient_facts)):
        p = replace(base, **ch, thread_everything=te, global_prefs={D: gp, M: gp},
                    last_active_at=NOW - timedelta(minutes=1 if active else 60))
        m = msg(**thread, special_mention=special, is_dm=dm, file_owner_id=ME if file else None,
                mentions=frozenset({ME} if mention else ()), text="x" if word else "y",
                created_at=NOW - timedelta(minutes=90 if late else 0))
        taken |= _edges(decide(p, device, m, NOW))
    # Then no dead arrow is ever taken, and every live one past the way in (A-D2, held
    # fixed here: the table covers it) is
    assert not taken & DEAD_EDGES
    assert taken >= {e for e in LIVE_EDGES if e[0] not in {"A", "B2", "C1", "C2", "D2"}}


REASONS = [
    ("self-message", "not notified: self-message (the author is the recipient)"),
    ("channel-muted", "not notified: channel muted"),
    ("dnd-no-override", "not notified: in DnD, no override"),
    ("mentions-at-mention", "notified: @mention"),
    ("global-dms-mobile-dm", "notified: DM (mobile push threshold passed)"),
    ("at-everyone-mobile-waiting",
     "not notified: @channel/@everyone/@here, but mobile push threshold not yet passed"),
    ("channel-nothing-this-device", "not notified: channel pref is 'Nothing' for this device"),
    ("all-active-user", "not notified: user active, not a thread message"),
    ("all-inactive-user", "notified: user not active"),
]


@pytest.mark.parametrize(("path_id", "reason"), REASONS, ids=[path for path, _ in REASONS])
def test_reason_reads_as_a_sentence(path_id: str, reason: str) -> None:
    row = next(r for r in ROWS if r.id == path_id)
    assert row.run().reason == reason


def test_every_path_has_a_reason() -> None:
    for row in ROWS:
        assert row.run().reason.startswith(("notified: ", "not notified: ")), row.id


def test_desktop_dms_pref_is_read_as_mentions_with_a_note() -> None:
    decision = decide(prefs(**glob(GlobalPref.DMS)), DESKTOP, msg(is_dm=True), NOW)
    h1 = next(s for s in decision.trail if s.node_id == "H1")
    assert (h1.answer, h1.note) == ("mentions", "'dms' is mobile-only; desktop reads mentions")


def test_steps_carry_the_answers() -> None:
    decision = decide(prefs(**chan(ChannelPref.MENTIONS, D)), DESKTOP,
                      msg(mentions=frozenset({ME})), NOW)
    assert [(s.node_id, s.answer) for s in decision.trail] == [
        ("A", "yes"), ("B1", "no"), ("B2", "no"), ("C1", "no"), ("D1", "no"), ("E1", "no"),
        ("E2", "no"), ("E3", "no"), ("F1", "mentions"), ("F2c", None), ("G1", "no"),
        ("G3", "no"), ("G4", "yes"), ("YES1", None), ("M1", "no"), ("YES2", None)]
    assert decision.trail[1].label == "Thread message && User subscribed?"


def _utc(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


NIGHT = DndSchedule(start=time(22, 0), end=time(7, 0))


@pytest.mark.parametrize(("schedule", "zone", "now", "in_dnd"), [
    # Berlin 22:00-07:00 wraps midnight and follows local time across DST
    (NIGHT, "Europe/Berlin", _utc(2025, 7, 1, 20, 30), True),      # 22:30 CEST
    (NIGHT, "Europe/Berlin", _utc(2025, 1, 15, 20, 30), False),    # 21:30 CET
    (NIGHT, "Europe/Berlin", _utc(2025, 1, 15, 21, 0), True),      # 22:00 CET, start inclusive
    (NIGHT, "Europe/Berlin", _utc(2025, 1, 16, 5, 59), True),      # 06:59 CET
    (NIGHT, "Europe/Berlin", _utc(2025, 1, 16, 6, 0), False),      # 07:00 CET, end exclusive
    (NIGHT, "Europe/Berlin", _utc(2025, 7, 2, 5, 0), False),       # 07:00 CEST
    (NIGHT, "Europe/Berlin", _utc(2025, 7, 2, 4, 59), True),       # 06:59 CEST
    (NIGHT, "UTC", _utc(2025, 7, 1, 20, 30), False),               # same instant, other zone
    # spring forward 2025-03-30: 02:00-03:00 local does not exist, so that window never holds
    (DndSchedule(start=time(2), end=time(3)), "Europe/Berlin", _utc(2025, 3, 30, 0, 59), False),
    (DndSchedule(start=time(2), end=time(3)), "Europe/Berlin", _utc(2025, 3, 30, 1, 0), False),
    (DndSchedule(start=time(1, 30), end=time(2, 30)), "Europe/Berlin", _utc(2025, 3, 30, 0, 45),
     True),
    # fall back 2025-10-26: 02:30 local happens twice, in DnD both times
    (DndSchedule(start=time(2), end=time(3)), "Europe/Berlin", _utc(2025, 10, 26, 0, 30), True),
    (DndSchedule(start=time(2), end=time(3)), "Europe/Berlin", _utc(2025, 10, 26, 1, 30), True),
    (DndSchedule(start=time(2), end=time(3)), "Europe/Berlin", _utc(2025, 10, 26, 2, 0), False),
    # office hours in New York, not wrapping; an empty window never holds
    (DndSchedule(start=time(9), end=time(17)), "America/New_York", _utc(2025, 1, 15, 14), True),
    (DndSchedule(start=time(9), end=time(17)), "America/New_York", _utc(2025, 1, 15, 22), False),
    (DndSchedule(start=time(9), end=time(9)), "America/New_York", _utc(2025, 1, 15, 14), False),
    # snooze alone, and snooze on top of a window
    (DndSchedule(snooze_until=_utc(2025, 1, 15, 13)), "UTC", _utc(2025, 1, 15, 12), True),
    (DndSchedule(snooze_until=_utc(2025, 1, 15, 13)), "UTC", _utc(2025, 1, 15, 13), False),
    (replace(NIGHT, snooze_until=_utc(2025, 1, 15, 13)), "Europe/Berlin", _utc(2025, 1, 15, 12),
     True),
], ids=lambda v: v.isoformat() if isinstance(v, datetime) else None)
def test_dnd_window(schedule: DndSchedule, zone: str, now: datetime, in_dnd: bool) -> None:
    p = prefs(dnd=schedule, timezone=zone)
    decision = decide(p, DESKTOP, msg(created_at=now), now)
    c1 = next(s for s in decision.trail if s.node_id == "C1")
    assert c1.answer == ("yes" if in_dnd else "no")
    if in_dnd:  # no override: DnD ends it at C2
        assert decision.node_ids == ("A", "B1", "B2", "C1", "C2", "N1")
    else:
        assert decision.node_ids[:5] == IN


@pytest.mark.parametrize(("words", "text", "hit"), [
    ({"deploy"}, "DEPLOY is done", True),
    ({"Deploy"}, "can someone deploy?", True),
    ({"deploy"}, "redeploy it", False),
    ({"deploy"}, "deployment done", False),
    ({"c++"}, "who knows C++, anyone", True),
    ({"on call"}, "who is ON CALL today", True),
    ({"on call"}, "who is on calling", False),
    ({"deploy", "release"}, "the release train", True),
    ({""}, "anything", False),
    (set(), "deploy", False),
])
def test_highlight_words_whole_word_any_case(words: set[str], text: str, hit: bool) -> None:
    p = prefs(**glob(GlobalPref.ALL), **ACTIVE, highlight_words=frozenset(words))
    decision = decide(p, DESKTOP, msg(text=text), NOW)
    assert decision.notify is hit
    assert ("J4", "yes" if hit else "no") in _edges(decision)


def test_self_message_stops_even_an_urgent_mention() -> None:
    m = msg(author_id=ME, mentions=frozenset({ME}), dnd_override=True, is_dm=True)
    decision = decide(prefs(**chan(ChannelPref.EVERYTHING)), MOBILE, m, NOW)
    assert (decision.notify, decision.node_ids) == (False, ("A", "N1"))


@pytest.mark.parametrize(("build", "needle"), [
    (lambda: prefs(timezone="Mars/Olympus"), "timezone"),
    (lambda: prefs(last_active_at=datetime(2025, 1, 1)), "last_active_at"),
    (lambda: prefs(mobile_push_threshold=timedelta(seconds=-1)), "mobile_push_threshold"),
    (lambda: prefs(activity_window=timedelta(0)), "activity_window"),
    (lambda: DndSchedule(start=time(22)), "dnd"),
    (lambda: DndSchedule(snooze_until=datetime(2025, 1, 1)), "snooze_until"),
    (lambda: msg(created_at=datetime(2025, 1, 1)), "created_at"),
    (lambda: decide(prefs(), DESKTOP, msg(), datetime(2025, 1, 1)), "now"),
], ids=["timezone", "last_active", "threshold", "window", "half-dnd", "snooze", "created", "now"])
def test_bad_input_is_refused_by_name(build: Any, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        build()
