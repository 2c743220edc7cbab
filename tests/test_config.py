"""Tests for klaviyo_bridge.config: loading, validation problems, secret references, rules, robustness."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from time import tzset
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from klaviyo_bridge import logs
from klaviyo_bridge.config import (
    DEFAULT_CONFIG_PATH,
    BridgeSettings,
    CustomerSettings,
    EventSettings,
    KlaviyoSettings,
    LoadedConfig,
    Settings,
    StatusSettings,
    WhiplashSettings,
    default_config_path,
    load_config,
    load_or_report,
)
from klaviyo_bridge.config_problems import problem_lines
from klaviyo_bridge.config_secrets import resolve_references
from klaviyo_bridge.core import EventKind, Rules
from klaviyo_bridge.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"

WHIPLASH_SECRET = "wl-secret-Q7vX2"
KLAVIYO_KEY = "pk_live_secret_9Zr4"
OTHER_KEY = "pk_live_other_3Kd8"
ENV = {"WL_SECRET": WHIPLASH_SECRET, "KEY_1234": KLAVIYO_KEY, "KEY_99": OTHER_KEY}
ALL_SECRETS = (WHIPLASH_SECRET, KLAVIYO_KEY, OTHER_KEY)

DROP = object()  # marks a key to remove in an override
TODAY = date(2026, 9, 1)  # "today" for loads: the example's and the base config's launch dates are recent
LISTEN_HINT = 'must be "host:port" with a port in 1..65535, e.g. "127.0.0.1:9464"'


# --- a tiny TOML writer (everything as inline tables, so nesting is arbitrary) --------------------


def toml_string(text: str) -> str:
    """Quote text as a TOML basic string (JSON escapes are valid TOML escapes, except DEL)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    """Render one value as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def to_toml(data: Mapping[str, Any]) -> str:
    """Render a document as TOML."""
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n" for key, value in data.items())


# --- helpers --------------------------------------------------------------------------------------


def customer(**overrides: Any) -> dict[str, Any]:
    """Return a valid customer table with ``overrides`` applied."""
    base: dict[str, Any] = {
        "whiplash_customer_id": 1234,
        "name": "Acme",
        "klaviyo_api_key": "env:KEY_1234",
        "launch_date": date(2026, 8, 1),
    }
    return merge(base, overrides)


def base_config() -> dict[str, Any]:
    """Return a minimal valid configuration (everything else defaulted)."""
    return {
        "bridge": {"state_path": "/var/lib/klaviyo-bridge/state.db"},
        "whiplash": {"client_id": "app-id", "client_secret": "env:WL_SECRET"},
        "klaviyo": {"default_profile_email": "samples@example.com"},
        "customers": [customer()],
    }


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``; DROP removes a key, lists replace wholesale."""
    result = dict(base)
    for key, value in overrides.items():
        if value is DROP:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def write(tmp_path: Path, overrides: Mapping[str, Any] | None = None, *, text: str | None = None) -> Path:
    """Write a config file: the base config with ``overrides``, or ``text`` verbatim."""
    path = tmp_path / "config.toml"
    path.write_text(text if text is not None else to_toml(merge(base_config(), overrides or {})), "utf-8")
    return path


def load(
    tmp_path: Path, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] = ENV
) -> LoadedConfig:
    """Load the base config with ``overrides`` on a fixed day (launch dates stay recent, warnings stable)."""
    return load_config(write(tmp_path, overrides), env, today=TODAY)


def problems(
    tmp_path: Path, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] = ENV
) -> list[str]:
    """Return the problem lines loading the base config with ``overrides`` raises."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, overrides, env)
    return info.value.problems


def credentials_dir(tmp_path: Path, values: Mapping[str, str]) -> Path:
    """Create a systemd-style credentials directory holding ``values``."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    for name, value in values.items():
        (directory / name).write_text(value + "\n", "utf-8")
    return directory


# --- the example file and defaults ----------------------------------------------------------------


def test_example_config_loads_with_credentials(tmp_path: Path) -> None:
    creds = {
        "whiplash-client-secret": WHIPLASH_SECRET,
        "klaviyo-1234": KLAVIYO_KEY,
        "klaviyo-5678": OTHER_KEY,
    }
    directory = credentials_dir(tmp_path, creds)

    loaded = load_config(EXAMPLE, {"CREDENTIALS_DIRECTORY": str(directory)}, today=TODAY)

    s = loaded.settings
    assert loaded.warnings == ()
    assert s.bridge.state_path == Path("/var/lib/klaviyo-bridge/state.db")
    assert s.whiplash.client_secret.get_secret_value() == WHIPLASH_SECRET
    # The disabled customer's key is never resolved: its credential need not even exist yet.
    assert [c.klaviyo_api_key.get_secret_value() for c in s.customers] == [KLAVIYO_KEY, "credential:klaviyo-5678"]
    assert [c.whiplash_customer_id for c in s.enabled_customers()] == [1234]
    assert 45 not in s.statuses.event_by_code()


def test_example_config_shows_every_default(tmp_path: Path) -> None:
    """Every default written in the example equals the model's default (the example documents them)."""
    directory = credentials_dir(
        tmp_path, {"whiplash-client-secret": "a", "klaviyo-1234": "b", "klaviyo-5678": "c"}
    )
    example = load_config(EXAMPLE, {"CREDENTIALS_DIRECTORY": str(directory)}).settings
    minimal = load(tmp_path).settings

    for section in ("bridge", "whiplash", "klaviyo"):
        shown = getattr(example, section).model_dump(exclude={"client_id", "default_profile_email"})
        defaulted = getattr(minimal, section).model_dump(exclude={"client_id", "default_profile_email"})
        assert {k: str(v) for k, v in shown.items()} == {k: str(v) for k, v in defaulted.items()}, section
    assert example.events == minimal.events
    assert example.statuses == minimal.statuses
    assert example.customers[0].backfill_days == minimal.customers[0].backfill_days


def test_defaults_applied(tmp_path: Path) -> None:
    s = load(tmp_path).settings

    assert (s.bridge.poll_interval_seconds, s.bridge.log_level, s.bridge.log_format) == (60.0, "info", "text")
    assert (s.bridge.shutdown_grace_seconds, s.bridge.metrics_listen) == (20.0, None)
    assert s.bridge.metrics_address() is None
    w = s.whiplash
    assert (w.base_url, w.grant, w.scope, w.refresh_token) == (
        "https://www.getwhiplash.com",
        "client_credentials",
        "app_read",
        None,
    )
    assert (w.page_size, w.overlap_seconds, w.timeout_seconds) == (50, 300, 30.0)
    k = s.klaviyo
    assert (k.base_url, k.revision, k.rate_limit_share, k.timeout_seconds) == (
        "https://a.klaviyo.com",
        "2026-07-15",
        0.8,
        30.0,
    )
    names = {kind: s.events.name_for(kind) for kind in EventKind}
    assert names == {
        EventKind.PROCESSING: "Processing order",
        EventKind.CANCELLED: "Order cancelled",
        EventKind.SHIPPED: "Order shipped",
        EventKind.DELIVERED: "Order delivered",
    }
    assert s.events.stale_after_hours == 72.0
    assert s.statuses.processing == (100, 120, 140, 150, 155, 160, 200, 250)
    assert (s.statuses.cancelled, s.statuses.shipped, s.statuses.delivered) == ((40,), (300,), (350,))
    c = s.customers[0]
    assert (c.backfill_days, c.list_name, c.enabled, c.launch_date) == (
        14,
        "Whiplash",
        True,
        date(2026, 8, 1),
    )


@pytest.mark.parametrize("customers", [[], DROP])
def test_no_customers_is_valid(tmp_path: Path, customers: object) -> None:
    assert load(tmp_path, {"customers": customers}).settings.customers == ()


