"""Logging set-up: journald priorities under systemd, readable text on a TTY, JSON for log shippers.

Every record passes a redaction filter that masks registered secret values, as a last line of defence
behind SecretStr: a secret that leaks into an exception text still never reaches a log line.
"""

from __future__ import annotations

import json
import logging
import os
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
_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Mask ``value`` wherever it would appear in a log line."""
    # Very short values would mask innocent text and are not worth hiding.
    if len(value) >= 6:
        _secrets.add(value)


def redact(text: str) -> str:
    """Return ``text`` with every registered secret masked."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def _one_line(text: str) -> str:
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
        return f"<{prio}>{redact(_one_line(text))}"


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
    """Send every log record to stderr in the format that suits where stderr goes."""
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(pick_formatter(fmt, env, sys.stderr))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access and client loggers are noisy at INFO and add nothing ops can act on.
    logging.getLogger("aiohttp").setLevel(max(root.level, logging.WARNING))
    logging.getLogger("backoff").setLevel(logging.ERROR)
