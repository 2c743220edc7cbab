"""``[bridge]`` settings overridden from the environment: ``KLAVIYO_BRIDGE_<KEY>`` (pydantic-settings reads them).

For a one-off without editing the file, e.g. ``systemctl edit klaviyo-bridge`` with
``Environment=KLAVIYO_BRIDGE_LOG_LEVEL=debug``, or ``KLAVIYO_BRIDGE_STATE_PATH=… klaviyo-bridge status``.
Invariants: only ``[bridge]`` keys can be overridden (never a secret, a customer or an upstream setting); an
override is validated exactly like the file's value, and a bad one is reported naming its variable; what the
environment holds besides (``KLAVIYO_BRIDGE_CONFIG``, failpoints) is ignored here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

ENV_PREFIX = "KLAVIYO_BRIDGE_"
_NUMBERS = frozenset({"poll_interval_seconds", "shutdown_grace_seconds"})


class BridgeEnvironment(BaseSettings):
    """The ``[bridge]`` keys an environment variable may set, as text (the settings models validate them)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")

    state_path: str | None = None
    poll_interval_seconds: str | None = None
    log_level: str | None = None
    log_format: str | None = None
    shutdown_grace_seconds: str | None = None
    metrics_listen: str | None = None


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' own environment source, reading a given mapping (tests, ``load_config(environ=…)``)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(BridgeEnvironment, case_sensitive=False, env_prefix=ENV_PREFIX)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {key.lower(): value for key, value in self._environ.items()}


def bridge_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Return the ``[bridge]`` values the environment sets, typed as TOML would give them."""
    found = BridgeEnvironment.model_validate(_MappingSource(environ)()).model_dump(exclude_none=True)
    return {key: _typed(key, text) for key, text in found.items()}


def variable_for(key: str) -> str:
    """Return the environment variable that overrides ``[bridge] key``."""
    return f"{ENV_PREFIX}{key.upper()}"


def _typed(key: str, text: str) -> Any:
    """Read a number where the setting is one; a text that is not one is left for validation to refuse."""
    if key in _NUMBERS:
        try:
            return float(text)
        except ValueError:
            return text
    return text
