"""The HTTP API (seed routes, ``/events``): writes rows and outbox events, never the broker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import uvicorn
from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from herald.db import init_db, is_outage, make_engine, probe, session_factory
from herald.errors import DatabaseUnavailable
from herald.logs import setup_logging, setup_sentry
from herald.metrics import OUTBOX_PENDING
from herald.models import OutboxEvent, User
from herald.settings import Settings, load_settings
from herald.supervisor import die_with_parent
from producer import events, idempotency, inbox, me, social, stream
from producer.auth import issue_token
from producer.deps import SessionsDep
from producer.idempotency import IdempotencyDep
from producer.outbox import add_event
from producer.passwords import (
    HashingBusy,
    check_password_async,
    hash_password_async,
    store_upgrade,
)
from producer.passwords import configure as configure_passwords
from producer.schemas import EventAccepted, LoginAccepted, LoginIn, SignupIn, UserPublic
from topology.envelope import Actor, Envelope, Recipient
from topology.live import LiveHub

log = logging.getLogger("herald.api")


def _recipient(user: User) -> Recipient:
    return social.recipient(user)


def _public(user: User) -> UserPublic:
    return me.public_user(user)


#: What every request that met a database outage is answered (status 503).
OUTAGE_DETAIL = "database unavailable; retry later"
#: Seconds a client should wait before retrying after a 503 for a database outage.
OUTAGE_RETRY_AFTER = 5
#: At most one warning per this many seconds while requests keep meeting the outage.
_OUTAGE_LOG_EVERY = 10.0
#: Seconds ``/healthz`` waits for the database's answer.
_HEALTH_PROBE_TIMEOUT = 2.0


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, BaseExceptionGroup):  # raised through an anyio task group
        return any(_is_outage(inner) for inner in exc.exceptions)
    return is_outage(exc)


class DatabaseOutageMiddleware:
    """Answers 503 ``{"detail": OUTAGE_DETAIL}`` with ``Retry-After`` to any request whose
    handling raised a database outage (:func:`herald.db.is_outage`), wherever it was
    raised: a route, a dependency (the bearer check, the idempotency layer), an
    exception handler.

    Without it the exception reaches Starlette's error middleware, which answers
    500 and re-raises, and uvicorn then closes the keep-alive connection. Other
    exceptions pass through untouched; so does an outage after the response
    started (a stream): its status is already sent.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._logged_at = -_OUTAGE_LOG_EVERY
        self._unlogged = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watching)
        except Exception as exc:
            if started or not _is_outage(exc):
                raise
            self._log(scope, exc)
            response = JSONResponse({"detail": OUTAGE_DETAIL},
                                    status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                                    headers={"Retry-After": str(OUTAGE_RETRY_AFTER)})
            await response(scope, receive, send)

    def _log(self, scope: Scope, exc: BaseException) -> None:
        # One line per burst, not per request: an outage meets every request.
        now = time.monotonic()
        if now - self._logged_at < _OUTAGE_LOG_EVERY:
            self._unlogged += 1
            return
        more = f" (and {self._unlogged} more since the last line)" if self._unlogged else ""
        log.warning("database unavailable: %s %s answered 503%s: %s: %s", scope.get("method"),
                    scope.get("path"), more, type(exc).__name__, str(exc)[:200])
        self._logged_at, self._unlogged = now, 0


async def _init_when_back(app: FastAPI, engine: AsyncEngine) -> None:
    """Retry the schema set-up until the database answers, then let requests through."""
    backoff = 0.5
    while True:
        await asyncio.sleep(backoff)
        try:
            await init_db(engine)
        except Exception as exc:
            if not is_outage(exc):
                log.error("database schema set-up failed: %s: %s", type(exc).__name__, exc)
            backoff = min(backoff * 2, float(OUTAGE_RETRY_AFTER))
            continue
        app.state.sessions = session_factory(engine)
        log.info("database reachable: schema ready, serving requests")
        return


