"""Load, resolve and validate the bridge's TOML configuration into one frozen ``Settings`` tree.

The settings models and loading live here; the checked field types are ``config_fields``', the wording of
problems ``config_problems``', secret references ``config_secrets``' and environment overrides ``config_env``'s.
Invariants kept here:
- ``load_config`` either returns a fully valid, frozen ``Settings`` or raises ``ConfigError`` listing every
  problem it found, one line each, as ``"<key path>: <why>"``; no TOML input produces any other exception.
- Secret values are only ever held as ``SecretStr``; no problem line, warning, repr or str shows one
  (a literal secret is never echoed either, only reported as a warning).
- The TOML file is the source of settings; the environment only overrides ``[bridge]`` keys
  (``KLAVIYO_BRIDGE_LOG_LEVEL=debug``, see ``config_env``; a bad override is reported naming its variable) and
  resolves ``env:`` and ``credential:`` secret references.
- Secrets are resolved only for commands that talk to an API (``resolve_secrets=True``), and then only for
  the Whiplash application and the *enabled* customers: ``status`` and ``dead-letters`` read the config
  and the state DB with no secret at hand, and a disabled customer's missing credential blocks nothing.
- For the daemon and what talks to APIs (``load_or_report(resolve_secrets=True)``) the state DB's folder must
  exist and be writable: the bridge never creates folders, so a mistyped ``state_path`` is a config error (exit 78)
  rather than a fresh database that would re-send every order's history.
- Every Whiplash status code maps to at most one event; metric names are pairwise distinct;
  customer ids are unique.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, Strict, ValidationError, field_validator, model_validator

from . import logs
from .clock import utcnow
from .config_env import bridge_overrides, variable_for
from .config_fields import (
    MAX_INT64,
    Email,
    Float,
    HttpUrlStr,
    Int,
    ListenAddress,
    MetricName,
    NonEmptyStr,
    Revision,
    Secret,
    StatusCode,
    WebhookPath,
    check_state_path,
    raise_cross,
    split_host_port,
)
from .config_problems import Loc, escape_controls, problem_lines, quote
from .config_secrets import os_reason, resolve_references
from .core import DEFAULT_METRIC_NAMES, DEFAULT_STATUS_EVENTS, EventKind, Rules
from .errors import ConfigError
from .logs import LogFormat

DEFAULT_CONFIG_PATH = Path("/etc/klaviyo-bridge/config.toml")
CONFIG_PATH_ENV = "KLAVIYO_BRIDGE_CONFIG"

# timedelta/datetime arithmetic overflows long before float does; ten years is far beyond any useful value.
_MAX_STALE_HOURS = 10 * 365 * 24

LogLevel = Literal["debug", "info", "warning", "error"]
Grant = Literal["client_credentials", "refresh_token"]


# --- settings models ----------------------------------------------------------------------------------------


class BridgeSettings(BaseModel):
    """Process-wide settings: where state lives, how often to poll, how to log and stop."""

    # Spelled out per class: the pydantic mypy plugin only sees a literal ConfigDict(frozen=True).
    model_config = ConfigDict(frozen=True, extra="forbid")

    state_path: Path
    poll_interval_seconds: Float = Field(default=60.0, ge=1)
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    shutdown_grace_seconds: Float = Field(default=20.0, gt=0)
    metrics_listen: ListenAddress | None = None

    _check_state_path = field_validator("state_path", mode="before")(check_state_path)

    def metrics_address(self) -> tuple[str, int] | None:
        """Return the (host, port) to serve metrics on (IPv6 without brackets), or None when disabled."""
        return None if self.metrics_listen is None else split_host_port(self.metrics_listen)


class WhiplashSettings(BaseModel):
    """How to reach and authenticate against the Whiplash API."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: HttpUrlStr = "https://www.getwhiplash.com"
    grant: Grant = "client_credentials"
    client_id: NonEmptyStr
    client_secret: Secret
    refresh_token: Secret | None = None
    scope: NonEmptyStr = "app_read"
    page_size: Int = Field(default=50, ge=1, le=500)
    overlap_seconds: Int = Field(default=300, ge=0, le=86400)
    timeout_seconds: Float = Field(default=30.0, gt=0)
    # Orders last seen shipped are re-read by id this often, for this long, in case "delivered" does not
    # bump updated_at; reconcile_days = 0 turns the sweep off.
    reconcile_interval_minutes: Float = Field(default=30.0, ge=0.01, le=10080)
    reconcile_days: Int = Field(default=30, ge=0, le=365)
    # One budget for every Whiplash request of the process (all customers share the OAuth application's limit).
    max_requests_per_second: Int = Field(default=10, ge=1, le=1000)
    max_concurrent_requests: Int = Field(default=4, ge=1, le=64)

    @model_validator(mode="after")
    def _refresh_token_for_grant(self) -> Self:
        """Require a refresh token to seed the refresh_token grant."""
        if self.grant == "refresh_token" and self.refresh_token is None:
            raise_cross([(("refresh_token",), 'required when grant = "refresh_token"')])
        return self


