"""The spine end to end in-process: POST /signup → outbox → relay → broker → worker → SMTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from herald.mailsink import MailSink
from herald.settings import Settings
from tests.conftest import smtp_url
from tests.harness import api_client, email_worker, relay


async def test_signup_reaches_the_inbox(
    database_url: str, make_settings: Callable[..., Settings], smtp: MailSink, topology: Settings
) -> None:
    # Given the API, the relay and the email worker on a real broker and database
    settings = make_settings(smtp_url=smtp_url(smtp))
    async with api_client(settings) as api, relay(settings), email_worker(settings):
        # When a user signs up
        response = await api.post("/signup", json={
            "email": "Ada@Example.com", "password": "correct horse", "name": 'Ada & "L"'})
        assert response.status_code == 201, response.text
        # Then exactly one welcome email arrives, multipart, HTML escaped
        async with asyncio.timeout(10):
            messages = await smtp.wait_for(1)
    assert len(messages) == 1
    mail = messages[0]
    assert mail["To"].addresses[0].addr_spec == "ada@example.com"
    assert mail["Subject"] == 'Welcome to herald, Ada & "L"'
    html = mail.get_body(("html",)).get_content()
    text = mail.get_body(("plain",)).get_content()
    assert "Ada &amp; &#34;L&#34;" in html and 'Ada & "L"' not in html
    assert 'Ada & "L"' in text
    assert response.json()["event_id"] in mail["Message-ID"]
