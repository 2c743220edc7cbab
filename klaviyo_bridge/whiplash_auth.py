"""Whiplash OAuth: the token chain (``TokenManager``) and how every Whiplash reply is read.

The orders client (``whiplash``) and the notification client (``notifications``) both sign in through this
module and read Whiplash's answers with it, so the two share one token chain and one error vocabulary.
Invariants:
- Secrets (client secret, refresh and access tokens) never reach a log line, repr or exception message:
  messages are built from status codes and response bodies, and known secrets are scrubbed from those.
- A rotated refresh token is saved to the vault before the access token issued with it is first used.
- Failures leave as the ``errors`` tree: 401/403 -> ``AuthFailed``; 408/429/5xx/network/timeouts ->
  ``TransientUpstream``; other 4xx -> ``PermanentUpstream``; a 2xx body that is not JSON -> ``MalformedPayload``.
- Every token request first takes a slot of the process's one ``WhiplashBudget``, and every 429 (of any
  Whiplash request) is reported to it: the limit belongs to the OAuth application, not to a customer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import aiohttp
from pydantic import SecretStr

from . import failpoints, logs
from .budget import Lane, WhiplashBudget
from .clock import Epoch
from .config import Grant, WhiplashSettings
from .errors import AuthFailed, ConfigError, MalformedPayload
from .http import Outcome, Reply, body_reason, classify, error_for, exchange, one_line, retry_after, scrub

# The orders client's logger: the logger name is part of every log line, and token lines keep the one operators
# already filter on.
log = logging.getLogger("klaviyo_bridge.whiplash")

SERVICE = "whiplash"
REFRESH_MARGIN = timedelta(minutes=5)
EXCERPT_CHARS = 200
DEFAULT_PER_SECOND = 10  # [whiplash] max_requests_per_second's default, for clients built without settings
DEFAULT_CONCURRENT = 4


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """The Whiplash OAuth tokens; ``refresh_token`` must never be lost once rotated."""

    access_token: str = field(repr=False)
    expires_at: datetime  # UTC
    refresh_token: str | None = field(repr=False)
    seed_fingerprint: str  # sha256 of the refresh token from config that this chain started from


@dataclass(frozen=True, slots=True)
class WhiplashAuth:
    """The OAuth application credentials the bridge signs in with."""

    base_url: str
    grant: Grant
    client_id: str
    client_secret: SecretStr
    refresh_token: SecretStr | None
    scope: str


class TokenVault(Protocol):
    """Durable home of the Whiplash token chain (the Store implements it)."""

    async def load_whiplash_token(self) -> TokenRecord | None:
        """Return the saved token record, if any."""
        ...

    async def save_whiplash_token(self, rec: TokenRecord) -> None:
        """Persist ``rec`` durably, replacing the previous record."""
        ...


# --- response interpretation -------------------------------------------------------------------------


def _excerpt(text: str, secrets: Sequence[str] = ()) -> str:
    """Return a one-line, redacted excerpt of at most EXCERPT_CHARS characters."""
    return one_line(scrub(text, secrets), EXCERPT_CHARS)


def _errors_text(errors: object) -> str:
    """Flatten a Rails-style ``errors`` value (string, list, or field -> messages) into prose."""
    if isinstance(errors, dict):
        return "; ".join(f"{field}: {_errors_text(msgs)}" for field, msgs in errors.items())
    if isinstance(errors, list):
        return ", ".join(_errors_text(item) for item in errors)
    return str(errors)


def _body_detail(data: object) -> str | None:
    """Return the message of a JSON error body shaped {message}, {error[, error_description]} or {errors}."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("message"), str):
        return str(data["message"])
    if "error" in data:
        desc = data.get("error_description")
        error = _errors_text(data["error"])
        return f"{error}: {desc}" if isinstance(desc, str) else error
    if "errors" in data:
        return _errors_text(data["errors"])
    return None


def error_detail(text: str, secrets: Sequence[str] = ()) -> str:
    """Return a readable, redacted detail (≤200 chars) from an error response body (never an HTML page)."""
    try:
        detail = _body_detail(json.loads(text))
    except ValueError:
        detail = None
    return _excerpt(detail if detail is not None else body_reason(text), secrets) or "(empty body)"


