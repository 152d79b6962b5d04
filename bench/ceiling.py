"""The broker's ceiling on this machine: bare aio-pika, no herald code on the path.

What any worker on this broker can at best reach: publishing with publisher confirms
(one at a time, and pipelined with a window of messages in flight) and consuming
with a manual ack per message (prefetch 100 and 1000), on a classic and on a quorum
queue. Bodies are herald signup envelopes, published as herald publishes them
(persistent, ``topology.messages.build_message``, mandatory).

    uv run python -m bench.ceiling [--messages 5000] [--runs 3] [--window 100]

Runs are interleaved (every variant once, then again), each figure is the median,
min and max of the runs in msg/s. Each queue is declared for one run and deleted
after it. Prints a table and exits 0, even when a variant fails (its row says why).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python bench/ceiling.py`` as well as ``-m bench.ceiling``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bench.common import AMQP_URL, load_average, one_line, percentile, print_table, run_main
from topology.envelope import Actor, Envelope, Recipient
from topology.messages import build_message

QUEUE_TYPES = ("quorum", "classic")


def signup_envelope(i: int, tag: str = "bench") -> Envelope:
    """The ``i``-th signup event, one recipient with a unique id and address."""
    return Envelope(type="user.signup", actor=Actor(id=f"{tag}-api"),
                    recipients=[Recipient(user_id=f"{tag}-u{i}", email=f"u{i}@{tag}.example.com",
                                          name=f"User {i}")],
                    data={"name": f"User {i}"})


# ---------------------------------------------------------------- one queue, one measurement


@contextlib.asynccontextmanager
async def scratch_queue(connection: AbstractConnection, queue_type: str
                        ) -> AsyncIterator[str]:
    """A durable queue of ``queue_type`` with a name no one else uses, deleted afterwards."""
    name = f"bench-ceiling-{queue_type}-{uuid.uuid4().hex[:8]}"
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": queue_type})
        yield name
    finally:
        # A fresh channel: the one above may have been closed by an error.
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            await cleanup.queue_delete(name)
            await cleanup.close()
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()


async def publish(connection: AbstractConnection, queue: str, n: int, window: int,
                  body: bytes, timeout: float = 120.0) -> float:
    """Publish ``n`` messages to ``queue`` with confirms, at most ``window`` unconfirmed
    at a time (1: each confirm awaited before the next publish); returns msg/s."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        exchange = channel.default_exchange
        slots = asyncio.Semaphore(window)

        async def one(i: int) -> None:
            async with slots:
                await exchange.publish(build_message(body, f"m{i}", "user.signup"),
                                       routing_key=queue, mandatory=True, timeout=30)

        began = time.monotonic()
        if window == 1:
            for i in range(n):
                await one(i)
        else:
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout)
        return n / (time.monotonic() - began)
    finally:
        await channel.close()


async def consume(connection: AbstractConnection, queue: str, n: int, prefetch: int,
                  timeout: float = 120.0) -> float:
    """Consume ``n`` messages from ``queue``, acking each; msg/s from the first delivery to
    the ``n``-th ack (so the consumer's start-up is not counted)."""
    channel: AbstractChannel = await connection.channel()
    try:
        await channel.set_qos(prefetch_count=prefetch)
        declared = await channel.get_queue(queue, ensure=False)
        done = asyncio.Event()
        seen = 0
        first = last = 0.0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal seen, first, last
            await message.ack()
            seen += 1
            if seen == 1:
                first = time.monotonic()
            if seen == n:
                last = time.monotonic()
                done.set()

        tag = await declared.consume(on_message)
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"timeout: {seen} of {n} consumed in {timeout:.0f} s") from None
        finally:
            with contextlib.suppress(Exception):
                await declared.cancel(tag)
        return (n - 1) / (last - first) if n > 1 else float("nan")
    finally:
        if not channel.is_closed:
            await channel.close()


