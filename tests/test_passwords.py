"""argon2id parameters from the settings, old hashes upgraded at login, bounded slot wait."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from sqlmodel import col, update

from herald.db import make_engine, session_factory
from herald.errors import ConfigError
from herald.models import User
from herald.settings import Settings, load_settings
from producer import passwords
from producer.passwords import (
    Hasher,
    HashingBusy,
    check_password_async,
    hash_password,
    hash_password_async,
    needs_rehash,
    store_upgrade,
    verify_password,
    verify_password_async,
)
from tests.harness import PASSWORD, rows

NEW_PREFIX = "$argon2id$v=19$m=19456,t=2,p=1$"
#: argon2-cffi's own defaults, which herald used before (64 MiB, t=3, p=4).
OLD_PREFIX = "$argon2id$v=19$m=65536,t=3,p=4$"


@pytest.fixture(autouse=True)
def _restore_hasher() -> Iterator[None]:
    """Whatever a test configures, the next one starts from the module's hasher; and no
    test leaves a hashing slot taken."""
    saved = passwords._hasher
    yield
    passwords._hasher = saved
    assert passwords.slots().borrowed_tokens == 0


@pytest.fixture(scope="module")
def old_hash() -> str:
    """``PASSWORD`` hashed with argon2-cffi's defaults (``PasswordHasher()``)."""
    return PasswordHasher().hash(PASSWORD)


@pytest.fixture
def api_settings(database_url: str, make_settings: Callable[..., Settings]) -> Settings:
    """Settings on the parametrised database (SQLite, then PostgreSQL)."""
    return make_settings()


@pytest.fixture
async def held_slots() -> AsyncIterator[list[object]]:
    """Every hashing slot taken (as by hashes in progress); released afterwards.

    Async: anyio's limiter needs a running event loop the first time it is used.
    """
    limiter = passwords.slots()
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for holder in holders:
        limiter.acquire_on_behalf_of_nowait(holder)
    yield holders
    for holder in holders:
        if holder in limiter.statistics().borrowers:
            limiter.release_on_behalf_of(holder)


# --- parameters ---------------------------------------------------------------------------


def test_new_hashes_carry_owasp_minimum_parameters(old_hash: str) -> None:
    # When a password is hashed with the defaults
    new = hash_password(PASSWORD)
    # Then it is argon2id at 19 MiB, t=2, p=1, written into the hash
    assert new.startswith(NEW_PREFIX), new
    assert verify_password(new, PASSWORD)
    assert not verify_password(new, PASSWORD + "!")
    # And it does not need a rehash, whereas an argon2-cffi-default hash does
    assert not needs_rehash(new)
    assert old_hash.startswith(OLD_PREFIX)
    assert needs_rehash(old_hash)


def test_old_default_parameter_hashes_still_verify(old_hash: str) -> None:
    assert verify_password(old_hash, PASSWORD)
    assert not verify_password(old_hash, "wrong password")


def test_unknown_or_malformed_hashes_never_match() -> None:
    assert not verify_password(None, "herald-timing-equaliser")  # not even the dummy's own
    assert not verify_password("not-a-hash", PASSWORD)
    assert not needs_rehash("not-a-hash")


def test_configure_takes_the_parameters_from_the_settings(
    make_settings: Callable[..., Settings], old_hash: str
) -> None:
    # Given settings with other argon2 parameters and wait
    settings = make_settings(argon2_memory_kib=8192, argon2_time_cost=1,
                             argon2_parallelism=2, hash_wait="250ms")
    # When the module is configured with them
    passwords.configure(settings)
    # Then new hashes use them, and hashes with the defaults verify but need a rehash
    new = hash_password(PASSWORD)
    assert new.startswith("$argon2id$v=19$m=8192,t=1,p=2$"), new
    assert not needs_rehash(new)
    default = Hasher().hash(PASSWORD)
    assert verify_password(default, PASSWORD) and needs_rehash(default)
    assert verify_password(old_hash, PASSWORD) and needs_rehash(old_hash)
    assert passwords._hasher.wait == 0.25


