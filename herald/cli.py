"""The ``herald`` command: run everything, manage the topology, inspect and replay DLQs."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from herald.errors import HeraldError
from herald.settings import Settings, load_settings

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustConnection
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")
app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="herald: notifications over RabbitMQ.")
topology_app = typer.Typer(no_args_is_help=True, help="Declare or export exchanges and queues.")
dlq_app = typer.Typer(no_args_is_help=True, help="Inspect, replay and purge dead letters.")
db_app = typer.Typer(no_args_is_help=True, help="Database maintenance.")
app.add_typer(topology_app, name="topology")
app.add_typer(dlq_app, name="dlq")
app.add_typer(db_app, name="db")
err = Console(stderr=True, soft_wrap=True)
out = Console()
CHANNELS = ("email", "in_app", "push", "sms")


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except HeraldError as exc:
        raise _fail(str(exc), 2) from None


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async operation, turning broker and herald errors into one clear line."""
    from aio_pika.exceptions import AMQPConnectionError, ChannelNotFoundEntity

    async def wrapped() -> T:
        return await coro_fn()

    # aio-pika logs each failed connect before raising; the one line below says it.
    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(wrapped())
    except HeraldError as exc:
        raise _fail(str(exc)) from None
    except ChannelNotFoundEntity as exc:
        raise _fail(f"{exc}; run `herald topology declare` first") from None
    except (AMQPConnectionError, ConnectionError, OSError) as exc:
        raise _fail(f"cannot reach RabbitMQ: {exc or type(exc).__name__} "
                    "(start it: `rabbitmq-server -detached` or `docker compose up -d rabbitmq`; "
                    "or set HERALD_AMQP_URL)") from None


def _on_broker(settings: Settings,
               operation: Callable[[AbstractRobustConnection], Awaitable[T]]) -> T:
    """Run ``operation`` on a fresh broker connection, closed afterwards (see ``_run``)."""
    from topology.dlq import connect

    async def go() -> T:
        connection = await connect(settings.amqp_url)
        try:
            return await operation(connection)
        finally:
            await connection.close()

    return _run(go)


def _channel(value: str) -> str:
    if value not in CHANNELS:
        raise typer.BadParameter(f"unknown channel {value!r}; one of: {', '.join(CHANNELS)}")
    return value


ChannelArg = Annotated[str, typer.Argument(help="email, in_app, push or sms",
                                           callback=_channel)]


@topology_app.command("declare")
def topology_declare() -> None:
    """Create every exchange, queue and binding (idempotent)."""
    from topology.declare import declare
    from topology.spec import build

    settings = _settings()

    async def go(connection: AbstractRobustConnection) -> int:
        topo = build(settings)
        await declare(connection, topo)
        return len(topo.queues)

    count = _on_broker(settings, go)
    out.print(f"declared {count} queues under prefix {settings.prefix!r}")


@topology_app.command("migrate")
def topology_migrate(
    wait: Annotated[float, typer.Option(
        help="seconds to wait for old retry tiers to drain before deleting them")] = 0.0,
) -> None:
    """Bring a broker declared by an older herald to this topology, losing no message.

    Declares what is new, then retires the old retry tiers (``<channel>.retry.<delay>``):
    unbound at once, deleted once empty (their messages drain into the work queues).
    """
    from topology.declare import declare
    from topology.migrate import LegacyTier, retire
    from topology.spec import build

    settings = _settings()

    async def go(connection: AbstractRobustConnection) -> list[LegacyTier]:
        await declare(connection, build(settings))
        return await retire(connection, settings, wait=wait)

    tiers = _on_broker(settings, go)
    left = [t for t in tiers if not t.deleted]
    for tier in tiers:
        out.print(f"{tier.queue}: " + ("deleted" if tier.deleted else
                                       f"unbound, {tier.messages} message(s) still draining"))
    if left:
        out.print(f"{len(left)} old tier(s) still drain into the work queues; run "
                  f"`herald topology migrate --wait 600` later to delete them")
        raise typer.Exit(1)
    out.print(f"topology of {settings.prefix!r} is current"
              + (f"; {len(tiers)} old tier(s) removed" if tiers else ""))