def raise_for_status(reply: Reply, secrets: Sequence[str], now: float) -> None:
    """Translate a non-2xx reply into the error tree (the shared table); return quietly on success."""
    if classify(reply.status) is Outcome.OK:
        return  # a page of orders is not parsed twice: the detail is read from error bodies only
    error = error_for(SERVICE, reply, error_detail(reply.text, secrets),
                      wait=retry_after(reply.headers.get("Retry-After"), now))
    if error is not None:
        raise error


def report_throttle(budget: WhiplashBudget, reply: Reply, now: float) -> None:
    """Tell the shared budget about a 429, whoever's request got it: the limit is the application's."""
    if reply.status == 429:
        budget.throttled(retry_after(reply.headers.get("Retry-After"), now))


def json_body(reply: Reply, secrets: Sequence[str]) -> object:
    """Decode a 2xx body as JSON; HTML, truncated or empty bodies raise MalformedPayload.

    The message describes the body without quoting it: a cut-off page of orders starts with shoppers' data.
    """
    try:
        return json.loads(reply.text)
    except ValueError as exc:
        reason = _excerpt(body_reason(reply.text), secrets)
        raise MalformedPayload(SERVICE, reply.status, f"not JSON: {reason}") from exc


# --- tokens ------------------------------------------------------------------------------------------


