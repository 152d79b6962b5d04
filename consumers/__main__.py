"""``python -m consumers CHANNEL``: run one channel's worker until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import weakref
from collections.abc import Awaitable, Callable
from functools import partial

from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.deliveries import DeliveryStore
from consumers.email import EmailChannel
from consumers.in_app import InAppChannel
from consumers.policy import Policy
from consumers.preferences import PLATFORM_KIND, PreferenceStore
from consumers.providers.apns import ApnsProvider
from consumers.providers.base import EmailProvider, Provider, PushMessage, SmsMessage
from consumers.providers.chain import ProviderChain
from consumers.providers.devsink import DevPushSink, DevSmsSink
from consumers.providers.fcm import FcmProvider
from consumers.providers.sendgrid import SendGridProvider
from consumers.providers.smtp import SmtpProvider
from consumers.providers.twilio import TwilioProvider
from consumers.providers.vonage import VonageProvider
from consumers.providers.webpush import WebPushProvider
from consumers.push import PushChannel
from consumers.ratelimit import TokenBucketLimiter
from consumers.runtime import Worker
from consumers.sms import SmsChannel
from consumers.templates import Renderer
from herald.db import init_db, make_engine
from herald.errors import ConfigError, HeraldError
from herald.logs import setup_logging, setup_sentry
from herald.metrics import serve as serve_metrics
from herald.settings import Settings, load_settings
from herald.supervisor import die_with_parent
from topology.live import LiveHub

log = logging.getLogger("herald.worker")
CHANNELS = ("email", "in_app", "push", "sms")
#: Live hubs the builders opened: :func:`run_channel` sees each closed before it
#: returns. An AMQP close still under way when ``asyncio.run`` cancels what is left
#: never completes (aiormq's own tasks are cancelled with it): the process hung.
_hubs: weakref.WeakSet[LiveHub] = weakref.WeakSet()


def _live_hub(settings: Settings) -> LiveHub:
    hub = LiveHub(settings)
    _hubs.add(hub)
    return hub


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
    return Worker(settings, handler, engine), engine


async def build_in_app_worker(settings: Settings) -> tuple[Worker, AsyncEngine]:
    """The in-app worker for ``settings`` and the engine it writes notifications with."""
    engine = make_engine(settings.database_url)
    await init_db(engine)
    # No provider timeout bounds a DB insert; the lease only has to outlast one.
    store = DeliveryStore(engine, lease=30)
    live = _live_hub(settings)
    prefs = preference_store(settings, store)
    handler = InAppChannel(Renderer(settings.templates_dir), store,
                           Policy(store, settings.recipient_limit, digests=False), prefs, live)
    worker = Worker(settings, handler, engine)
    worker.background.append(partial(prefs.listen, live))
    return worker, engine


def preference_store(settings: Settings, store: DeliveryStore) -> PreferenceStore:
    """The cached preference reader of a worker, configured from ``settings``."""
    return PreferenceStore(store.sessions, ttl=settings.user_cache_ttl,
                           activity_window=settings.activity_window,
                           mobile_push_threshold=settings.mobile_push_threshold)


def push_chains(settings: Settings) -> dict[str, ProviderChain[PushMessage]]:
    """One chain per platform: its real service when configured, else the dev sink."""
    providers: dict[str, Provider[PushMessage]] = {}
    timeout = settings.provider_timeout
    if settings.fcm_credentials_file is not None:
        providers["android"] = FcmProvider(settings.fcm_credentials_file, settings.fcm_url,
                                           timeout=timeout)
    if settings.apns_key_file is not None:
        assert settings.apns_key_id and settings.apns_team_id and settings.apns_topic
        providers["ios"] = ApnsProvider(settings.apns_key_file, settings.apns_key_id,
                                        settings.apns_team_id, settings.apns_topic,
                                        settings.apns_url, timeout=timeout)
    if settings.vapid_private_key_file is not None:
        providers["web"] = WebPushProvider(settings.vapid_private_key_file,
                                           settings.vapid_subject, timeout=timeout)
    for platform in PLATFORM_KIND:
        providers.setdefault(platform, DevPushSink(platform, settings.push_dir))
    limiter = TokenBucketLimiter({p.name: settings.push_rate_limit for p in providers.values()},
                                 namespace=settings.prefix, redis_url=settings.redis_url)
    return {platform: ProviderChain("push", [provider], limiter,
                                    threshold=settings.breaker_threshold,
                                    cooldown=settings.breaker_cooldown)
            for platform, provider in providers.items()}


def sms_providers(settings: Settings) -> list[Provider[SmsMessage]]:
    """``HERALD_SMS_PROVIDERS`` in fallback order; the dev sink when none is set."""
    built: list[Provider[SmsMessage]] = []
    timeout = settings.provider_timeout
    for name in settings.sms_providers:
        if name == "twilio":
            assert settings.twilio_account_sid and settings.twilio_auth_token
            assert settings.twilio_from  # checked by Settings
            built.append(TwilioProvider(settings.twilio_account_sid, settings.twilio_auth_token,
                                        settings.twilio_from, settings.twilio_url,
                                        timeout=timeout))
        elif name == "vonage":
            assert settings.vonage_api_key and settings.vonage_api_secret
            assert settings.vonage_from  # checked by Settings
            built.append(VonageProvider(settings.vonage_api_key, settings.vonage_api_secret,
                                        settings.vonage_from, settings.vonage_url,
                                        timeout=timeout))
    return built or [DevSmsSink(settings.sms_dir)]


async def build_push_worker(settings: Settings) -> tuple[Worker, AsyncEngine]:
    """The push worker for ``settings`` and the engine it records deliveries with."""
    engine = make_engine(settings.database_url)
    await init_db(engine)
    store = DeliveryStore(engine, lease=2 * settings.provider_timeout + 5)
    prefs = preference_store(settings, store)
    handler = PushChannel(push_chains(settings), Renderer(settings.templates_dir), store,
                          prefs, Policy(store, settings.recipient_limit, digests=False))
    worker = Worker(settings, handler, engine)
    live = _live_hub(settings)
    worker.background.append(partial(prefs.listen, live))
    worker.background.append(partial(_close_after, live))
    return worker, engine


async def build_sms_worker(settings: Settings) -> tuple[Worker, AsyncEngine]:
    """The SMS worker for ``settings`` and the engine it records deliveries with."""
    engine = make_engine(settings.database_url)
    await init_db(engine)
    providers = sms_providers(settings)
    limiter = TokenBucketLimiter({p.name: settings.sms_rate_limit for p in providers},
                                 namespace=settings.prefix, redis_url=settings.redis_url)
    chain = ProviderChain("sms", providers, limiter, threshold=settings.breaker_threshold,
                          cooldown=settings.breaker_cooldown)
    store = DeliveryStore(engine, lease=2 * settings.provider_timeout + 5)
    prefs = preference_store(settings, store)
    handler = SmsChannel(chain, Renderer(settings.templates_dir), store, prefs,
                         settings.sms_max_segments,
                         Policy(store, settings.recipient_limit, digests=False))
    worker = Worker(settings, handler, engine)
    live = _live_hub(settings)
    worker.background.append(partial(prefs.listen, live))
    worker.background.append(partial(_close_after, live))
    return worker, engine


async def _close_after(live: LiveHub) -> None:
    """Hold until the worker cancels its side jobs, then close ``live``.

    The worker awaits its side jobs after cancelling them (``Worker.run``), so
    the close completes inside the worker's own shutdown, not during
    ``asyncio.run``'s final cancellation, where an AMQP close never finishes.
    """
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.wait_for(live.aclose(), 5)


BUILDERS: dict[str, Callable[[Settings], Awaitable[tuple[Worker, AsyncEngine]]]] = {
    "email": build_email_worker,
    "in_app": build_in_app_worker,
    "push": build_push_worker,
    "sms": build_sms_worker,
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
    # Before building: a SIGTERM while the database is set up stops the worker
    # cleanly (exit 0) instead of killing the process half-way.
    stopping = asyncio.Event()
    worker: Worker | None = None

    def stop() -> None:
        stopping.set()
        if worker is not None:
            worker.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    known = set(_hubs)
    worker, engine = await build(settings)
    try:
        serve_metrics(settings.worker_metrics_port)
        if not stopping.is_set():
            await worker.run()
    finally:
        for hub in [hub for hub in _hubs if hub not in known]:
            await hub.aclose()
        await engine.dispose()
    log.info("worker stopped: %s", worker.stats)
    return worker


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m consumers email`` (or ``in_app``, ``push``, ``sms``)."""
    die_with_parent()
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
