"""The topology on a real broker: declare is idempotent and strict, export imports cleanly.

What the broker holds is read back with ``rabbitmqctl`` (the management
plugin may be off), so these tests need it on the machine running the
broker under test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from herald.errors import TopologyMismatch
from herald.settings import Settings
from tests.conftest import IN_CI, delete_topology, eventually
from tests.procs import clean_env, herald_cmd, run
from topology.declare import declare
from topology.envelope import Actor, Envelope, Recipient
from topology.export import definitions
from topology.messages import build_message
from topology.spec import CHANNELS, Topology, build

# --- reading the broker back ---------------------------------------------------------------


async def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl args``; its stdout (fails the test on a non-zero exit)."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)}: {err.decode()}{out.decode()}"
    return out.decode()


@pytest.fixture
async def ctl(amqp_url: str) -> None:
    """Skip (fail in CI) unless ``rabbitmqctl`` can talk to the broker under test."""
    host = urlsplit(amqp_url).hostname
    if shutil.which("rabbitmqctl") is None or host not in ("127.0.0.1", "localhost", "::1"):
        if IN_CI:
            pytest.fail("rabbitmqctl for the broker under test is required in CI")
        pytest.skip("rabbitmqctl not available for the broker under test")
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "list_vhosts", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    async with asyncio.timeout(60):
        code = await proc.wait()
    if code != 0:
        if IN_CI:
            pytest.fail("rabbitmqctl cannot reach the node (permissions? Erlang cookie?)")
        pytest.skip("rabbitmqctl cannot reach the node")


async def import_definitions(document: bytes) -> None:
    """``rabbitmqctl import_definitions`` of ``document``.

    Through a world-readable temporary file: packaged ``rabbitmqctl`` runs as
    the ``rabbitmq`` user, which cannot read the test's ``tmp_path``, and
    3.10 does not read ``-`` (stdin) as its usage claims.
    """
    fd, name = tempfile.mkstemp(prefix="herald-defs-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(document)
        os.chmod(name, 0o644)
        await rabbitmqctl("-q", "import_definitions", name)
    finally:
        os.unlink(name)


def _args(raw: list[list[Any]]) -> dict[str, Any]:
    # rabbitmqctl reports [name, type, value]; the AMQP type (byte, short, long…)
    # depends on how the value was declared, the value is what must match.
    return {name: value for name, _type, value in raw}


async def queues(vhost: str, prefix: str) -> dict[str, dict[str, Any]]:
    """``{name: {"type": ..., "arguments": {...}}}`` of the prefix's queues in ``vhost``."""
    rows = json.loads(await rabbitmqctl("-q", "list_queues", "-p", vhost, "name", "type",
                                        "arguments", "--formatter", "json"))
    return {r["name"]: {"type": r["type"], "arguments": _args(r["arguments"])}
            for r in rows if r["name"].startswith(f"{prefix}.")}


async def bindings(vhost: str, prefix: str) -> set[tuple[str, str, str]]:
    """``(exchange, queue, routing key)`` of the prefix's exchanges in ``vhost``."""
    rows = json.loads(await rabbitmqctl(
        "-q", "list_bindings", "-p", vhost, "source_name", "destination_name",
        "destination_kind", "routing_key", "--formatter", "json"))
    return {(r["source_name"], r["destination_name"], r["routing_key"]) for r in rows
            if r["source_name"].startswith(f"{prefix}.") and r["destination_kind"] == "queue"}


async def exchanges(vhost: str, prefix: str) -> dict[str, str]:
    """``{name: type}`` of the prefix's exchanges in ``vhost``."""
    rows = json.loads(await rabbitmqctl("-q", "list_exchanges", "-p", vhost, "name", "type",
                                        "--formatter", "json"))
    return {r["name"]: r["type"] for r in rows if r["name"].startswith(f"{prefix}.")}


async def message_count(connection: AbstractRobustConnection, queue: str) -> int:
    """Messages ready in ``queue`` now (a fresh passive declare: robust channels cache them)."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


def expected_queues(topo: Topology) -> dict[str, dict[str, Any]]:
    """What ``queues()`` must return for a topology, from the spec alone."""
    return {q.name: {"type": q.arguments["x-queue-type"], "arguments": dict(q.arguments)}
            for q in topo.queues}


def expected_bindings(topo: Topology) -> set[tuple[str, str, str]]:
    """What ``bindings()`` must return for a topology, from the spec alone."""
    return {(b.exchange, b.queue, b.routing_key) for b in topo.bindings}


@pytest.fixture
async def cleanup(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings]
) -> AsyncIterator[Settings]:
    """The test's default settings; their topology is deleted afterwards, whatever was made."""
    settings = make_settings()
    yield settings
    await delete_topology(connection, settings)