def _number(value: object) -> float | None:
    """Return ``value`` if it is a JSON number (bools excluded), else None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def fingerprint(secret: str) -> str:
    """Return the sha256 hex digest used to tell which configured seed a token chain grew from."""
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenManager:
    """Hand out a valid Whiplash access token, refreshing (once, under a lock) when needed."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: WhiplashAuth,
        vault: TokenVault,
        *,
        clock: Epoch = time.time,
        timeout: float = 30,
        budget: WhiplashBudget | None = None,
    ) -> None:
        if auth.grant == "refresh_token" and auth.refresh_token is None:
            raise ConfigError(["whiplash: grant = 'refresh_token' needs a refresh_token"])
        self._session = session
        self._auth = auth
        self._vault = vault
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._lock = asyncio.Lock()
        self._record: TokenRecord | None = None
        self._loaded = False
        self._bad_token: str | None = None
        self._seed = self._seed_fingerprint()
        self.budget = budget if budget is not None else WhiplashBudget(DEFAULT_PER_SECOND, DEFAULT_CONCURRENT)

    @classmethod
    def from_settings(
        cls, settings: WhiplashSettings, session: aiohttp.ClientSession, vault: TokenVault
    ) -> TokenManager:
        """Build the manager and the process's request budget from the [whiplash] settings."""
        w = settings
        auth = WhiplashAuth(w.base_url, w.grant, w.client_id, w.client_secret, w.refresh_token, w.scope)
        budget = WhiplashBudget(w.max_requests_per_second, w.max_concurrent_requests)
        return cls(session, auth, vault, timeout=w.timeout_seconds, budget=budget)

    def __repr__(self) -> str:
        return f"TokenManager(base_url={self._auth.base_url!r}, grant={self._auth.grant!r})"

    def secrets(self) -> tuple[str, ...]:
        """Return every secret this manager knows, for scrubbing text before it is logged or raised."""
        known = [self._auth.client_secret.get_secret_value()]
        if self._auth.refresh_token is not None:
            known.append(self._auth.refresh_token.get_secret_value())
        if self._record is not None:
            known += [self._record.access_token, self._record.refresh_token or ""]
        return tuple(s for s in known if s)

    async def access_token(self) -> str:
        """Return a usable access token, fetching a new one when missing, invalidated or near expiry."""
        async with self._lock:
            if not self._loaded:
                self._record = await self._load_matching()
                self._loaded = True
            if self._record is None or not self._is_usable(self._record):
                self._record = await self._refresh(self._record)
            return self._record.access_token

    async def invalidate(self, token: str) -> None:
        """Mark ``token`` as refused so the next ``access_token`` call replaces it."""
        async with self._lock:
            # Compare by value: concurrent callers that all saw the same 401 cause one refresh, not many.
            self._bad_token = token

    def _seed_fingerprint(self) -> str:
        """Return the fingerprint of the configured credentials a stored chain must match."""
        if self._auth.refresh_token is not None and self._auth.grant == "refresh_token":
            return fingerprint(self._auth.refresh_token.get_secret_value())
        # client_credentials has no seed token; tie the stored token to the app and scope instead.
        return fingerprint(f"client_credentials\n{self._auth.client_id}\n{self._auth.scope}")

    async def _load_matching(self) -> TokenRecord | None:
        """Return the vault's record if it grew from the configured seed, else None."""
        rec = await self._vault.load_whiplash_token()
        if rec is not None:
            _register_tokens(rec)
        if rec is not None and rec.seed_fingerprint != self._seed:
            log.info("whiplash stored token ignored reason=configured_credentials_changed")
            return None
        return rec

    def _is_usable(self, rec: TokenRecord) -> bool:
        """Return True when ``rec`` is not invalidated and has over REFRESH_MARGIN left."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        return rec.access_token != self._bad_token and rec.expires_at - now > REFRESH_MARGIN

    def _grant_body(self, prev: TokenRecord | None) -> tuple[dict[str, str], str | None]:
        """Return the token request body and the refresh token it spends (None for client_credentials)."""
        auth = self._auth
        creds = {"client_id": auth.client_id, "client_secret": auth.client_secret.get_secret_value()}
        if auth.grant == "client_credentials":
            return {"grant_type": "client_credentials", **creds, "scope": auth.scope}, None
        assert auth.refresh_token is not None  # checked in __init__
        # The vault's token is the newest link of the chain; the configured one is only its seed.
        spent = prev.refresh_token if prev is not None and prev.refresh_token else None
        spent = spent or auth.refresh_token.get_secret_value()
        return {"grant_type": "refresh_token", "refresh_token": spent, **creds}, spent

    async def _refresh(self, prev: TokenRecord | None) -> TokenRecord:
        """Run the configured grant, persist the result, and only then return it."""
        body, spent = self._grant_body(prev)
        secrets = (*self.secrets(), *(v for k, v in body.items() if k in ("client_secret", "refresh_token")))
        url = f"{self._auth.base_url}/oauth/token"
        async with self.budget.slot(Lane.TOKEN):
            reply = await exchange(self._session, SERVICE, "POST", url, secrets=secrets, json=body,
                                   timeout=self._timeout)
        report_throttle(self.budget, reply, self._clock())
        if reply.status in (400, 401):
            raise AuthFailed(SERVICE, reply.status, f"token endpoint: {error_detail(reply.text, secrets)}")
        raise_for_status(reply, secrets, self._clock())
        rec = self._record_from(json_body(reply, secrets), spent)
        _register_tokens(rec)
        failpoints.hit("during_token_refresh")
        # Doorkeeper revokes the spent refresh token when the new access token is first used. Saving
        # before anyone can use it means a crash leaves either the old chain (still valid) or the new
        # one on disk, never a revoked token with its successor lost.
        await self._vault.save_whiplash_token(rec)
        # expires_at is UTC already (see _record_from): the same text as the orders client's search values.
        expires = rec.expires_at.isoformat(timespec="milliseconds")
        log.info("whiplash token obtained grant=%s expires_at=%s", self._auth.grant, expires)
        return rec

    def _record_from(self, data: object, spent: str | None) -> TokenRecord:
        """Build a TokenRecord from a token response; a body without the fields raises MalformedPayload."""
        if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
            raise MalformedPayload(SERVICE, 200, "token response lacks access_token")
        expires_in, issued = _number(data.get("expires_in")), _number(data.get("created_at"))
        if expires_in is None:
            raise MalformedPayload(SERVICE, 200, "token response lacks numeric expires_in")
        expires_at = datetime.fromtimestamp((self._clock() if issued is None else issued) + expires_in, UTC)
        rotated = data.get("refresh_token")
        refresh = rotated if isinstance(rotated, str) and rotated else spent
        return TokenRecord(str(data["access_token"]), expires_at, refresh, self._seed)


def _register_tokens(rec: TokenRecord) -> None:
    """Have every log line mask these tokens from now on, before anything could print them."""
    logs.register_secret(rec.access_token)
    if rec.refresh_token:
        logs.register_secret(rec.refresh_token)
