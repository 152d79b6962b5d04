"""``herald dlq``: list without consuming, replay by id or all, purge, and its error messages.

Dead letters are made for real: the email worker meets an SMTP server that
refuses every message with 550 (permanent), so the worker parks them in
``<prefix>.email.dlq``. The commands run as the installed ``herald`` script.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from typer.testing import CliRunner

from herald.cli import app
from herald.mailsink import MailSink
from herald.settings import Settings
from tests.conftest import delete_topology, eventually, smtp_url
from tests.harness import email_worker
from tests.procs import Finished, clean_env, herald_cmd, run
from tests.tcpproxy import free_port
from topology.declare import declare
from topology.envelope import Actor, Envelope, Recipient
from topology.messages import build_message
from topology.spec import H_ATTEMPT, H_ATTEMPTS_TOTAL, H_LAST_ERROR, H_REASON, Names, build

REFUSAL = "550 5.1.1 <user@example.com>: Recipient address rejected: mailbox unavailable"


async def message_count(connection: AbstractRobustConnection, queue: str) -> int:
    """Messages ready in ``queue`` (a fresh passive declare: robust channels cache them)."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


@dataclass
class DeadLetters:
    """What the ``dead_letters`` fixture made."""

    settings: Settings
    envelopes: list[Envelope]
    env: dict[str, str]
    cwd: Path

    @property
    def ids(self) -> set[str]:
        """The dead events' ids."""
        return {e.id for e in self.envelopes}

    @property
    def dlq(self) -> str:
        """The email DLQ's name."""
        return Names(self.settings.prefix).dlq("email")

    async def herald(self, *args: str) -> Finished:
        """Run ``herald args`` against this test's prefix."""
        return await run(herald_cmd(*args), self.env, cwd=self.cwd, timeout=60)

    async def listed(self) -> list[dict[str, Any]]:
        """``herald dlq list email --json``, parsed."""
        done = await self.herald("dlq", "list", "email", "--json")
        assert done.code == 0, done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows


def signup(n: int) -> Envelope:
    """A ``user.signup`` event for user ``n``."""
    return Envelope(type="user.signup", actor=Actor(id=f"u{n}", name=f"User {n}"),
                    recipients=[Recipient(user_id=f"u{n}", email=f"user{n}@example.com",
                                          name=f"User {n}")],
                    data={"name": f"User {n}"})


