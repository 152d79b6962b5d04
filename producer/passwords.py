"""Password hashing with argon2id, parameters from the settings, and a bounded wait.

The default is OWASP's minimum for argon2id (19 MiB, t=2, p=1): ~20 ms of
CPU per hash here, against ~120 ms (and 64 MiB) for argon2-cffi's own
defaults, which admitted only ~8.5 signups/s on a 2-core machine (a burst
of 100 signups answered with p99 11.9 s). The parameters are written into
every hash, so a hash made with other ones still verifies;
:func:`check_password_async` also hands back a hash with today's parameters
for the login to store (an upgrade at the next successful login).

The async helpers run hashes in worker threads, at most one per CPU (a burst
queues for the CPU instead of allocating a hash's memory per request: a
20-request burst took 1.4 GiB with the default 40 threads), and wait at most
``HERALD_HASH_WAIT`` for a slot; past that they raise :class:`HashingBusy`,
which the API answers 503 with ``Retry-After``, rather than queueing without end.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, TypeVar

import anyio
from anyio import CapacityLimiter
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import col, update
from sqlmodel.ext.asyncio.session import AsyncSession

from herald.errors import HeraldError
from herald.models import User
from herald.settings import Settings

_T = TypeVar("_T")

#: OWASP's minimum for argon2id (Password Storage Cheat Sheet); also the settings' defaults.
DEFAULT_MEMORY_KIB = 19456
DEFAULT_TIME_COST = 2
DEFAULT_PARALLELISM = 1
#: Seconds a request waits for a hashing slot before :class:`HashingBusy` (``HERALD_HASH_WAIT``).
DEFAULT_WAIT = 2.0


class HashingBusy(HeraldError):
    """Raised when no hashing slot came free within ``HERALD_HASH_WAIT`` (the API answers 503)."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"every password hashing slot is busy; retry in {retry_after:g}s")

    @property
    def retry_after_header(self) -> str:
        """``retry_after`` as a ``Retry-After`` value (whole seconds, at least 1)."""
        return str(max(1, math.ceil(self.retry_after)))


class Checked(NamedTuple):
    """What :func:`check_password_async` found."""

    #: The password matches the stored hash.
    ok: bool
    #: A hash of the same password with today's parameters, when ``ok`` and the stored
    #: hash was made with others; the caller stores it. None otherwise.
    upgraded: str | None = None


class Hasher:
    """argon2id with fixed parameters; verifies hashes made with any parameters."""

    def __init__(self, memory_kib: int = DEFAULT_MEMORY_KIB, time_cost: int = DEFAULT_TIME_COST,
                 parallelism: int = DEFAULT_PARALLELISM, wait: float = DEFAULT_WAIT) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib,
                                      parallelism=parallelism, type=Type.ID)
        #: Seconds the async helpers wait for a slot.
        self.wait = wait
        self._dummy: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Hasher:
        """The hasher ``settings`` describe (``HERALD_ARGON2_*``, ``HERALD_HASH_WAIT``)."""
        return cls(settings.argon2_memory_kib, settings.argon2_time_cost,
                   settings.argon2_parallelism, settings.hash_wait)

    def hash(self, password: str) -> str:
        """An argon2id hash with a fresh salt and this hasher's parameters in it."""
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when ``password`` matches; as much work when ``stored_hash`` is None.

        The parameters are read from ``stored_hash``, so a hash made with other
        ones verifies too. A malformed hash is a mismatch, never an exception.
        """
        try:
            matched = self._hasher.verify(stored_hash or self._dummy_hash(), password)
        except (VerificationError, InvalidHashError):
            return False
        return matched and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when ``stored_hash`` is a valid argon2 hash made with other parameters."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return False  # not ours to upgrade: it never verifies either

    def check(self, stored_hash: str | None, password: str) -> Checked:
        """:meth:`verify`, plus a hash with today's parameters when ``stored_hash`` needs one."""
        if not self.verify(stored_hash, password):
            return Checked(ok=False)
        assert stored_hash is not None  # verify is False without one
        return Checked(ok=True, upgraded=self.hash(password)
                       if self.needs_rehash(stored_hash) else None)

    def _dummy_hash(self) -> str:
        # Verified against when the email is unknown, so that a miss costs as long as a
        # hit; made with this hasher's parameters, as new hashes are.
        if self._dummy is None:
            self._dummy = self.hash("herald-timing-equaliser")
        return self._dummy