class KlaviyoSettings(BaseModel):
    """How to reach the Klaviyo API, shared by every customer's account."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: HttpUrlStr = "https://a.klaviyo.com"
    revision: Revision = "2026-07-15"
    rate_limit_share: Float = Field(default=0.8, gt=0, le=1)
    default_profile_email: Email
    timeout_seconds: Float = Field(default=30.0, gt=0)
    key_probe_seconds: Float = Field(default=300.0, ge=1, le=86400)


class EventSettings(BaseModel):
    """Klaviyo metric name for each milestone, and when a change is too old to email about."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The defaults are the core's: one definition of the names every merchant's flows are built on.
    processing: MetricName = DEFAULT_METRIC_NAMES[EventKind.PROCESSING]
    cancelled: MetricName = DEFAULT_METRIC_NAMES[EventKind.CANCELLED]
    shipped: MetricName = DEFAULT_METRIC_NAMES[EventKind.SHIPPED]
    delivered: MetricName = DEFAULT_METRIC_NAMES[EventKind.DELIVERED]
    stale_after_hours: Float = Field(default=72.0, gt=0, le=_MAX_STALE_HOURS)

    def name_for(self, kind: EventKind) -> str:
        """Return the metric name configured for ``kind``."""
        name: str = getattr(self, kind.value)
        return name

    @model_validator(mode="after")
    def _names_distinct(self) -> Self:
        """Reject two milestones sharing one metric (flows could not tell them apart)."""
        names = {kind: self.name_for(kind) for kind in EventKind}
        raise_cross([((kind.value,), f"same metric name as events.{owner.value} ({quote(names[kind])})")
                      for kind, owner in _shared_names(names)])
        return self


def _shared_names(names: Mapping[EventKind, str]) -> list[tuple[EventKind, EventKind]]:
    """Return (kind, earlier kind) for every metric name already used by an earlier milestone (case-blind)."""
    first: dict[str, EventKind] = {}
    shared = []
    for kind, name in names.items():
        owner = first.setdefault(name.strip().casefold(), kind)
        if owner is not kind:
            shared.append((kind, owner))
    return shared


# Each milestone's status codes in the core's table (in its order): the one definition of which status announces what.
_DEFAULT_CODES = {kind: tuple(code for code, k in DEFAULT_STATUS_EVENTS.items() if k is kind) for kind in EventKind}