@pytest.mark.parametrize(
    ("overrides", "read"),
    [
        ({"whiplash": {"base_url": "https://sandbox.example.com/"}}, lambda s: s.whiplash.base_url),
        ({"klaviyo": {"base_url": "http://127.0.0.1:8080//"}}, lambda s: s.klaviyo.base_url),
    ],
)
def test_base_url_stored_without_trailing_slash(tmp_path: Path, overrides: dict[str, Any], read: Any) -> None:
    assert not read(load(tmp_path, overrides).settings).endswith("/")


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9100", ("::1", 9100)),
        ("localhost:1", ("localhost", 1)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_metrics_listen_accepted(tmp_path: Path, listen: str, address: tuple[str, int]) -> None:
    assert load(tmp_path, {"bridge": {"metrics_listen": listen}}).settings.bridge.metrics_address() == address


@pytest.mark.parametrize(
    ("overrides", "read", "expected"),
    [
        pytest.param(
            {"klaviyo": {"default_profile_email": "a" * 242 + "@example.com"}},
            lambda s: len(s.klaviyo.default_profile_email),
            254,
            id="email-of-254-characters",
        ),
        pytest.param(
            {"events": {"delivered": "d" * 127}}, lambda s: s.events.delivered, "d" * 127, id="metric-of-127"
        ),
        pytest.param(
            {"klaviyo": {"base_url": "http://127.0.0.1:1/API-X/"}},
            lambda s: s.klaviyo.base_url,
            "http://127.0.0.1:1/API-X",
            id="url-port-1-path-kept",
        ),
        pytest.param({"klaviyo": {"rate_limit_share": 1.0}}, lambda s: s.klaviyo.rate_limit_share, 1.0, id="share-1"),
    ],
)
def test_values_at_their_limits_accepted(
    tmp_path: Path, overrides: dict[str, Any], read: Any, expected: object
) -> None:
    assert read(load(tmp_path, overrides).settings) == expected


def test_default_profile_email_is_stored_trimmed_and_lower_cased(tmp_path: Path) -> None:
    """1. default_profile_email written with spaces and capitals. Result: stored as the address Klaviyo keys
    profiles by (trimmed, lower case), so samples always land on one profile."""
    s = load(tmp_path, {"klaviyo": {"default_profile_email": " Samples@Example.COM "}}).settings
    assert s.klaviyo.default_profile_email == "samples@example.com"


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load(tmp_path).settings
    with pytest.raises(ValueError, match="frozen"):
        s.bridge.poll_interval_seconds = 5  # type: ignore[misc]


# --- one problem per case, exact line -------------------------------------------------------------

ONE_PROBLEM: list[tuple[str, dict[str, Any], str]] = [
    # unknown keys
    ("unknown top-level table", {"metrics": {"port": 1}}, "metrics: unknown key"),
    ("unknown top-level key", {"debug": True}, "debug: unknown key"),
    (
        "unknown nested key",
        {"bridge": {"poll_intervl_seconds": 5}},
        "bridge.poll_intervl_seconds: unknown key",
    ),
    ("unknown customer key", {"customers": [customer(colour="red")]}, "customers[0].colour: unknown key"),
    ("unknown odd key quoted", {"bridge": {"a b": 1}}, 'bridge."a b": unknown key'),
    ("unknown key shown as written", {"bridge": {"naïve": 1}}, 'bridge."naïve": unknown key'),
    # ranges
    (
        "poll interval",
        {"bridge": {"poll_interval_seconds": 0.5}},
        "bridge.poll_interval_seconds: must be >= 1 (got 0.5)",
    ),
    (
        "grace zero",
        {"bridge": {"shutdown_grace_seconds": 0}},
        "bridge.shutdown_grace_seconds: must be > 0 (got 0)",
    ),
    (
        "backfill",
        {"customers": [customer(backfill_days=30)]},
        "customers[0].backfill_days: must be <= 14 (got 30)",
    ),
    (
        "backfill negative",
        {"customers": [customer(backfill_days=-1)]},
        "customers[0].backfill_days: must be >= 0 (got -1)",
    ),
    ("share 0", {"klaviyo": {"rate_limit_share": 0}}, "klaviyo.rate_limit_share: must be > 0 (got 0)"),
    ("share 1.5", {"klaviyo": {"rate_limit_share": 1.5}}, "klaviyo.rate_limit_share: must be <= 1 (got 1.5)"),
    ("page size 0", {"whiplash": {"page_size": 0}}, "whiplash.page_size: must be >= 1 (got 0)"),
    ("page size 501", {"whiplash": {"page_size": 501}}, "whiplash.page_size: must be <= 500 (got 501)"),
    (
        "overlap",
        {"whiplash": {"overlap_seconds": 86401}},
        "whiplash.overlap_seconds: must be <= 86400 (got 86401)",
    ),
    ("timeout", {"klaviyo": {"timeout_seconds": -1.0}}, "klaviyo.timeout_seconds: must be > 0 (got -1)"),
    ("stale", {"events": {"stale_after_hours": 0}}, "events.stale_after_hours: must be > 0 (got 0)"),
    (
        "huge float as written",
        {"events": {"stale_after_hours": 1e16}},
        "events.stale_after_hours: must be <= 87600 (got 1e+16)",
    ),
    (
        "large whole float as integer",
        {"events": {"stale_after_hours": 1e15}},
        "events.stale_after_hours: must be <= 87600 (got 1000000000000000)",
    ),
    (
        "customer id 0",
        {"customers": [customer(whiplash_customer_id=0)]},
        "customers[0].whiplash_customer_id: must be > 0 (got 0)",
    ),
    ("status negative", {"statuses": {"shipped": [-300]}}, "statuses.shipped[0]: must be >= 0 (got -300)"),
    (
        "infinite",
        {"bridge": {"poll_interval_seconds": float("inf")}},
        "bridge.poll_interval_seconds: must be a finite number",
    ),
    (
        "nan",
        {"whiplash": {"timeout_seconds": float("nan")}},
        "whiplash.timeout_seconds: must be a finite number",
    ),
    # types
    (
        "int as string",
        {"whiplash": {"page_size": "50"}},
        "whiplash.page_size: must be an integer (got string)",
    ),
    ("int as float", {"whiplash": {"page_size": 50.0}}, "whiplash.page_size: must be an integer (got float)"),
    (
        "int as bool",
        {"whiplash": {"overlap_seconds": True}},
        "whiplash.overlap_seconds: must be an integer (got boolean)",
    ),
    (
        "float as bool",
        {"bridge": {"poll_interval_seconds": True}},
        "bridge.poll_interval_seconds: must be a number (got boolean)",
    ),
    (
        "bool as string",
        {"customers": [customer(enabled="yes")]},
        "customers[0].enabled: must be true or false (got string)",
    ),
    (
        "date quoted",
        {"customers": [customer(launch_date="2026-08-01")]},
        "customers[0].launch_date: must be a date like 2026-08-01, unquoted (got string)",
    ),
    (
        "date-time not date",
        {"customers": [customer(launch_date=datetime(2026, 8, 1, 0, 0))]},
        "customers[0].launch_date: must be a date like 2026-08-01, unquoted (got date-time)",
    ),
    ("section not table", {"events": 5}, "events: must be a table (got integer)"),
    ("customers not array", {"customers": {"name": "x"}}, "customers: must be an array (got table)"),
    ("customer not table", {"customers": ["acme"]}, "customers[0]: must be a table (got string)"),
    (
        "status list item",
        {"statuses": {"shipped": [300, "x"]}},
        "statuses.shipped[1]: must be an integer (got string)",
    ),
    ("status not list", {"statuses": {"shipped": 300}}, "statuses.shipped: must be an array (got integer)"),
    ("path not string", {"bridge": {"state_path": 5}}, "bridge.state_path: must be a string (got integer)"),
    (
        "secret not string",
        {"whiplash": {"client_secret": 12345}},
        "whiplash.client_secret: must be a string (got integer)",
    ),
    ("metric not string", {"events": {"shipped": ["x"]}}, "events.shipped: must be a string (got array)"),
    (
        "log level",
        {"bridge": {"log_level": "verbose"}},
        'bridge.log_level: must be one of "debug", "info", "warning" or "error" (got "verbose")',
    ),
    (
        "log level not a string",
        {"bridge": {"log_level": 3}},
        'bridge.log_level: must be one of "debug", "info", "warning" or "error" (got integer)',
    ),
    (
        "grant",
        {"whiplash": {"grant": "password"}},
        'whiplash.grant: must be one of "client_credentials" or "refresh_token" (got "password")',
    ),
    # values
    ("empty path", {"bridge": {"state_path": ""}}, "bridge.state_path: must be a file path"),
    ("path with NUL", {"bridge": {"state_path": "/var/lib/a\x00b"}}, "bridge.state_path: must be a file path"),
    ("empty client id", {"whiplash": {"client_id": " "}}, "whiplash.client_id: must not be empty"),
    ("empty name", {"customers": [customer(name="")]}, "customers[0].name: must not be empty"),
    ("empty list name", {"customers": [customer(list_name="")]}, "customers[0].list_name: must not be empty"),
    ("empty secret", {"whiplash": {"client_secret": ""}}, "whiplash.client_secret: must not be empty"),
    (
        "bad url scheme",
        {"whiplash": {"base_url": "ftp://example.com"}},
        'whiplash.base_url: must be an http(s) URL like https://host (got "ftp://example.com")',
    ),
    (
        "url with credentials",
        {"klaviyo": {"base_url": "https://u:p@a.klaviyo.com"}},
        'klaviyo.base_url: must be an http(s) URL like https://host (got "https://u:p@a.klaviyo.com")',
    ),
    (
        "url bad port",
        {"klaviyo": {"base_url": "https://a.klaviyo.com:99999"}},
        'klaviyo.base_url: must be an http(s) URL like https://host (got "https://a.klaviyo.com:99999")',
    ),
    (
        "revision",
        {"klaviyo": {"revision": "2026-13-01"}},
        'klaviyo.revision: must be a revision date like 2026-07-15 or 2026-07-15.pre (got "2026-13-01")',
    ),
    (
        "echo shown as written",
        {"klaviyo": {"revision": "2026-07-15.é"}},
        'klaviyo.revision: must be a revision date like 2026-07-15 or 2026-07-15.pre (got "2026-07-15.é")',
    ),
    (
        "echo of 60 characters whole",
        {"klaviyo": {"revision": "r" * 60}},
        f'klaviyo.revision: must be a revision date like 2026-07-15 or 2026-07-15.pre (got "{"r" * 60}")',
    ),
    (
        "echo over 60 characters cut",
        {"klaviyo": {"default_profile_email": "a" * 243 + "@example.com"}},
        f'klaviyo.default_profile_email: must be an email address (got "{"a" * 60}…")',
    ),
    (
        "url port 0",
        {"klaviyo": {"base_url": "https://a.klaviyo.com:0"}},
        'klaviyo.base_url: must be an http(s) URL like https://host (got "https://a.klaviyo.com:0")',
    ),
    (
        "email",
        {"klaviyo": {"default_profile_email": "nobody"}},
        'klaviyo.default_profile_email: must be an email address (got "nobody")',
    ),
    ("metric blank", {"events": {"delivered": "  "}}, "events.delivered: must not be empty"),
    (
        "metric too long",
        {"events": {"delivered": "x" * 128}},
        "events.delivered: must be at most 127 characters (got 128)",
    ),
    (
        "metrics listen",
        {"bridge": {"metrics_listen": "9464"}},
        f'bridge.metrics_listen: {LISTEN_HINT} (got "9464")',
    ),
    (
        "metrics listen v6",
        {"bridge": {"metrics_listen": "::1:9464"}},
        f'bridge.metrics_listen: {LISTEN_HINT} (got "::1:9464")',
    ),
    *(
        (f"metrics listen {bad}", {"bridge": {"metrics_listen": bad}},
         f'bridge.metrics_listen: {LISTEN_HINT} (got "{bad}")')
        for bad in ("[::1:9464", "::1]:9464", "local host:9464", "localhost:http", "localhost:0", "localhost:65536")
    ),
    # missing
    ("missing key", {"bridge": {"state_path": DROP}}, "bridge.state_path: missing required key"),
    ("missing table", {"klaviyo": DROP}, "klaviyo: missing required table [klaviyo]"),
    # no [bridge] table and no KLAVIYO_BRIDGE_<KEY> override to stand in for it
    ("missing bridge table", {"bridge": DROP}, "bridge: missing required table [bridge]"),
    (
        "missing customer key",
        {"customers": [customer(launch_date=DROP)]},
        "customers[0].launch_date: missing required key",
    ),
    (
        "missing secret",
        {"customers": [customer(klaviyo_api_key=DROP)]},
        "customers[0].klaviyo_api_key: missing required key",
    ),
    # cross-field
    (
        "refresh grant",
        {"whiplash": {"grant": "refresh_token"}},
        'whiplash.refresh_token: required when grant = "refresh_token"',
    ),
    (
        "duplicate customer",
        {"customers": [customer(), customer(whiplash_customer_id=99), customer(name="Acme 2")]},
        "customers[2].whiplash_customer_id: duplicate of customers[0] (1234)",
    ),
    (
        "duplicate status across events",
        {"statuses": {"cancelled": [40, 300]}},
        "statuses.shipped[0]: status 300 is already listed at statuses.cancelled[1]",
    ),
    (
        "duplicate status in one event",
        {"statuses": {"delivered": [350, 350]}},
        "statuses.delivered[1]: status 350 is already listed at statuses.delivered[0]",
    ),
    (
        "duplicate metric",
        {"events": {"shipped": "Order cancelled"}},
        'events.shipped: same metric name as events.cancelled ("Order cancelled")',
    ),
    (
        "duplicate metric by case",
        {"events": {"delivered": "order SHIPPED "}},
        'events.delivered: same metric name as events.shipped ("order SHIPPED ")',
    ),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), [c[1:] for c in ONE_PROBLEM], ids=[c[0] for c in ONE_PROBLEM]
)
def test_single_problem(tmp_path: Path, overrides: dict[str, Any], expected: str) -> None:
    assert problems(tmp_path, overrides) == [expected]


