"""herald's email worker against the broker's ceiling, Celery and Dramatiq, in one run.

    uv run --group bench python -m bench.email_throughput [--messages 2000] [--runs 3]
        [--db postgresql,sqlite] [--workers 1,2] [--only bare,sink,herald,celery,dramatiq]
        [--rival-queue quorum|classic] [--herald-env HERALD_PREFETCH=50 ...]
        [--profile DIR] [--log-dir DIR]

Contenders, each run in turn, then again (A B C … A B C …), ``--runs`` rounds:

- bare aio-pika on a quorum and on a classic queue: pre-fill with publisher confirms
  (100 in flight; that rate is reported too), then consume + ack with prefetch 100;
- the instant SMTP sink alone (smtplib, one connection, one pre-built message): what
  the sink takes when nothing else is done per message;
- herald's email worker, ``python -m consumers email`` as a user starts it, one or two
  processes, on a SQLite file or a fresh PostgreSQL database per run; settings through
  HERALD_* variables, the rate limit off (``HERALD_EMAIL_RATE_LIMIT=1000000/s``), no
  Redis; events published to ``<prefix>.events`` with routing key ``user.signup`` as
  the relay publishes them (confirmed, mandatory);
- the same job in Celery (``--pool solo``, ``acks_late``, default prefetch multiplier 4)
  and in Dramatiq (one process, one thread), one worker process each, one kept SMTP
  connection per process, on a ``--rival-queue`` queue (quorum by default, as herald's).

Method: the queue is pre-filled with N messages before the consumer starts, then the
time to drain it is measured at the SMTP sink, from the moment every worker process of
the contender is consuming (or from the first email, if none had arrived by then) to the
N-th email. Pre-filling keeps the publisher out of the timed window (on two shared cores
it would take CPU from the consumer and cap its rate) and every contender meets the same
full queue, never an empty one; start-up (imports, database set-up, connecting) is not
throughput and is left out. Completion is the sink's count.

Prints one table (msg/s median, min, max; worker CPU ms per message) and the ratios
from the same run, plus the load average at the start and the end. Exits 0 and prints
the table even when a contender fails (its row says why); every process is stopped and
every queue, exchange and database it made is deleted, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python bench/email_throughput.py`` as well as ``-m``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ceiling import bare_round, signup_envelope
from bench.common import (
    Broker,
    CountingSink,
    SinkThread,
    cpu_seconds,
    load_average,
    one_line,
    percentile,
    print_table,
    run_main,
)
from bench.rivals import CeleryRival, DramatiqRival, Mailer, Rival, installed
from bench.workers import CHANNEL, Stage, WorkerProcess

RATE_OFF = "1000000/s"
KINDS = ("bare", "sink", "herald", "celery", "dramatiq")


# ---------------------------------------------------------------- one measurement


@dataclass
class Result:
    """One run of one contender."""

    rate: float  #: msg/s over the timed window
    cpu_ms: float | None = None  #: worker processes' CPU per message in that window
    extra: dict[str, float] = field(default_factory=dict)  #: other rates (publish)


async def drain(sink: CountingSink, n: int, start: tuple[float, int], timeout: float,
                failed: Callable[[], str | None]) -> float:
    """Wait for the ``n``-th email at ``sink``; msg/s from ``start`` (a time and the sink's
    count then) or, if no email had arrived by then, from the first one.

    Raises ``RuntimeError`` when ``failed()`` names a reason (a worker died) or after
    ``timeout`` seconds, saying how many arrived.
    """
    deadline = time.monotonic() + timeout
    while sink.count < n:
        if (why := failed()) is not None:
            raise RuntimeError(f"{why} ({sink.count} of {n} emails)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timeout: {sink.count} of {n} emails after {timeout:.0f} s")
        await asyncio.sleep(0.02)
    began, before = start
    if before == 0:
        began, before = sink.times[0], 1
    if n - before < n // 2:
        raise RuntimeError(f"{before} of {n} emails went before every worker was consuming; "
                           "too few left to time: use more --messages")
    return (n - before) / (sink.times[n - 1] - began)


def exited(workers: Sequence[WorkerProcess]) -> str | None:
    """Why the run cannot finish: a worker that exited, with its last line."""
    for worker in workers:
        if not worker.running:
            code = worker.process.returncode if worker.process else None
            last = worker.tail(1)
            return f"{worker.name} exited with {code}" + (f": {last}" if last else "")
    return None


class Context:
    """What every run shares: options, the broker connection, directories, the profiler."""

    def __init__(self, args: argparse.Namespace, broker: Broker, log_dir: Path,
                 scratch: Path) -> None:
        self.args = args
        self.n: int = args.messages
        self.broker = broker
        self.log_dir = log_dir
        self.scratch = scratch
        self.timeout = 30 + self.n / 15  # a contender slower than ~15 msg/s fails the run
        self.herald_env: dict[str, str] = dict(args.herald_env)
        self.profile: Path | None = None  #: set for the one (uncounted) profiled run

    def events(self, tag: str) -> list[dict[str, Any]]:
        """N signup events as the wire carries them (JSON), ids and addresses unique."""
        return [json.loads(signup_envelope(i, tag).to_json()) for i in range(self.n)]


async def run_bare(ctx: Context, queue_type: str) -> Result:
    """Bare aio-pika: pipelined confirmed publish, then consume + ack at prefetch 100."""
    rates = await bare_round(queue_type, ctx.n, window=100, prefetch=100)
    return Result(rates["consume"], extra={"publish": rates["publish"]})


async def run_sink(ctx: Context) -> Result:
    """The sink alone: one smtplib connection sends one pre-built email N times."""
    sink = CountingSink()
    with SinkThread(sink) as smtp:
        mailer = Mailer("127.0.0.1", smtp.port)
        message = mailer.compose(ctx.events("bench-sink")[0])

        def send_all() -> None:
            for _ in range(ctx.n):
                mailer.send(message)

        await asyncio.wait_for(asyncio.to_thread(send_all), ctx.timeout)
        return Result((ctx.n - 1) / (sink.times[-1] - sink.times[0]))


async def run_herald(ctx: Context, database: str, processes: int) -> Result:
    """herald's email worker: fresh prefix and database, N events pre-filled, drained."""
    sink = CountingSink()
    with SinkThread(sink) as smtp:
        async with Stage(f"email-{database[:2]}{processes}", database, ctx.broker,
                         ctx.log_dir, ctx.scratch) as stage:
            # --herald-env comes last: it may override these too.
            stage.configure(**{"HERALD_SMTP_URL": smtp.url,
                               "HERALD_EMAIL_RATE_LIMIT": RATE_OFF, **ctx.herald_env})
            await stage.prepare()
            envelopes = [signup_envelope(i, stage.prefix) for i in range(ctx.n)]
            await stage.publish(envelopes)
            queue = stage.names.work(CHANNEL)
            deadline = time.monotonic() + 30
            while (ready := await stage.ready(queue)) < ctx.n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {ready} of {ctx.n} events reached {queue}")
                await asyncio.sleep(0.05)
            workers = await stage.start_workers(processes)
            start = (time.monotonic(), sink.count)
            pids = [pid for w in workers for pid in w.pids()]
            cpu = cpu_seconds(pids)
            profiler = await start_profiler(ctx, workers[0]) if ctx.profile else None
            try:
                rate = await drain(sink, ctx.n, start, ctx.timeout, lambda: exited(workers))
            finally:
                if profiler is not None:
                    await stop_profiler(profiler)
            cpu = cpu_seconds(pids) - cpu
            done = ctx.n - max(start[1], 1)
            return Result(rate, cpu_ms=cpu / done * 1000)


