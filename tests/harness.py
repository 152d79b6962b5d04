"""Run herald's parts in-process for tests: API client, relay, email and in-app workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select

from consumers.__main__ import (
    build_email_worker,
    build_in_app_worker,
    build_push_worker,
    build_sms_worker,
)
from consumers.runtime import Worker
from herald.db import init_db, make_engine, session_factory
from herald.settings import Settings
from producer.api import create_app
from producer.relay import Relay


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client wired to the API app, with its lifespan running."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://herald") as client:
            yield client


@asynccontextmanager
async def relay(settings: Settings) -> AsyncIterator[Relay]:
    """The outbox relay running in the background."""
    engine = make_engine(settings.database_url)
    await init_db(engine)
    r = Relay(settings, engine)
    task = asyncio.create_task(r.run())
    try:
        yield r
    finally:
        r.stop()
        await asyncio.wait_for(task, 10)
        await engine.dispose()


@asynccontextmanager
async def _running(
    build: Callable[[Settings], Awaitable[tuple[Worker, AsyncEngine]]], settings: Settings
) -> AsyncIterator[Worker]:
    """A channel's worker consuming in the background (ready when entered)."""
    worker, engine = await build(settings)
    task = asyncio.create_task(worker.run())
    try:
        ready = asyncio.create_task(worker.ready.wait())
        done, _ = await asyncio.wait({ready, task}, timeout=15, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()  # raise what stopped it
        assert worker.ready.is_set(), "worker did not start consuming"
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, settings.shutdown_timeout + 10)
        await engine.dispose()


def email_worker(settings: Settings) -> AbstractAsyncContextManager[Worker]:
    """The email worker consuming in the background (ready when entered)."""
    return _running(build_email_worker, settings)


def in_app_worker(settings: Settings) -> AbstractAsyncContextManager[Worker]:
    """The in-app worker consuming in the background (ready when entered)."""
    return _running(build_in_app_worker, settings)


def push_worker(settings: Settings) -> AbstractAsyncContextManager[Worker]:
    """The push worker consuming in the background (ready when entered)."""
    return _running(build_push_worker, settings)


def sms_worker(settings: Settings) -> AbstractAsyncContextManager[Worker]:
    """The SMS worker consuming in the background (ready when entered)."""
    return _running(build_sms_worker, settings)


PASSWORD = "correct horse battery"


async def sign_up(api: httpx.AsyncClient, name: str) -> tuple[str, dict[str, str]]:
    """Sign ``name`` up and log in through the API; their user id and ``Authorization``."""
    email = f"{name}@example.com"
    signup = await api.post("/signup", json={"email": email, "password": PASSWORD, "name": name})
    assert signup.status_code == 201, signup.text
    login = await api.post("/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return login.json()["user"]["id"], {"Authorization": f"Bearer {login.json()['access_token']}"}


async def rows(settings: Settings, model: Any) -> list[Any]:
    """Every row of ``model``'s table, read through a connection of the test's own."""
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session:
            return list((await session.exec(select(model))).all())
    finally:
        await engine.dispose()