def test_multiple_problems_reported_at_once(tmp_path: Path) -> None:
    overrides = {
        "bridge": {"poll_interval_seconds": 0, "typo": 1},
        "klaviyo": {"rate_limit_share": 2},
        "events": {"shipped": "Order delivered"},
        "customers": [
            customer(backfill_days=15),
            customer(whiplash_customer_id=99, klaviyo_api_key="env:NOPE"),
        ],
    }

    found = problems(tmp_path, overrides)

    assert sorted(found) == sorted(
        [
            "bridge.poll_interval_seconds: must be >= 1 (got 0)",
            "bridge.typo: unknown key",
            "klaviyo.rate_limit_share: must be <= 1 (got 2)",
            'events.delivered: same metric name as events.shipped ("Order delivered")',
            "customers[0].backfill_days: must be <= 14 (got 15)",
            "customers[1].klaviyo_api_key: environment variable NOPE is not set",
        ]
    )
    assert all("\n" not in line for line in found)


def test_config_error_message_joins_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {"bridge": {"a": 1, "b": 2}})
    assert str(info.value) == "bridge.a: unknown key; bridge.b: unknown key"


# --- file-level problems --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    assert info.value.problems == [f"{path}: cannot read file (No such file or directory)"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, ENV)
    assert info.value.problems == [f"{tmp_path}: cannot read file (Is a directory)"]


@pytest.mark.parametrize(
    "text", ["[bridge\nstate_path = 1\n", "a = 1\na = 2\n", 'x = "unterminated\n', "[bridge]\n[bridge]\n"]
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text=text)
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    [line] = info.value.problems
    assert line.startswith(f"{path}: invalid TOML: ")
    assert "line" in line  # tomllib's position survives


def test_path_with_nul(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Path("/etc/a\x00b.toml"), ENV)
    assert info.value.problems == ["/etc/a\\u0000b.toml: cannot read file (invalid path)"]


