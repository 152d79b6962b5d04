"""A TCP proxy for tests that can play "the broker went away" and come back on the same port.

``close()`` stops listening and drops every open connection (both sides), so
clients see the connection reset and new connects are refused; ``open()``
listens again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class TcpProxy:
    """Forwards ``host:port`` to ``upstream_host:upstream_port`` until closed."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port
        self.connections = 0  #: accepted since creation
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[None] | None] = set()

    @property
    def is_open(self) -> bool:
        """True while listening."""
        return self._server is not None

    async def open(self) -> None:
        """Listen (again) on ``port`` (the first call picks a free one when it is 0)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        handlers = [t for t in self._handlers if t is not None]
        if handlers:
            await asyncio.wait(handlers, timeout=5)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        if self._server is None:
            client_w.transport.abort()
            return
        self.connections += 1
        me = asyncio.current_task()
        self._handlers.add(me)
        try:
            await self._forward(client_r, client_w)
        finally:
            self._handlers.discard(me)

    async def _forward(self, client_r: asyncio.StreamReader,
                       client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return
        if self._server is None:  # closed while we connected upstream
            client_w.transport.abort()
            up_w.transport.abort()
            return
        self._writers.update((client_w, up_w))
        pipes = [asyncio.create_task(self._pipe(client_r, up_w)),
                 asyncio.create_task(self._pipe(up_r, client_w))]
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
                self._tasks.discard(task)
            await asyncio.gather(*pipes, return_exceptions=True)
            for writer in (client_w, up_w):
                self._writers.discard(writer)
                writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