class StatusSettings(BaseModel):
    """Which Whiplash status codes announce which milestone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The defaults are the core's, like the metric names (45 "Closed by Originator" is deliberately absent: see
    # config.example.toml).
    processing: tuple[StatusCode, ...] = _DEFAULT_CODES[EventKind.PROCESSING]
    cancelled: tuple[StatusCode, ...] = _DEFAULT_CODES[EventKind.CANCELLED]
    shipped: tuple[StatusCode, ...] = _DEFAULT_CODES[EventKind.SHIPPED]
    delivered: tuple[StatusCode, ...] = _DEFAULT_CODES[EventKind.DELIVERED]

    def codes_for(self, kind: EventKind) -> tuple[int, ...]:
        """Return the status codes that announce ``kind``."""
        codes: tuple[int, ...] = getattr(self, kind.value)
        return codes

    def event_by_code(self) -> dict[int, EventKind]:
        """Return the status code → event mapping."""
        return {code: kind for kind in EventKind for code in self.codes_for(kind)}

    @model_validator(mode="after")
    def _codes_unique(self) -> Self:
        """Reject a status code listed twice: one status change must mean one milestone."""
        first: dict[int, tuple[EventKind, int]] = {}
        problems: list[tuple[Loc, str]] = []
        for kind in EventKind:
            for index, code in enumerate(self.codes_for(kind)):
                owner, at = first.setdefault(code, (kind, index))
                if (owner, at) != (kind, index):
                    where = f"statuses.{owner.value}[{at}]"
                    problems.append(((kind.value, index), f"status {code} is already listed at {where}"))
        raise_cross(problems)
        return self


EventName = Literal["processing", "cancelled", "shipped", "delivered"]
ALL_EVENTS: tuple[EventName, ...] = ("processing", "cancelled", "shipped", "delivered")


class MetricOverrides(BaseModel):
    """One merchant's own metric names, replacing [events] for that merchant only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    processing: MetricName | None = None
    cancelled: MetricName | None = None
    shipped: MetricName | None = None
    delivered: MetricName | None = None

    def name_for(self, kind: EventKind) -> str | None:
        """Return the merchant's own name for ``kind``, if it set one."""
        name: str | None = getattr(self, kind.value)
        return name


