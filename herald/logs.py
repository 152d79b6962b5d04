"""Logging set-up and masking of personal data (emails, phone numbers)."""

from __future__ import annotations

import logging
import re
from typing import Any

_EMAIL = re.compile(
    r"([A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]*@([A-Za-z0-9\-])[A-Za-z0-9.\-]*(\.[A-Za-z]{2,})"
)
_PHONE = re.compile(r"\+\d[\d \-]{5,}(\d{2})\b")


def mask(text: str) -> str:
    """``alice@example.com`` → ``a***@e***.com``; ``+14155550123`` → ``***23``."""
    text = _EMAIL.sub(r"\1***@\2***\3", text)
    return _PHONE.sub(r"***\1", text)


class MaskingFilter(logging.Filter):
    """Masks emails and phone numbers in every record before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask(record.getMessage())
        record.args = None
        return True


def setup_logging(level: str = "INFO", name: str = "herald") -> None:
    """One line per record on stderr, personal data masked."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s"))
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "mail.log", "sqlalchemy.engine", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_sentry(dsn: str | None, component: str) -> None:
    """Report errors to Sentry when a DSN is set; personal data is masked before sending."""
    if not dsn:
        return
    import sentry_sdk

    def scrub(event: Any, _hint: Any) -> Any:
        for entry in (event.get("logentry"), event.get("message")):
            if isinstance(entry, dict) and isinstance(entry.get("message"), str):
                entry["message"] = mask(entry["message"])
        if isinstance(event.get("message"), str):
            event["message"] = mask(event["message"])
        return event

    sentry_sdk.init(dsn=dsn, send_default_pii=False, before_send=scrub,
                    server_name=component)
