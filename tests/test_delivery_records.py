"""Delivery records keep what was decided: dead-lettering and late reports do not rewrite it."""

from __future__ import annotations

from datetime import datetime

import pytest
from pydantic import ValidationError

from consumers.deliveries import DeliveryStore
from herald.db import init_db, make_engine
from herald.settings import Settings
from topology.envelope import Actor, Envelope, Recipient


async def test_dead_lettering_keeps_decisions_and_never_spreads_one_recipients_error(
    database_url: str, settings: Settings
) -> None:
    engine = make_engine(settings.database_url)
    await init_db(engine)
    store = DeliveryStore(engine, lease=30)
    try:
        # Given one event: Ada was suppressed, Bob sent, Cat failing with an error naming her
        for user in ("ada", "bob", "cat", "dan"):
            await store.claim("e-1", "user.post", "push", user)
        await store.settle("e-1", "push", "ada", "suppressed", "not notified: channel muted")
        await store.sent("e-1", "push", "bob", "fcm")
        await store.failed("e-1", "push", "cat", "550 <cat@example.com> unknown")
        # When the event is dead-lettered
        await store.dead("e-1", "push", "permanent: 550 <cat@example.com> unknown")
        rows = {u: await store.get("e-1", "push", u) for u in ("ada", "bob", "cat", "dan")}
        # Then decisions stay, the failing delivery gets the DLQ reason, others a neutral one
        assert rows["ada"] is not None and rows["ada"].status == "suppressed"
        assert rows["bob"] is not None and rows["bob"].status == "sent"
        assert rows["cat"] is not None and rows["cat"].status == "dead"
        assert rows["cat"].last_error == "permanent: 550 <cat@example.com> unknown"
        assert rows["dan"] is not None and rows["dan"].status == "dead"
        assert "cat@example.com" not in (rows["dan"].last_error or "")
        # And a late report from a worker whose lease ran out cannot undo a send
        await store.failed("e-1", "push", "bob", "timeout")
        again = await store.get("e-1", "push", "bob")
        assert again is not None and again.status == "sent"
    finally:
        await engine.dispose()


def test_an_envelope_needs_an_aware_time_and_a_recipient_id_without_a_slash() -> None:
    with pytest.raises(ValidationError, match="occurred_at"):
        Envelope(type="user.post", actor=Actor(id="a"), recipients=[Recipient(user_id="b")],
                 occurred_at=datetime(2026, 1, 1, 12, 0))
    with pytest.raises(ValidationError, match="user_id"):
        Recipient(user_id="b/d-1")
    with pytest.raises(ValidationError, match="user_id"):
        Recipient(user_id="x" * 64)


async def test_only_a_channel_that_sends_digests_holds_throttled_digest_events(
    settings: Settings
) -> None:
    from consumers.policy import Policy
    from herald.settings import Rate

    engine = make_engine(settings.database_url)
    await init_db(engine)
    store = DeliveryStore(engine, lease=30)
    try:
        await store.claim("e-0", "user.post", "push", "ada")
        await store.sent("e-0", "push", "ada", "fcm")
        envelope = Envelope(type="user.post", actor=Actor(id="bob"), digest=True,
                            recipients=[Recipient(user_id="ada")])
        limit = Rate(1, 3600.0)
        held = await Policy(store, limit).check(envelope, "push", "ada")
        dropped = await Policy(store, limit, digests=False).check(envelope, "push", "ada")
        assert held is not None and held.status == "held"
        # Push, SMS and in-app have no digest to wait for: suppressed, with the reason
        assert dropped is not None and dropped.status == "suppressed"
        assert "throttled" in dropped.reason
    finally:
        await engine.dispose()
