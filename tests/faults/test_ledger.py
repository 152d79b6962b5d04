"""The ledger itself (pure: no broker, no database): it must catch what the fault tests look for."""

from __future__ import annotations

from email.message import EmailMessage

import pytest

from herald.models import Delivery
from tests.faults.ledger import DLQ, LOST, SENT, SUPPRESSED, Accepted, Ledger, parse_message_id
from topology.dlq import DeadMessage

EVENT = "5b0f7a1e-0c59-4b8a-9d0e-2f4f1f0a9c11"
OTHER = "0d6c2b1a-7f3e-4c2d-8a9b-1e2f3a4b5c6d"


def mail(event: str, user: str) -> EmailMessage:
    message = EmailMessage()
    message["Message-ID"] = f"<{event}.{user}@herald>"
    return message


def row(event: str, user: str, status: str, reason: str | None = None) -> Delivery:
    return Delivery(event_id=event, event_type="user.signup", channel="email", recipient=user,
                    status=status, last_error=reason)


def dead(message_id: str, reason: str = "permanent: SMTP 550 5.1.1 <address>") -> DeadMessage:
    return DeadMessage(id=message_id, event_type="user.signup", routing_key="user.signup",
                       attempts=1, reason=reason, last_error="", first_failure=None,
                       age_seconds=None)


def test_every_outcome_is_told_apart() -> None:
    ledger = Ledger.build(
        [Accepted(EVENT, ("a", "b", "c", "d"))],
        [row(EVENT, "a", "sent"), row(EVENT, "b", "suppressed", "throttled: 10 in 1h"),
         row(EVENT, "c", "dead", "permanent: SMTP 550")],
        [dead(f"{EVENT}:email:c")], [mail(EVENT, "a")])
    assert {k[2]: e.outcome for k, e in ledger.entries.items()} == {
        "a": SENT, "b": SUPPRESSED, "c": DLQ, "d": LOST}
    assert ledger.lost == [(EVENT, "email", "d")]
    with pytest.raises(AssertionError, match="lost deliveries"):
        ledger.check()
    assert "LOST (1)" in ledger.report()


def test_a_clean_run_passes_and_reports_its_counts() -> None:
    ledger = Ledger.build([Accepted(EVENT, ("a", "b"))],
                          [row(EVENT, "a", "sent"), row(EVENT, "b", "sent")], [],
                          [mail(EVENT, "a"), mail(EVENT, "b")])
    text = ledger.check()
    assert "sent 2" in text and "LOST 0" in text and "duplicates: 0" in text


def test_duplicates_are_counted_and_bounded() -> None:
    ledger = Ledger.build([Accepted(EVENT, ("a",))], [row(EVENT, "a", "sent")], [],
                          [mail(EVENT, "a"), mail(EVENT, "a"), mail(EVENT, "a")])
    assert ledger.duplicate_count == 2
    ledger.check(max_duplicates=2)
    with pytest.raises(AssertionError, match="2 duplicates > 1 allowed"):
        ledger.check(max_duplicates=1)


def test_sources_that_disagree_are_mismatches() -> None:
    # a row "sent" the provider never got; a message the provider got whose row still says
    # "sending"; a DLQ entry whose row is not dead; a dead row with no DLQ entry
    ledger = Ledger.build(
        [Accepted(EVENT, ("a", "b", "c", "d"))],
        [row(EVENT, "a", "sent"), row(EVENT, "b", "sending"), row(EVENT, "c", "failed"),
         row(EVENT, "d", "dead")],
        [dead(f"{EVENT}:email:c")], [mail(EVENT, "b")])
    problems = ledger.mismatches
    assert set(problems) == {(EVENT, "email", u) for u in "abcd"}
    assert ledger.entries[(EVENT, "email", "d")].outcome == LOST
    with pytest.raises(AssertionError):
        ledger.check()


def test_sent_and_dead_lettered_at_once_is_a_conflict() -> None:
    ledger = Ledger.build([Accepted(EVENT, ("a",))], [row(EVENT, "a", "sent")],
                          [dead(f"{EVENT}:email:a")], [mail(EVENT, "a")])
    assert ledger.conflicts == [(EVENT, "email", "a")]
    with pytest.raises(AssertionError, match="more than one outcome"):
        ledger.check()


def test_a_dlq_entry_for_the_whole_event_covers_its_unsettled_recipients() -> None:
    # an envelope not split per recipient: one DLQ entry named by the event id
    ledger = Ledger.build([Accepted(EVENT, ("a", "b"))],
                          [row(EVENT, "a", "sent"), row(EVENT, "b", "dead")],
                          [dead(EVENT)], [mail(EVENT, "a")])
    assert ledger.entries[(EVENT, "email", "a")].outcome == SENT
    assert ledger.entries[(EVENT, "email", "b")].outcome == DLQ
    assert "1 named by the event id" in ledger.report()


def test_what_nobody_accepted_is_unexpected_unless_its_answer_was_lost() -> None:
    ledger = Ledger.build([Accepted(EVENT, ("a",))], [row(EVENT, "a", "sent")], [],
                          [mail(EVENT, "a"), mail(OTHER, "z")])
    assert ledger.unexpected == [f"a received message for {(OTHER, 'email', 'z')}"]
    with pytest.raises(AssertionError, match="nobody accepted"):
        ledger.check()
    # the same, for an event whose POST got no answer: it was accepted after all
    ledger = Ledger.build([Accepted(EVENT, ("a",))],
                          [row(EVENT, "a", "sent"), row(OTHER, "z", "sent")], [],
                          [mail(EVENT, "a"), mail(OTHER, "z")],
                          uncertain=[Accepted(OTHER, ("z",))])
    ledger.check()
    assert (OTHER, "email", "z") in ledger.entries


def test_a_suppression_needs_a_reason() -> None:
    ledger = Ledger.build([Accepted(EVENT, ("a",))], [row(EVENT, "a", "suppressed")], [], [])
    assert ledger.mismatches == {(EVENT, "email", "a"): ["row says suppressed without a reason"]}


def test_message_ids_are_parsed_as_herald_writes_them() -> None:
    assert parse_message_id(f"<{EVENT}.user.with.dots@herald>") == (EVENT, "user.with.dots")
    assert parse_message_id("<abc@elsewhere>") is None