class CustomerSettings(BaseModel):
    """One merchant: its Whiplash customer id, its own Klaviyo account and the events it gets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    whiplash_customer_id: Int = Field(gt=0, le=MAX_INT64)
    name: NonEmptyStr
    klaviyo_api_key: Secret
    launch_date: Annotated[date, Strict()]  # changes before 00:00 UTC that day are backfill
    backfill_days: Int = Field(default=14, ge=0, le=14)
    list_name: NonEmptyStr = "Whiplash"
    enabled: Annotated[bool, Strict()] = True
    # The milestones this merchant gets as events ([] = profiles and list only); profiles are never affected.
    events: tuple[EventName, ...] = ALL_EVENTS
    metrics: MetricOverrides = Field(default_factory=MetricOverrides)

    @field_validator("events")
    @classmethod
    def _events_once(cls, events: tuple[EventName, ...]) -> tuple[EventName, ...]:
        """Reject an event listed twice (a typo or a merge gone wrong; say which)."""
        seen: set[str] = set()
        problems: list[tuple[Loc, str]] = []
        for index, name in enumerate(events):
            if name in seen:
                problems.append(((index,), f"{quote(name)} is listed twice"))
            seen.add(name)
        raise_cross(problems)
        return events

    def enabled_events(self) -> frozenset[EventKind]:
        """Return the milestones this merchant gets as events."""
        return frozenset(EventKind(name) for name in self.events)


_MIB = 1024 * 1024


class WebhookSettings(BaseModel):
    """The receiver of Whiplash's signed webhooks, which wake a customer's poller (unset listen: polling only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    listen: ListenAddress | None = None
    path: WebhookPath = "/whiplash/webhook"
    # Whiplash signs with the OAuth application's client secret; a separate key only if Whiplash ever uses one.
    secret: Secret | None = None
    max_body_bytes: Int = Field(default=_MIB, ge=1024, le=64 * _MIB)

    def address(self) -> tuple[str, int] | None:
        """Return the (host, port) to bind when systemd passes no socket (IPv6 without brackets), or None: off."""
        return None if self.listen is None else split_host_port(self.listen)


class Settings(BaseModel):
    """The whole validated configuration."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bridge: BridgeSettings
    whiplash: WhiplashSettings
    klaviyo: KlaviyoSettings
    events: EventSettings = Field(default_factory=EventSettings)
    statuses: StatusSettings = Field(default_factory=StatusSettings)
    customers: tuple[CustomerSettings, ...] = ()
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)

    @field_validator("customers")
    @classmethod
    def _ids_unique(cls, customers: tuple[CustomerSettings, ...]) -> tuple[CustomerSettings, ...]:
        """Reject two entries for one Whiplash customer (their orders would be sent twice)."""
        first: dict[int, int] = {}
        problems: list[tuple[Loc, str]] = []
        for index, customer in enumerate(customers):
            cid = customer.whiplash_customer_id
            earlier = first.setdefault(cid, index)
            if earlier != index:
                why = f"duplicate of customers[{earlier}] ({cid})"
                problems.append(((index, "whiplash_customer_id"), why))
        raise_cross(problems)
        return customers

    @model_validator(mode="after")
    def _customer_metrics_distinct(self) -> Self:
        """Reject a merchant whose own metric names make two of its milestones share one metric."""
        problems: list[tuple[Loc, str]] = []
        for index, customer in enumerate(self.customers):
            names = self.metric_names_for(customer)
            problems += [
                (("customers", index, "metrics", kind.value),
                 f"same metric name as {owner.value} for this customer ({quote(names[kind])})")
                for kind, owner in _shared_names(names)
            ]
        raise_cross(problems)
        return self

    def metric_names_for(self, customer: CustomerSettings) -> dict[EventKind, str]:
        """Return the metric name of each milestone for ``customer``: its own, else [events]'."""
        return {kind: customer.metrics.name_for(kind) or self.events.name_for(kind) for kind in EventKind}

    def enabled_customers(self) -> tuple[CustomerSettings, ...]:
        """Return the customers the daemon should poll."""
        return tuple(customer for customer in self.customers if customer.enabled)

    def webhook_secret(self) -> SecretStr:
        """Return the key webhook signatures are checked with: [webhooks] secret, else the Whiplash client secret."""
        return self.webhooks.secret or self.whiplash.client_secret

    def rules_for(self, customer: CustomerSettings) -> Rules:
        """Build the pure-core rules for ``customer``."""
        return Rules(
            customer_id=customer.whiplash_customer_id,
            launch_date=customer.launch_date,
            metric_names=self.metric_names_for(customer),
            status_events=self.statuses.event_by_code(),
            stale_after=timedelta(hours=self.events.stale_after_hours),
            enabled=customer.enabled_events(),
        )


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A valid configuration and the warnings found while loading it."""

    settings: Settings
    warnings: tuple[str, ...]

    def secret_values(self) -> list[str]:
        """Return every resolved secret value, for the log redactor (references that were not resolved too)."""
        s = self.settings
        values = [s.whiplash.client_secret, s.whiplash.refresh_token, s.webhooks.secret,
                  *(c.klaviyo_api_key for c in s.customers)]
        return [v.get_secret_value() for v in values if v is not None]


# --- loading ------------------------------------------------------------------------------------------------


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Return $KLAVIYO_BRIDGE_CONFIG, or /etc/klaviyo-bridge/config.toml when it is unset or empty."""
    env = os.environ if environ is None else environ
    return Path(env.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH)


def load_config(
    path: Path,
    environ: Mapping[str, str] | None = None,
    *,
    resolve_secrets: bool = True,
    check_state_folder: bool = False,
    today: date | None = None,
) -> LoadedConfig:
    """Read, resolve and validate the config at ``path``; raise ConfigError listing every problem.

    ``resolve_secrets=False`` (commands that only read the config and the state DB) leaves every secret
    reference unresolved; ``check_state_folder`` (the daemon and what else writes state) requires the state
    DB's folder to exist and be writable.
    """
    env = os.environ if environ is None else environ
    raw = _read_toml(path)
    overridden = _apply_environment(raw, env)
    secret_problems, warnings = resolve_references(raw, env, resolve=resolve_secrets)
    settings, problems = _validate(raw)
    problems = [_name_variable(line, overridden) for line in problems]
    problems += secret_problems
    if settings is not None and check_state_folder:
        problems += _state_folder_problems(settings.bridge.state_path)
    if settings is None or problems:
        raise ConfigError([escape_controls(line) for line in problems])
    warnings += _advice(settings, today or utcnow().date())
    return LoadedConfig(settings=settings, warnings=tuple(escape_controls(line) for line in warnings))


def load_or_report(
    path: Path | None, *, resolve_secrets: bool = True, environ: Mapping[str, str] | None = None
) -> LoadedConfig | None:
    """Load the config (default path if None), printing each problem and warning on its own line to stderr.

    With ``resolve_secrets`` (commands that talk to an API) the state folder is checked too. Returns None when
    the config is unusable. Every resolved secret is registered with the log redactor.
    """
    env = os.environ if environ is None else environ
    target = path or default_config_path(env)
    try:
        loaded = load_config(target, env, resolve_secrets=resolve_secrets, check_state_folder=resolve_secrets)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return None
    for warning in loaded.warnings:
        print(f"config warning: {warning}", file=sys.stderr)
    for secret in loaded.secret_values():
        logs.register_secret(secret)
    return loaded


def _state_folder_problems(state_path: Path) -> list[str]:
    """Return why the state DB could not be opened for writing where ``state_path`` says (the folder is never
    created: a mistyped path must not start a fresh database that re-sends history)."""
    folder = state_path.parent
    key = "bridge.state_path"
    if not folder.is_dir():
        return [f"{key}: folder {folder} does not exist; create it (systemd's StateDirectory= does) or fix the path"]
    if not os.access(folder, os.W_OK | os.X_OK):
        return [f"{key}: folder {folder} is not writable by this user"]
    if state_path.exists() and not (state_path.is_file() and os.access(state_path, os.R_OK | os.W_OK)):
        return [f"{key}: {state_path} is not a readable and writable file"]
    return []


def _read_toml(path: Path) -> dict[str, Any]:
    """Parse the TOML file, turning every failure into a one-problem ConfigError."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([escape_controls(f"{path}: invalid TOML: not UTF-8 (byte {exc.start})")]) from None
    except OSError as exc:
        raise ConfigError([escape_controls(f"{path}: cannot read file ({os_reason(exc)})")]) from None
    except ValueError:  # an embedded NUL in the path
        raise ConfigError([escape_controls(f"{path}: cannot read file (invalid path)")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([escape_controls(f"{path}: invalid TOML: {exc}")]) from None
    except RecursionError:
        raise ConfigError([escape_controls(f"{path}: invalid TOML: nested too deeply")]) from None


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Put the environment's ``[bridge]`` overrides into ``raw``; return the keys they set."""
    overrides = bridge_overrides(environ)
    bridge = raw.get("bridge")
    if overrides and isinstance(bridge, dict):
        bridge.update(overrides)
    elif overrides and bridge is None:
        raw["bridge"] = dict(overrides)
    return list(overrides)


def _name_variable(line: str, overridden: Sequence[str]) -> str:
    """Say which environment variable a problem of an overridden ``[bridge]`` key came from."""
    for key in overridden:
        if line.startswith(f"bridge.{key}: "):
            return line.replace(f"bridge.{key}: ", f"bridge.{key} (from {variable_for(key)}): ", 1)
    return line


def _validate(raw: dict[str, Any]) -> tuple[Settings | None, list[str]]:
    """Validate ``raw``; return the settings or the problem lines."""
    try:
        return Settings.model_validate(raw), []
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    # Outside the except block so no ValidationError (whose text may echo inputs) is chained anywhere.
    return None, [line for error in errors for line in problem_lines(error)]


def _advice(settings: Settings, today: date) -> list[str]:
    """Return warnings about valid but probably unintended settings."""
    advice: list[str] = []
    if 45 in settings.statuses.cancelled:
        advice.append(
            'statuses.cancelled: 45 "Closed by Originator" means the shop closed or shipped the order '
            "itself; its shoppers would get a wrong cancellation email"
        )
    if not settings.bridge.state_path.is_absolute():
        advice.append(
            f"bridge.state_path: {quote(str(settings.bridge.state_path))} is relative, so it depends on the "
            "directory the bridge is started from; use an absolute path (e.g. /var/lib/klaviyo-bridge/state.db)"
        )
    for index, customer in enumerate(settings.customers):
        if customer.launch_date < today - timedelta(days=365):
            advice.append(
                f"customers[{index}].launch_date: {customer.launch_date} is more than a year ago; "
                "check the year (the bridge only reads changes from launch_date - backfill_days on)"
            )
    address = settings.webhooks.address()
    if address is not None and not _is_loopback(address[0]):
        advice.append(
            f"webhooks.listen: {quote(settings.webhooks.listen or '')} is not a loopback address; the receiver "
            "speaks plain HTTP, so keep it on 127.0.0.1 behind a TLS reverse proxy (README: Webhooks)"
        )
    return advice


def _is_loopback(host: str) -> bool:
    """Tell whether ``host`` names this machine only (127.0.0.0/8, ::1 or localhost)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
