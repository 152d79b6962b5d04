"""The ledger of a fault test: what was accepted against what happened to it.

Four sources, each read as the system left it:

- the events the API accepted (its 202 answers; an event answered 503 was
  not accepted, one whose answer never came is *uncertain*);
- the ``deliveries`` table: one row per (event, channel, recipient);
- the channel's dead-letter queue (``topology.dlq.browse``, not consumed);
- what the provider's server received (``MailSink.messages``, keyed by the
  ``Message-ID`` herald sets: ``<{event_id}.{user_id}@herald>``).

Per (event, channel, recipient) the outcome is exactly one of ``sent``,
``suppressed`` (a row saying so, with a reason), ``dlq`` (an entry in the DLQ)
or ``LOST`` (none of them). Two outcomes at once is a *conflict*; sources
that disagree about one outcome (a row ``sent`` the provider never received,
a DLQ entry whose row is not ``dead``) are *mismatches*. A message the
provider received more than once is a *duplicate*: only the window between
the provider's accept and the worker's record may produce one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage

from aio_pika.abc import AbstractRobustConnection
from sqlmodel import select

from herald.db import make_engine, session_factory
from herald.models import Delivery
from herald.settings import load_settings
from topology.dlq import DeadMessage, browse
from topology.spec import Names

#: (event id, channel, recipient: the user id; ``user/device`` for push)
Key = tuple[str, str, str]

SENT = "sent"
SUPPRESSED = "suppressed"
DLQ = "dlq"
LOST = "LOST"
#: Row statuses that mean "decided not to send" (each carries its reason in ``last_error``).
SUPPRESSED_STATUSES = frozenset({"suppressed", "cancelled", "held"})

_MESSAGE_ID = re.compile(r"^<?(?P<event>[^.<>@]+)\.(?P<user>.+)@herald>?$")


@dataclass(frozen=True)
class Accepted:
    """An event the API accepted: its id and the recipients (user ids) it names."""

    event_id: str
    recipients: tuple[str, ...]


@dataclass
class Entry:
    """Everything the four sources say about one key."""

    key: Key
    row_status: str | None = None
    row_reason: str | None = None
    received: int = 0  #: how many copies the provider accepted
    dead: list[DeadMessage] = field(default_factory=list)
    #: True when the DLQ entry names the whole event (a message not split per recipient).
    dead_by_event: bool = False

    @property
    def outcomes(self) -> list[str]:
        """Every outcome the sources show (exactly one is right)."""
        found: list[str] = []
        if self.received or self.row_status == "sent":
            found.append(SENT)
        if self.row_status in SUPPRESSED_STATUSES:
            found.append(SUPPRESSED)
        if self.dead:
            found.append(DLQ)
        return found

    @property
    def outcome(self) -> str:
        """``sent``, ``suppressed``, ``dlq``, ``LOST``, or ``a+b`` for a conflict."""
        return "+".join(self.outcomes) or LOST

    def mismatches(self) -> list[str]:
        """Where the sources disagree about this key's outcome."""
        problems: list[str] = []
        if self.row_status == "sent" and not self.received:
            problems.append("row says sent, the provider received nothing")
        if self.received and self.row_status != "sent":
            problems.append(f"the provider received it, the row says {self.row_status}")
        if self.dead and self.row_status != "dead":
            problems.append(f"in the DLQ, the row says {self.row_status}")
        if self.row_status == "dead" and not self.dead:
            problems.append("row says dead, nothing in the DLQ")
        if self.row_status in SUPPRESSED_STATUSES and not self.row_reason:
            problems.append(f"row says {self.row_status} without a reason")
        return problems


def parse_message_id(value: str) -> tuple[str, str] | None:
    """(event id, user id) of a ``Message-ID`` herald wrote, or None for anything else."""
    match = _MESSAGE_ID.match(value.strip())
    return (match["event"], match["user"]) if match else None


def parse_dead_id(value: str) -> tuple[str, str | None, str | None]:
    """(event id, channel, unit) of a DLQ message id: ``<event>:<channel>:<unit>`` for one
    recipient's message, the bare event id for a message naming the whole event."""
    parts = value.split(":", 2)
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return value, None, None