def test_nested_too_deeply(tmp_path: Path) -> None:
    path = write(tmp_path, text="x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    assert info.value.problems == [f"{path}: invalid TOML: nested too deeply"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'name = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    assert info.value.problems == [f"{path}: invalid TOML: not UTF-8 (byte 8)"]


def test_utf8_bom_accepted(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xef\xbb\xbf" + to_toml(base_config()).encode())
    assert load_config(path, ENV).settings.customers[0].name == "Acme"


# --- secrets --------------------------------------------------------------------------------------


def test_env_secrets_resolved(tmp_path: Path) -> None:
    s = load(tmp_path).settings
    assert s.whiplash.client_secret.get_secret_value() == WHIPLASH_SECRET
    assert s.customers[0].klaviyo_api_key.get_secret_value() == KLAVIYO_KEY


def test_file_secret_strips_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "wl"
    secret.write_text(WHIPLASH_SECRET + "\r\n", "utf-8")
    s = load(tmp_path, {"whiplash": {"client_secret": f"file:{secret}"}}).settings
    assert s.whiplash.client_secret.get_secret_value() == WHIPLASH_SECRET


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b"key-XX\t \n", "key-XX\t ", id="only-the-line-break-dropped"),
        pytest.param(b"key-X\r\n", "key-X", id="nothing-but-the-line-break"),
        pytest.param(b"k" * (64 * 1024), "k" * (64 * 1024), id="exactly-64-KiB"),
    ],
)
def test_file_secret_is_read_verbatim(tmp_path: Path, content: bytes, expected: str) -> None:
    secret = tmp_path / "dir:with:colons" / "wl"
    secret.parent.mkdir()
    secret.write_bytes(content)
    s = load(tmp_path, {"whiplash": {"client_secret": f"file:{secret}"}}).settings
    assert s.whiplash.client_secret.get_secret_value() == expected


@pytest.mark.parametrize("literal", ["env", "file", "credential"])
def test_scheme_without_colon_is_a_literal_secret(tmp_path: Path, literal: str) -> None:
    loaded = load(tmp_path, {"customers": [customer(klaviyo_api_key=literal)]})
    assert loaded.settings.customers[0].klaviyo_api_key.get_secret_value() == literal
    assert loaded.warnings == (f"customers[0].klaviyo_api_key: {LITERAL_WARNING}",)


def test_config_and_secrets_come_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path)
    monkeypatch.setenv("KLAVIYO_BRIDGE_CONFIG", str(path))
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert default_config_path() == path
    assert load_config(path).settings.customers[0].klaviyo_api_key.get_secret_value() == KLAVIYO_KEY


def test_credential_secret(tmp_path: Path) -> None:
    directory = credentials_dir(tmp_path, {"klaviyo-1234": KLAVIYO_KEY})
    env = {**ENV, "CREDENTIALS_DIRECTORY": str(directory)}
    s = load(tmp_path, {"customers": [customer(klaviyo_api_key="credential:klaviyo-1234")]}, env).settings
    assert s.customers[0].klaviyo_api_key.get_secret_value() == KLAVIYO_KEY


def test_refresh_token_grant_with_token(tmp_path: Path) -> None:
    env = {**ENV, "WL_REFRESH": "refresh-secret-1"}
    s = load(
        tmp_path, {"whiplash": {"grant": "refresh_token", "refresh_token": "env:WL_REFRESH"}}, env
    ).settings
    assert s.whiplash.refresh_token is not None
    assert s.whiplash.refresh_token.get_secret_value() == "refresh-secret-1"


def test_refresh_token_allowed_with_client_credentials(tmp_path: Path) -> None:
    env = {**ENV, "WL_REFRESH": "refresh-secret-1"}
    s = load(tmp_path, {"whiplash": {"refresh_token": "env:WL_REFRESH"}}, env).settings
    assert s.whiplash.grant == "client_credentials"


LITERAL_WARNING = "literal secret in config file; use env:, file: or credential:"


def test_literal_secret_is_a_warning_without_the_value(tmp_path: Path) -> None:
    loaded = load(tmp_path, {"customers": [customer(klaviyo_api_key=KLAVIYO_KEY)]})

    assert loaded.warnings == (f"customers[0].klaviyo_api_key: {LITERAL_WARNING}",)
    assert loaded.settings.customers[0].klaviyo_api_key.get_secret_value() == KLAVIYO_KEY
    assert KLAVIYO_KEY not in repr(loaded)


def test_closed_by_originator_as_cancelled_warns(tmp_path: Path) -> None:
    loaded = load(tmp_path, {"statuses": {"cancelled": [40, 45]}})
    assert loaded.warnings == (
        'statuses.cancelled: 45 "Closed by Originator" means the shop closed or shipped the order itself; '
        "its shoppers would get a wrong cancellation email",
    )


def secret_cases(tmp_path: Path) -> list[tuple[str, str, Mapping[str, str]]]:
    """Return (reference, expected problem text, environ) for unresolvable references."""
    empty = tmp_path / "empty"
    empty.write_text("\n", "utf-8")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"k" * (64 * 1024 + 1))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    creds = credentials_dir(tmp_path, {})
    with_creds = {**ENV, "CREDENTIALS_DIRECTORY": str(creds)}
    return [
        ("env:NOPE", "environment variable NOPE is not set", ENV),
        ("env:EMPTY", "environment variable EMPTY is empty", {**ENV, "EMPTY": ""}),
        ("env:", '"env:" needs a variable name, e.g. "env:KLAVIYO_KEY"', ENV),
        (f"file:{tmp_path}/nope", f"cannot read file {tmp_path}/nope (No such file or directory)", ENV),
        (f"file:{empty}", f"file {empty} is empty", ENV),
        (f"file:{fifo}", f"cannot read file {fifo} (not a regular file)", ENV),
        (f"file:{big}", f"file {big} is larger than 64 KiB", ENV),
        (f"file:{binary}", f"file {binary} is not UTF-8 text", ENV),
        ("file:relative/key", '"file:" needs an absolute path (got "relative/key")', ENV),
        ("file:/tmp/a\x00b", "cannot read file /tmp/a\\u0000b (invalid path)", ENV),
        (
            "credential:klaviyo-1234",
            "credential klaviyo-1234: CREDENTIALS_DIRECTORY is not set "
            "(start the bridge with systemd LoadCredential=)",
            ENV,
        ),
        (
            "credential:klaviyo-1234",
            f"cannot read file {creds}/klaviyo-1234 (No such file or directory)",
            with_creds,
        ),
        ("credential:../etc", '"credential:" needs a credential name without "/" (got "../etc")', with_creds),
        ("credential:.", '"credential:" needs a credential name without "/" (got ".")', with_creds),
        ("credential:..", '"credential:" needs a credential name without "/" (got "..")', with_creds),
        ("   ", "the value is empty", ENV),
    ]


def test_disabled_customers_secrets_are_not_resolved(tmp_path: Path) -> None:
    """1. A disabled customer whose key reference cannot be resolved. Result: no problem, the reference is kept
    (it is resolved when a reload enables the customer); its literal key is still reported as a warning."""
    loaded = load(tmp_path, {"customers": [customer(), customer(whiplash_customer_id=2, enabled=False,
                                                                klaviyo_api_key="env:NOT_SET_ANYWHERE")]})
    assert loaded.settings.customers[1].klaviyo_api_key.get_secret_value() == "env:NOT_SET_ANYWHERE"
    literal = load(tmp_path, {"customers": [customer(enabled=False, klaviyo_api_key=KLAVIYO_KEY)]})
    assert literal.warnings == (
        "customers[0].klaviyo_api_key: literal secret in config file; use env:, file: or credential:",
    )


def test_without_resolving_no_secret_is_read(tmp_path: Path) -> None:
    """1. Load with resolve_secrets=False and an empty environment (a monitoring job).
    Result: valid settings holding the references themselves; nothing is read from env, files or credentials."""
    loaded = load_config(write(tmp_path, {"whiplash": {"client_secret": "credential:nope"}}), {},
                         resolve_secrets=False)
    assert loaded.settings.whiplash.client_secret.get_secret_value() == "credential:nope"
    assert loaded.settings.customers[0].klaviyo_api_key.get_secret_value() == "env:KEY_1234"


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("missing/dir/state.db", "folder {tmp}/missing/dir does not exist"),
        ("ro/state.db", "folder {tmp}/ro is not writable by this user"),
        ("adir/state.db", "{tmp}/adir/state.db is not a readable and writable file"),
    ],
)
def test_state_folder_must_exist_and_be_writable(tmp_path: Path, where: str, why: str) -> None:
    """1. state_path in a missing folder, a read-only folder, or naming a directory.
    Result: one problem naming bridge.state_path; nothing is created."""
    (tmp_path / "ro").mkdir(mode=0o500)
    (tmp_path / "adir" / "state.db").mkdir(parents=True)
    path = write(tmp_path, {"bridge": {"state_path": str(tmp_path / where)}})
    if where.startswith("ro/") and os.access(tmp_path / "ro", os.W_OK):
        (tmp_path / "ro").chmod(0o700)  # root writes anywhere: make the case the unwritable *file* instead
        (tmp_path / "ro" / "state.db").mkdir()
        why = "{tmp}/ro/state.db is not a readable and writable file"
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV, check_state_folder=True)
    assert info.value.problems == [f"bridge.state_path: {why.format(tmp=tmp_path)}" +
                                   ("; create it (systemd's StateDirectory= does) or fix the path"
                                    if "does not exist" in why else "")]
    assert not (tmp_path / "missing").exists()
    assert load_config(path, ENV).settings.bridge.state_path == tmp_path / where  # only checked when asked