async def wait_ready(connection: AbstractConnection, queue: str, n: int,
                     timeout: float = 30.0) -> None:
    """Wait until ``queue`` reports ``n`` messages ready (confirms came before the count)."""
    deadline = time.monotonic() + timeout
    while True:
        channel = await connection.channel()
        try:
            found = await channel.declare_queue(queue, passive=True)
            ready = int(found.declaration_result.message_count or 0)
        finally:
            await channel.close()
        if ready >= n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {ready} of {n} messages in {queue} after {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def bare_round(queue_type: str, n: int, window: int, prefetch: int,
                     url: str = AMQP_URL) -> dict[str, float]:
    """One pre-fill (pipelined publish with confirms) then one drain (consume + ack) on a
    fresh queue: ``{"publish": msg/s, "consume": msg/s}``. What the comparison runs."""
    body = signup_envelope(0).to_json()
    connection = await aio_pika.connect(url, timeout=10)
    try:
        async with scratch_queue(connection, queue_type) as queue:
            published = await publish(connection, queue, n, window, body)
            await wait_ready(connection, queue, n)
            consumed = await consume(connection, queue, n, prefetch)
            return {"publish": published, "consume": consumed}
    finally:
        await connection.close()


# ---------------------------------------------------------------- the standalone table


@dataclass
class Figure:
    """One row: its runs (msg/s) and the errors of the runs that failed."""

    name: str
    rates: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def cells(self) -> tuple[str, ...]:
        """(name, median, min, max, runs) for the table; "failed: why" when no run worked."""
        if not self.rates:
            why = self.errors[0] if self.errors else "not run"
            return (self.name, f"failed: {why}", "", "", f"0/{len(self.errors)}")
        runs = f"{len(self.rates)}/{len(self.rates) + len(self.errors)}"
        if self.errors:
            runs += f" (failed: {self.errors[0]})"
        return (self.name, f"{percentile(self.rates, 50):.0f}", f"{min(self.rates):.0f}",
                f"{max(self.rates):.0f}", runs)


async def measure_into(figures: Sequence[Figure],
                       work: Callable[[], Coroutine[Any, Any, Sequence[float]]]) -> None:
    """Run ``work`` once; append each of its rates to the figure at the same position,
    or its error (one line) to every one of them."""
    try:
        rates = await work()
    except Exception as error:
        for figure in figures:
            figure.errors.append(one_line(error))
        return
    for figure, rate in zip(figures, rates, strict=True):
        figure.rates.append(rate)


async def ceiling(args: argparse.Namespace) -> int:
    """Every variant ``args.runs`` times, interleaved; prints the table."""
    n, window = args.messages, args.window
    body = signup_envelope(0).to_json()
    print(f"load average at start: {load_average()}", flush=True)
    figures: dict[tuple[str, str], Figure] = {}
    for queue_type in QUEUE_TYPES:
        for what in ("publish, confirm each", f"publish, confirms pipelined ({window})",
                     *(f"consume + ack, prefetch {p}" for p in args.prefetch)):
            figures[queue_type, what] = Figure(f"{queue_type:7}  {what}")

    for run in range(args.runs):
        for queue_type in QUEUE_TYPES:
            print(f"run {run + 1}/{args.runs}: {queue_type}", file=sys.stderr, flush=True)

            async def one_by_one(qt: str = queue_type) -> list[float]:
                connection = await aio_pika.connect(AMQP_URL, timeout=10)
                try:
                    async with scratch_queue(connection, qt) as queue:
                        return [await publish(connection, queue, n, 1, body)]
                finally:
                    await connection.close()

            async def pipelined(qt: str = queue_type) -> list[float]:
                # One pre-fill serves every prefetch: each drain empties the queue, so
                # it is filled again (not timed) before the next one.
                connection = await aio_pika.connect(AMQP_URL, timeout=10)
                try:
                    async with scratch_queue(connection, qt) as queue:
                        rates = [await publish(connection, queue, n, window, body)]
                        for i, prefetch in enumerate(args.prefetch):
                            if i:
                                await publish(connection, queue, n, window, body)
                            await wait_ready(connection, queue, n)
                            rates.append(await consume(connection, queue, n, prefetch))
                        return rates
                finally:
                    await connection.close()

            await measure_into([figures[queue_type, "publish, confirm each"]], one_by_one)
            await measure_into(
                [figures[queue_type, f"publish, confirms pipelined ({window})"],
                 *(figures[queue_type, f"consume + ack, prefetch {p}"]
                   for p in args.prefetch)], pipelined)

    print_table(
        f"bare aio-pika {aio_pika.__version__} on {AMQP_URL.split('@')[-1]}: {n} messages "
        f"({len(body)} B, persistent), median of {args.runs} interleaved runs, msg/s",
        [("queue    measurement", "median", "min", "max", "runs")]
        + [f.cells() for f in figures.values()])
    print(f"\nload average at end: {load_average()}")
    return 0


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000,
                        help="messages per measurement (default 5000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--window", type=int, default=100,
                        help="unconfirmed publishes in flight when pipelined (default 100)")
    parser.add_argument("--prefetch", type=lambda s: [int(p) for p in s.split(",")],
                        default=[100, 1000], help="prefetch counts to consume with "
                        "(comma-separated, default 100,1000)")
    args = parser.parse_args()
    run_main(ceiling(args))


if __name__ == "__main__":
    main()