@topology_app.command("export")
def topology_export(
    vhost: Annotated[str, typer.Option(help="vhost written into the definitions")] = "/",
    output: Annotated[str, typer.Option("--output", "-o", help="file (default: stdout)")] = "-",
) -> None:
    """Print the topology as a RabbitMQ definitions file (management UI / import_definitions)."""
    from topology.export import definitions
    from topology.spec import build

    text = json.dumps(definitions(build(_settings()), vhost), indent=2)
    if output == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        err.print(f"wrote {output}")


@dlq_app.command("list")
def dlq_list(
    channel: ChannelArg,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array")] = False,
    limit: Annotated[int, typer.Option(min=1, help="at most this many")] = 1000,
) -> None:
    """Show dead letters without consuming them."""
    from topology.dlq import browse
    from topology.spec import Names

    settings = _settings()

    async def go(connection: AbstractRobustConnection) -> list[dict[str, object]]:
        found = await browse(connection, Names(settings.prefix), channel, limit)
        return [m.as_dict() for m in found]

    rows = _on_broker(settings, go)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        out.print(f"{settings.prefix}.{channel}.dlq is empty")
        return
    table = Table(title=f"{settings.prefix}.{channel}.dlq ({len(rows)})")
    for col in ("id", "event", "attempts", "age", "reason / last error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        age = r["age_seconds"]
        table.add_row(str(r["id"]), str(r["event_type"]), str(r["attempts"]),
                      "?" if age is None else f"{float(str(age)):.0f}s",
                      f"{r['reason']}\n{r['last_error']}".strip())
    out.print(table)


@dlq_app.command("replay")
def dlq_replay(
    channel: ChannelArg,
    ids: Annotated[list[str] | None, typer.Option("--id", help="message id (repeatable)")] = None,
    events: Annotated[list[str] | None, typer.Option(
        "--event", help="every entry of this event: the envelope and each recipient's or "
                        "device's own entry (repeatable)")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="every dead letter")] = False,
) -> None:
    """Send dead letters back to the work queue with their retry count reset."""
    from topology.dlq import of_event, replay
    from topology.spec import Names

    if sum((bool(ids), bool(events), replay_all)) != 1:
        raise _fail("say which: --id ID, --event EVENT_ID (both repeatable) or --all", 2)
    settings = _settings()
    wanted = set(ids) if ids else None
    wanted_events = set(events) if events else None

    async def go(connection: AbstractRobustConnection) -> list[str]:
        return await replay(connection, Names(settings.prefix), channel, wanted, wanted_events)

    done = _on_broker(settings, go)
    if wanted is not None and (missing := wanted - set(done)):
        out.print(f"replayed {len(done)}; not found in the DLQ: {', '.join(sorted(missing))}")
        raise typer.Exit(1)
    if wanted_events is not None and (missing := {
            e for e in wanted_events if not any(of_event(d, e) for d in done)}):
        out.print(f"replayed {len(done)}; no DLQ entry for event(s): "
                  f"{', '.join(sorted(missing))}")
        raise typer.Exit(1)
    out.print(f"replayed {len(done)} message(s) to {settings.prefix}.{channel}")


@dlq_app.command("purge")
def dlq_purge(
    channel: ChannelArg,
    yes: Annotated[bool, typer.Option("--yes", help="really delete them")] = False,
) -> None:
    """Delete every dead letter of a channel (asks for --yes)."""
    from topology.dlq import purge
    from topology.spec import Names

    if not yes:
        raise _fail("purging deletes the messages for good; add --yes to confirm", 2)
    settings = _settings()

    async def go(connection: AbstractRobustConnection) -> int:
        return await purge(connection, Names(settings.prefix), channel)

    out.print(f"purged {_on_broker(settings, go)} message(s) from "
              f"{settings.prefix}.{channel}.dlq")