@pytest.mark.parametrize("state_db", [None, b"", b"SQLite format 3\x00"])
def test_a_usable_state_folder_passes_the_check(tmp_path: Path, state_db: bytes | None) -> None:
    """1. state_path in an existing writable folder, the DB not created yet or already a regular file.
    Result: valid with the folder checked; nothing is created."""
    path = tmp_path / "state" / "state.db"
    path.parent.mkdir()
    if state_db is not None:
        path.write_bytes(state_db)
    loaded = load_config(write(tmp_path, {"bridge": {"state_path": str(path)}}), ENV, check_state_folder=True)
    assert loaded.settings.bridge.state_path == path
    assert path.exists() == (state_db is not None)


@pytest.mark.parametrize(
    ("denied", "mode", "why"),
    [
        ("folder", os.W_OK, "folder {folder} is not writable by this user"),
        ("folder", os.X_OK, "folder {folder} is not writable by this user"),
        ("file", os.R_OK, "{file} is not a readable and writable file"),
        ("file", os.W_OK, "{file} is not a readable and writable file"),
    ],
)
def test_each_permission_the_state_db_needs_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, denied: str, mode: int, why: str
) -> None:
    """1. An existing state DB whose user may not write or enter its folder, or not read or write the file
    (os.access answers no for that one permission: root, which runs these tests in containers, has them all).
    Result: one problem naming bridge.state_path."""
    folder = tmp_path / "state"
    folder.mkdir()
    file = folder / "state.db"
    file.write_bytes(b"")
    refused = folder if denied == "folder" else file
    real_access = os.access

    def access(path: Any, wanted: int, **kwargs: Any) -> bool:
        return not (Path(path) == refused and wanted & mode) and real_access(path, wanted, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {"bridge": {"state_path": str(file)}}), ENV, check_state_folder=True)
    assert info.value.problems == [f"bridge.state_path: {why.format(folder=folder, file=file)}"]


def unusable_for_apis(tmp_path: Path) -> tuple[Path, Path]:
    """Write a config whose customer key names an unset variable and whose state folder does not exist; return
    (config path, state path)."""
    missing = tmp_path / "missing" / "state.db"
    overrides = {"bridge": {"state_path": str(missing)}, "customers": [customer(klaviyo_api_key="env:NOPE")]}
    return write(tmp_path, overrides), missing


def test_state_folder_problem_and_secret_problems_are_all_reported(tmp_path: Path) -> None:
    """1. An unset secret variable and a state folder that does not exist. Result: both problems, secret first."""
    path, missing = unusable_for_apis(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV, check_state_folder=True)
    assert info.value.problems == [
        "customers[0].klaviyo_api_key: environment variable NOPE is not set",
        f"bridge.state_path: folder {missing.parent} does not exist; create it (systemd's StateDirectory= does) "
        "or fix the path",
    ]


def test_relative_state_path_and_old_launch_warn(tmp_path: Path) -> None:
    """1. A relative state_path and a launch date 400 days ago. Result: two warnings, each naming its key."""
    loaded = load_config(
        write(tmp_path, {"bridge": {"state_path": "state.db"}, "customers": [customer(launch_date=date(2025, 1, 1))]}),
        ENV, today=date(2026, 2, 5),
    )
    assert loaded.warnings == (
        'bridge.state_path: "state.db" is relative, so it depends on the directory the bridge is started from; '
        "use an absolute path (e.g. /var/lib/klaviyo-bridge/state.db)",
        "customers[0].launch_date: 2025-01-01 is more than a year ago; check the year (the bridge only reads "
        "changes from launch_date - backfill_days on)",
    )
    recent = load_config(write(tmp_path, {"customers": [customer(launch_date=date(2025, 2, 5))]}), ENV,
                         today=date(2026, 2, 5))
    assert recent.warnings == ()


@pytest.mark.parametrize(("days_ago", "warned"), [(365, False), (366, True)])
def test_a_launch_date_warns_once_more_than_365_days_back(tmp_path: Path, days_ago: int, warned: bool) -> None:
    """1. A launch date 365 or 366 days before today. Result: only 366 days back warns."""
    today = date(2026, 2, 5)
    launch = today - timedelta(days=days_ago)
    loaded = load_config(write(tmp_path, {"customers": [customer(launch_date=launch)]}), ENV, today=today)
    assert loaded.warnings == ((f"customers[0].launch_date: {launch} is more than a year ago; check the year (the "
                                "bridge only reads changes from launch_date - backfill_days on)",) if warned else ())


