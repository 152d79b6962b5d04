"""The ``/inbox`` page in real headless Chromium against the real API, relay and in-app worker.

Chromium comes from the Debian package (``/usr/bin/chromium``), driven by
Playwright; without it these tests are skipped, except in CI, where they fail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from herald.models import User
from herald.settings import Settings
from producer.api import create_app
from tests.conftest import IN_CI, eventually
from tests.harness import PASSWORD, api_client, in_app_worker, relay, rows, sign_up
from tests.tcpproxy import TcpProxy
from tests.test_live import serve

CHROMIUM = Path("/usr/bin/chromium")
SERVICE_TOKEN = "page-test-service-token"
#: Milliseconds Playwright waits for a condition on the page.
WAIT_MS = 20_000
XSS = '<img src=x onerror="window.__pwned=1"><b>bold</b>'


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """The test's settings, with ``POST /events`` switched on."""
    return make_settings(service_token=SERVICE_TOKEN)


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    """A fresh page in headless Chromium; fails the test on any uncaught script error."""
    if not CHROMIUM.exists():
        message = f"Chromium not installed at {CHROMIUM} (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    errors: list[Any] = []
    expect.set_options(timeout=WAIT_MS)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                   headless=True)
        try:
            context = await browser.new_context()
            tab = await context.new_page()
            tab.set_default_timeout(WAIT_MS)
            tab.on("pageerror", lambda error: errors.append(error))
            yield tab
            await context.close()
        finally:
            await browser.close()
    assert errors == [], f"uncaught errors on the page: {errors}"


@pytest.fixture
async def herald(topology: Settings) -> AsyncIterator[str]:
    """The API on a free port, the relay and the in-app worker; yields the API's base URL."""
    async with serve(create_app(topology)) as served, relay(topology), \
            in_app_worker(topology):
        yield served.url


async def sign_in(page: Page, base_url: str, email: str) -> None:
    """Open the inbox page and sign in with the form."""
    await page.goto(f"{base_url}/inbox")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#inbox-view")).to_be_visible()


async def raise_login_event(api: httpx.AsyncClient, user_id: str, user_agent: str) -> None:
    """Have another service raise ``user.login`` for ``user_id`` (the in-app body shows the UA)."""
    response = await api.post("/events", headers={"Authorization": f"Bearer {SERVICE_TOKEN}"},
                              json={"type": "user.login", "actor": {"id": "page-test"},
                                    "recipients": [{"user_id": user_id}],
                                    "data": {"user_agent": user_agent}})
    assert response.status_code == 202, response.text


async def test_the_page_signs_in_lists_and_shows_new_notifications_live(
    herald: str, page: Page,
) -> None:
    items = page.locator("#list > li")
    async with httpx.AsyncClient(base_url=herald) as api:
        # Given Ada's account
        await sign_up(api, "ada")
        # When she signs in on the page
        await sign_in(page, herald, "ada@example.com")
        # Then her inbox shows the sign-in notifications: the API signup helper's
        # login and the page's own, whether listed or arriving live
        await expect(items).to_have_count(2)
        await expect(items.first.locator(".title")).to_have_text("New sign-in")
        await expect(page.locator("#unread-count")).to_have_text("2")
        await expect(page.locator("#status")).to_have_text("Live")
        await page.evaluate("window.__sameDocument = true")

        # When she signs in elsewhere while the page is open
        login = await api.post("/login", json={"email": "ada@example.com", "password": PASSWORD},
                               headers={"User-Agent": "Probe/2.0 (elsewhere)"})
        assert login.status_code == 200, login.text
        # Then the new notification appears on top, without a reload
        await expect(items).to_have_count(3)
        await expect(items.first.locator(".body")).to_contain_text("Probe/2.0 (elsewhere)")
        await expect(page.locator("#unread-count")).to_have_text("3")
        assert await page.evaluate("window.__sameDocument") is True

    # When she marks the newest one read, then all of them
    await items.first.get_by_role("button", name="Mark read").click()
    await expect(items.first).to_have_class("item read")
    await expect(page.locator("#unread-count")).to_have_text("2")
    await page.get_by_role("button", name="Mark all read").click()
    await expect(page.locator("#unread-count")).to_have_text("0")
    await expect(page.locator("#list > li.read")).to_have_count(3)
    # Then a reload (the token is kept for the tab) shows them read, from the server
    await page.reload()
    await expect(items).to_have_count(3)
    await expect(page.locator("#list > li.read")).to_have_count(3)
    await expect(page.locator("#unread-count")).to_have_text("0")