def create_app(settings: Settings) -> FastAPI:
    """The API bound to ``settings`` (database created on start-up if missing).

    It starts without a database too: routes that need one answer 503 (see
    :class:`DatabaseOutageMiddleware`) until the schema could be set up, and
    ``/healthz`` answers 200 saying ``"database": "unavailable"``.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        app.state.engine = engine
        app.state.live = LiveHub(settings)
        waiting: asyncio.Task[None] | None = None
        try:
            await init_db(engine)
            app.state.sessions = session_factory(engine)
        except Exception as exc:
            if not is_outage(exc):  # an unknown revision: nothing to wait for
                await engine.dispose()
                raise
            log.warning("database unavailable at start-up (%s: %s); answering 503 until "
                        "it is back", type(exc).__name__, str(exc)[:200])
            waiting = asyncio.create_task(_init_when_back(app, engine))
        try:
            yield
        finally:
            if waiting is not None:
                waiting.cancel()
                with suppress(asyncio.CancelledError):
                    await waiting
            await app.state.live.aclose()
            await engine.dispose()

    app = FastAPI(
        title="herald",
        summary="Raise events; herald notifies by email, in-app, push and SMS.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    configure_passwords(settings)  # argon2 parameters and the slot wait
    app.state.engine = None
    app.state.sessions = None  # until the lifespan set the schema up
    app.add_middleware(DatabaseOutageMiddleware)
    idempotency.install(app)
    app.include_router(events.router)
    # Before inbox: /me/notifications/stream must win over any /{notification_id} route.
    app.include_router(stream.router)
    app.include_router(inbox.router)
    app.include_router(inbox.events_router)
    app.include_router(me.router)
    app.include_router(social.router)

    @app.exception_handler(HashingBusy)
    async def _hashing_busy(_request: Request, exc: HashingBusy) -> JSONResponse:
        # Every hashing slot stayed busy for HERALD_HASH_WAIT: shed load instead of queueing.
        return JSONResponse({"detail": "server busy; retry later"},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                            headers={"Retry-After": exc.retry_after_header})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI echoes the offending input; that would send passwords back
        # (and into any log of responses), so only the field and reason go out.
        detail = [
            {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
            for err in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics(sessions: SessionsDep) -> PlainTextResponse:
        """Prometheus metrics of this API process, with the outbox backlog."""
        async with sessions() as session:
            pending = await session.exec(select(func.count()).select_from(OutboxEvent)
                                         .where(col(OutboxEvent.published_at).is_(None)))
            OUTBOX_PENDING.set(pending.one())
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["ops"])
    async def healthz(request: Request) -> dict[str, str]:
        """Liveness: the process answers (always 200, so an orchestrator never restarts an
        API for a database outage); ``database`` says whether the database answers now
        (``ok``) or not (``unavailable``: database routes answer 503 meanwhile)."""
        engine: AsyncEngine | None = request.app.state.engine
        database = "unavailable"
        if engine is not None and request.app.state.sessions is not None:
            with suppress(Exception):
                await asyncio.wait_for(probe(engine), _HEALTH_PROBE_TIMEOUT)
                database = "ok"
        return {"status": "ok", "database": database}

    @app.post("/signup", status_code=status.HTTP_201_CREATED, tags=["events"],
              responses={**idempotency.RESPONSES, 409: {
                  "description": "email already registered, handle already taken (or a "
                                 "request with this Idempotency-Key is still in progress)"}})
    async def signup(body: SignupIn, sessions: SessionsDep,
                     idem: IdempotencyDep) -> EventAccepted:
        """Create an account and raise ``user.signup`` (a welcome email), in one transaction."""
        password_hash = await hash_password_async(body.password)
        for attempt in (1, 2, 3):
            user = User(email=body.email, name=body.name, password_hash=password_hash,
                        phone=body.phone, locale=body.locale, timezone=body.timezone)
            envelope = Envelope(
                type="user.signup",
                actor=Actor(id=user.id, name=user.name),
                recipients=[_recipient(user)],
                data={"name": user.name},
            )
            try:
                async with sessions() as session, session.begin():
                    taken = await session.exec(select(User.id).where(User.email == body.email))
                    if taken.first() is not None:
                        raise HTTPException(status.HTTP_409_CONFLICT, "email already registered")
                    user.handle = await me.claim_handle(session, body.handle, body.email)
                    accepted = EventAccepted(user=_public(user), event_id=envelope.id)
                    session.add(user)
                    add_event(session, envelope)
                    await idem.stage(session, accepted)
                break
            except IntegrityError:
                # The email or handle was taken meanwhile: the next attempt says which
                # (or derives another handle). With an Idempotency-Key, maybe by a
                # concurrent retry of this very request, which the dependency replays.
                if attempt == 3:
                    raise HTTPException(status.HTTP_409_CONFLICT,
                                        "email or handle already registered") from None
        log.info("signup user=%s event=%s", user.id, envelope.id)
        return accepted

    @app.post("/login", tags=["events"],
              responses={**idempotency.RESPONSES,
                         401: {"description": "unknown email or wrong password"}})
    async def login(body: LoginIn, request: Request, sessions: SessionsDep,
                    idem: IdempotencyDep) -> LoginAccepted:
        """Check credentials, raise ``user.login`` and answer a bearer token for ``/me/…``.

        With an ``Idempotency-Key``, a retry replays the same token (stored
        sealed with the password, see ``producer.idempotency``): one login,
        one valid token, never a second one.
        """
        async with sessions() as session:
            user = (await session.exec(select(User).where(User.email == body.email))).first()
        ok, upgraded = await check_password_async(user.password_hash if user else None,
                                                  body.password)
        if user is None or not ok:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid email or password",
                                headers={"WWW-Authenticate": "Bearer"})
        envelope = Envelope(
            type="user.login",
            actor=social.actor(user),
            recipients=[_recipient(user)],
            data={
                "name": user.name,
                "ip": request.client.host if request.client else None,
                "user_agent": request.headers.get("user-agent"),
            },
        )
        async with sessions() as session, session.begin():
            add_event(session, envelope)
            if upgraded is not None:  # hashed with other argon2 parameters: store today's
                await store_upgrade(session, user.id, user.password_hash, upgraded)
            # In the key's transaction: a concurrent retry that loses rolls its token back.
            token = issue_token(session, user.id, settings.token_ttl)
            accepted = LoginAccepted(user=_public(user), event_id=envelope.id,
                                     access_token=token, expires_in=round(settings.token_ttl))
            await idem.stage(session, accepted)
        return accepted

    return app


def main() -> None:
    """Run the API with uvicorn (``python -m producer.api``)."""
    die_with_parent()
    settings = load_settings()
    setup_logging(settings.log_level, "api")
    setup_sentry(settings.sentry_dsn, "api")
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                log_level=settings.log_level.lower(), access_log=False, log_config=None)


if __name__ == "__main__":
    main()