async def test_check_hands_back_an_upgrade_only_for_a_matching_old_hash(old_hash: str) -> None:
    assert await check_password_async(old_hash, "wrong password") == (False, None)
    assert await check_password_async(None, PASSWORD) == (False, None)
    ok, upgraded = await check_password_async(old_hash, PASSWORD)
    assert ok and upgraded is not None and upgraded.startswith(NEW_PREFIX)
    assert verify_password(upgraded, PASSWORD)
    assert await check_password_async(upgraded, PASSWORD) == (True, None)


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "variable"),
    [
        ("argon2_memory_kib", 1024, "HERALD_ARGON2_MEMORY_KIB"),
        ("argon2_memory_kib", "lots", "HERALD_ARGON2_MEMORY_KIB"),
        ("argon2_time_cost", 0, "HERALD_ARGON2_TIME_COST"),
        ("argon2_parallelism", 0, "HERALD_ARGON2_PARALLELISM"),
        ("argon2_parallelism", 65, "HERALD_ARGON2_PARALLELISM"),
        ("hash_wait", "0", "HERALD_HASH_WAIT"),
        ("hash_wait", "2 parsecs", "HERALD_HASH_WAIT"),
    ],
)
def test_invalid_hash_settings_name_the_variable(field: str, value: Any, variable: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable}: "):
        load_settings(**{field: value})


def test_hash_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings()
    assert (defaults.argon2_memory_kib, defaults.argon2_time_cost,
            defaults.argon2_parallelism, defaults.hash_wait) == (19456, 2, 1, 2.0)
    monkeypatch.setenv("HERALD_HASH_WAIT", "10ms")
    monkeypatch.setenv("HERALD_ARGON2_MEMORY_KIB", "47104")
    custom = load_settings()
    assert custom.hash_wait == 0.01 and custom.argon2_memory_kib == 47104


# --- login upgrades an old hash -------------------------------------------------------------


async def _set_hash(settings: Settings, email: str, password_hash: str) -> None:
    engine = make_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            await session.exec(update(User).where(col(User.email) == email)
                               .values(password_hash=password_hash))
    finally:
        await engine.dispose()


async def _stored_hash(settings: Settings) -> str:
    users: list[User] = await rows(settings, User)
    assert len(users) == 1
    return users[0].password_hash


async def test_login_upgrades_an_old_parameter_hash(
    api: httpx.AsyncClient, api_settings: Settings, old_hash: str
) -> None:
    # Given a user whose stored hash was made with argon2-cffi's defaults
    credentials = {"email": "ada@example.com", "password": PASSWORD}
    signup = await api.post("/signup", json={**credentials, "name": "Ada"})
    assert signup.status_code == 201, signup.text
    assert (await _stored_hash(api_settings)).startswith(NEW_PREFIX)
    await _set_hash(api_settings, "ada@example.com", old_hash)
    # When a login with the wrong password fails
    wrong = await api.post("/login", json={**credentials, "password": "wrong password"})
    assert wrong.status_code == 401
    # Then the old hash is left alone
    assert await _stored_hash(api_settings) == old_hash
    # When the user logs in with the right one
    login = await api.post("/login", json=credentials)
    assert login.status_code == 200, login.text
    # Then the stored hash is replaced by one with today's parameters, of the same password
    upgraded = await _stored_hash(api_settings)
    assert upgraded != old_hash and upgraded.startswith(NEW_PREFIX), upgraded
    assert verify_password(upgraded, PASSWORD)
    # And the next login works and leaves that hash as it is
    again = await api.post("/login", json=credentials)
    assert again.status_code == 200, again.text
    assert await _stored_hash(api_settings) == upgraded


