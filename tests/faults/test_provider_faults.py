"""Faults of the provider: down past the retry ladder (then a DLQ replay), greylisting, one
bad recipient among many.

Real processes (API, relay, worker) on the shared broker under a prefix of
their own, a database of their own, load through ``POST /events``, the
SMTP server in the test's loop, and the ledger at the end.
"""

from __future__ import annotations

from pathlib import Path

from tests.faults.conftest import FaultSink, attach, stack
from tests.faults.ledger import DLQ, SENT, Ledger


async def test_provider_down_past_the_ladder_then_dlq_replay_sends_everything(
    amqp_url: str, service_db: str, sink: FaultSink, tmp_path: Path
) -> None:
    # Given a provider that refuses every message (421) and a ladder of 3 retries
    # (200ms, 400ms, 800ms). The circuit breaker is kept shut (threshold 1000): an
    # open breaker pauses consumption instead, and nothing would reach the DLQ.
    sink.faults.refuse_always = "421 4.3.2 Service not available, closing channel"
    async with stack(amqp_url=amqp_url, database_url=service_db, sink=sink, root=tmp_path,
                     HERALD_BREAKER_THRESHOLD=1000) as s:
        await s.start()

        # When 8 events for 2 recipients each come in while it is down
        await s.load(8, every=0.05, recipients=2)

        # Then every delivery ends in the DLQ, with a reason, once its retries are spent
        def all_dead(ledger: Ledger) -> bool:
            return ledger.counts[DLQ] == 16 and ledger.settled

        down = await s.settled(timeout=30, done=all_dead)
        text = attach(down, "provider down")
        down.check(title="provider down")
        assert down.counts == {DLQ: 16}, text
        assert len(down.dead_letters) == 16, text  # one entry per recipient
        assert all(m.reason.startswith("retries exhausted") and "421" in m.reason
                   for m in down.dead_letters), [m.reason for m in down.dead_letters]
        assert not sink.messages

        # When the provider is back and an operator replays the DLQ
        sink.faults.refuse_always = None
        replay = await s.herald("dlq", "replay", "email", "--all")
        assert replay.code == 0, replay.stderr
        assert "replayed 16" in replay.stdout, replay.stdout

        # Then everything is sent, once, and the DLQ is empty
        ledger = await s.settled(timeout=30)
        text = attach(ledger, "after replay")
    assert s.statuses == {202: 8}, s.statuses
    assert ledger.counts == {SENT: 16}, text
    assert ledger.dead_letters == [], text
    ledger.check(title="after replay")


async def test_a_greylisting_server_gets_every_email_on_a_later_try(
    amqp_url: str, service_db: str, sink: FaultSink, tmp_path: Path
) -> None:
    # Given a server that refuses each address (451) for 2 s after its first attempt,
    # and a ladder of 1s, 2s, 4s
    sink.faults.greylist_seconds = 2
    async with stack(amqp_url=amqp_url, database_url=service_db, sink=sink, root=tmp_path,
                     HERALD_RETRY_DELAYS="1s,2s,4s", HERALD_MAX_RETRY=3) as s:
        await s.start()

        # When 10 events for 2 recipients each come in
        await s.load(10, every=0.05, recipients=2)

        # Then every email is sent, once, nothing dead-lettered
        ledger = await s.settled(timeout=40)
        text = attach(ledger, "greylisting")
    assert s.statuses == {202: 10}, s.statuses
    assert sink.greylisted >= 20, f"the greylist refused only {sink.greylisted}\n{text}"
    assert ledger.counts == {SENT: 20}, text
    assert ledger.dead_letters == [], text
    ledger.check(title="greylisting")


async def test_one_bad_recipient_among_twenty_is_dead_lettered_alone(
    amqp_url: str, service_db: str, sink: FaultSink, tmp_path: Path
) -> None:
    # Given a server that does not know one of 20 addresses (550 at RCPT TO)
    async with stack(amqp_url=amqp_url, database_url=service_db, sink=sink, root=tmp_path) as s:
        recipients = s.recipients(20)
        bad = recipients[7]
        sink.refuse = {bad["email"]: "550 5.1.1 <" + bad["email"] + ">: no such user"}
        await s.start()

        # When one event names all 20
        event = await s.post(recipients)

        # Then 19 are sent and the bad one alone is in the DLQ, as its own entry
        ledger = await s.settled(timeout=30)
        text = attach(ledger, "one bad recipient")
    assert event.status == 202, event
    assert ledger.counts == {SENT: 19, DLQ: 1}, text
    assert ledger.entries[(event.event_id, "email", bad["user_id"])].outcome == DLQ, text
    [entry] = ledger.dead_letters
    assert entry.id == f"{event.event_id}:email:{bad['user_id']}", entry
    assert entry.reason.startswith("permanent") and "550" in entry.reason, entry.reason
    assert bad["email"] not in entry.reason  # addresses stay out of user-visible reasons
    ledger.check(title="one bad recipient")
