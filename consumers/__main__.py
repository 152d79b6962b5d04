"""``python -m consumers CHANNEL``: run one channel's worker until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial

from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.deliveries import DeliveryStore
from consumers.email import EmailChannel
from consumers.in_app import InAppChannel
from consumers.policy import Policy
from consumers.preferences import PreferenceStore
from consumers.providers.base import EmailProvider
from consumers.providers.chain import ProviderChain
from consumers.providers.sendgrid import SendGridProvider
from consumers.providers.smtp import SmtpProvider
from consumers.ratelimit import TokenBucketLimiter
from consumers.runtime import Worker
from consumers.templates import Renderer
from herald.db import init_db, make_engine
from herald.errors import ConfigError, HeraldError
from herald.logs import setup_logging, setup_sentry
from herald.metrics import serve as serve_metrics
from herald.settings import Settings, load_settings
from topology.live import LiveHub

log = logging.getLogger("herald.worker")
CHANNELS = ("email", "in_app")


async def build_email_worker(settings: Settings) -> tuple[Worker, AsyncEngine]:
    """The email worker for ``settings`` and the engine it records deliveries with."""
    providers = email_providers(settings)
    engine = make_engine(settings.database_url)
    await init_db(engine)
    limiter = TokenBucketLimiter({p.name: settings.rate_for(p.name) for p in providers},
                                 namespace=settings.prefix, redis_url=settings.redis_url)
    chain = ProviderChain("email", providers, limiter, threshold=settings.breaker_threshold,
                          cooldown=settings.breaker_cooldown)
    store = DeliveryStore(engine, lease=2 * settings.smtp_timeout + 5)
    handler = EmailChannel(chain, Renderer(settings.templates_dir), store, settings.email_from,
                           Policy(store, settings.recipient_limit))
    return Worker(settings, handler), engine


async def build_in_app_worker(settings: Settings) -> tuple[Worker, AsyncEngine]:
    """The in-app worker for ``settings`` and the engine it writes notifications with."""
    engine = make_engine(settings.database_url)
    await init_db(engine)
    # No provider timeout bounds a DB insert; the lease only has to outlast one.
    store = DeliveryStore(engine, lease=30)
    live = LiveHub(settings)
    prefs = preference_store(settings, store)
    handler = InAppChannel(Renderer(settings.templates_dir), store,
                           Policy(store, settings.recipient_limit), prefs, live)
    worker = Worker(settings, handler)
    worker.background.append(partial(prefs.listen, live))
    return worker, engine


def preference_store(settings: Settings, store: DeliveryStore) -> PreferenceStore:
    """The cached preference reader of a worker, configured from ``settings``."""
    return PreferenceStore(store.sessions, ttl=settings.user_cache_ttl,
                           activity_window=settings.activity_window,
                           mobile_push_threshold=settings.mobile_push_threshold)


BUILDERS: dict[str, Callable[[Settings], Awaitable[tuple[Worker, AsyncEngine]]]] = {
    "email": build_email_worker,
    "in_app": build_in_app_worker,
}


def email_providers(settings: Settings) -> list[EmailProvider]:
    """The providers of ``HERALD_EMAIL_PROVIDERS``, in order; ConfigError if one lacks config."""
    built: list[EmailProvider] = []
    for name in settings.email_providers:
        if name == "smtp":
            if not settings.smtp_url:
                raise ConfigError("HERALD_SMTP_URL: not set (herald run starts a local sink "
                                  "for you)")
            built.append(SmtpProvider(settings.smtp_url, timeout=settings.smtp_timeout))
        elif name == "sendgrid":
            assert settings.sendgrid_api_key is not None  # checked by Settings
            built.append(SendGridProvider(settings.sendgrid_api_key, settings.sendgrid_url,
                                          timeout=settings.smtp_timeout))
    return built


async def run_channel(settings: Settings, channel: str) -> Worker:
    """Build and run ``channel``'s worker until a signal stops it; returns it for its stats."""
    build = BUILDERS.get(channel)
    if build is None:
        raise ConfigError(f"no worker for channel {channel!r} yet; available: "
                          f"{', '.join(BUILDERS)}")
    worker, engine = await build(settings)
    serve_metrics(settings.worker_metrics_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await engine.dispose()
    log.info("worker stopped: %s", worker.stats)
    return worker


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m consumers email`` (or ``in_app``)."""
    parser = argparse.ArgumentParser(prog="python -m consumers")
    parser.add_argument("channel", choices=CHANNELS)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings.log_level, f"worker.{args.channel}")
        setup_sentry(settings.sentry_dsn, f"worker.{args.channel}")
        asyncio.run(run_channel(settings, args.channel))
    except HeraldError as exc:
        print(f"herald: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