def _on_database(settings: Settings, operation: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run ``operation`` on a fresh engine, disposed afterwards; database errors are one line."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from herald.db import make_engine

    url = make_url(settings.database_url)
    where = url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)

    def reason(exc: Exception) -> str:
        return str(exc.orig if isinstance(exc, DBAPIError) else exc).strip().splitlines()[0]

    async def go() -> T:
        try:
            engine = make_engine(settings.database_url)
        except OSError as exc:
            raise HeraldError(f"cannot open the database {where}: {exc}") from None
        try:
            try:
                async with engine.connect():
                    pass
            except (OSError, SQLAlchemyError) as exc:
                raise HeraldError(f"cannot reach the database {where}: {reason(exc)} "
                                  "(check HERALD_DATABASE_URL)") from None
            try:
                return await operation(engine)
            except SQLAlchemyError as exc:
                raise HeraldError(f"database error on {where}: {reason(exc)}") from None
        finally:
            await engine.dispose()

    return _run(go)


def _revision(value: str) -> str:
    """``value`` if some migration script has it (exit 2 otherwise), before any connection."""
    from herald.migrations import check_revision

    try:
        check_revision(value)
    except HeraldError as exc:
        raise _fail(str(exc), 2) from None
    return value


def _say(text: str) -> None:
    out.print(text, highlight=False, soft_wrap=True)


