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
    replay_all: Annotated[bool, typer.Option("--all", help="every dead letter")] = False,
) -> None:
    """Send dead letters back to the work queue with their retry count reset."""
    from topology.dlq import replay
    from topology.spec import Names

    if bool(ids) == replay_all:
        raise _fail("say which: --id ID (repeatable) or --all", 2)
    settings = _settings()
    wanted = set(ids) if ids else None

    async def go(connection: AbstractRobustConnection) -> list[str]:
        return await replay(connection, Names(settings.prefix), channel, wanted)

    done = _on_broker(settings, go)
    if wanted is not None and (missing := wanted - set(done)):
        out.print(f"replayed {len(done)}; not found in the DLQ: {', '.join(sorted(missing))}")
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


@db_app.command("init")
def db_init() -> None:
    """Create the tables (idempotent)."""
    from herald.db import init_db, make_engine

    settings = _settings()

    async def go() -> None:
        engine = make_engine(settings.database_url)
        try:
            await init_db(engine)
        finally:
            await engine.dispose()

    _run(go)
    out.print("database ready")


@app.command("run")
def run(
    worker: Annotated[bool, typer.Option(help="run the email and in-app workers")] = True,
    api: Annotated[bool, typer.Option(help="run the HTTP API")] = True,
    relay: Annotated[bool, typer.Option(help="run the outbox relay")] = True,
) -> None:
    """Run the API, the outbox relay, the email and in-app workers (and a dev SMTP sink)."""
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
    if worker and not settings.worker_metrics_port and port_free("127.0.0.1", 9464):
        overrides["HERALD_WORKER_METRICS_PORT"] = "9464"
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
        children.append(Child("worker.email", ["consumers", "email"], env))
        in_app_env = env
        if "HERALD_WORKER_METRICS_PORT" in overrides:
            # The email worker has 9464; the next port, or no metrics, for this one.
            in_app_env = child_env({**overrides, "HERALD_WORKER_METRICS_PORT":
                                    "9465" if port_free("127.0.0.1", 9465) else "0"})
        children.append(Child("worker.in_app", ["consumers", "in_app"], in_app_env))
        if not settings.smtp_url:
            children.append(Child("mailsink", ["herald.mailsink"], env))
    if api:
        log.info("API on http://%s:%d (docs at /docs)", settings.api_host, settings.api_port)
    if "HERALD_SMTP_URL" in overrides:
        log.info("no HERALD_SMTP_URL: emails go to the dev sink and are saved in %s/",
                 settings.mail_dir)
    code = asyncio.run(Supervisor(children, settings.shutdown_timeout + 5).run())
    raise typer.Exit(code)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":  # ``python -m herald.cli …`` (it did nothing, silently, before)
    main()
