"""The HTTP API (seed routes, ``/events``): writes rows and outbox events, never the broker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, func, select

from herald.db import init_db, make_engine, session_factory
from herald.logs import setup_logging, setup_sentry
from herald.metrics import OUTBOX_PENDING
from herald.models import OutboxEvent, User
from herald.settings import Settings, load_settings
from producer import events, idempotency, inbox, me, social, stream
from producer.auth import issue_token
from producer.deps import SessionsDep
from producer.idempotency import IdempotencyDep
from producer.outbox import add_event
from producer.passwords import hash_password_async, verify_password_async
from producer.schemas import EventAccepted, LoginAccepted, LoginIn, SignupIn, UserPublic
from topology.envelope import Actor, Envelope, Recipient
from topology.live import LiveHub

log = logging.getLogger("herald.api")


def _recipient(user: User) -> Recipient:
    return social.recipient(user)


def _public(user: User) -> UserPublic:
    return me.public_user(user)


def create_app(settings: Settings) -> FastAPI:
    """The API bound to ``settings`` (database created on start-up if missing)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        await init_db(engine)
        app.state.sessions = session_factory(engine)
        app.state.live = LiveHub(settings)
        yield
        await app.state.live.aclose()
        await engine.dispose()

    app = FastAPI(
        title="herald",
        summary="Raise events; herald notifies by email, in-app, push and SMS.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    idempotency.install(app)
    app.include_router(events.router)
    # Before inbox: /me/notifications/stream must win over any /{notification_id} route.
    app.include_router(stream.router)
    app.include_router(inbox.router)
    app.include_router(inbox.events_router)
    app.include_router(me.router)
    app.include_router(social.router)

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
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

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
        ok = await verify_password_async(user.password_hash if user else None, body.password)
        if user is None or not ok:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid email or password",
                                headers={"WWW-Authenticate": "Bearer"})
        envelope = Envelope(
            type="user.login",
            actor=Actor(id=user.id, name=user.name),
            recipients=[_recipient(user)],
            data={
                "name": user.name,
                "ip": request.client.host if request.client else None,
                "user_agent": request.headers.get("user-agent"),
            },
        )
        async with sessions() as session, session.begin():
            add_event(session, envelope)
            # In the key's transaction: a concurrent retry that loses rolls its token back.
            token = issue_token(session, user.id, settings.token_ttl)
            accepted = LoginAccepted(user=_public(user), event_id=envelope.id,
                                     access_token=token, expires_in=round(settings.token_ttl))
            await idem.stage(session, accepted)
        return accepted

    return app


def main() -> None:
    """Run the API with uvicorn (``python -m producer.api``)."""
    settings = load_settings()
    setup_logging(settings.log_level, "api")
    setup_sentry(settings.sentry_dsn, "api")
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                log_level=settings.log_level.lower(), access_log=False, log_config=None)


if __name__ == "__main__":
    main()