def test_today_is_the_utc_date_whatever_the_machine_zone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. No ``today`` given; the machine's zone is a day ahead of UTC (UTC+14, from 11:00 UTC) or behind it
    (UTC-12, before); launch dates 365 and 366 days before UTC's date.
    Result: only the one 366 days back warns: "today" is UTC's date, not the machine's."""
    now = datetime.now(UTC)
    monkeypatch.setenv("TZ", "AHEAD-14" if now.hour >= 11 else "BEHIND+12")  # POSIX: the offset is west of UTC
    tzset()
    try:
        assert datetime.now().date() != now.date()
        today = now.date()
        launches = [customer(launch_date=today - timedelta(days=365)),
                     customer(whiplash_customer_id=2, launch_date=today - timedelta(days=366))]
        loaded = load_config(write(tmp_path, {"customers": launches}), ENV)
    finally:
        monkeypatch.undo()
        tzset()
    if datetime.now(UTC).date() == today:  # not across midnight UTC
        assert [w.partition(":")[0] for w in loaded.warnings] == ["customers[1].launch_date"]


def test_unresolvable_secrets(tmp_path: Path) -> None:
    for index, (reference, why, env) in enumerate(secret_cases(tmp_path)):
        case_dir = tmp_path / f"case{index}"
        case_dir.mkdir()
        found = problems(case_dir, {"customers": [customer(klaviyo_api_key=reference)]}, env)
        assert found == [f"customers[0].klaviyo_api_key: {why}"], reference


def test_all_secret_slots_resolved_and_reported(tmp_path: Path) -> None:
    overrides = {
        "whiplash": {"client_secret": "env:A", "refresh_token": "env:B"},
        "customers": [
            customer(klaviyo_api_key="env:C"),
            customer(whiplash_customer_id=2, klaviyo_api_key="env:D"),
        ],
    }
    assert problems(tmp_path, overrides, {}) == [
        "whiplash.client_secret: environment variable A is not set",
        "whiplash.refresh_token: environment variable B is not set",
        "customers[0].klaviyo_api_key: environment variable C is not set",
        "customers[1].klaviyo_api_key: environment variable D is not set",
    ]


@pytest.mark.parametrize(("value", "why"), [(5, "must be a string (got integer)"), ("", "must not be empty")])
def test_a_secret_left_to_validation_does_not_stop_the_next_ones(tmp_path: Path, value: object, why: str) -> None:
    """1. whiplash.client_secret is not a reference at all (a number, or empty); a customer's key names an unset
    variable. Result: both are reported: the first by validation, the second as unresolvable."""
    assert problems(tmp_path, {"whiplash": {"client_secret": value},
                               "customers": [customer(klaviyo_api_key="env:NOPE")]}) == [
        f"whiplash.client_secret: {why}",
        "customers[0].klaviyo_api_key: environment variable NOPE is not set",
    ]


def test_resolve_references_resolves_unless_told_not_to() -> None:
    """1. resolve_references on a raw table, without and with resolve=False. Result: by default the references in
    use become their values; with resolve=False they stay as written; a literal is a warning either way."""
    def raw() -> dict[str, Any]:
        return {"whiplash": {"client_secret": "env:WL_SECRET", "refresh_token": "literal-token"}}

    resolved = raw()
    assert resolve_references(resolved, ENV) == ([], [f"whiplash.refresh_token: {LITERAL_WARNING}"])
    assert resolved["whiplash"] == {"client_secret": WHIPLASH_SECRET, "refresh_token": "literal-token"}
    kept = raw()
    assert resolve_references(kept, ENV, resolve=False) == ([], [f"whiplash.refresh_token: {LITERAL_WARNING}"])
    assert kept == raw()


def test_secrets_never_in_problems_or_reprs(tmp_path: Path) -> None:
    literal = {
        "whiplash": {"client_secret": WHIPLASH_SECRET},
        "customers": [customer(klaviyo_api_key=KLAVIYO_KEY)],
    }
    loaded = load(tmp_path, literal)
    broken = merge(literal, {"whiplash": {"refresh_token": OTHER_KEY, "page_size": -1}, "bridge": {"x": 1}})
    broken["customers"] = [customer(klaviyo_api_key=KLAVIYO_KEY, backfill_days=99, extra=OTHER_KEY)]
    with pytest.raises(ConfigError) as info:
        load(tmp_path, broken)

    texts = [
        repr(loaded),
        str(loaded.settings),
        repr(loaded.settings.whiplash),
        str(loaded.settings.customers[0]),
        *loaded.warnings,
        str(info.value),
        repr(info.value),
    ]
    assert len(info.value.problems) == 4
    for secret in ALL_SECRETS:
        assert all(secret not in text for text in texts), secret


# --- rules and helpers ----------------------------------------------------------------------------


def test_rules_for_maps_events_statuses_and_staleness(tmp_path: Path) -> None:
    overrides = {
        "events": {"shipped": "Package on its way", "stale_after_hours": 36.5},
        "statuses": {"processing": [100], "cancelled": [40, 45], "shipped": [300, 325], "delivered": []},
        "customers": [
            customer(),
            customer(whiplash_customer_id=77, launch_date=date(2026, 1, 2), enabled=False),
        ],
    }
    s = load(tmp_path, overrides).settings

    rules = s.rules_for(s.customers[1])

    assert rules == Rules(
        customer_id=77,
        launch_date=date(2026, 1, 2),
        metric_names={
            EventKind.PROCESSING: "Processing order",
            EventKind.CANCELLED: "Order cancelled",
            EventKind.SHIPPED: "Package on its way",
            EventKind.DELIVERED: "Order delivered",
        },
        status_events={
            100: EventKind.PROCESSING,
            40: EventKind.CANCELLED,
            45: EventKind.CANCELLED,
            300: EventKind.SHIPPED,
            325: EventKind.SHIPPED,
        },
        stale_after=timedelta(hours=36.5),
    )
    assert [c.whiplash_customer_id for c in s.enabled_customers()] == [1234]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, DEFAULT_CONFIG_PATH),
        ({"KLAVIYO_BRIDGE_CONFIG": ""}, DEFAULT_CONFIG_PATH),
        ({"KLAVIYO_BRIDGE_CONFIG": "/srv/bridge.toml"}, Path("/srv/bridge.toml")),
    ],
)
def test_default_config_path(environ: dict[str, str], expected: Path) -> None:
    assert default_config_path(environ) == expected


def test_settings_validate_directly_with_cross_field_summary() -> None:
    """Constructing Settings in code keeps the invariants (and a readable message)."""
    with pytest.raises(ValueError, match=r"shipped\[0\]: status 300 is already listed"):
        Settings.model_validate(
            {
                "bridge": {"state_path": "/x"},
                "whiplash": {"client_id": "a", "client_secret": "b"},
                "klaviyo": {"default_profile_email": "a@b.co"},
                "statuses": {"cancelled": [300]},
            }
        )


def test_cross_field_summary_lists_every_problem() -> None:
    with pytest.raises(ValidationError) as info:
        StatusSettings.model_validate({"cancelled": [300, 350]})
    [error] = info.value.errors()
    assert error["msg"] == (
        "shipped[0]: status 300 is already listed at statuses.cancelled[0]; "
        "delivered[0]: status 350 is already listed at statuses.cancelled[1]"
    )


@pytest.mark.parametrize(
    ("error", "line"),
    [
        pytest.param(
            {"type": "greater_than", "loc": ("a",), "msg": "", "input": "secret", "ctx": {"gt": 0}},
            "a: must be > 0 (got string)",
            id="range-check-of-a-non-number-shows-its-type-only",
        ),
        pytest.param(
            {"type": "string_too_short", "loc": ("a",), "msg": "", "input": "x", "ctx": {"min_length": 3}},
            "a: must have at least 3 characters",
            id="too-short-of-3",
        ),
        pytest.param(
            {"type": "too_short", "loc": ("a",), "msg": "", "input": [], "ctx": {}},
            "a: must not be empty",
            id="too-short-without-min-length",
        ),
        pytest.param(
            {"type": "too_short", "loc": ("a",), "msg": "", "input": []}, "a: must not be empty", id="too-short-no-ctx"
        ),
        pytest.param(
            {"type": "string_type", "loc": (), "msg": "", "input": b"x"},
            "(top level): must be a string (got bytes)",
            id="top-level-and-a-python-type",
        ),
    ],
)
def test_problem_lines_of_unusual_errors(error: Any, line: str) -> None:
    """A pydantic error without the optional ctx, or with an input no TOML file holds, still makes its line."""
    assert problem_lines(error) == [line]


@pytest.mark.parametrize(
    ("kind", "start"), [("greater_than", "a: must be > "), ("literal_error", "a: must be one of  (got integer)")]
)
def test_problem_lines_without_ctx_still_describe(kind: str, start: str) -> None:
    [line] = problem_lines({"type": kind, "loc": ("a",), "msg": "", "input": 5})
    assert line.startswith(start)


# --- robustness -----------------------------------------------------------------------------------

SECRET_ENV_VALUE = "ENV-SECRET-do-not-print-4417"
FUZZ_ENV = {**ENV, "SET": SECRET_ENV_VALUE, "CREDENTIALS_DIRECTORY": "/nonexistent"}
SECTIONS: dict[str, type[BaseModel]] = {
    "bridge": BridgeSettings,
    "whiplash": WhiplashSettings,
    "klaviyo": KlaviyoSettings,
    "events": EventSettings,
    "statuses": StatusSettings,
}
MODELS: list[type[BaseModel]] = [*SECTIONS.values(), CustomerSettings]
KEYS = sorted({"junk", "a b", *SECTIONS, *(key for model in MODELS for key in model.model_fields)})
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-3, max_value=600) | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=8),
    st.sampled_from(
        [
            "env:SET",
            "env:UNSET",
            "env:",
            "file:/nonexistent",
            "file:rel",
            "credential:x",
            "credential:",
            "refresh_token",
            "debug",
            "json",
            "127.0.0.1:9464",
            "https://x.example/",
            "a@b.co",
            "2026-07-15.pre",
            "",
        ]
    ),
    st.dates(),
    st.datetimes(),
    st.times(),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(KEYS), children, max_size=3)
    ),
    max_leaves=8,
)


def tables_of(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    """Generate mostly tables keyed by ``model``'s fields (plus junk), sometimes any value at all."""
    keys = st.sampled_from([*model.model_fields, "junk"])
    return st.dictionaries(keys, SCALARS | VALUES, max_size=3) | VALUES


DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        **{name: tables_of(model) for name, model in SECTIONS.items()},
        "customers": st.lists(
            tables_of(CustomerSettings).map(lambda c: merge(customer(), c) if isinstance(c, dict) else c),
            max_size=3,
        )
        | VALUES,
        "junk": VALUES,
    },
).map(lambda extra: merge(base_config(), extra))


