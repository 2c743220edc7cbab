"""Log formats: journald priorities, JSON, readable text, and secret masking in all of them."""

from __future__ import annotations

import io
import json
import logging

import pytest

from klaviyo_bridge import logs

SECRET = "pk_secret_for_log_tests_42"


def record(level: int, msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    """Build a log record, optionally carrying the current exception."""
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"boom with {SECRET}\nsecond line")
        except RuntimeError as e:
            exc_info = (type(e), e, e.__traceback__)
    return logging.LogRecord("klaviyo_bridge.daemon", level, __file__, 1, msg, args, exc_info)


@pytest.fixture(autouse=True)
def _secret() -> None:
    logs.register_secret(SECRET)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [(logging.ERROR, "<3>"), (logging.WARNING, "<4>"), (logging.INFO, "<6>"), (logging.DEBUG, "<7>")],
)
def test_journal_lines_carry_priority_and_no_timestamp(level: int, prefix: str) -> None:
    """Result: `<N>logger: message`, so `journalctl -p warning` filters by our levels."""
    line = logs.JournalFormatter().format(record(level, "cycle customer=%s", 7))
    assert line == f"{prefix}klaviyo_bridge.daemon: cycle customer=7"


def test_journal_folds_tracebacks_into_one_masked_line() -> None:
    """Result: one line per record; the secret inside the exception text is masked."""
    line = logs.JournalFormatter().format(record(logging.ERROR, "failed", exc=True))
    assert "\n" not in line
    assert line.startswith("<3>")
    assert "RuntimeError" in line
    assert SECRET not in line


def test_json_lines_parse_and_mask() -> None:
    """Result: one JSON object with level, logger and message; secrets masked."""
    doc = json.loads(logs.JsonFormatter().format(record(logging.WARNING, "key=%s", SECRET)))
    assert doc["level"] == "warning"
    assert doc["logger"] == "klaviyo_bridge.daemon"
    assert doc["msg"] == "key=***"


def test_text_format_masks_secrets() -> None:
    """Result: readable line with level and logger, secret masked."""
    line = logs.TextFormatter().format(record(logging.INFO, "using %s", SECRET))
    assert "INFO" in line
    assert "using ***" in line


@pytest.mark.parametrize(
    ("fmt", "env", "expected"),
    [
        ("text", {"JOURNAL_STREAM": "8:1234"}, logs.JournalFormatter),
        ("text", {}, logs.TextFormatter),
        ("json", {"JOURNAL_STREAM": "8:1234"}, logs.JsonFormatter),
    ],
)
def test_formatter_choice(fmt: logs.LogFormat, env: dict[str, str], expected: type) -> None:
    """Result: JSON when asked, journald style under systemd, text otherwise."""
    assert isinstance(logs.pick_formatter(fmt, env, io.StringIO()), expected)


def test_emails_in_any_line_become_their_keyed_reference() -> None:
    """1. A key is registered; a line (and a traceback) mentions a shopper's email in two spellings.
    Result: every spelling is replaced by the same reference, which is not a plain hash of the email."""
    logs.register_profile_key(b"k" * 32)
    ref = logs.profile_ref("Ann.Lee+shop@Example.com")
    assert ref == logs.keyed_ref(b"k" * 32, "ann.lee+shop@example.com")
    assert ref != logs.keyed_ref(b"j" * 32, "ann.lee+shop@example.com")
    line = logs.TextFormatter().format(record(logging.WARNING, "detail=%s and %s", "Invalid: Ann.Lee+shop@Example.com",
                                              "ann.lee+shop@example.com"))
    assert "ann" not in line.lower()
    assert line.count(f"[profile {ref}]") == 2
    doc = json.loads(logs.JsonFormatter().format(record(logging.ERROR, "x %s", "o'brien@example.co.uk")))
    assert "brien" not in doc["msg"]


def test_third_party_loggers_stay_at_warning_whatever_the_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """1. setup_logging at debug. Result: the bridge's loggers log debug; aiosqlite, asyncio, aiohttp, backoff
    and any other library stay at WARNING (aiosqlite's debug lines carry SQL parameters: tokens)."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    touched = ("klaviyo_bridge", "aiosqlite", "asyncio", "aiohttp", "backoff")
    levels = {name: logging.getLogger(name).level for name in touched}
    try:
        logs.setup_logging("debug", "text", {})
        assert logging.getLogger("klaviyo_bridge.whiplash").isEnabledFor(logging.DEBUG)
        for name in ("aiosqlite", "asyncio", "aiohttp.client", "backoff", "some.other.library"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
            assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(saved[0])
        for handler in saved[1]:
            root.addHandler(handler)
        for name, level in levels.items():  # other tests' caplog must see these loggers as before
            logging.getLogger(name).setLevel(level)