# --- declare -------------------------------------------------------------------------------


async def test_declare_twice_changes_nothing(
    ctl: None, connection: AbstractRobustConnection, cleanup: Settings
) -> None:
    # Given the topology declared once, with a message waiting in the email queue
    topo = build(cleanup)
    await declare(connection, topo)
    first = await queues("/", cleanup.prefix)
    first_bindings = await bindings("/", cleanup.prefix)
    channel = await connection.channel()
    await channel.default_exchange.publish(aio_pika.Message(b"{}"),
                                           routing_key=topo.names.work("email"))

    # When it is declared again
    await declare(connection, topo)

    # Then no error, the same queues with the same arguments, the same bindings,
    # and nothing was purged
    assert await queues("/", cleanup.prefix) == first == expected_queues(topo)
    assert await bindings("/", cleanup.prefix) == first_bindings == expected_bindings(topo)
    assert await exchanges("/", cleanup.prefix) == {
        f"{cleanup.prefix}.events": "topic", f"{cleanup.prefix}.retry": "direct",
        f"{cleanup.prefix}.dlx": "direct", f"{cleanup.prefix}.live": "topic"}
    assert await message_count(connection, topo.names.work("email")) == 1
    await channel.close()


async def test_work_queues_are_quorum_with_delivery_limit_and_dead_lettering(
    ctl: None, connection: AbstractRobustConnection, cleanup: Settings
) -> None:
    # Given the topology declared with delivery limit 5 and retry delays 100ms, 200ms, 400ms
    topo = build(cleanup)
    await declare(connection, topo)

    # When we read the queues back from the broker
    found = await queues("/", cleanup.prefix)

    # Then every work queue (and the due queue retries come back to) is quorum,
    # bounded, dead-lettering at-least-once to its DLQ
    p = cleanup.prefix
    for channel in CHANNELS:
        for name in (f"{p}.{channel}", f"{p}.{channel}.due"):
            work = found[name]
            assert work["type"] == "quorum"
            assert work["arguments"]["x-delivery-limit"] == 5
            assert work["arguments"]["x-dead-letter-strategy"] == "at-least-once"
            # at-least-once dead-lettering is only honoured with reject-publish overflow
            assert work["arguments"]["x-overflow"] == "reject-publish"
            assert work["arguments"]["x-dead-letter-exchange"] == f"{p}.dlx"
            assert work["arguments"]["x-dead-letter-routing-key"] == channel
        assert found[f"{p}.{channel}.dlq"] == expected_queues(topo)[f"{p}.{channel}.dlq"]
        # and each delay tier holds for one fixed TTL, then goes straight to the
        # channel's due queue through the default exchange
        for label, ttl in (("100ms", 100), ("200ms", 200), ("400ms", 400)):
            tier = found[f"{p}.{channel}.delay.{label}"]
            assert tier["type"] == "classic"
            assert tier["arguments"] == {
                "x-queue-type": "classic", "x-message-ttl": ttl,
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{p}.{channel}.due"}
    assert len(found) == len(CHANNELS) * (3 + 3)
    routes = await bindings("/", p)
    for channel in CHANNELS:
        assert (f"{p}.dlx", f"{p}.{channel}.dlq", channel) in routes
        assert (f"{p}.retry", f"{p}.{channel}.delay.100ms", f"{channel}.delay.100ms") in routes


async def test_retry_tier_returns_to_its_own_due_queue_only(
    connection: AbstractRobustConnection, cleanup: Settings
) -> None:
    # Given the topology and a user.login event (routed to email, in_app and sms)
    topo = build(cleanup)
    await declare(connection, topo)
    envelope = Envelope(type="user.login", actor=Actor(id="u1"),
                        recipients=[Recipient(user_id="u1", email="u1@example.com")])
    channel = await connection.channel(publisher_confirms=True)
    retry = await channel.get_exchange(topo.names.retry)

    # When the email worker parks it in the 100ms email tier
    await retry.publish(build_message(envelope.to_json(), envelope.id, envelope.type),
                        routing_key=topo.names.retry_key("email", 0.1), mandatory=True)

    # Then after the TTL it is in the email due queue (not behind new work in the
    # work queue), with the broker's record of where it waited …
    email_q = await channel.get_queue(topo.names.due("email"))
    message = await eventually(lambda: email_q.get(no_ack=True, fail=False), timeout=10)
    assert message.message_id == envelope.id
    death = message.headers["x-death"][0]
    assert death["queue"] == topo.names.retry_queue("email", 0.1)
    assert death["reason"] == "expired"
    # … and it did not fan out again through the topic exchange
    for other in ("in_app", "sms", "push"):
        assert await message_count(connection, topo.names.work(other)) == 0, other
        assert await message_count(connection, topo.names.due(other)) == 0, other
    assert await message_count(connection, topo.names.work("email")) == 0
    await channel.close()


async def test_delivery_limit_dead_letters_a_message_that_keeps_coming_back(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings]
) -> None:
    # Given a work queue that allows 2 deliveries
    settings = make_settings(delivery_limit=2)
    topo = build(settings)
    await declare(connection, topo)
    try:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id="crasher"), routing_key=topo.names.work("email"))
        work = await channel.get_queue(topo.names.work("email"))
        dlq = await channel.get_queue(topo.names.dlq("email"))

        # When every worker that takes it gives it back without an ack (as a crash does)
        async def bounce_until_dead() -> aio_pika.abc.AbstractIncomingMessage | None:
            message = await work.get(no_ack=False, fail=False)
            if message is not None:
                await message.nack(requeue=True)
            return await dlq.get(no_ack=True, fail=False)

        dead = await eventually(bounce_until_dead, timeout=15, interval=0.1)

        # Then the broker dead-letters it to the DLQ instead of looping forever
        assert dead.message_id == "crasher"
        assert dead.headers["x-first-death-reason"] == "delivery_limit"

        async def work_empty() -> bool:
            return await message_count(connection, topo.names.work("email")) == 0

        await eventually(work_empty, timeout=10)
        await channel.close()
    finally:
        await delete_topology(connection, settings)


