"""POST /signup latency: herald (outbox, answers before any email) against a naive
baseline that sends the welcome email over SMTP inside the request.

Both run as uvicorn processes on loopback, hash the password with the same argon2
parameters (``producer.passwords``) and write the user row to the same kind of
database; only the email differs. Both SMTP sinks take ``--smtp-delay`` seconds
per message (500 ms by default, like a slow provider). herald runs whole
(``herald run``: API, relay and email worker), so its emails go out in the
background while it is measured. Requests are sequential and alternate between
the two servers, so machine noise falls on both alike.

    uv run python -m bench.signup_latency [-n 200] [--smtp-delay 0.5]
                                          [--database sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python bench/...py`` as well as ``python -m bench....``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosmtplib
import httpx
from fastapi import FastAPI, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from sqlmodel import select

from bench.common import (
    REPO,
    Broker,
    HeraldRun,
    SinkThread,
    TimedSink,
    free_port,
    herald_env,
    ms,
    percentile,
    print_table,
    run_main,
    settings_for,
    temp_database,
    unique_prefix,
    wait_until,
)
from consumers.providers.smtp import SmtpProvider
from consumers.templates import Renderer
from herald.db import init_db, make_engine, session_factory
from herald.mailsink import Faults
from herald.models import User
from herald.settings import Settings, load_settings
from producer.passwords import hash_password
from producer.schemas import SignupIn
from topology.envelope import Actor, Envelope, Recipient

# ---------------------------------------------------------------- the naive baseline


def naive_app(settings: Settings) -> FastAPI:
    """Signup that hashes, stores the user, then sends the welcome email before answering."""
    renderer = Renderer(settings.templates_dir)
    assert settings.smtp_url is not None
    smtp = SmtpProvider(settings.smtp_url, timeout=settings.smtp_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        await init_db(engine)
        app.state.sessions = session_factory(engine)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/signup", status_code=status.HTTP_201_CREATED)
    async def signup(body: SignupIn) -> dict[str, Any]:
        password_hash = await run_in_threadpool(hash_password, body.password)
        user = User(email=body.email, name=body.name, password_hash=password_hash)
        async with app.state.sessions() as session, session.begin():
            taken = await session.exec(select(User.id).where(User.email == body.email))
            if taken.first() is not None:
                raise HTTPException(status.HTTP_409_CONFLICT, "email already registered")
            session.add(user)
        envelope = Envelope(type="user.signup", actor=Actor(id=user.id, name=user.name),
                            recipients=[Recipient(user_id=user.id, email=user.email,
                                                  name=user.name)],
                            data={"name": user.name})
        context = {"event": envelope, "recipient": envelope.recipients[0],
                   "data": envelope.data, "actor": envelope.actor,
                   "occurred_at": envelope.occurred_at}
        message = EmailMessage()
        message["Subject"] = renderer.render("email", envelope.type, "subject", context).strip()
        message["From"] = settings.email_from
        message["To"] = user.email
        message.set_content(renderer.render("email", envelope.type, "txt", context))
        message.add_alternative(renderer.render("email", envelope.type, "html", context),
                                subtype="html")
        try:
            await aiosmtplib.send(message, hostname=smtp.host, port=smtp.port,
                                  timeout=settings.smtp_timeout)
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"email failed: {exc}") from None
        return {"user": {"id": user.id, "email": user.email, "name": user.name}}

    return app


def serve_naive(port: int) -> None:
    """``python -m bench.signup_latency --serve-naive PORT`` (settings from HERALD_*)."""
    import uvicorn

    uvicorn.run(naive_app(load_settings()), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


# ---------------------------------------------------------------- the benchmark


async def _wait_http(client: httpx.AsyncClient, url: str, process: asyncio.subprocess.Process,
                     timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.returncode is not None:
            raise RuntimeError(f"{url}: server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(url)).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready within {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def latency_bench(args: argparse.Namespace) -> int:
    """Run once; returns the process exit code."""
    prefix = unique_prefix("latency")
    herald_port, naive_port = free_port(), free_port()
    faults = {"hang_first": 10**9, "hang_seconds": args.smtp_delay}
    herald_sink = TimedSink(faults=Faults(**faults))
    naive_sink = TimedSink(faults=Faults(**faults))
    total = args.n + args.warmup
    lat: dict[str, list[float]] = {"herald": [], "naive": []}
    codes: dict[str, dict[int, int]] = {"herald": {}, "naive": {}}
    with (tempfile.TemporaryDirectory(prefix="herald-bench-") as tmp,
          SinkThread(herald_sink) as herald_smtp, SinkThread(naive_sink) as naive_smtp):
        base = Path(tmp)
        (base / "h").mkdir()
        (base / "n").mkdir()
        async with (temp_database(args.database, base / "h") as herald_db,
                    temp_database(args.database, base / "n") as naive_db,
                    Broker() as broker):
            env = herald_env({
                "HERALD_PREFIX": prefix, "HERALD_API_PORT": str(herald_port),
                "HERALD_DATABASE_URL": herald_db, "HERALD_SMTP_URL": herald_smtp.url,
                "HERALD_MAIL_DIR": f"{tmp}/mail"})
            settings = settings_for(env)
            naive_env = herald_env({"HERALD_DATABASE_URL": naive_db,
                                    "HERALD_SMTP_URL": naive_smtp.url,
                                    "HERALD_SMTP_TIMEOUT": "30s"})
            herald = HeraldRun(env, base / "herald-run.log")
            naive: asyncio.subprocess.Process | None = None
            try:
                with (base / "naive.log").open("ab") as log:
                    naive = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "bench.signup_latency", "--serve-naive",
                        str(naive_port), env=naive_env, cwd=REPO, stdout=log,
                        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
                await herald.start()
                await herald.wait_ready(broker, herald_port, f"{prefix}.email")
                urls = {"herald": f"http://127.0.0.1:{herald_port}",
                        "naive": f"http://127.0.0.1:{naive_port}"}
                async with httpx.AsyncClient(timeout=60) as client:
                    await _wait_http(client, urls["naive"] + "/healthz", naive)
                    began = time.monotonic()
                    for i in range(total):
                        order = ("herald", "naive") if i % 2 == 0 else ("naive", "herald")
                        for name in order:
                            t0 = time.monotonic()
                            response = await client.post(urls[name] + "/signup", json={
                                "email": f"{name}{i}@{prefix}.example.com",
                                "password": "correct horse battery staple",
                                "name": f"User {i}"})
                            took = time.monotonic() - t0
                            codes[name][response.status_code] = (
                                codes[name].get(response.status_code, 0) + 1)
                            if i >= args.warmup:
                                lat[name].append(took)
                    requests_s = time.monotonic() - began
                # herald's emails went out in the background; let them finish (bounded).
                await wait_until(lambda: len(herald_sink.messages) >= total, args.drain)
                herald_emails = len(herald_sink.messages)
                drained_s = time.monotonic() - began
                code, _, _ = await herald.interrupt()
            except BaseException:
                print(herald.log_tail(), file=sys.stderr)
                raise
            finally:
                if naive is not None and naive.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(naive.pid, signal.SIGTERM)
                    try:
                        await asyncio.wait_for(naive.wait(), 15)
                    except TimeoutError:
                        naive.kill()
                        await naive.wait()
                await herald.cleanup()
                await broker.delete_topology(settings)

    rows: list[tuple[str, ...]] = [("", "herald (outbox)", "naive (SMTP in request)",
                                    "naive / herald")]
    for label, pct in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0)):
        h, n = percentile(lat["herald"], pct), percentile(lat["naive"], pct)
        rows.append((label, ms(h), ms(n), f"{n / h:.1f}x"))
    h_mean = sum(lat["herald"]) / len(lat["herald"])
    n_mean = sum(lat["naive"]) / len(lat["naive"])
    rows.append(("mean", ms(h_mean), ms(n_mean), f"{n_mean / h_mean:.1f}x"))
    rows.append(("max", ms(max(lat["herald"])), ms(max(lat["naive"])), ""))
    rows.append(("responses", _codes(codes["herald"]), _codes(codes["naive"]), ""))
    rows.append(("emails at the sink", f"{herald_emails} (background)",
                 f"{len(naive_sink.messages)} (in request)", ""))
    print_table(f"signup latency: {args.n} sequential POST /signup each (+{args.warmup} warm-up), "
                f"alternating; SMTP sink {args.smtp_delay * 1000:.0f} ms per message; "
                f"database {args.database}", rows)
    print(f"  requests took {requests_s:.1f} s in all; herald's {herald_emails}/{total} emails "
          f"were at the sink {drained_s:.1f} s after the first request; "
          f"herald run exited {code} on SIGINT")
    ok = (codes["herald"].get(201) == total and codes["naive"].get(201) == total
          and herald_emails == total and len(naive_sink.messages) == total and code == 0)
    if not ok:
        print("  FAIL: a request failed, an email is missing, or herald run did not exit 0")
    return 0 if ok else 1


def _codes(counts: dict[int, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.signup_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200, help="measured requests per server")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured requests first")
    parser.add_argument("--smtp-delay", type=float, default=0.5,
                        help="seconds the sinks take per message (default 0.5)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--drain", type=float, default=60.0,
                        help="at most this long to wait for herald's emails afterwards")
    parser.add_argument("--serve-naive", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_naive:
        serve_naive(args.serve_naive)
        return
    run_main(latency_bench(args))


if __name__ == "__main__":
    main()
