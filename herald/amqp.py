"""Connecting to RabbitMQ: one way for every process (workers, relay, API, CLI).

A process started on its own waits for the broker (backoff, one log line per
attempt) instead of crashing with a traceback; the connection carries the
process's name so the management UI tells the workers apart.

``HERALD_AMQP_URL`` may name several brokers (the nodes of a cluster), in the
form libpq and MongoDB use for several hosts: one user, vhost and query, a
comma between ``host[:port]`` entries::

    amqp://guest:guest@rabbit1:5672,rabbit2:5673,rabbit3/vhost

A list of full URLs also works, separated by commas or by semicolons (kombu's
and so Celery's spelling): ``amqp://u:p@rabbit1//;amqp://u:p@rabbit2//``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Sequence
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

log = logging.getLogger("herald.amqp")
_MAX_BACKOFF = 30.0
#: A separator followed by a scheme starts the next full URL of a list.
_NEXT_URL = re.compile(r"\s*[,;]\s*(?=[A-Za-z][A-Za-z0-9+.\-]*://)")
_FORM = "amqp://user:pass@host1:5672,host2:5672/vhost"


def _safe(url: str) -> str:
    """``url`` without its password (for log lines)."""
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, _, creds = head.partition("://")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{tail}"


def _check_host(url: str, label: str) -> None:
    """Raise ValueError (naming ``label``, never the password) unless ``url`` has one good host."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"{label}: scheme must be amqp or amqps (like {_FORM})")
    if not parts.hostname:
        raise ValueError(f"{label}: no host (write it like {_FORM})")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{label}: the port must be a number from 1 to 65535") from None
    if port == 0:
        raise ValueError(f"{label}: the port must be a number from 1 to 65535")


def broker_urls(url: str) -> list[str]:
    """One URL per broker that ``url`` names, in the order written.

    ``amqp://u:p@h1:5672,h2,h3:5673/vh?heartbeat=30`` gives
    ``amqp://u:p@h1:5672/vh?heartbeat=30``, ``amqp://u:p@h2/vh?heartbeat=30`` …;
    a list of full URLs gives those URLs; a plain URL gives itself.

    Raises:
        ValueError: the first problem, naming the host entry but never the password.
    """
    text = url.strip()
    pieces = _NEXT_URL.split(text)
    if len(pieces) > 1:  # a list of full URLs: each one names one broker
        for number, piece in enumerate(pieces, 1):
            label = f"URL {number} ({_safe(piece)})"
            if "," in urlsplit(piece).netloc:
                raise ValueError(f"{label}: list either full URLs or hosts in one URL, not both")
            _check_host(piece, label)
        return pieces
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("amqp", "amqps"):
        raise ValueError(f"must look like amqp://user:pass@host:5672/vhost or {_FORM}")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    # The last "@" ends the user part: a password may hold "," but not a bare "@".
    userinfo, at, hostlist = authority.rpartition("@")
    entries = hostlist.split(",")
    urls: list[str] = []
    for number, entry in enumerate(entries, 1):
        shown = f" {entry.strip()!r}" if entry.strip() else ""
        label = f"host{shown}" if len(entries) == 1 else f"host {number} of {len(entries)}{shown}"
        if not entry.strip():
            raise ValueError(f"{label} is empty (write hosts like {_FORM})")
        host_url = f"{scheme}://{userinfo}{at}{entry.strip()}{tail}"
        _check_host(host_url, label)
        urls.append(host_url)
    return urls


def _first(count: int) -> int:
    """The host to try first: random, so that many processes spread over a cluster's nodes."""
    return random.randrange(count)


class MultiHostConnection(aio_pika.RobustConnection):
    """A robust connection that moves on to the next broker whenever it loses one.

    aio-pika's reconnect loop (the private ``__connection_factory``) always
    reconnects to ``self.url``. Both a lost connection and a failed attempt
    pass through ``_on_connection_close`` (aio-pika's ``UnderlayConnection``
    calls it with the failure), so pointing ``self.url`` at the next broker
    there is all it takes for the loop's next attempt to go elsewhere, and we
    keep aio-pika's own restore of channels, queues and consumers rather than
    copying its private loop.
    """

    def __init__(self, urls: Sequence[URL], first: int = 0, **kwargs: Any) -> None:
        self.urls = list(urls)
        self.index = first % len(self.urls)
        super().__init__(self.urls[self.index], **kwargs)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> MultiHostConnection:
        """Not yet connected, to the brokers ``url`` names, from a random one: for callers
        that run ``connect()`` themselves (``kwargs`` as for ``aio_pika.RobustConnection``).

        Raises:
            ValueError: ``url`` is not an AMQP URL.
        """
        urls = [URL(u) for u in broker_urls(url)]
        return cls(urls, _first(len(urls)), **kwargs)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        await super()._on_connection_close(closing)
        if self._close_called or self.is_closed:
            return  # closed on purpose: nothing to move on from
        failed = self.url
        self.index = (self.index + 1) % len(self.urls)
        self.url = self.urls[self.index]
        if self.connection_attempt:
            # Reconnecting after having been connected (connect() logs the first attempts).
            try:
                error: object = closing.exception()
            except asyncio.CancelledError:
                error = "cancelled"
            log.warning("broker %s: connection lost or refused (%s); reconnecting to %s",
                        _safe(str(failed)), str(error)[:200] or type(error).__name__,
                        _safe(str(self.url)))


async def connect(url: str, *, name: str, wait: bool = True,
                  stop: asyncio.Event | None = None,
                  connect_timeout: float = 10.0) -> AbstractRobustConnection:
    """A robust connection to ``url`` named ``name`` (shown by ``rabbitmqctl list_connections``).

    ``url`` may name several brokers (see :func:`broker_urls`): they are tried
    in order from a random one, and when an established connection is lost
    the reconnect goes to the next one. With ``wait`` (the default for
    long-running processes) a round in which no broker answers is retried
    with exponential backoff up to 30 s, one warning line per failed attempt
    (never with the password), until one answers or ``stop`` is set (then
    ``asyncio.CancelledError``). Without ``wait`` the last broker's failure
    raises once each was tried (operator commands say so at once).

    Raises:
        ValueError: ``url`` is not an AMQP URL (Settings has checked it already).
    """
    urls = [URL(u) for u in broker_urls(url)]
    first = _first(len(urls))
    backoff = 0.5
    attempt = 0
    while True:
        for step in range(len(urls)):
            index = (first + step) % len(urls)
            attempt += 1
            connection = MultiHostConnection(
                urls, index, client_properties={"connection_name": name})
            try:
                await connection.connect(timeout=connect_timeout)
                return connection
            except (*CONNECTION_EXCEPTIONS, TimeoutError, OSError) as exc:
                with suppress(Exception):
                    await connection.close()
                last = step == len(urls) - 1
                if last and not wait:
                    raise
                if not last:
                    after = f"trying {_safe(str(urls[(index + 1) % len(urls)]))} next"
                else:
                    after = f"retrying in {backoff:.1f}s"
                log.warning("broker %s unreachable (%s); attempt %d, %s",
                            _safe(str(urls[index])), str(exc)[:200] or type(exc).__name__,
                            attempt, after)
            except BaseException:
                with suppress(Exception):
                    await connection.close()
                raise
        if stop is None:
            await asyncio.sleep(backoff)
        else:
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            if stop.is_set():
                raise asyncio.CancelledError("stopped while waiting for the broker")
        backoff = min(backoff * 2, _MAX_BACKOFF)
