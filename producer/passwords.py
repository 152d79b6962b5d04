"""Password hashing with argon2 (argon2-cffi's recommended parameters).

Each hash takes ~64 MiB and ~100 ms of CPU; the async helpers run them in
worker threads, at most one per CPU, so a signup burst queues for the CPU
instead of allocating a hash's memory per request (a 20-request burst took
1.4 GiB with the default 40 threads).
"""

from __future__ import annotations

import os

from anyio import CapacityLimiter, to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()
#: Verified against when the email is unknown, so a miss costs as long as a hit.
_DUMMY_HASH = _hasher.hash("herald-timing-equaliser")
_limiter: CapacityLimiter | None = None


def hash_password(password: str) -> str:
    """An argon2id hash with a fresh salt."""
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; constant work when ``stored_hash`` is None."""
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def _cpu_limiter() -> CapacityLimiter:
    global _limiter
    if _limiter is None:
        _limiter = CapacityLimiter(os.cpu_count() or 2)
    return _limiter


async def hash_password_async(password: str) -> str:
    """:func:`hash_password` in a thread, at most one hash per CPU at a time."""
    return await to_thread.run_sync(hash_password, password, limiter=_cpu_limiter())


async def verify_password_async(stored_hash: str | None, password: str) -> bool:
    """:func:`verify_password` in a thread, at most one per CPU at a time."""
    return await to_thread.run_sync(verify_password, stored_hash, password,
                                    limiter=_cpu_limiter())
