"""OutgoingEmail: the bytes an SMTP server receives say what the EmailMessage build said."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parsedate_to_datetime

import pytest
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from consumers import mime
from consumers.email import EmailChannel
from consumers.mime import Mailbox, OutgoingEmail, date_header
from consumers.providers.sendgrid import to_sendgrid
from consumers.providers.smtp import SmtpProvider
from consumers.templates import Renderer
from herald.errors import ConfigError, PermanentError
from herald.mailsink import Faults, MailSink, start_sink
from herald.settings import REPO_ROOT
from topology.envelope import Actor, Envelope, Recipient

SENDER = "herald <no-reply@herald.local>"
ADDRESS = "ada@example.com"
EXTRA = (("Message-ID", "<evt-1.u1@herald>"), ("X-Herald-Event", "user.signup evt-1"))


@dataclass(frozen=True)
class Case:
    name: str
    subject: str
    text: str
    html: str | None = "<p>Hello</p>\n"
    #: The name has a non-ASCII run longer than one encoded word: Python's
    #: headerregistry keeps the folding space there (RFC 2047 decoders do not).
    split_name: bool = False
    #: The subject holds text shaped like an encoded word: the old build sent it so
    #: that readers decoded it ("not encoded"); the new one keeps the literal text.
    literal_encoded_word: bool = False


CASES = {
    "ascii": Case("Ada Lovelace", "Welcome to herald, Ada", "Hi Ada,\nWelcome.\n",
                  "<p>Hi <strong>Ada</strong></p>\n"),
    "accents": Case("Zoë Ångström", "Bienvenue à herald, Zoë", "Salut Zoë,\nça va ?\n",
                    "<p>Ça va, Zoë ?</p>"),
    "emoji": Case("Ada 🚀", "Launch 🚀🎉 today", "🎉" * 30 + "\n", "<p>🚀</p>"),
    "cjk": Case("山田太郎", "ようこそ herald へ、山田太郎さん", "こんにちは\n" * 20,
                "<p>ようこそ</p>"),
    "long ascii subject": Case("Ada", "word " * 200 + "end", "x\n"),
    "long accented subject": Case("Ada", "é " * 300, "x\n"),
    "subject of one long word": Case("Ada", "x" * 1200, "x\n"),
    "long cjk subject": Case("Ada", "日本語の件名" * 40, "x\n"),
    "long emoji subject": Case("Ada", "🎉" * 40, "x\n"),
    "long name without spaces": Case("x" + "é" * 60, "Hi", "x\n", split_name=True),
    "comma": Case("Lovelace, Ada", "Hi", "x\n"),
    "quotes": Case('Ada "the Countess" Lovelace', "Hi", "x\n"),
    "at sign": Case("ada@example.org", "Hi", "x\n"),
    "parentheses and angles": Case("Ada (Countess) <Lovelace>; x: y", "Hi", "x\n"),
    "backslash": Case("C:\\Users\\ada", "Hi", "x\n"),
    "looks encoded": Case("=?utf-8?q?Mallory?=", "=?utf-8?q?not_encoded?=", "x\n",
                          literal_encoded_word=True),
    "accents and specials": Case('Zoë, "the" @dmin (x)', "Hi", "x\n"),
    "repeated spaces": Case("Ada  Lovelace", "Hi", "x\n"),
    "long ascii name": Case(("Ada Lovelace, Countess of Lovelace " * 8).strip(), "Hi", "x\n"),
    "long ascii name, trailing space": Case("Ada Lovelace, Countess " * 8, "Hi", "x\n"),
    "long cyrillic name": Case("Александр Сергеевич Пушкин", "Привет", "Привет\n",
                               split_name=True),
    "very long accented name": Case("Zoë Ångström " * 20, "Hi", "x\n", split_name=True),
    "no html": Case("Ada", "Text only", "Just text.\nTwo lines.\n", None),
    "no html, accents": Case("Zoë", "Texte", "Ça va ?\n", None),
    "long text line": Case("Ada", "Hi", "x" * 1200 + "\n" + "é" * 500, None),
    "long line, mostly ASCII": Case("Ada", "Hi", "x = y " * 300 + "\ncafé \n", "<p>" * 400),
    "dots and From": Case("Ada", "Hi", ".\n..\nFrom here\n.leading dot\n", "<p>\n.\n</p>"),
    "no trailing newline, CRLF": Case("Ada", "Hi", "one\r\ntwo\rthree", "<b>x</b>"),
    "empty subject and text": Case("", "", "", None),
}


def reference(case: Case, address: str = ADDRESS) -> EmailMessage:
    """What consumers/email.py built before OutgoingEmail (EmailMessage, default policy)."""
    message = EmailMessage()
    message["Subject"] = " ".join(case.subject.split())
    message["From"] = SENDER
    message["To"] = Address(display_name=case.name, addr_spec=address)
    message["Date"] = formatdate(localtime=False)
    message.set_content(case.text)
    if case.html is not None:
        message.add_alternative(case.html, subtype="html")
    for name, value in EXTRA:
        message[name] = value
    return message


def outgoing(case: Case, address: str = ADDRESS) -> OutgoingEmail:
    return OutgoingEmail(sender=Mailbox.parse(SENDER), recipient=Mailbox(address, case.name),
                         subject=case.subject, text=case.text, html=case.html,
                         headers=(date_header(), *EXTRA))


class RawSink(MailSink):
    """The mail sink, also keeping each message's bytes and SMTP envelope."""

    def __init__(self, faults: Faults | None = None) -> None:
        super().__init__(faults=faults or Faults())
        self.raw: list[bytes] = []
        self.envelopes: list[tuple[str, list[str]]] = []

    async def handle_DATA(self, server: SMTP, session: Session,
                          envelope: SmtpEnvelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):
            self.raw.append(envelope.original_content or b"")
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return reply