_hasher = Hasher()
_slots: CapacityLimiter | None = None
_threads: ThreadPoolExecutor | None = None


def configure(settings: Settings) -> None:
    """Use the parameters and wait of ``settings`` from now on (call once at app start).

    Until called, the defaults (which are also the settings' defaults) apply.
    Hashes made before keep verifying: their parameters are in them.
    """
    global _hasher
    _hasher = Hasher.from_settings(settings)


def hash_password(password: str) -> str:
    """An argon2id hash with a fresh salt and the configured parameters (blocks the caller)."""
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; constant work when ``stored_hash`` is None."""
    return _hasher.verify(stored_hash, password)


def needs_rehash(stored_hash: str) -> bool:
    """True when ``stored_hash`` was made with other parameters than the configured ones."""
    return _hasher.needs_rehash(stored_hash)


def slots() -> CapacityLimiter:
    """The hashing slots: one per CPU, shared by every async helper of this process."""
    global _slots, _threads
    if _slots is None or _threads is None:
        count = os.cpu_count() or 2
        _slots = CapacityLimiter(count)
        # Threads of our own: anyio's default pool (40) is shared with FastAPI's sync
        # code, and waiting there would escape HERALD_HASH_WAIT. A job is only submitted
        # by a slot's holder, so it never queues here.
        _threads = ThreadPoolExecutor(count, thread_name_prefix="herald-hash")
    return _slots


async def _in_slot(work: Callable[[Hasher], _T]) -> _T:
    """``work`` in a worker thread once a slot is free; HashingBusy after the wait."""
    hasher = _hasher
    limiter = slots()
    assert _threads is not None
    token = object()  # the slot's borrower: released by a callback, not by this task
    try:
        with anyio.fail_after(hasher.wait):
            # A waiter that times out leaves the queue (or hands back a token given to
            # it in the same instant): anyio's acquire cleans up on cancellation.
            await limiter.acquire_on_behalf_of(token)
    except TimeoutError:
        # About the wait: the queue that filled every slot drains at that pace.
        raise HashingBusy(retry_after=hasher.wait) from None
    loop = asyncio.get_running_loop()
    try:
        job = _threads.submit(work, hasher)
    except BaseException:
        limiter.release_on_behalf_of(token)
        raise
    # The slot stands for a CPU, so it is freed when the thread is done, not when the
    # request is: a cancelled request (a client gone) cannot stop argon2 midway, and
    # freeing its slot at once would let one more hash than CPUs run.
    job.add_done_callback(
        lambda _job: loop.call_soon_threadsafe(limiter.release_on_behalf_of, token))
    return await asyncio.wrap_future(job)


async def hash_password_async(password: str) -> str:
    """:func:`hash_password` in a thread, at most one hash per CPU at a time.

    Raises:
        HashingBusy: no slot came free within ``HERALD_HASH_WAIT``.
    """
    return await _in_slot(lambda hasher: hasher.hash(password))


async def verify_password_async(stored_hash: str | None, password: str) -> bool:
    """:func:`verify_password` in a thread, at most one per CPU at a time.

    Raises:
        HashingBusy: no slot came free within ``HERALD_HASH_WAIT``.
    """
    return await _in_slot(lambda hasher: hasher.verify(stored_hash, password))


async def check_password_async(stored_hash: str | None, password: str) -> Checked:
    """Verify ``password`` and, when it matches a hash with other parameters, rehash it.

    Both in one slot and one thread. Store ``upgraded`` with
    :func:`store_upgrade` in the transaction the login writes.

    Raises:
        HashingBusy: no slot came free within ``HERALD_HASH_WAIT``.
    """
    return await _in_slot(lambda hasher: hasher.check(stored_hash, password))


async def store_upgrade(session: AsyncSession, user_id: str, old_hash: str,
                        new_hash: str) -> None:
    """Replace the user's hash ``old_hash`` with ``new_hash`` (in the caller's transaction).

    A no-op when the stored hash is no longer ``old_hash``: a password changed
    since the login read it is never overwritten with the old password.
    """
    await session.exec(update(User)
                       .where(col(User.id) == user_id, col(User.password_hash) == old_hash)
                       .values(password_hash=new_hash))