async def test_other_delivery_limit_is_a_mismatch_naming_queue_and_values(
    connection: AbstractRobustConnection, make_settings: Callable[..., Settings]
) -> None:
    # Given the topology declared with delivery limit 5
    five = make_settings(delivery_limit=5)
    await declare(connection, build(five))
    try:
        # When it is declared again with 7
        with pytest.raises(TopologyMismatch) as caught:
            await declare(connection, build(make_settings(delivery_limit=7)))

        # Then the error names the queue and the argument with both values
        queue = f"{five.prefix}.email"
        assert caught.value.queue == queue
        assert caught.value.differences == {"x-delivery-limit": (5, 7)}
        text = str(caught.value)
        assert f"'{queue}'" in text
        assert "x-delivery-limit: broker has 5, spec wants 7" in text
    finally:
        await delete_topology(connection, five)


async def test_retry_tier_with_another_ttl_is_a_mismatch(
    connection: AbstractRobustConnection, cleanup: Settings
) -> None:
    # Given an email retry tier someone created by hand with a 999ms TTL
    p = cleanup.prefix
    tier = f"{p}.email.delay.100ms"
    channel = await connection.channel()
    await channel.declare_queue(tier, durable=True, arguments={
        "x-queue-type": "classic", "x-message-ttl": 999, "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{p}.email.due"})
    await channel.close()

    # When the topology (100ms tier) is declared
    with pytest.raises(TopologyMismatch) as caught:
        await declare(connection, build(cleanup))

    # Then the mismatch names that tier and its TTL, both values
    assert caught.value.queue == tier
    assert caught.value.differences == {"x-message-ttl": (999, 100)}
    assert f"'{tier}'" in str(caught.value)
    assert "x-message-ttl: broker has 999, spec wants 100" in str(caught.value)


async def test_mismatch_lists_every_differing_argument(
    ctl: None, connection: AbstractRobustConnection, cleanup: Settings
) -> None:
    # Given an email work queue made by an older release: quorum, limit 3, no dead-lettering
    p = cleanup.prefix
    channel = await connection.channel()
    await channel.declare_queue(f"{p}.email", durable=True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 3})
    await channel.close()

    # When the topology is declared
    with pytest.raises(TopologyMismatch) as caught:
        await declare(connection, build(cleanup))

    # Then each difference is reported, with what the broker has and what the spec wants
    assert caught.value.queue == f"{p}.email"
    assert caught.value.differences == {
        "x-delivery-limit": (3, 5),
        "x-dead-letter-exchange": (None, f"{p}.dlx"),
        "x-dead-letter-routing-key": (None, "email"),
        "x-dead-letter-strategy": (None, "at-least-once"),
        "x-overflow": (None, "reject-publish"),
    }
    text = str(caught.value)
    for arg in caught.value.differences:
        assert arg in text
    assert "broker has None, spec wants 'at-least-once'" in text
    # and the existing queue was left as it was
    assert (await queues("/", p))[f"{p}.email"]["arguments"] == {
        "x-queue-type": "quorum", "x-delivery-limit": 3}