@pytest.fixture
async def sink() -> AsyncIterator[tuple[RawSink, SmtpProvider]]:
    sink = RawSink()
    server = await start_sink(sink)
    provider = SmtpProvider(f"smtp://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                            timeout=5)
    yield sink, provider
    await provider.aclose()
    server.close()
    await server.wait_closed()


def lines_ok(raw: bytes) -> None:
    """CRLF only, 7-bit, no line over 998 octets."""
    assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")
    assert raw.isascii()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def structure(message: EmailMessage) -> list[tuple[str, str | None]]:
    return [(part.get_content_type(), part.get_param("charset")) for part in message.walk()]


def text_of(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if not isinstance(part, EmailMessage) or part.get_content_subtype() != subtype:
        return None
    # Old 7bit/8bit parts came back with CRLF, its base64 ones with LF: compare lines.
    return str(part.get_content()).replace("\r\n", "\n")


def lf(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def raw_header(raw: bytes, name: str) -> str:
    """A header's value as written (unfolded), before any decoding."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii").replace("\r\n ", " ")
    [line] = [h for h in head.split("\r\n") if h.lower().startswith(name.lower() + ":")]
    return line.split(":", 1)[1].strip()


@pytest.mark.parametrize("key", list(CASES))
async def test_the_server_receives_what_the_emailmessage_build_sent(
        key: str, sink: tuple[RawSink, SmtpProvider]) -> None:
    case = CASES[key]
    received, provider = sink
    # Given the same email built the old way and the new way
    # When both go through the real SMTP provider to the sink
    await provider.send(reference(case))
    await provider.send(outgoing(case))
    old, new = received.messages
    raw = received.raw[1]

    # Then the new bytes are clean, and say what the old ones said
    lines_ok(raw)
    assert received.envelopes[1] == ("no-reply@herald.local", [ADDRESS])
    assert received.envelopes[1] == received.envelopes[0]
    assert str(new["Subject"]) == " ".join(case.subject.split())
    for name in ("Subject", "From", "Message-ID", "X-Herald-Event", "MIME-Version"):
        if name == "Subject" and case.literal_encoded_word:
            assert str(old[name]) != str(new[name])  # the old build lost the text
            continue
        assert str(new[name]) == str(old[name]), name
    sent_at = [parsedate_to_datetime(str(m["Date"])) for m in (old, new)]
    assert abs(sent_at[1] - sent_at[0]) < timedelta(minutes=5)
    [to] = new["To"].addresses
    assert to.addr_spec == ADDRESS
    if case.split_name:
        # an RFC 2047 decoder reads the name exactly; headerregistry adds a space
        # where one encoded word follows another
        assert str(make_header(decode_header(raw_header(raw, "To").rsplit(" <", 1)[0]))) \
            == case.name
        assert to.display_name.replace(" ", "") == case.name.replace(" ", "")
    else:
        assert to.display_name == case.name
    assert structure(new) == structure(old)
    assert text_of(new, "plain") == text_of(old, "plain") == lf(case.text)
    assert text_of(new, "html") == text_of(old, "html")
    if case.html is not None:
        assert text_of(new, "html") == lf(case.html)
    assert not new.defects and all(not new[h].defects for h in new)


@pytest.mark.parametrize("key", list(CASES))
def test_sendgrid_gets_the_same_body_from_the_fields(key: str) -> None:
    case = CASES[key]
    new, old = to_sendgrid(outgoing(case)), to_sendgrid(reference(case))
    if case.literal_encoded_word:
        assert new.pop("subject") == case.subject and old.pop("subject") != case.subject
    assert new == old


@pytest.mark.parametrize("key", ["ascii", "cjk", "no html", "long cyrillic name"])
def test_as_message_is_the_parsed_bytes_and_cached(key: str) -> None:
    message = outgoing(CASES[key])
    parsed = message.as_message()
    assert parsed is message.as_message() and message.as_bytes() is message.as_bytes()
    assert parsed.as_bytes(policy=email.policy.SMTP).split(b"\r\n\r\n")[0] \
        == message.as_bytes().split(b"\r\n\r\n")[0]
    assert parsed["To"].addresses[0].addr_spec == ADDRESS


def test_encodings_follow_the_content() -> None:
    def cte(text: str) -> str:
        message = OutgoingEmail(Mailbox.parse(SENDER), Mailbox(ADDRESS), "s", text)
        return str(message.as_message()["Content-Transfer-Encoding"])

    assert cte("short ASCII lines\n") == "7bit"
    assert cte("x" * 79) == "quoted-printable"         # a line too long for 7bit
    assert cte("Bonjour Zoë, votre compte est prêt.\n") == "quoted-printable"  # mostly ASCII
    assert cte("こんにちは世界\n") == "base64"            # mostly not


def test_a_long_address_and_name_stay_under_998_octets() -> None:
    address = "a" * 60 + "@" + ".".join(["d" * 60] * 3) + ".example"
    for name in ["x" * 2000, "é" * 2000, "Ada " * 500, '"' * 600, "x" * 400 + " é"]:
        message = OutgoingEmail(Mailbox.parse(SENDER), Mailbox(address, name),
                                "y" * 3000, "z")
        lines_ok(message.as_bytes())
        [to] = message.as_message()["To"].addresses
        assert to.addr_spec == address


def test_header_values_cannot_start_a_new_header() -> None:
    message = OutgoingEmail(Mailbox.parse(SENDER), Mailbox(ADDRESS), "hi\r\nBcc: x@evil.test",
                            "t", headers=(("X-Herald-Event", "a\r\nBcc: y@evil.test"),))
    parsed = message.as_message()
    assert parsed["Bcc"] is None and str(parsed["Subject"]) == "hi Bcc: x@evil.test"


@pytest.mark.parametrize(("recipient", "headers", "match"), [
    (Mailbox("not an address"), (), "ASCII name@domain"),
    (Mailbox("zoë@example.com"), (), "ASCII name@domain"),
    (Mailbox("ada@example.com>, eve@evil.test"), (), "ASCII name@domain"),
    (Mailbox(ADDRESS, "Ada\r\nBcc: eve@evil.test"), (), "CR or LF"),
    (Mailbox(ADDRESS), (("To", "eve@evil.test"),), "cannot add a 'To' header"),
    (Mailbox(ADDRESS), (("Content-Type", "text/html"),), "cannot add"),
    (Mailbox(ADDRESS), (("Bad Name", "x"),), "cannot add"),
])
def test_what_cannot_be_written_is_refused_on_construction(
        recipient: Mailbox, headers: tuple[tuple[str, str], ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OutgoingEmail(Mailbox.parse(SENDER), recipient, "s", "t", headers=headers)


def test_text_that_cannot_be_encoded_is_refused() -> None:
    message = OutgoingEmail(Mailbox.parse(SENDER), Mailbox(ADDRESS), "s", "bad \ud800")
    with pytest.raises(UnicodeEncodeError):
        message.as_bytes()


def test_a_sender_that_is_not_one_address_is_refused() -> None:
    for value in ["", "a@b.example, c@d.example", "herald"]:
        with pytest.raises(ValueError, match="exactly one address"):
            Mailbox.parse(value)
    with pytest.raises(ConfigError, match="HERALD_EMAIL_FROM"):
        channel(sender="two@b.example, three@c.example")


def test_a_boundary_found_in_a_7bit_part_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([1, 1, 2])
    monkeypatch.setattr(mime.random, "getrandbits", lambda _bits: next(draws))
    taken = f"--=_herald_{1:024x}"
    message = OutgoingEmail(Mailbox.parse(SENDER), Mailbox(ADDRESS), "s",
                            f"quoting a mail:\n{taken}\n", html="<p>x</p>")
    parsed = message.as_message()
    assert parsed.get_param("boundary") == f"=_herald_{2:024x}"
    assert text_of(parsed, "plain") == f"quoting a mail:\n{taken}\n"


def channel(sender: str = SENDER) -> EmailChannel:
    return EmailChannel(providers=None,  # type: ignore[arg-type]
                        renderer=Renderer(REPO_ROOT / "templates"),
                        store=None,  # type: ignore[arg-type]
                        sender=sender)


def test_the_channel_builds_an_outgoing_email_with_its_headers() -> None:
    envelope = Envelope(id="evt-9", type="user.signup", actor=Actor(id="u1"),
                        recipients=[Recipient(user_id="u1", email=ADDRESS, name="Zoë, Ada")])
    message = channel().compose(envelope, envelope.recipients[0])
    parsed = message.as_message()
    assert (message.sender.address, message.recipient.address) == ("no-reply@herald.local",
                                                                   ADDRESS)
    assert parsed["Message-ID"] == "<evt-9.u1@herald>"
    assert parsed["X-Herald-Event"] == "user.signup evt-9"
    assert parsed["To"].addresses[0].display_name == "Zoë, Ada"
    assert parsed.get_content_type() == "multipart/alternative"


def test_the_channel_turns_an_unwritable_address_into_a_permanent_error() -> None:
    envelope = Envelope(id="evt-9", type="user.signup", actor=Actor(id="u1"),
                        recipients=[Recipient(user_id="u1", email=ADDRESS)])
    recipient = envelope.recipients[0].model_copy(update={"email": "not an address"})
    with pytest.raises(PermanentError, match="cannot build the email to u1"):
        channel().compose(envelope, recipient)


async def test_a_refusal_of_outgoing_bytes_is_classified_like_any_other() -> None:
    received = RawSink(Faults(refuse_always="554 5.7.1 Message rejected"))
    server = await start_sink(received)
    provider = SmtpProvider(f"smtp://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                            timeout=5)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(PermanentError, match="554"):
                await provider.send(outgoing(CASES["ascii"]))
            received.faults.refuse_always = None
            await provider.send(outgoing(CASES["ascii"]))  # the session was kept
    finally:
        await provider.aclose()
        server.close()
        await server.wait_closed()
    assert provider.connections == 1 and len(received.raw) == 1