async def run_rival(ctx: Context, make: Callable[[int, Path], Rival]) -> Result:
    """Celery or Dramatiq: unique queue, N tasks pre-filled, one worker process drains."""
    sink = CountingSink()
    with SinkThread(sink) as smtp:
        rival = make(smtp.port, ctx.log_dir)
        try:
            await rival.prefill(ctx.events(rival.queue))
            worker = await rival.start()
            deadline = time.monotonic() + 90
            while True:  # consuming: the broker counts its consumer on the work queue
                if (why := exited([worker])) is not None:
                    raise RuntimeError(why)
                found = await ctx.broker.counts(rival.queue)
                if found is not None and found[1] >= 1:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("worker not consuming within 90 s")
                await asyncio.sleep(0.2)
            start = (time.monotonic(), sink.count)
            pids = worker.pids()
            cpu = cpu_seconds(pids)
            rate = await drain(sink, ctx.n, start, ctx.timeout, lambda: exited([worker]))
            cpu = cpu_seconds(pids) - cpu
            return Result(rate, cpu_ms=cpu / (ctx.n - max(start[1], 1)) * 1000)
        except Exception:
            if rival.worker is not None:
                print(f"\n-- last lines of {rival.name} ({rival.queue}):\n"
                      f"{rival.worker.tail()}", file=sys.stderr)
            raise
        finally:
            await rival.cleanup()