@dataclass
class Ledger:
    """The outcome of every accepted (event, channel, recipient), and what does not add up."""

    channel: str
    entries: dict[Key, Entry]
    duplicates: dict[str, int]  #: Message-ID → copies received, for those received twice+
    unexpected: list[str]  #: things seen for keys nobody accepted
    uncertain: list[Key]  #: keys of events whose answer never came (may or may not exist)
    dead_letters: list[DeadMessage]

    # --- building ------------------------------------------------------------------------

    @classmethod
    def build(cls, accepted: Iterable[Accepted], rows: Iterable[Delivery],
              dead: Sequence[DeadMessage], received: Iterable[EmailMessage],
              channel: str = "email", uncertain: Iterable[Accepted] = ()) -> Ledger:
        """Match the four sources key by key (pure: no I/O)."""
        entries: dict[Key, Entry] = {}
        for event in accepted:
            for user in event.recipients:
                key = (event.event_id, channel, user)
                entries[key] = Entry(key)
        maybe: dict[Key, Entry] = {}
        for event in uncertain:
            for user in event.recipients:
                key = (event.event_id, channel, user)
                maybe[key] = Entry(key)
        unexpected: list[str] = []

        def entry(key: Key, what: str) -> Entry | None:
            found = entries.get(key) or maybe.get(key)
            if found is None:
                unexpected.append(f"{what} for {key}")
            return found

        for row in rows:
            if row.channel != channel:
                continue
            if (e := entry((row.event_id, row.channel, row.recipient), f"row {row.status}")):
                e.row_status, e.row_reason = row.status, row.last_error
        ids: Counter[str] = Counter()
        for message in received:
            mid = str(message.get("Message-ID", ""))
            parsed = parse_message_id(mid)
            if parsed is None:
                unexpected.append(f"a message without a herald Message-ID ({mid!r})")
                continue
            ids[mid] += 1
            if (e := entry((parsed[0], channel, parsed[1]), "a received message")):
                e.received += 1
        by_event: dict[str, list[Entry]] = {}
        for e in [*entries.values(), *maybe.values()]:
            by_event.setdefault(e.key[0], []).append(e)
        for letter in dead:
            event_id, dead_channel, unit = parse_dead_id(letter.id)
            if unit is not None:
                if dead_channel != channel:
                    unexpected.append(f"a DLQ entry of channel {dead_channel}: {letter.id}")
                    continue
                if (e := entry((event_id, channel, unit), "a DLQ entry")):
                    e.dead.append(letter)
                continue
            # An entry naming the whole event: it stands for every recipient of the
            # event that has no other outcome.
            covered = by_event.get(event_id)
            if not covered:
                unexpected.append(f"a DLQ entry for event {event_id}")
                continue
            for e in covered:
                if not e.received and e.row_status != "sent" \
                        and e.row_status not in SUPPRESSED_STATUSES:
                    e.dead.append(letter)
                    e.dead_by_event = True
        # An uncertain event the system knows about was accepted after all.
        for key, e in maybe.items():
            if e.row_status is not None or e.received or e.dead:
                entries[key] = e
        return cls(channel=channel, entries=entries,
                   duplicates={mid: n for mid, n in ids.items() if n > 1},
                   unexpected=unexpected, uncertain=[k for k in maybe if k not in entries],
                   dead_letters=list(dead))

    # --- reading -------------------------------------------------------------------------

    def with_outcome(self, outcome: str) -> list[Key]:
        """Keys whose outcome is exactly ``outcome``."""
        return [k for k, e in self.entries.items() if e.outcome == outcome]

    @property
    def counts(self) -> Counter[str]:
        """How many keys have each outcome (conflicts as ``a+b``)."""
        return Counter(e.outcome for e in self.entries.values())

    @property
    def lost(self) -> list[Key]:
        """Keys with no outcome at all."""
        return self.with_outcome(LOST)

    @property
    def conflicts(self) -> list[Key]:
        """Keys with more than one outcome."""
        return [k for k, e in self.entries.items() if len(e.outcomes) > 1]

    @property
    def mismatches(self) -> dict[Key, list[str]]:
        """Keys whose sources disagree, with what they disagree on."""
        return {k: m for k, e in self.entries.items() if (m := e.mismatches())}

    @property
    def duplicate_count(self) -> int:
        """Extra copies the provider received (2 copies of one message count 1)."""
        return sum(n - 1 for n in self.duplicates.values())

    @property
    def settled(self) -> bool:
        """Every key has exactly one outcome and its sources agree (nothing in flight)."""
        return not self.lost and not self.conflicts and not self.mismatches

    def report(self, title: str = "ledger") -> str:
        """A few lines for a person: outcome counts, then every problem (ids, no addresses)."""
        counts = self.counts
        lines = [
            f"{title} ({self.channel}): {len(self.entries)} accepted recipient-deliveries: "
            + ", ".join(f"{name} {counts[name]}" for name in (SENT, SUPPRESSED, DLQ, LOST))
            + (f", conflicts {len(self.conflicts)}" if self.conflicts else ""),
            f"  duplicates: {self.duplicate_count}"
            + (f" ({', '.join(f'{m} x{n}' for m, n in sorted(self.duplicates.items())[:5])})"
               if self.duplicates else ""),
            f"  DLQ entries: {len(self.dead_letters)}"
            + (f" ({by_event} named by the event id: one entry for all its recipients)"
               if (by_event := sum(parse_dead_id(m.id)[2] is None
                                   for m in self.dead_letters)) else ""),
        ]
        reasons = Counter(_reason_kind(m.reason) for m in self.dead_letters)
        for reason, n in reasons.most_common(5):
            lines.append(f"    {n} x {reason}")
        for name, keys in (("LOST", self.lost), ("conflicts", self.conflicts)):
            if keys:
                lines.append(f"  {name} ({len(keys)}): {_keys(keys)}")
        mismatches = self.mismatches
        if mismatches:
            lines.append(f"  mismatches ({len(mismatches)}):")
            for key, problems in list(mismatches.items())[:10]:
                lines.append(f"    {key}: {'; '.join(problems)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): "
                         f"{'; '.join(self.unexpected[:5])}")
        if self.uncertain:
            lines.append(f"  uncertain (answer lost, never seen): {len(self.uncertain)}")
        return "\n".join(lines)

    def check(self, max_duplicates: int = 0, title: str = "ledger") -> str:
        """Assert lost = 0, one outcome per key, sources agree, nothing unexpected, and at most
        ``max_duplicates`` extra copies; return the report (also printed)."""
        text = self.report(title)
        print(text)
        assert not self.lost, f"lost deliveries\n{text}"
        assert not self.conflicts, f"more than one outcome\n{text}"
        assert not self.mismatches, f"the sources disagree\n{text}"
        assert not self.unexpected, f"deliveries nobody accepted\n{text}"
        assert self.duplicate_count <= max_duplicates, \
            f"{self.duplicate_count} duplicates > {max_duplicates} allowed\n{text}"
        return text


