"""The uvicorn lifecycle the HTTP stand-ins share.

A stand-in subclasses :class:`HttpStandIn`, calls ``super().__init__()``, sets
``app`` (any ASGI app) and ``name`` (used in errors), and gets
``async with``: uvicorn runs inside the caller's event loop on a free
``127.0.0.1`` port, ``url`` is its base URL while it runs, and ``_release`` is
set on exit so handlers waiting on it (``hang_seconds``) return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from types import TracebackType
from typing import Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn would take over SIGINT/SIGTERM for the whole test process.
        yield


class HttpStandIn:
    """Runs ``self.app`` with uvicorn on ``127.0.0.1:<free port>`` for an ``async with``."""

    name = "HTTP"  #: how errors name the stand-in ("<name> stand-in stopped ...")
    app: ASGIApp  #: set by the subclass before ``__aenter__``

    def __init__(self) -> None:
        self.url = ""
        self._release = asyncio.Event()
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    def _starlette(self, *routes: BaseRoute) -> Starlette:
        """An app serving ``routes``, and ``_not_found`` for any other path."""
        return Starlette(routes=[*routes, Route("/{path:path}", self._not_found,
                                                methods=["GET", "POST", "PUT", "PATCH",
                                                         "DELETE"])])

    async def _not_found(self, request: Request) -> Response:
        return Response(status_code=404)

    async def __aenter__(self) -> Self:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                log_config=None, access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=2)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve())
        async with asyncio.timeout(10):
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise RuntimeError(f"{self.name} stand-in stopped before it started")
                await asyncio.sleep(0.005)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._release.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, 10)