async def test_store_upgrade_never_overwrites_a_hash_changed_meanwhile(
    api: httpx.AsyncClient, api_settings: Settings, old_hash: str
) -> None:
    # Given a user whose hash changed after a login read it (a password change)
    signup = await api.post("/signup", json={"email": "ada@example.com", "password": PASSWORD,
                                             "name": "Ada"})
    assert signup.status_code == 201, signup.text
    changed = await _stored_hash(api_settings)
    user_id = signup.json()["user"]["id"]
    # When the login stores its upgrade of the hash it read
    engine = make_engine(api_settings.database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            await store_upgrade(session, user_id, old_hash, hash_password(PASSWORD))
    finally:
        await engine.dispose()
    # Then the newer hash stays
    assert await _stored_hash(api_settings) == changed


# --- bounded wait for a slot ----------------------------------------------------------------


@pytest.mark.parametrize("helper", [
    lambda: hash_password_async(PASSWORD),
    lambda: verify_password_async(None, PASSWORD),
    lambda: check_password_async(None, PASSWORD),
], ids=["hash", "verify", "check"])
async def test_busy_slots_raise_hashing_busy_after_the_wait(
    held_slots: list[object], helper: Callable[[], Any]
) -> None:
    # Given every slot taken and a 10 ms wait
    passwords._hasher = Hasher(wait=0.01)
    limiter = passwords.slots()
    # When a request needs a hash
    began = time.monotonic()
    with pytest.raises(HashingBusy) as caught:
        await helper()
    # Then it gives up quickly (generous bound: the machine is noisy), saying when to retry
    assert time.monotonic() - began < 1.0
    assert caught.value.retry_after == 0.01
    assert caught.value.retry_after_header == "1"
    # And it left neither a waiter in the queue nor a token of its own
    stats = limiter.statistics()
    assert stats.tasks_waiting == 0
    assert stats.borrowed_tokens == len(held_slots)
    # And once the slots are free again, every one of them can be used
    for holder in held_slots:
        limiter.release_on_behalf_of(holder)
    assert limiter.borrowed_tokens == 0
    passwords._hasher = Hasher(wait=30)
    many = [hash_password_async(PASSWORD) for _ in range(int(limiter.total_tokens) + 1)]
    assert all(h.startswith(NEW_PREFIX) for h in await asyncio.gather(*many))
    assert limiter.borrowed_tokens == 0


async def test_a_slot_freed_within_the_wait_is_taken(held_slots: list[object]) -> None:
    # Given every slot taken and a wait longer than the slot stays busy
    passwords._hasher = Hasher(wait=10)
    limiter = passwords.slots()
    waiting = asyncio.create_task(hash_password_async(PASSWORD))
    await asyncio.sleep(0.05)
    assert not waiting.done() and limiter.statistics().tasks_waiting == 1
    # When one slot is released
    limiter.release_on_behalf_of(held_slots[0])
    # Then the waiting hash gets it and completes
    assert (await asyncio.wait_for(waiting, 10)).startswith(NEW_PREFIX)
    assert limiter.borrowed_tokens == len(held_slots) - 1


async def test_a_cancelled_hash_keeps_its_slot_until_its_thread_is_done() -> None:
    # Given a hash in progress (a stand-in that blocks its worker thread until released)
    limiter = passwords.slots()
    gate = threading.Event()
    task = asyncio.create_task(passwords._in_slot(lambda _hasher: gate.wait(10)))
    await _until(lambda: limiter.borrowed_tokens == 1)
    # When its request is cancelled (the client went away)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    # Then the slot stays taken while the thread still uses the CPU
    await asyncio.sleep(0.1)
    assert limiter.borrowed_tokens == 1
    # And is released, exactly once, when the thread finishes
    gate.set()
    await _until(lambda: limiter.borrowed_tokens == 0)


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_signup_answers_503_with_retry_after_when_no_hashing_slot_frees_up(
    api: httpx.AsyncClient, api_settings: Settings, held_slots: list[object]
) -> None:
    # Given every hashing slot busy and a 10 ms wait (HERALD_HASH_WAIT)
    passwords._hasher = Hasher(wait=0.01)
    # When someone signs up
    response = await api.post("/signup", json={"email": "ada@example.com",
                                               "password": PASSWORD, "name": "Ada"})
    # Then the API sheds the load with a 503 saying when to come back, and stores nothing
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert response.json() == {"detail": "server busy; retry later"}
    assert await rows(api_settings, User) == []
