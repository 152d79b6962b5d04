"""The retry ladder and the DLQ as a user sees them, through ``herald run`` and the CLI.

Scenario 1: the SMTP sink refuses the first 2 attempts with 451; herald retries
after the configured delays (HERALD_RETRY_DELAYS=200ms,400ms,800ms) and the
third attempt is delivered. The observed gaps between attempts are printed next
to the configured delays.

Scenario 2: the sink refuses every attempt; after HERALD_MAX_RETRY=3 retries the
message is in the DLQ. ``herald dlq list email --json`` shows it; with the sink
healthy again, ``herald dlq replay email --all`` delivers it.

    uv run python -m bench.retry [--delays 200ms,400ms,800ms] [--max-retry 3]
                                 [--database sqlite|postgresql]

Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # ``python bench/retry.py`` as well as ``python -m bench.retry``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.common import (
    Broker,
    HeraldRun,
    SinkThread,
    TimedSink,
    free_port,
    herald_cli,
    herald_env,
    ms,
    print_table,
    run_main,
    settings_for,
    temp_database,
    unique_prefix,
    wait_until,
)
from herald.mailsink import Faults
from herald.settings import Settings

REFUSAL = "451 4.3.0 Temporary failure, try again"


def ladder_rows(attempts: list[tuple[float, str]], posted: float,
                settings: Settings) -> list[tuple[str, ...]]:
    """One row per attempt: when, what the sink said, the gap and the configured delay."""
    rows: list[tuple[str, ...]] = [
        ("attempt", "since POST", "sink reply", "gap", "configured", "gap - configured")]
    for i, (at, reply) in enumerate(attempts):
        if i == 0:
            rows.append(("1", ms(at - posted), reply, "-", "-", "-"))
            continue
        gap = at - attempts[i - 1][0]
        delay = settings.retry_delay(i)
        rows.append((str(i + 1), ms(at - posted), reply, ms(gap), ms(delay), ms(gap - delay)))
    return rows


async def retry_bench(args: argparse.Namespace) -> int:
    """Run both scenarios once; returns the process exit code."""
    prefix = unique_prefix("retry")
    api_port = free_port()
    sink = TimedSink(faults=Faults())
    checks: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory(prefix="herald-bench-") as tmp, SinkThread(sink) as smtp:
        async with temp_database(args.database, Path(tmp)) as database_url, Broker() as broker:
            env = herald_env({
                "HERALD_PREFIX": prefix,
                "HERALD_API_PORT": str(api_port),
                "HERALD_DATABASE_URL": database_url,
                "HERALD_SMTP_URL": smtp.url,
                "HERALD_RETRY_DELAYS": args.delays,
                "HERALD_MAX_RETRY": str(args.max_retry),
                "HERALD_MAIL_DIR": f"{tmp}/mail",
            })
            settings = settings_for(env)
            herald = HeraldRun(env, Path(args.log) if args.log else Path(tmp) / "herald-run.log")
            budget = sum(settings.retry_delay(i) for i in range(1, settings.max_retry + 1)) * 3
            budget += 30
            dlq = f"{prefix}.email.dlq"
            try:
                await herald.start()
                ready_s = await herald.wait_ready(broker, api_port, f"{prefix}.email")
                print(f"herald run ready after {ready_s:.2f} s (prefix {prefix}, "
                      f"HERALD_RETRY_DELAYS={args.delays}, HERALD_MAX_RETRY={args.max_retry})")
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}",
                                             timeout=30) as client:

                    async def signup(who: str) -> float:
                        posted = time.monotonic()
                        response = await client.post("/signup", json={
                            "email": f"{who}@{prefix}.example.com",
                            "password": "correct horse battery staple", "name": who})
                        response.raise_for_status()
                        return posted

                    # ---- scenario 1: two 451s, then accepted
                    refusals = 2
                    sink.faults.refuse_first = sink.received + refusals
                    posted = await signup("ada")
                    await wait_until(lambda: len(sink.messages) >= 1, budget)
                    await asyncio.sleep(max(settings.retry_delays) + 0.5)  # nothing more comes
                    one = list(sink.attempts)
                    delivered_one = len(sink.messages)
                    print_table(f"scenario 1: sink refuses the first {refusals} attempts with "
                                "451, then accepts", ladder_rows(one, posted, settings))
                    checks.append((f"scenario 1: {refusals + 1} attempts",
                                   len(one) == refusals + 1, str(len(one))))
                    checks.append(("scenario 1: replies 451, 451, 250",
                                   [r for _, r in one] == ["451"] * refusals + ["250"],
                                   ", ".join(r for _, r in one)))
                    checks.append(("scenario 1: delivered once", delivered_one == 1,
                                   str(delivered_one)))

                    # ---- scenario 2: always refused, lands in the DLQ after max_retry retries
                    sink.faults.refuse_always = REFUSAL
                    mark = len(sink.attempts)
                    posted = await signup("grace")
                    found = await _wait_dlq(broker, dlq, budget)
                    in_dlq_at = time.monotonic()  # within ~20 ms (the polling interval)
                    await asyncio.sleep(max(settings.retry_delays) + 0.5)  # no attempt after
                    two = sink.attempts[mark:]
                    print_table("scenario 2: sink refuses every attempt with 451",
                                ladder_rows(two, posted, settings))
                    expected = settings.max_retry + 1
                    checks.append((f"scenario 2: {expected} attempts (1 + {settings.max_retry} "
                                   "retries), none after the DLQ", len(two) == expected,
                                   str(len(two))))
                    checks.append(("scenario 2: one message in the DLQ", found == 1, str(found)))
                    figures = [("figure", "value")]
                    if two:
                        figures.append(("first attempt -> in the DLQ",
                                        ms(in_dlq_at - two[0][0])))
                    figures.append(("POST -> in the DLQ", ms(in_dlq_at - posted)))
                    figures.append(("sum of configured delays", ms(sum(
                        settings.retry_delay(i) for i in range(1, settings.max_retry + 1)))))

                    code, out, err = await herald_cli(env, "dlq", "list", "email", "--json")
                    print("\n$ herald dlq list email --json")
                    print(out.rstrip() or err.rstrip())
                    listed = json.loads(out) if code == 0 and out.strip() else []
                    checks.append(("`herald dlq list email --json` exits 0", code == 0,
                                   str(code)))
                    attempts_listed = listed[0]["attempts"] if len(listed) == 1 else None
                    checks.append((f"DLQ entry says attempts = {expected}",
                                   attempts_listed == expected, str(attempts_listed)))
                    found_after_list = await broker.counts(dlq)
                    checks.append(("listing did not consume it",
                                   found_after_list is not None and found_after_list[0] == 1,
                                   str(found_after_list and found_after_list[0])))

                    # ---- replay with a healthy sink
                    sink.faults.refuse_always = None
                    mark = len(sink.attempts)
                    before = len(sink.messages)
                    replayed_at = time.monotonic()
                    code, out, err = await herald_cli(env, "dlq", "replay", "email", "--all")
                    cli_s = time.monotonic() - replayed_at
                    print("\n$ herald dlq replay email --all")
                    print((out.rstrip() or err.rstrip()) + f"   (exit {code})")
                    checks.append(("`herald dlq replay email --all` exits 0", code == 0,
                                   str(code)))
                    ok = await wait_until(lambda: len(sink.messages) > before, budget)
                    delivered_at = sink.accepted_at[-1] if ok else time.monotonic()
                    await asyncio.sleep(0.5)
                    after = sink.attempts[mark:]
                    left = await broker.counts(dlq)
                    checks.append(("replayed message delivered, in one attempt",
                                   ok and [r for _, r in after] == ["250"],
                                   ", ".join(r for _, r in after) or "nothing"))
                    checks.append(("DLQ empty after replay", left is not None and left[0] == 0,
                                   str(left and left[0])))
                    figures.append(("`herald dlq replay` command, start to exit",
                                    ms(cli_s)))
                    figures.append(("replay command started -> email accepted",
                                    ms(delivered_at - replayed_at) if ok else "not delivered"))
                    print_table("scenario 2 figures", figures)

                exit_code, stop_s, left_pids = await herald.interrupt()
                checks.append(("SIGINT -> herald run exits 0", exit_code == 0,
                               f"{exit_code} after {stop_s:.2f} s"))
                checks.append(("no process left behind", not left_pids, str(left_pids or "none")))
            except BaseException:
                print(herald.log_tail(), file=sys.stderr)
                raise
            finally:
                await herald.cleanup()
                await broker.delete_topology(settings)

    print_table("checks", [("check", "result", "observed")] + [
        (name, "ok" if ok else "FAIL", seen) for name, ok, seen in checks])
    return 0 if all(ok for _, ok, _ in checks) else 1


async def _wait_dlq(broker: Broker, queue: str, timeout: float) -> int:
    """Messages in ``queue`` once there is at least one (0 after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await broker.counts(queue)
        if found is not None and found[0] > 0:
            return found[0]
        await asyncio.sleep(0.02)
    return 0


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.retry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays", default="200ms,400ms,800ms", help="HERALD_RETRY_DELAYS")
    parser.add_argument("--max-retry", type=int, default=3, help="HERALD_MAX_RETRY")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--log", help="keep herald run's output in this file")
    args = parser.parse_args()
    run_main(retry_bench(args))


if __name__ == "__main__":
    main()