async def test_cli_declare_then_mismatch_prints_one_clear_error(
    amqp_url: str, connection: AbstractRobustConnection,
    make_settings: Callable[..., Settings], tmp_path: Path,
) -> None:
    settings = make_settings()
    env = clean_env(HERALD_AMQP_URL=amqp_url, HERALD_PREFIX=settings.prefix,
                    HERALD_RETRY_DELAYS="100ms,200ms", HERALD_MAX_RETRY=2,
                    HERALD_DELIVERY_LIMIT=5)
    try:
        # Given the topology declared through the CLI
        done = await run(herald_cmd("topology", "declare"), env, cwd=tmp_path)
        assert done.code == 0, done.stderr
        # per channel: work, due, DLQ and two delay tiers
        assert f"declared {4 * 5} queues under prefix '{settings.prefix}'" in done.stdout

        # When it is declared again with another delivery limit
        env["HERALD_DELIVERY_LIMIT"] = "7"
        done = await run(herald_cmd("topology", "declare"), env, cwd=tmp_path)

        # Then one line says which queue and argument differ, and it exits non-zero
        assert done.code != 0
        assert "Traceback" not in done.stderr + done.stdout
        assert len(done.error_lines) == 1, done.stderr
        line = done.error_lines[0]
        assert line.startswith("error: ")
        assert f"'{settings.prefix}.email'" in line
        assert "x-delivery-limit: broker has 5, spec wants 7" in line
    finally:
        await delete_topology(connection, make_settings(retry_delays="100ms,200ms",
                                                        max_retry=2))


# --- export --------------------------------------------------------------------------------


@pytest.fixture
async def vhost(ctl: None) -> AsyncIterator[str]:
    """A fresh vhost that guest may use; deleted afterwards."""
    name = f"herald-t-{uuid.uuid4().hex[:10]}"
    await rabbitmqctl("-q", "add_vhost", name)
    try:
        await rabbitmqctl("-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        await rabbitmqctl("-q", "delete_vhost", name)


def in_vhost(amqp_url: str, vhost: str) -> str:
    """``amqp_url`` pointed at ``vhost`` (url-encoded)."""
    parts = urlsplit(amqp_url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


async def test_export_imports_into_a_fresh_vhost_as_declare_builds_it(
    vhost: str, amqp_url: str, topology: Settings, tmp_path: Path
) -> None:
    # Given the test's topology declared by `declare` in "/"
    p = topology.prefix
    env = clean_env(HERALD_AMQP_URL=amqp_url, HERALD_PREFIX=p,
                    HERALD_RETRY_DELAYS="100ms,200ms,400ms", HERALD_MAX_RETRY=3)

    # When `herald topology export --vhost V` is imported into a fresh vhost
    path = tmp_path / "definitions.json"
    done = await run(herald_cmd("topology", "export", "--vhost", vhost, "-o", str(path)), env,
                     cwd=tmp_path)
    assert done.code == 0, done.stderr
    exported = json.loads(path.read_text())
    assert exported == json.loads(json.dumps(definitions(build(topology), vhost)))
    await import_definitions(path.read_bytes())

    # Then (the import is asynchronous) the vhost holds the same queues, arguments,
    # exchanges and bindings as `declare` made, which are the spec's
    topo = build(topology)
    want = expected_queues(topo)

    async def imported() -> bool:
        return len(await queues(vhost, p)) == len(want)

    await eventually(imported, timeout=30, interval=0.5)
    assert await queues(vhost, p) == await queues("/", p) == want
    assert await exchanges(vhost, p) == await exchanges("/", p) == {
        ex.name: ex.type for ex in topo.exchanges}
    assert await bindings(vhost, p) == await bindings("/", p) == expected_bindings(topo)

    # And declaring against the imported vhost finds nothing to change, nothing to refuse
    connection = await aio_pika.connect_robust(in_vhost(amqp_url, vhost))
    try:
        await declare(connection, topo)
    finally:
        await connection.close()
    env["HERALD_AMQP_URL"] = in_vhost(amqp_url, vhost)
    done = await run(herald_cmd("topology", "declare"), env, cwd=tmp_path)
    assert done.code == 0, done.stderr
    assert await queues(vhost, p) == want


async def test_export_to_stdout_is_a_definitions_document(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # Given settings with two retry delays
    settings = make_settings(retry_delays="1s,30s", max_retry=4)
    env = clean_env(HERALD_PREFIX=settings.prefix, HERALD_RETRY_DELAYS="1s,30s",
                    HERALD_MAX_RETRY=4)

    # When exported without --output or --vhost (no broker needed)
    done = await run(herald_cmd("topology", "export"), env, cwd=tmp_path)

    # Then stdout is exactly the definitions of the spec for vhost "/"
    assert done.code == 0, done.stderr
    document = json.loads(done.stdout)
    assert document == json.loads(json.dumps(definitions(build(settings), "/")))
    names = {q["name"] for q in document["queues"]}
    assert f"{settings.prefix}.email.delay.30s" in names
    assert all(q["vhost"] == "/" and q["durable"] for q in document["queues"])