@db_app.command("init")
def db_init() -> None:
    """Create or upgrade the tables to the newest revision (idempotent; = db upgrade)."""
    from herald.db import upgrade_db

    _before, after = _on_database(_settings(), upgrade_db)
    _say(f"database ready at revision {after}")


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="target (default: head, the newest)")] = "head",
) -> None:
    """Upgrade the schema to REVISION; a database made before migrations is adopted first."""
    from herald.db import upgrade_db

    _revision(revision)
    before, after = _on_database(_settings(), lambda engine: upgrade_db(engine, revision))
    _say(f"already at {after}" if before == after else f"upgraded {before or 'base'} -> {after}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="target: 0001_spine (or 0001), or base")],
) -> None:
    """Downgrade the schema to REVISION; dropped tables and columns lose their data."""
    from herald.db import downgrade_db

    _revision(revision)
    before, after = _on_database(_settings(), lambda engine: downgrade_db(engine, revision))
    _say(f"already at {after or 'base'}" if before == after
         else f"downgraded {before} -> {after or 'base'}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's revision (and whether it is the newest)."""
    from herald.db import current_revision
    from herald.migrations import head

    revision = _on_database(_settings(), current_revision)
    if revision is None:
        _say("none (an empty database, or one made before migrations: "
             "`herald db upgrade` adopts it)")
    elif revision == head():
        _say(f"{revision} (head)")
    else:
        _say(f"{revision} (head is {head()}: run `herald db upgrade`)")


@app.command("run")
def run(
    worker: Annotated[bool, typer.Option(help="run the channel workers")] = True,
    api: Annotated[bool, typer.Option(help="run the HTTP API")] = True,
    relay: Annotated[bool, typer.Option(help="run the outbox relay")] = True,
) -> None:
    """Run the API, the outbox relay, the four channel workers (and a dev SMTP sink)."""
    from herald.db import init_db, make_engine
    from herald.logs import setup_logging
    from herald.supervisor import Child, Supervisor, child_env, port_free
    from topology.declare import declare
    from topology.spec import build

    settings = _settings()
    setup_logging(settings.log_level, "run")
    log = logging.getLogger("herald.run")
    overrides: dict[str, str] = {}
    children: list[Child] = []
    if worker and not settings.smtp_url:
        if not port_free("127.0.0.1", settings.mailsink_port):
            raise _fail(f"HERALD_MAILSINK_PORT {settings.mailsink_port} is in use; "
                        "set another, or HERALD_SMTP_URL to a real server")
        overrides["HERALD_SMTP_URL"] = f"smtp://127.0.0.1:{settings.mailsink_port}"
    if api and not port_free(settings.api_host, settings.api_port):
        raise _fail(f"HERALD_API_PORT {settings.api_port} is in use on {settings.api_host}; "
                    "stop what runs there or set HERALD_API_PORT")

    async def prepare(connection: AbstractRobustConnection) -> None:
        await declare(connection, build(settings))
        engine = make_engine(settings.database_url)
        try:
            await init_db(engine)
        finally:
            await engine.dispose()

    _on_broker(settings, prepare)
    env = child_env(overrides)
    if api:
        children.append(Child("api", ["producer.api"], env))
    if relay:
        children.append(Child("relay", ["producer.relay"], env))
    if worker:
        # Each worker exposes metrics on the next free port from 9464 unless one is set.
        port = 9464
        for channel in CHANNELS:
            extra: dict[str, str] = {}
            if not settings.worker_metrics_port:
                while port < 9564 and not port_free("127.0.0.1", port):
                    port += 1
                extra["HERALD_WORKER_METRICS_PORT"] = str(port) if port < 9564 else "0"
                port += 1
            children.append(Child(f"worker.{channel}", ["consumers", channel],
                                  child_env({**overrides, **extra})))
        if not settings.smtp_url:
            children.append(Child("mailsink", ["herald.mailsink"], env))
    if api:
        log.info("API on http://%s:%d (docs at /docs)", settings.api_host, settings.api_port)
    if "HERALD_SMTP_URL" in overrides:
        log.info("no HERALD_SMTP_URL: emails go to the dev sink and are saved in %s/",
                 settings.mail_dir)
    if worker and not settings.sms_providers:
        log.info("no HERALD_SMS_PROVIDERS: text messages are saved in %s/", settings.sms_dir)
    if worker and None in (settings.fcm_credentials_file, settings.apns_key_file,
                           settings.vapid_private_key_file):
        log.info("push platforms without credentials are saved in %s/", settings.push_dir)
    code = asyncio.run(Supervisor(children, settings.shutdown_timeout + 5).run())
    raise typer.Exit(code)


@app.command("why")
def why(
    event_id: Annotated[str, typer.Argument(help="the event id (POST /post answers it)")],
    user: Annotated[str | None, typer.Option(help="only this user's decisions")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show, per channel, recipient and device, whether an event notified and why (not)."""
    from sqlalchemy.exc import SQLAlchemyError

    from herald.db import make_engine, session_factory
    from herald.why import ChannelDecision, explain

    settings = _settings()

    async def go() -> list[ChannelDecision]:
        engine = make_engine(settings.database_url)
        try:
            return await explain(session_factory(engine), event_id, user)
        except SQLAlchemyError as exc:
            raise _fail(f"database {settings.database_url.split('@')[-1]}: "
                        f"{type(exc).__name__}") from None
        finally:
            await engine.dispose()

    decisions = _run(go)
    if not decisions:
        raise _fail(f"nothing recorded for event {event_id!r}"
                    + (f" and user {user!r}" if user else "")
                    + " (unknown id, or the workers have not handled it yet)")
    if as_json:
        sys.stdout.write(json.dumps([d.as_dict() for d in decisions], indent=2) + "\n")
        return
    from rich.markup import escape

    for d in decisions:
        where = d.channel + (f" device {d.device_id}" if d.device_id else "")
        colour = "green" if d.status in ("sent", "digested") else "yellow"
        out.print(f"[bold]{escape(where)}[/] to {escape(d.user_id)}: "
                  f"[{colour}]{d.meaning}[/] — {escape(d.reason)}", highlight=False,
                  soft_wrap=True)
        for step in d.trail:
            answer = f" → {step['answer']}" if step.get("answer") is not None else ""
            note = f"  ({step['note']})" if step.get("note") else ""
            line = f"    {step.get('node', '?')!s:>5}  {step.get('label', '')}{answer}{note}"
            out.print(escape(line), highlight=False, soft_wrap=True)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":  # ``python -m herald.cli …`` (it did nothing, silently, before)
    main()