async def publish(connection: AbstractRobustConnection, settings: Settings,
                  envelopes: list[Envelope]) -> None:
    """Publish events as the relay does (topic exchange, confirmed)."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        exchange = await channel.get_exchange(Names(settings.prefix).events)
        for envelope in envelopes:
            await exchange.publish(build_message(envelope.to_json(), envelope.id, envelope.type),
                                   routing_key=envelope.type, mandatory=True)
    finally:
        await channel.close()


@pytest.fixture
async def dead_letters(
    make_settings: Callable[..., Settings], smtp: MailSink, topology: Settings,
    connection: AbstractRobustConnection, tmp_path: Path,
) -> DeadLetters:
    """Three signups the email worker dead-lettered (SMTP 550); the SMTP server is healthy now."""
    settings = make_settings(smtp_url=smtp_url(smtp))
    envelopes = [signup(n) for n in range(3)]
    smtp.faults.refuse_always = REFUSAL
    async with email_worker(settings) as worker:
        await publish(connection, settings, envelopes)
        await eventually(lambda: worker.stats["dead_lettered"] >= 3, timeout=20)
    names = Names(settings.prefix)

    async def parked() -> bool:
        return await message_count(connection, names.dlq("email")) == 3

    await eventually(parked, timeout=10)
    assert await message_count(connection, names.work("email")) == 0
    smtp.faults.refuse_always = None
    env = clean_env(HERALD_AMQP_URL=settings.amqp_url, HERALD_PREFIX=settings.prefix,
                    HERALD_DATABASE_URL=f"sqlite:///{tmp_path}/cli.db")
    return DeadLetters(settings, envelopes, env, tmp_path)


FIELDS = {"id", "event_type", "attempts", "last_error", "reason", "age_seconds"}


async def test_list_shows_each_dead_letter_without_consuming(
    dead_letters: DeadLetters, connection: AbstractRobustConnection
) -> None:
    # Given three signups parked after a permanent SMTP refusal
    # When the DLQ is listed twice as JSON
    first = await dead_letters.listed()
    second = await dead_letters.listed()

    # Then each dead letter says what it is, how often it was tried and why it is here
    assert {row["id"] for row in first} == dead_letters.ids
    for row in first:
        assert row.keys() >= FIELDS
        assert row["event_type"] == "user.signup"
        assert row["attempts"] == 1
        assert "550" in row["last_error"] and "mailbox unavailable" in row["last_error"]
        assert row["reason"].startswith("permanent: SMTP 550")
        assert 0 <= row["age_seconds"] < 120
    # and listing consumed nothing: same messages, same order, same details
    assert [r["id"] for r in second] == [r["id"] for r in first]
    for before, after in zip(first, second, strict=True):
        assert {k: v for k, v in after.items() if k != "age_seconds"} == {
            k: v for k, v in before.items() if k != "age_seconds"}
        assert after["age_seconds"] >= before["age_seconds"]
    assert await message_count(connection, dead_letters.dlq) == 3

    # And the table form names the queue and the count
    done = await dead_letters.herald("dlq", "list", "email")
    assert done.code == 0, done.stderr
    assert f"{dead_letters.dlq} (3)" in done.stdout
    assert "user.signup" in done.stdout


def _replayed_headers_are_reset(message: AbstractIncomingMessage) -> None:
    headers = message.headers or {}
    for gone in (H_ATTEMPT, H_ATTEMPTS_TOTAL, H_REASON, H_LAST_ERROR, "x-death",
                 "x-first-death-reason"):
        assert gone not in headers, gone
    assert "x-herald-replayed-at" in headers


async def test_replay_one_by_id_then_all_delivers_each_once(
    dead_letters: DeadLetters, smtp: MailSink, connection: AbstractRobustConnection
) -> None:
    names = Names(dead_letters.settings.prefix)
    chosen = dead_letters.envelopes[1]

    # When one dead letter is replayed by id (no worker running yet)
    done = await dead_letters.herald("dlq", "replay", "email", "--id", chosen.id)

    # Then only that one left the DLQ, for the work queue, with its retry history reset
    assert done.code == 0, done.stderr
    assert f"replayed 1 message(s) to {names.work('email')}" in done.stdout
    assert {r["id"] for r in await dead_letters.listed()} == dead_letters.ids - {chosen.id}
    channel = await connection.channel()
    work = await channel.get_queue(names.work("email"))
    message = await eventually(lambda: work.get(no_ack=False, fail=False), timeout=10)
    assert message.message_id == chosen.id
    assert message.type == "user.signup"
    _replayed_headers_are_reset(message)
    assert await work.get(no_ack=True, fail=False) is None  # it was the only one
    await message.nack(requeue=True)
    await channel.close()

    # And with a healthy SMTP server a worker delivers it, once
    async with email_worker(dead_letters.settings) as worker:
        await eventually(lambda: worker.stats["delivered"] == 1, timeout=15)
        assert len(smtp.messages) == 1
        assert chosen.id in smtp.messages[0]["Message-ID"]

        # When the rest are replayed with --all
        done = await dead_letters.herald("dlq", "replay", "email", "--all")

        # Then both come back and are delivered; nothing is sent twice, the DLQ is empty
        assert done.code == 0, done.stderr
        assert f"replayed 2 message(s) to {names.work('email')}" in done.stdout
        await eventually(lambda: worker.stats["delivered"] == 3, timeout=15)
    sent = sorted(m["Message-ID"] for m in smtp.messages)
    assert len(sent) == 3
    for envelope in dead_letters.envelopes:
        assert sum(envelope.id in mid for mid in sent) == 1
    assert worker.stats["dead_lettered"] == 0 and worker.stats["retried"] == 0
    assert await message_count(connection, dead_letters.dlq) == 0
    assert await message_count(connection, names.work("email")) == 0
    done = await dead_letters.herald("dlq", "list", "email")
    assert f"{dead_letters.dlq} is empty" in done.stdout


async def test_replay_unknown_id_says_not_found_and_moves_nothing(
    dead_letters: DeadLetters, connection: AbstractRobustConnection
) -> None:
    before = [r["id"] for r in await dead_letters.listed()]

    # When an id that is not in the DLQ is replayed
    done = await dead_letters.herald("dlq", "replay", "email", "--id", "no-such-event")

    # Then it says so and exits 1; the DLQ keeps all three, in order; the work queue is empty
    assert done.code == 1, done.stdout + done.stderr
    assert "not found in the DLQ: no-such-event" in done.stdout + done.stderr
    assert "replayed 0" in done.stdout
    assert [r["id"] for r in await dead_letters.listed()] == before
    assert await message_count(connection,
                               Names(dead_letters.settings.prefix).work("email")) == 0


async def test_replay_known_and_unknown_ids_replays_the_known_and_exits_1(
    dead_letters: DeadLetters
) -> None:
    known = dead_letters.envelopes[0].id
    done = await dead_letters.herald("dlq", "replay", "email", "--id", known, "--id", "ghost")
    assert done.code == 1
    assert "replayed 1; not found in the DLQ: ghost" in done.stdout
    assert {r["id"] for r in await dead_letters.listed()} == dead_letters.ids - {known}


async def test_purge_needs_yes_then_empties_and_counts(
    dead_letters: DeadLetters, connection: AbstractRobustConnection
) -> None:
    # When purge is asked without --yes
    done = await dead_letters.herald("dlq", "purge", "email")

    # Then it refuses (usage error), and nothing is deleted
    assert done.code == 2
    assert "--yes" in done.stderr
    assert await message_count(connection, dead_letters.dlq) == 3

    # When confirmed
    done = await dead_letters.herald("dlq", "purge", "email", "--yes")

    # Then the DLQ is empty and the count is printed
    assert done.code == 0, done.stderr
    assert f"purged 3 message(s) from {dead_letters.dlq}" in done.stdout
    assert await message_count(connection, dead_letters.dlq) == 0
    assert await dead_letters.listed() == []


# --- usage and environment errors ----------------------------------------------------------


runner = CliRunner()


def invoke(*args: str, **env: str) -> Any:
    """``herald args`` in-process (only for errors raised before any broker call)."""
    return runner.invoke(app, list(args), env={"HERALD_PREFIX": "t-usage", **env})


@pytest.mark.parametrize("args", [
    ["dlq", "replay", "email"],
    ["dlq", "replay", "email", "--all", "--id", "abc"],
    ["dlq", "replay", "email", "--event", "e1", "--id", "abc"],
    ["dlq", "replay", "email", "--event", "e1", "--all"],
])
def test_replay_needs_exactly_one_of_id_event_or_all(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "say which: --id ID, --event EVENT_ID (both repeatable) or --all" in result.stderr


@pytest.mark.parametrize("command", [
    ["dlq", "list", "carrier_pigeon", "--json"],
    ["dlq", "replay", "carrier_pigeon", "--all"],
    ["dlq", "purge", "carrier_pigeon", "--yes"]])
def test_unknown_channel_is_a_usage_error(command: list[str]) -> None:
    result = invoke(*command)
    assert result.exit_code == 2
    assert "unknown channel 'carrier_pigeon'" in result.output
    assert "email, in_app, push, sms" in result.output.replace("\n", " ").replace("│", " ")


@pytest.mark.parametrize("command", [
    ["dlq", "list", "email"], ["dlq", "replay", "email", "--all"],
    ["dlq", "purge", "email", "--yes"]])
async def test_unreachable_broker_is_one_line_without_traceback(
    command: list[str], prefix: str, tmp_path: Path
) -> None:
    # Given nothing listening where HERALD_AMQP_URL points
    env = clean_env(HERALD_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
                    HERALD_PREFIX=prefix)

    # When a dlq command runs
    done = await run(herald_cmd(*command), env, cwd=tmp_path, timeout=60)

    # Then it exits 1 with one line saying the broker is unreachable and how to fix it
    assert done.code == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert len(done.error_lines) == 1, done.stderr
    assert done.error_lines[0].startswith("error: cannot reach RabbitMQ")
    assert "HERALD_AMQP_URL" in done.error_lines[0]


@pytest.mark.parametrize("command", [
    ["dlq", "list", "email"], ["dlq", "replay", "email", "--all"],
    ["dlq", "purge", "email", "--yes"]])
async def test_undeclared_prefix_says_to_declare_the_topology(
    command: list[str], amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    # Given a prefix whose topology was never declared on the broker
    env = clean_env(HERALD_AMQP_URL=amqp_url, HERALD_PREFIX=prefix)

    # When a dlq command runs
    done = await run(herald_cmd(*command), env, cwd=tmp_path, timeout=60)

    # Then one line names the missing queue and says what to run
    assert done.code == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert len(done.error_lines) == 1, done.stderr
    assert f"{prefix}.email.dlq" in done.error_lines[0]
    assert "herald topology declare" in done.error_lines[0]


async def test_list_and_replay_a_message_the_broker_dead_lettered(
    make_settings: Callable[..., Settings], connection: AbstractRobustConnection,
    tmp_path: Path,
) -> None:
    # Given a work queue allowing 2 deliveries and a message that keeps coming back unacked
    # (what a crashing worker does), so that the broker itself dead-letters it
    settings = make_settings(delivery_limit=2)
    names = Names(settings.prefix)
    envelope = signup(7)
    await declare(connection, build(settings))
    try:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            build_message(envelope.to_json(), envelope.id, envelope.type),
            routing_key=names.work("email"))
        work = await channel.get_queue(names.work("email"))

        async def bounced_into_dlq() -> bool:
            message = await work.get(no_ack=False, fail=False)
            if message is not None:
                await message.nack(requeue=True)
            return await message_count(connection, names.dlq("email")) == 1

        await eventually(bounced_into_dlq, timeout=15, interval=0.1)
        await channel.close()
        env = clean_env(HERALD_AMQP_URL=settings.amqp_url, HERALD_PREFIX=settings.prefix)

        # When it is listed
        done = await run(herald_cmd("dlq", "list", "email", "--json"), env, cwd=tmp_path)

        # Then the listing says the broker put it there, and why that usually happens
        assert done.code == 0, done.stderr
        [row] = json.loads(done.stdout)
        assert row["id"] == envelope.id
        assert row["event_type"] == "user.signup"
        assert row["reason"].startswith("broker: delivery_limit")
        assert "crashing worker" in row["reason"]
        assert row["age_seconds"] is not None and 0 <= row["age_seconds"] < 120

        # And replaying it sends it back to the work queue without the broker's history
        done = await run(herald_cmd("dlq", "replay", "email", "--id", envelope.id), env,
                         cwd=tmp_path)
        assert done.code == 0, done.stderr
        channel = await connection.channel()
        work = await channel.get_queue(names.work("email"))
        message = await eventually(lambda: work.get(no_ack=True, fail=False), timeout=10)
        assert message.message_id == envelope.id
        _replayed_headers_are_reset(message)
        await channel.close()
    finally:
        await delete_topology(connection, settings)