def assert_clean_outcome(path: Path) -> None:
    """Loading either succeeds or raises ConfigError with one-line problems free of secrets."""
    try:
        loaded = load_config(path, FUZZ_ENV)
    except ConfigError as exc:
        lines = exc.problems
    else:
        assert SECRET_ENV_VALUE not in repr(loaded)
        return
    assert lines
    for line in lines:
        assert len(line.splitlines()) == 1
        assert ": " in line
        assert SECRET_ENV_VALUE not in line


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=DOCUMENTS)
def test_arbitrary_documents_never_crash(
    tmp_path_factory: pytest.TempPathFactory, document: dict[str, Any]
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    text = to_toml(document)
    tomllib.loads(text)  # the writer itself must produce valid TOML
    path.write_text(text, "utf-8")
    assert_clean_outcome(path)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_arbitrary_bytes_never_crash(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-bytes.toml"
    path.write_bytes(data)
    assert_clean_outcome(path)


# --- per-merchant events and metric names -------------------------------------------------------------------


def test_customer_events_and_metric_names_shape_its_rules(tmp_path: Path) -> None:
    """1. One customer gets shipped and delivered, delivered under its own name; another keeps the defaults;
    a third gets none. Result: each one's rules carry exactly its events and names; [events] stays the default."""
    loaded = load(tmp_path, {"customers": [
        customer(events=["shipped", "delivered"], metrics={"delivered": "Whiplash: Delivered"}),
        customer(whiplash_customer_id=2),
        customer(whiplash_customer_id=3, events=[]),
    ]})
    s = loaded.settings
    partial, full, none = (s.rules_for(c) for c in s.customers)
    assert partial.enabled == {EventKind.SHIPPED, EventKind.DELIVERED}
    assert partial.metric_names[EventKind.DELIVERED] == "Whiplash: Delivered"
    assert partial.metric_names[EventKind.SHIPPED] == "Order shipped"
    assert full.enabled == frozenset(EventKind)
    assert full.metric_names[EventKind.DELIVERED] == "Order delivered"
    assert none.enabled == frozenset()
    assert s.customers[0].events == ("shipped", "delivered")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"events": ["shipped", "delivred", "Shipped"]}, [
            'customers[0].events[1]: must be one of "processing", "cancelled", "shipped" or "delivered" '
            '(got "delivred")',
            'customers[0].events[2]: must be one of "processing", "cancelled", "shipped" or "delivered" '
            '(got "Shipped")',
        ]),
        ({"events": ["shipped", "delivered", "shipped", "delivered"]}, [
            'customers[0].events[2]: "shipped" is listed twice',
            'customers[0].events[3]: "delivered" is listed twice',
        ]),
        ({"events": "shipped"}, ["customers[0].events: must be an array (got string)"]),
        ({"metrics": {"shiped": "X"}}, ["customers[0].metrics.shiped: unknown key"]),
        ({"metrics": {"shipped": "  "}}, ["customers[0].metrics.shipped: must not be empty"]),
        ({"metrics": {"shipped": "x" * 128}},
         ["customers[0].metrics.shipped: must be at most 127 characters (got 128)"]),
        ({"metrics": {"shipped": "order DELIVERED"}}, [
            'customers[0].metrics.delivered: same metric name as shipped for this customer ("Order delivered")',
        ]),
        ({"metrics": {"shipped": "Same", "delivered": "same"}}, [
            'customers[0].metrics.delivered: same metric name as shipped for this customer ("same")',
        ]),
        ({"metrics": "Whiplash"}, ["customers[0].metrics: must be a table (got string)"]),
    ],
)
def test_customer_events_and_metrics_problems(tmp_path: Path, overrides: dict[str, Any], expected: list[str]) -> None:
    """Result: one line per problem, naming the customer, the key and the element."""
    assert problems(tmp_path, {"customers": [customer(**overrides)]}) == expected


def test_an_empty_choice_is_valid_and_distinct_names_across_customers_are_fine(tmp_path: Path) -> None:
    """1. Two customers naming their own metrics the same ("Shipped!"): names only need to differ within one
    merchant's account. Result: valid."""
    loaded = load(tmp_path, {"customers": [
        customer(metrics={"shipped": "Shipped!"}),
        customer(whiplash_customer_id=2, metrics={"shipped": "Shipped!"}, events=[]),
    ]})
    assert [c.metrics.shipped for c in loaded.settings.customers] == ["Shipped!", "Shipped!"]


# --- [bridge] overrides from the environment ----------------------------------------------------------------


def test_bridge_keys_can_be_overridden_from_the_environment(tmp_path: Path) -> None:
    """1. KLAVIYO_BRIDGE_LOG_LEVEL, _POLL_INTERVAL_SECONDS and _METRICS_LISTEN set (any case), plus variables that
    are not [bridge] keys. Result: those three override the file; nothing else changes; the config path variable
    and unknown ones are ignored."""
    env = {**ENV, "KLAVIYO_BRIDGE_LOG_LEVEL": "debug", "klaviyo_bridge_poll_interval_seconds": "30",
           "KLAVIYO_BRIDGE_METRICS_LISTEN": "127.0.0.1:9100", "KLAVIYO_BRIDGE_CONFIG": "/elsewhere.toml",
           "KLAVIYO_BRIDGE_CLIENT_SECRET": "nope"}
    bridge = load(tmp_path, env=env).settings.bridge
    assert (bridge.log_level, bridge.poll_interval_seconds, bridge.metrics_listen) == ("debug", 30.0,
                                                                                       "127.0.0.1:9100")
    assert bridge.state_path == Path("/var/lib/klaviyo-bridge/state.db")
    assert load(tmp_path).settings.bridge.log_level == "info"


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("KLAVIYO_BRIDGE_LOG_LEVEL", "loud",
         'bridge.log_level (from KLAVIYO_BRIDGE_LOG_LEVEL): must be one of "debug", "info", "warning" or "error" '
         '(got "loud")'),
        ("KLAVIYO_BRIDGE_POLL_INTERVAL_SECONDS", "often",
         "bridge.poll_interval_seconds (from KLAVIYO_BRIDGE_POLL_INTERVAL_SECONDS): must be a number (got string)"),
        ("KLAVIYO_BRIDGE_SHUTDOWN_GRACE_SECONDS", "0",
         "bridge.shutdown_grace_seconds (from KLAVIYO_BRIDGE_SHUTDOWN_GRACE_SECONDS): must be > 0 (got 0)"),
        # only the key path is renamed, never the echoed value, even when it looks like one
        ("KLAVIYO_BRIDGE_LOG_LEVEL", "bridge.log_level: debug",
         'bridge.log_level (from KLAVIYO_BRIDGE_LOG_LEVEL): must be one of "debug", "info", "warning" or "error" '
         '(got "bridge.log_level: debug")'),
    ],
)
def test_a_bad_override_names_its_variable(tmp_path: Path, variable: str, value: str, problem: str) -> None:
    assert problems(tmp_path, env={**ENV, variable: value}) == [problem]


def test_overrides_apply_even_without_a_bridge_table(tmp_path: Path) -> None:
    """1. A file whose [bridge] table is missing; the state path comes from the environment. Result: valid."""
    path = write(tmp_path, {"bridge": DROP})
    loaded = load_config(path, {**ENV, "KLAVIYO_BRIDGE_STATE_PATH": str(tmp_path / "s.db")}, today=TODAY)
    assert loaded.settings.bridge.state_path == tmp_path / "s.db"


# --- what commands print: load_or_report -------------------------------------------------------------------


@pytest.fixture
def redactor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give the log redactor an empty set of secrets for one test (secrets registered elsewhere stay out)."""
    monkeypatch.setattr(logs, "_secrets", set())


@pytest.mark.usefixtures("redactor")
def test_load_or_report_resolves_warns_and_registers_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. No path given: the environment passed names the config (KLAVIYO_BRIDGE_CONFIG) and holds the secrets;
    a literal refresh token. Result: the settings with every secret resolved, the warning on stderr, nothing on
    stdout, and each secret masked by the log redactor from now on."""
    state = tmp_path / "state" / "state.db"
    state.parent.mkdir()
    path = write(tmp_path, {"bridge": {"state_path": str(state)}, "whiplash": {"refresh_token": OTHER_KEY}})
    loaded = load_or_report(None, environ={**ENV, "KLAVIYO_BRIDGE_CONFIG": str(path)})

    assert loaded is not None
    assert loaded.settings.customers[0].klaviyo_api_key.get_secret_value() == KLAVIYO_KEY
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"config warning: whiplash.refresh_token: {LITERAL_WARNING}\n")
    line = logs.redact(f"{WHIPLASH_SECRET} {KLAVIYO_KEY} {OTHER_KEY}")
    assert all(secret not in line for secret in ALL_SECRETS), line