def _reason_kind(reason: str) -> str:
    """The start of a DLQ reason, without addresses or numbers that differ per message."""
    short = re.sub(r"<[^>]*>|\S+@\S+", "<address>", reason)
    return short[:120]


def _keys(keys: Sequence[Key], limit: int = 8) -> str:
    shown = ", ".join(f"{e[:8]}/{u}" for e, _c, u in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


async def read_rows(database_url: str) -> list[Delivery]:
    """Every delivery row, through an engine of the test's own (``database_url`` as users
    write it: ``postgresql://…``, ``sqlite:///…``)."""
    engine = make_engine(load_settings(database_url=database_url).database_url)
    try:
        async with session_factory(engine)() as session:
            return list((await session.exec(select(Delivery))).all())
    finally:
        await engine.dispose()


async def collect(accepted: Iterable[Accepted], database_url: str,
                  connection: AbstractRobustConnection, prefix: str,
                  received: Iterable[EmailMessage], channel: str = "email",
                  uncertain: Iterable[Accepted] = ()) -> Ledger:
    """Read the rows, the DLQ (without consuming it) and build the ledger."""
    rows = await read_rows(database_url)
    dead = await browse(connection, Names(prefix), channel)
    return Ledger.build(accepted, rows, dead, list(received), channel, uncertain)


__all__ = ["DLQ", "LOST", "SENT", "SUPPRESSED", "Accepted", "Entry", "Key", "Ledger",
           "collect", "parse_dead_id", "parse_message_id", "read_rows"]