async def test_the_page_sends_presence_heartbeats(herald: str, page: Page,
                                                 topology: Settings) -> None:
    async with httpx.AsyncClient(base_url=herald) as api:
        await sign_up(api, "ada")
    await sign_in(page, herald, "ada@example.com")
    # Then the visible page told the server Ada is active (POST /me/presence)
    [ada] = await eventually(lambda: _users_active(topology), timeout=WAIT_MS / 1000)
    assert ada.email == "ada@example.com"


async def _users_active(settings: Settings) -> list[User]:
    return [user for user in await rows(settings, User) if user.last_active_at is not None]


async def test_the_page_reconnects_and_catches_up_after_losing_the_stream(
    herald: str, page: Page,
) -> None:
    items = page.locator("#list > li")
    status = page.locator("#status")
    upstream = urlsplit(herald)
    # Given the page talks to the API through a link that can fail
    async with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 80) as link, \
            httpx.AsyncClient(base_url=herald) as api:
        user_id, auth = await sign_up(api, "ada")
        await sign_in(page, f"http://127.0.0.1:{link.port}", "ada@example.com")
        await expect(items).to_have_count(2)
        await expect(status).to_have_text("Live")
        await page.evaluate("window.__sameDocument = true")
        # When the link drops, and a notification is stored while the page is away
        await link.close()
        await expect(status).to_contain_text("reconnecting")
        await raise_login_event(api, user_id, "While-away/1.0")
        await eventually(lambda: _inbox_size(api, auth, 3), timeout=WAIT_MS / 1000)
        await link.open()
        # Then the page reconnects by itself and shows it (replayed after Last-Event-ID)
        await expect(status).to_have_text("Live")
        await expect(items).to_have_count(3)
        await expect(items.first.locator(".body")).to_contain_text("While-away/1.0")
        assert await page.evaluate("window.__sameDocument") is True


async def _inbox_size(api: httpx.AsyncClient, auth: dict[str, str], size: int) -> bool:
    response = await api.get("/me/notifications", headers=auth)
    return response.status_code == 200 and len(response.json()["items"]) == size


async def test_html_in_a_notification_is_shown_as_text_and_never_runs(
    herald: str, page: Page,
) -> None:
    async with httpx.AsyncClient(base_url=herald) as api:
        user_id, _ = await sign_up(api, "ada")
        await sign_in(page, herald, "ada@example.com")
        await expect(page.locator("#status")).to_have_text("Live")
        # When a notification arrives live whose text holds markup
        await raise_login_event(api, user_id, XSS)
        hostile = page.locator("#list .body", has_text="<b>bold</b>")
        await expect(hostile).to_have_count(1)
    # Then the markup is shown literally and nothing of it became an element or ran
    await _shown_as_text(page)
    # And the same holds when the list is loaded from the server
    await page.reload()
    await expect(hostile).to_have_count(1)
    await _shown_as_text(page)


async def _shown_as_text(page: Page) -> None:
    body = page.locator("#list .body", has_text="<b>bold</b>")
    assert XSS in (await body.text_content() or "")
    await expect(page.locator("#list img")).to_have_count(0)
    await expect(page.locator("#list b")).to_have_count(0)
    assert await page.evaluate("typeof window.__pwned") == "undefined"


async def test_a_wrong_password_shows_an_error_and_keeps_the_form(
    herald: str, page: Page,
) -> None:
    async with httpx.AsyncClient(base_url=herald) as api:
        await sign_up(api, "ada")
    await page.goto(f"{herald}/inbox")
    await page.get_by_label("Email").fill("ada@example.com")
    await page.get_by_label("Password").fill("not the password")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#login-error")).to_have_text("Wrong email or password.")
    await expect(page.locator("#inbox-view")).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('herald.token')") is None


# --- the page's HTTP side (no browser) -------------------------------------------------


async def test_the_page_and_its_assets_are_served_with_a_strict_policy(
    settings: Settings,
) -> None:
    async with api_client(settings) as api:
        page = await api.get("/inbox")
        script = await api.get("/inbox/inbox.js")
        style = await api.get("/inbox/inbox.css")
        missing = await api.get("/inbox/inbox.html")
        traversal = await api.get("/inbox/..%2Fapi.py")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert '<form id="login-form"' in page.text
    assert script.status_code == 200 and "textContent" in script.text
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404 and traversal.status_code == 404


def test_the_script_never_writes_html() -> None:
    script = (Path(__file__).parent.parent / "producer" / "static" / "inbox.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