def test_load_or_report_prints_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. A config with an unset secret variable whose state folder does not exist, loaded as a command that talks
    to APIs (the default). Result: None, and one "config error:" line per problem on stderr, nothing on stdout."""
    path, missing = unusable_for_apis(tmp_path)

    assert load_or_report(path, environ=ENV) is None
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "config error: customers[0].klaviyo_api_key: environment variable NOPE is not set",
        f"config error: bridge.state_path: folder {missing.parent} does not exist; create it (systemd's "
        "StateDirectory= does) or fix the path",
    ]


def test_load_or_report_without_secrets_checks_neither_secrets_nor_state_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. The same config loaded with resolve_secrets=False and an empty environment (status, dead-letters).
    Result: valid, the references kept as written, nothing printed."""
    path, missing = unusable_for_apis(tmp_path)

    loaded = load_or_report(path, resolve_secrets=False, environ={})
    assert loaded is not None
    assert loaded.settings.customers[0].klaviyo_api_key.get_secret_value() == "env:NOPE"
    assert capsys.readouterr() == ("", "")
    assert not missing.parent.exists()


def test_secret_values_lists_every_secret_in_use(tmp_path: Path) -> None:
    """1. Configs with and without a refresh token, with two customers (one disabled, its key a reference).
    Result: every secret value the settings hold, in order, the missing refresh token left out."""
    env = {**ENV, "WL_REFRESH": "refresh-secret-1"}
    both = [customer(), customer(whiplash_customer_id=2, enabled=False, klaviyo_api_key="env:KEY_99")]
    with_token = load(tmp_path, {"whiplash": {"refresh_token": "env:WL_REFRESH"}, "customers": both}, env)
    assert with_token.secret_values() == [WHIPLASH_SECRET, "refresh-secret-1", KLAVIYO_KEY, "env:KEY_99"]
    assert load(tmp_path).secret_values() == [WHIPLASH_SECRET, KLAVIYO_KEY]


# --- [webhooks] -------------------------------------------------------------------------------------------


def test_webhooks_are_off_by_default_and_checked_with_the_client_secret(tmp_path: Path) -> None:
    """Result: no listen (polling only), the default path and body cap, and the Whiplash client secret as key."""
    s = load(tmp_path).settings
    w = s.webhooks
    assert (w.listen, w.path, w.max_body_bytes, w.secret) == (None, "/whiplash/webhook", 1024 * 1024, None)
    assert w.address() is None
    assert s.webhook_secret().get_secret_value() == WHIPLASH_SECRET


def test_webhooks_with_their_own_secret_reference(tmp_path: Path) -> None:
    """1. listen on IPv6 loopback, an own path, cap and secret (an env: reference).
    Result: the address parsed, the secret resolved, used for signatures and registered for masking."""
    loaded = load(tmp_path, {"webhooks": {"listen": "[::1]:8787", "path": "/hooks/whiplash-1",
                                          "max_body_bytes": 2048, "secret": "env:HOOK"}},
                  {**ENV, "HOOK": "hook-secret-77"})
    w = loaded.settings.webhooks
    assert w.address() == ("::1", 8787)
    assert (w.path, w.max_body_bytes) == ("/hooks/whiplash-1", 2048)
    assert loaded.settings.webhook_secret().get_secret_value() == "hook-secret-77"
    assert "hook-secret-77" in loaded.secret_values()
    assert loaded.warnings == ()


def test_a_webhook_secret_is_resolved_only_while_the_receiver_is_on(tmp_path: Path) -> None:
    """Result: with listen unset an unresolvable [webhooks] secret is no problem (not in use); with listen set
    it is one line, naming the key and never a value."""
    off = load(tmp_path, {"webhooks": {"secret": "env:MISSING_HOOK"}})
    assert off.settings.webhooks.secret is not None
    assert problems(tmp_path, {"webhooks": {"listen": "127.0.0.1:8787", "secret": "env:MISSING_HOOK"}}) == [
        "webhooks.secret: environment variable MISSING_HOOK is not set"]


@pytest.mark.parametrize(
    ("webhooks", "expected"),
    [
        ({"listen": "8787"}, f'webhooks.listen: {LISTEN_HINT} (got "8787")'),
        ({"path": "whiplash/webhook"},
         'webhooks.path: must be a URL path starting with "/", e.g. "/whiplash/webhook" (got "whiplash/webhook")'),
        ({"path": "/hook?x=1"},
         'webhooks.path: must be a URL path starting with "/", e.g. "/whiplash/webhook" (got "/hook?x=1")'),
        ({"path": "/a b"},
         'webhooks.path: must be a URL path starting with "/", e.g. "/whiplash/webhook" (got "/a b")'),
        ({"max_body_bytes": 100}, "webhooks.max_body_bytes: must be >= 1024 (got 100)"),
        ({"max_body_bytes": 2**40}, f"webhooks.max_body_bytes: must be <= {64 * 1024 * 1024} (got {2**40})"),
        ({"max_body_bytes": "1MiB"}, "webhooks.max_body_bytes: must be an integer (got string)"),
        ({"listen": "127.0.0.1:8787", "secret": ""}, "webhooks.secret: must not be empty"),
        ({"enabled": True}, "webhooks.enabled: unknown key"),
    ],
)
def test_webhook_problems_are_one_line_each(tmp_path: Path, webhooks: dict[str, Any], expected: str) -> None:
    """Result: each bad [webhooks] value is one problem line with its key path (check-config and run exit 78)."""
    assert problems(tmp_path, {"webhooks": webhooks}) == [expected]


@pytest.mark.parametrize(("listen", "warned"), [("0.0.0.0:8787", True), ("10.1.2.3:8787", True),
                                                ("hooks.example.com:8787", True),
                                                ("127.0.0.2:8787", False), ("localhost:8787", False)])
def test_a_receiver_off_loopback_is_warned_about(tmp_path: Path, listen: str, warned: bool) -> None:
    """Result: a listen address other than loopback warns (plain HTTP belongs behind a TLS proxy)."""
    warnings = load(tmp_path, {"webhooks": {"listen": listen}}).warnings
    assert bool([w for w in warnings if w.startswith("webhooks.listen: ")]) == warned


def test_the_off_loopback_warning_says_why_and_what_to_do(tmp_path: Path) -> None:
    """Result: the warning quotes the address and gives the reason and the fix, in these words."""
    assert load(tmp_path, {"webhooks": {"listen": "0.0.0.0:8787"}}).warnings == (
        'webhooks.listen: "0.0.0.0:8787" is not a loopback address; the receiver speaks plain HTTP, so keep it on '
        "127.0.0.1 behind a TLS reverse proxy (README: Webhooks)",)


def test_the_commented_webhooks_example_shows_the_defaults(tmp_path: Path) -> None:
    """1. Uncomment the example's [webhooks] block. Result: it loads; path, cap and key (the client secret's
    credential) are the defaults the model applies, and listen is the socket unit's address."""
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [webhooks]")
    block = [line.removeprefix("# ") for line in lines[start:start + 5]]
    text = EXAMPLE.read_text().replace("\n".join(lines[start:start + 5]), "\n".join(block))
    path = tmp_path / "example.toml"
    path.write_text(text)
    directory = credentials_dir(tmp_path, {"whiplash-client-secret": "a", "klaviyo-1234": "b"})
    s = load_config(path, {"CREDENTIALS_DIRECTORY": str(directory)}, today=TODAY).settings
    defaults = load(tmp_path).settings.webhooks
    assert s.webhooks.listen == "127.0.0.1:8787"
    assert (s.webhooks.path, s.webhooks.max_body_bytes) == (defaults.path, defaults.max_body_bytes)
    assert s.webhook_secret() == s.whiplash.client_secret