# ---------------------------------------------------------------- py-spy on one worker


@dataclass
class Profiler:
    """A ``py-spy record`` process attached to one worker."""

    process: asyncio.subprocess.Process
    output: Path
    log: Path


async def start_profiler(ctx: Context, worker: WorkerProcess) -> Profiler:
    """Attach py-spy (``uv tool run py-spy``, from PyPI) to the worker's Python process."""
    assert ctx.profile is not None
    pid = python_pid(worker.pids())
    if pid is None:
        raise RuntimeError("no Python process found under the worker")
    uv = shutil.which("uv")
    command = ([uv, "tool", "run", "py-spy"] if uv else ["py-spy"]) + [
        "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
        "--duration", str(int(ctx.timeout)), "--output", str(ctx.profile)]
    log = ctx.profile.with_suffix(".log")
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    return Profiler(process, ctx.profile, log)


def python_pid(pids: Sequence[int]) -> int | None:
    """The one of ``pids`` that runs Python (not the ``uv run`` above it)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("python"):
                return pid
    return None


async def stop_profiler(profiler: Profiler) -> None:
    """Ctrl-C to py-spy (it writes what it sampled), SIGKILL if it does not exit."""
    process = profiler.process
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)  # its own group: uv and py-spy
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 20)
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_HERALD = ("consumers/", "herald/", "topology/")
_AREAS = (  # (label, path fragment), first match wins
    ("herald (consumers/, herald/, topology/)", "consumers/"),
    ("herald (consumers/, herald/, topology/)", "herald/"),
    ("herald (consumers/, herald/, topology/)", "topology/"),
    ("sqlalchemy / sqlmodel", "sqlalchemy/"), ("sqlalchemy / sqlmodel", "sqlmodel/"),
    ("aiosqlite / sqlite3", "aiosqlite/"), ("aiosqlite / sqlite3", "sqlite3/"),
    ("asyncpg", "asyncpg/"), ("aio-pika / aiormq / pamqp", "aio_pika/"),
    ("aio-pika / aiormq / pamqp", "aiormq/"), ("aio-pika / aiormq / pamqp", "pamqp/"),
    ("aiosmtplib", "aiosmtplib/"), ("jinja2", "jinja2/"), ("pydantic", "pydantic"),
    ("email (stdlib)", "email/"), ("logging (stdlib)", "logging/"),
    ("prometheus_client", "prometheus_client/"), ("throttled / purgatory", "throttled/"),
    ("throttled / purgatory", "purgatory/"),
)
#: Event-loop plumbing: a sample whose leaf is here is charged to the caller below it
#: (a socket write counts for the library that wrote), found by walking down the stack.
_PLUMBING = ("asyncio/", "selectors.py", "threading.py", "socket.py", "<frozen runpy>")


def _area(file: str) -> str:
    for label, fragment in _AREAS:
        if fragment in file:
            return label
    return "other: " + "/".join(Path(file).parts[-2:])


def profile_summary(raw: str, top: int = 12) -> list[tuple[str, ...]]:
    """Rows for the table of a ``py-spy --format raw`` (collapsed stacks) profile: the
    share of on-CPU samples by area (the package of the deepest frame that is not
    event-loop plumbing), by function itself (self), and by herald function with what it
    calls (inclusive). Samples waiting in ``select`` are idle and left out (py-spy counts
    a thread polling with a timeout, such as the metrics server's, as active)."""
    total = idle = 0
    by_area: Counter[str] = Counter()
    by_self: Counter[str] = Counter()
    by_herald: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            func, file = (match["func"], match["file"]) if match else (frame, "")
            frames.append((f"{func} ({'/'.join(Path(file).parts[-2:]) or '?'})", file))
        if frames[-1][0].endswith("select (selectors.py)") or ".select (selectors.py" in \
                frames[-1][0]:
            idle += count
            continue
        total += count
        by_self[frames[-1][0]] += count
        owner = next((file for _, file in reversed(frames)
                      if file and not any(p in file for p in _PLUMBING)), frames[-1][1])
        by_area[_area(owner)] += count
        for name in dict.fromkeys(n for n, file in frames
                                  if any(f"/{h}" in file or file.startswith(h)
                                         for h in _HERALD)):
            by_herald[name] += count
    if not total:
        return [("(no samples)", "", "")]

    def share(value: int) -> str:
        return f"{100 * value / total:.1f} %"

    rows: list[tuple[str, ...]] = [
        (f"where ({total} on-CPU samples; {idle} idle in select left out)", "share", "kind")]
    rows += [(name, share(v), "area") for name, v in by_area.most_common(top)]
    rows += [(name, share(v), "self") for name, v in by_self.most_common(top)]
    rows += [(name, share(v), "herald, inclusive") for name, v in by_herald.most_common(top)]
    return rows


@dataclass
class Row:
    """One contender: its label, how to run it, and every run's result or error."""

    key: str
    label: str
    run: Callable[[Context], Awaitable[Result]]
    results: list[Result | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def rates(self, what: str | None = None) -> list[float]:
        """Successful runs' rates (``what``: one of the extra rates)."""
        return [(r.rate if what is None else r.extra[what]) for r in self.results
                if r is not None and (what is None or what in r.extra)]

    def median(self) -> float | None:
        """The median rate, or None when no run worked."""
        rates = self.rates()
        return percentile(rates, 50) if rates else None


def contenders(args: argparse.Namespace) -> list[Row]:
    """The rows to run, in the order of each round."""
    rows: list[Row] = []
    if "bare" in args.only:
        for queue_type in ("quorum", "classic"):
            rows.append(Row(f"bare-{queue_type}",
                            f"bare aio-pika consume+ack, {queue_type}, prefetch 100",
                            partial(run_bare, queue_type=queue_type)))
    if "sink" in args.only:
        rows.append(Row("sink", "instant SMTP sink alone (smtplib, one connection)", run_sink))
    if "herald" in args.only:
        for database in args.db:
            for processes in args.workers:
                rows.append(Row(
                    f"herald-{database}-{processes}",
                    f"herald email worker, {database}, {processes} process"
                    + ("es" if processes > 1 else ""),
                    partial(run_herald, database=database, processes=processes)))
    queue_type = args.rival_queue
    if "celery" in args.only:
        rows.append(Row("celery",
                        f"celery {installed('celery') or '(missing)'}, solo, acks_late, "
                        f"prefetch 4, {queue_type}",
                        lambda ctx: run_rival(ctx, lambda port, logs: CeleryRival(
                            port, queue_type, logs))))
    if "dramatiq" in args.only:
        threads = args.dramatiq_threads
        rows.append(Row("dramatiq",
                        f"dramatiq {installed('dramatiq') or '(missing)'}, 1 process, "
                        f"{threads} thread{'s' if threads > 1 else ''}, {queue_type}",
                        lambda ctx: run_rival(ctx, lambda port, logs: DramatiqRival(
                            port, queue_type, logs, threads))))
    return rows


def rate_cells(rates: Sequence[float], errors: Sequence[str], runs: int) -> tuple[str, ...]:
    """(median, min, max, runs) cells; "failed: why" when no run worked."""
    if not rates:
        return (f"failed: {errors[0] if errors else 'not run'}", "", "", f"0/{runs}")
    done = f"{len(rates)}/{len(rates) + len(errors)}"
    if errors:
        done += f" (failed: {errors[0]})"
    return (f"{percentile(rates, 50):.0f}", f"{min(rates):.0f}", f"{max(rates):.0f}", done)


def table_rows(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    """The main table."""
    out: list[tuple[str, ...]] = [("contender", "median", "min", "max", "CPU ms/msg", "runs")]
    for row in rows:
        rates, cells = row.rates(), rate_cells(row.rates(), row.errors, len(row.results))
        cpu = [r.cpu_ms for r in row.results if r is not None and r.cpu_ms is not None]
        out.append((row.label, *cells[:3], f"{percentile(cpu, 50):.2f}" if cpu else "",
                    cells[3]))
        if rates and row.rates("publish"):
            publish = rate_cells(row.rates("publish"), [], len(row.results))
            out.append((row.label.replace("consume+ack", "publish, confirms pipelined (100)")
                        .replace(", prefetch 100", ""), *publish[:3], "", publish[3]))
    return out


def ratio_rows(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    """herald ÷ each reference, as the ratio of medians and round by round."""
    by_key = {row.key: row for row in rows}
    references = [(key, name, target) for key, name, target in (
        ("celery", "Celery", "target >= 2"), ("dramatiq", "Dramatiq", "target >= 2"),
        ("bare-quorum", "bare quorum consume+ack", "aim 0.25"))
        if key in by_key]
    out: list[tuple[str, ...]] = [("ratio (medians of the same run)", "value", "per round",
                                   "")]
    for row in rows:
        if not row.key.startswith("herald-"):
            continue
        for key, name, target in references:
            reference = by_key[key]
            if row.median() is None or reference.median() is None:
                why = "no successful run of " + (name if row.median() is not None
                                                  else row.label)
                out.append((f"{row.label} / {name}", "n/a", why, target))
                continue
            ratio = row.median() / reference.median()  # type: ignore[operator]
            rounds = [f"{a.rate / b.rate:.2f}" for a, b in zip(row.results, reference.results,
                                                               strict=False)
                      if a is not None and b is not None]
            out.append((f"{row.label} / {name}", f"{ratio:.2f}", " ".join(rounds), target))
    return out


async def one(ctx: Context, row: Row) -> None:
    """Run ``row`` once; note its result or its error (one line)."""
    began = time.monotonic()
    print(f"  {row.label} …", end="", file=sys.stderr, flush=True)
    try:
        result: Result | None = await row.run(ctx)
    except Exception as error:
        result = None
        row.errors.append(one_line(error))
    row.results.append(result)
    took = time.monotonic() - began
    print(f" {result.rate:.0f} msg/s ({took:.0f} s)" if result else
          f" failed: {row.errors[-1]} ({took:.0f} s)", file=sys.stderr, flush=True)


async def compare(args: argparse.Namespace) -> int:
    """Every contender ``args.runs`` times, interleaved; then the table and the ratios."""
    started = time.monotonic()
    load_start = load_average()
    print(f"load average at start: {load_start}", flush=True)
    rows = contenders(args)
    interrupted = False
    profiled: tuple[str, list[tuple[str, ...]]] | None = None
    with tempfile.TemporaryDirectory(prefix="herald-throughput-") as tmp:
        log_dir = Path(args.log_dir) if args.log_dir else Path(tmp) / "logs"
        async with Broker() as broker:
            ctx = Context(args, broker, log_dir, Path(tmp) / "scratch")
            try:
                for run in range(args.runs):
                    print(f"round {run + 1}/{args.runs}", file=sys.stderr, flush=True)
                    for row in rows:
                        await one(ctx, row)
                if args.profile:
                    profiled = await profile(ctx, Path(args.profile))
            except asyncio.CancelledError:
                interrupted = True  # Ctrl-C: clean-up ran; print what was measured
    took = time.monotonic() - started
    herald_env = " ".join(f"{k}={v}" for k, v in args.herald_env)
    print_table(
        f"email throughput: {args.messages} messages pre-filled, then drained; msg/s at the "
        f"SMTP sink, {args.runs} interleaved rounds" + (" (INTERRUPTED)" if interrupted else ""),
        table_rows(rows))
    print(f"  herald: HERALD_EMAIL_RATE_LIMIT={RATE_OFF}, no Redis, other settings default"
          + (f" except {herald_env}" if herald_env else "")
          + "; CPU ms/msg: the worker processes' user+system CPU over the timed window")
    ratios = ratio_rows(rows)
    if len(ratios) > 1:
        print_table("ratios (targets for PostgreSQL, one process)", ratios)
    if profiled is not None:
        print_table(*profiled)
    print(f"\nload average at start: {load_start}; at end: {load_average()}; "
          f"took {took:.0f} s")
    if interrupted:
        raise asyncio.CancelledError
    return 0


async def profile(ctx: Context, directory: Path) -> tuple[str, list[tuple[str, ...]]]:
    """One more herald run (PostgreSQL, one process; not counted) with py-spy attached;
    the title and rows of its summary table."""
    directory.mkdir(parents=True, exist_ok=True)
    output = ctx.profile = directory / "email-worker.txt"
    print("profiled run (not counted): herald email worker, postgresql, 1 process",
          file=sys.stderr, flush=True)
    title = "py-spy profile of one herald email worker (postgresql, 1 process, 100 Hz)"
    try:
        result = await run_herald(ctx, "postgresql", 1)
    except Exception as error:
        return title, [("profiled run", f"failed: {one_line(error)}")]
    finally:
        ctx.profile = None
    if not output.exists():
        log = output.with_suffix(".log")
        why = log.read_text(errors="replace").strip().splitlines()[:1] if log.exists() else []
        return title, [("py-spy", f"failed: {one_line(why[0]) if why else 'no output'}")]
    return (f"{title}: {result.rate:.0f} msg/s while sampled; collapsed stacks in {output}",
            profile_summary(output.read_text()))


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.email_throughput",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
        def parse(text: str) -> list[str]:
            chosen = [t.strip() for t in text.split(",") if t.strip()]
            if not chosen or any(c not in allowed for c in chosen):
                raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
            return chosen
        return parse

    def counts(text: str) -> list[int]:
        try:
            chosen = [int(t) for t in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError("numbers, comma-separated") from None
        if not chosen or min(chosen) < 1:
            raise argparse.ArgumentTypeError("at least 1")
        return chosen

    def setting(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key.startswith("HERALD_"):
            raise argparse.ArgumentTypeError("write it HERALD_NAME=value")
        return key, value

    parser.add_argument("--messages", type=int, default=2000,
                        help="messages per run (default 2000)")
    parser.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--db", type=names(("postgresql", "sqlite")),
                        default=["postgresql", "sqlite"],
                        help="herald's databases (default postgresql,sqlite)")
    parser.add_argument("--workers", type=counts, default=[1, 2],
                        help="herald worker processes (default 1,2)")
    parser.add_argument("--only", type=names(KINDS), default=list(KINDS),
                        help=f"contenders to run (default {','.join(KINDS)})")
    parser.add_argument("--rival-queue", choices=("quorum", "classic"), default="quorum",
                        help="queue type for Celery and Dramatiq (default quorum, as herald)")
    parser.add_argument("--dramatiq-threads", type=int, default=8,
                        help="Dramatiq worker threads (default 8, Dramatiq's own default; "
                        "they share the process's one SMTP connection)")
    parser.add_argument("--herald-env", type=setting, action="append", default=[],
                        metavar="HERALD_X=V", help="extra setting for herald's workers")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the rounds, one more herald run (postgresql, 1 process, "
                        "not counted) with py-spy attached; writes DIR/email-worker.txt")
    parser.add_argument("--log-dir", help="keep the workers' logs here")
    args = parser.parse_args()
    run_main(compare(args))


if __name__ == "__main__":
    main()
