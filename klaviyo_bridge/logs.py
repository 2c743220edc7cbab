"""Logging set-up: journald priorities under systemd, readable text on a TTY, JSON for log shippers.

Logs are a data sink that many people read for months, so two things never reach a line, at any level:
- a secret: every configured secret and every token obtained at run time (each Whiplash access token, each
  rotated refresh token) is registered here the moment it is known, and every formatter masks them, as a
  last line of defence behind SecretStr: a secret that leaks into an exception text is still masked;
- a shopper's email: lines name customers and orders; a profile is named by ``profile_ref`` (10 hex
  characters of a keyed hash, resolvable on purpose with ``klaviyo-bridge status --profile REF``), and any
  email address that still reaches a formatter (say, echoed in an upstream error text) is replaced by its
  reference.
Third-party loggers stay at WARNING whatever ``log_level`` says: aiosqlite logs every SQL call with its
parameters at DEBUG, which would print the stored Whiplash token; debug output is the bridge's own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

# sd-daemon(3) priorities, so `journalctl -p warning` filters our lines.
_JOURNAL_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_MASK = "***"
_PACKAGE = "klaviyo_bridge"
# Libraries whose DEBUG/INFO output is theirs, not ours (aiosqlite's includes SQL parameters).
_QUIET_LIBRARIES = ("aiosqlite", "asyncio", "aiohttp", "backoff")
_REF_CHARS = 10
# Good enough to catch an address inside free text (an upstream's error detail); validation is elsewhere.
_EMAIL = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
_secrets: set[str] = set()
_profile_key: bytes | None = None


def register_secret(value: str) -> None:
    """Mask ``value`` wherever it would appear in a log line."""
    # Very short values would mask innocent text and are not worth hiding.
    if len(value) >= 6:
        _secrets.add(value)


def register_profile_key(key: bytes) -> None:
    """Use ``key`` (kept in the state DB) for the profile references printed instead of emails."""
    global _profile_key
    _profile_key = key


def keyed_ref(key: bytes, email: str) -> str:
    """Return the stable reference of ``email`` under ``key``: 10 hex characters of its HMAC-SHA256."""
    digest = hmac.new(key, email.strip().lower().encode(), hashlib.sha256).hexdigest()
    return digest[:_REF_CHARS]


def profile_ref(email: str) -> str:
    """Return how log lines name the profile of ``email`` (its keyed reference, never the address)."""
    # Without a key (no state DB opened yet) a reference cannot be resolved later, so say only what it is.
    return keyed_ref(_profile_key, email) if _profile_key is not None else "unkeyed"


def redact(text: str) -> str:
    """Return ``text`` with every registered secret masked and every email replaced by its reference."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _MASK)
    if "@" in text:
        text = _EMAIL.sub(lambda m: f"[profile {profile_ref(m.group(0))}]", text)
    return text


def _fold_lines(text: str) -> str:
    """Fold a multi-line text (tracebacks) into one line so each record is one journal entry."""
    return text.replace("\r", "").replace("\n", " | ")


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message`` without a timestamp: journald adds its own."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record as a single journald line."""
        prio = _JOURNAL_PRIORITY.get(record.levelno, 6)
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += " | " + self.formatException(record.exc_info)
        return f"<{prio}>{redact(_fold_lines(text))}"


class TextFormatter(logging.Formatter):
    """Readable ``time level logger: message`` lines for terminals and plain files."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        """Format one record and mask secrets."""
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record as JSON."""
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, ensure_ascii=False))


def pick_formatter(fmt: LogFormat, environ: Mapping[str, str], stream: TextIO) -> logging.Formatter:
    """Choose JSON when asked, journald style under systemd, else readable text."""
    if fmt == "json":
        return JsonFormatter()
    if environ.get("JOURNAL_STREAM"):
        return JournalFormatter()
    return TextFormatter()


def setup_logging(level: str = "info", fmt: LogFormat = "text", environ: Mapping[str, str] | None = None) -> None:
    """Send every log record to stderr in the format that suits where stderr goes.

    ``level`` applies to the bridge's own loggers; everything else stays at WARNING.
    """
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(pick_formatter(fmt, env, sys.stderr))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(_PACKAGE).setLevel(level.upper())
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
