"""Whiplash API v2 client: OAuth tokens, one orders page, and the keyset walk over changed orders.

Invariants:
- Secrets (client secret, refresh and access tokens) never reach a log line, repr or exception message:
  messages are built from status codes and response bodies, and known secrets are scrubbed from those.
- A rotated refresh token is saved to the vault before the access token issued with it is first used.
- Every response body is checked before use: a page is a JSON array or ``MalformedPayload`` is raised.
- Failures leave as the ``errors`` tree: 401/403 -> ``AuthFailed``; 408/429/5xx/network/timeouts ->
  ``TransientUpstream`` once retries are spent; other 4xx -> ``PermanentUpstream``.
- ``walk_changes`` yields each order changed at or after ``since`` (and before ``until``, when given) at
  least once, in (updated_at, id) order, and terminates: it never loops on a page that cannot advance the
  cursor. ``step`` is one page of the same walk, for callers that run several walks side by side.
- Every HTTP request (token, orders, by id) first takes a slot of the process's one ``WhiplashBudget``, and
  every 429 is reported to it: the limit belongs to the OAuth application, not to a customer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

import aiohttp
import backoff
from backoff.types import Details
from pydantic import SecretStr

from . import failpoints, logs
from .budget import Lane, WhiplashBudget
from .clock import Epoch
from .config import Grant, WhiplashSettings
from .errors import (
    AuthFailed,
    BridgeError,
    ConfigError,
    MalformedOrder,
    MalformedPayload,
    TransientUpstream,
)
from .http import Outcome, Reply, body_reason, classify, error_for, exchange, one_line, retry_after, scrub
from .orders import Order, order_key, parse_order

log = logging.getLogger(__name__)

SERVICE = "whiplash"
ORDER_SORT = "updated_at asc,id asc"
REFRESH_MARGIN = timedelta(minutes=5)
# How long one page may keep retrying transient failures; the daemon's watchdog window builds on it.
RETRY_BUDGET_S = 120.0
EXCERPT_CHARS = 200
DEFAULT_PER_SECOND = 10  # [whiplash] max_requests_per_second's default, for clients built without settings
DEFAULT_CONCURRENT = 4
Key = tuple[datetime, int]


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


@dataclass(frozen=True, slots=True)
class Page:
    """The fresh orders of one fetched page, in server order, plus how far the cursor may move."""

    orders: tuple[Order, ...]
    malformed: tuple[MalformedOrder, ...]
    last_key: Key | None  # key of the last fresh object whose key is readable
    safe_key: Key | None  # key of the last good order before the first malformed one


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


def _raise_for_status(reply: Reply, secrets: Sequence[str], now: float) -> None:
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


def _json_body(reply: Reply, secrets: Sequence[str]) -> object:
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
        _raise_for_status(reply, secrets, self._clock())
        rec = self._record_from(_json_body(reply, secrets), spent)
        _register_tokens(rec)
        failpoints.hit("during_token_refresh")
        # Doorkeeper revokes the spent refresh token when the new access token is first used. Saving
        # before anyone can use it means a crash leaves either the old chain (still valid) or the new
        # one on disk, never a revoked token with its successor lost.
        await self._vault.save_whiplash_token(rec)
        log.info("whiplash token obtained grant=%s expires_at=%s", self._auth.grant, iso(rec.expires_at))
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


# --- retry policy -------------------------------------------------------------------------------------


def retry_waits(*, factor: float, cap: float, budget: float) -> Generator[float, BaseException | None, None]:
    """Yield backoff waits: the server's Retry-After when it sent one, else full-jitter exponential.

    backoff sends each caught exception into this generator (the same channel ``backoff.runtime``
    uses), so one generator serves both cases without sleeping outside backoff. A Retry-After that
    does not fit the remaining ``budget`` ends the generator: backoff then re-raises the error with
    its ``retry_after`` intact, so the caller defers instead of calling the server early.
    """
    started = time.monotonic()
    expo = backoff.expo(factor=factor, max_value=cap)
    next(expo)  # backoff.expo's first yield only absorbs the priming send
    exc = yield 0.0  # discarded: backoff primes every wait generator with send(None)
    while True:
        jittered = backoff.full_jitter(next(expo))
        hint = exc.retry_after if isinstance(exc, TransientUpstream) else None
        if hint is None:
            exc = yield jittered
        elif time.monotonic() - started + hint > budget:
            return
        else:
            exc = yield hint


def _log_backoff(details: Details) -> None:
    """Log one retry at DEBUG (outages are summarised by the poller); the exception text is secret-free."""
    exc = details.get("exception")
    log.debug(
        "whiplash retry customer=%s tries=%d wait=%.2f error=%s",
        details["args"][0] if details["args"] else "-",
        details["tries"],
        details.get("wait", 0.0),
        exc,
    )


# --- orders client -----------------------------------------------------------------------------------


def iso(ts: datetime) -> str:
    """Return ``ts`` as UTC ISO-8601 with milliseconds and an explicit offset, as search values."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class _Query:
    mode: Literal["since", "tie", "after"]
    search: dict[str, object]
    sort: str


def _since_query(customer_id: int, key: Key) -> _Query:
    search: dict[str, object] = {"customer_id_eq": customer_id, "updated_at_gteq": iso(key[0])}
    return _Query("since", search, ORDER_SORT)


def _tie_query(customer_id: int, key: Key) -> _Query:
    search: dict[str, object] = {"customer_id_eq": customer_id, "updated_at_eq": iso(key[0]), "id_gt": key[1]}
    return _Query("tie", search, "id asc")


def _after_query(customer_id: int, key: Key) -> _Query:
    search: dict[str, object] = {"customer_id_eq": customer_id, "updated_at_gt": iso(key[0])}
    return _Query("after", search, ORDER_SORT)


def _bounded(search: Mapping[str, object], until: datetime | None) -> dict[str, object]:
    """Return ``search`` limited to orders changed before ``until`` (unchanged when None)."""
    return dict(search) if until is None else {**search, "updated_at_lt": iso(until)}


@dataclass(frozen=True, slots=True)
class Keyset:
    """Where one keyset walk stands: the request that reads on (None: the walk is over) and the key reached."""

    query: _Query | None
    key: Key

    @property
    def done(self) -> bool:
        """Tell whether the walk has nothing more to read."""
        return self.query is None


def keyset_from(customer_id: int, since: datetime) -> Keyset:
    """Return the start of a walk over the orders of ``customer_id`` changed at or after ``since``."""
    if since.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    key: Key = (since.astimezone(UTC), 0)
    return Keyset(_since_query(customer_id, key), key)


@dataclass(frozen=True, slots=True)
class Step:
    """One page of a walk: its fresh orders (None: nothing new), where the walk stands after it, and a
    stalled keyset to raise once the page is used."""

    page: Page | None
    next: Keyset
    stalled: MalformedPayload | None


def build_page(raw: Sequence[object], key: Key) -> Page | None:
    """Return the fresh part of ``raw`` (key > ``key``, or unreadable key) as a Page, or None if empty."""
    fresh = [obj for obj in raw if (k := order_key(obj)) is None or k > key]
    orders: list[Order] = []
    malformed: list[MalformedOrder] = []
    last_key: Key | None = None
    safe_key: Key | None = None
    for obj in fresh:
        last_key = order_key(obj) or last_key
        try:
            order = parse_order(obj)
        except MalformedOrder as exc:
            malformed.append(exc)
            continue
        orders.append(order)
        safe_key = order.key if not malformed else safe_key
    if not fresh:
        return None
    return Page(tuple(orders), tuple(malformed), last_key, last_key if not malformed else safe_key)


def max_key(raw: Sequence[object], key: Key) -> Key:
    """Return the largest readable key in ``raw``, or ``key`` when none is larger."""
    return max((k for obj in raw if (k := order_key(obj)) is not None), default=key)


class WhiplashClient:
    """Read orders of one 3PL's merchants from Whiplash API v2, within the process's request budget."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        tokens: TokenManager,
        *,
        base_url: str,
        page_size: int = 50,
        timeout: float = 30,
        max_tries: int = 6,
        max_time: float | None = None,
        backoff_factor: float = 1.0,
        backoff_cap: float = 30.0,
    ) -> None:
        self._session = session
        self._tokens = tokens
        self.budget = tokens.budget  # one budget for tokens and orders: both spend the application's limit
        self._url = f"{base_url.rstrip('/')}/api/v2/orders"
        self.page_size = page_size
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # Read when the client is built, not when this module is: the watchdog's window and tests follow it.
        max_time = RETRY_BUDGET_S if max_time is None else max_time
        self._get_json = backoff.on_exception(
            retry_waits,
            TransientUpstream,
            max_tries=max_tries,
            max_time=max_time,
            jitter=None,  # retry_waits jitters itself: a Retry-After must not be jittered away
            on_backoff=_log_backoff,
            logger=None,
            factor=backoff_factor,
            cap=backoff_cap,
            budget=max_time,
        )(self._get_once)

    @classmethod
    def from_settings(
        cls, settings: WhiplashSettings, session: aiohttp.ClientSession, vault: TokenVault
    ) -> WhiplashClient:
        """Build the client, its token manager and the process's request budget from the [whiplash] settings."""
        w = settings
        auth = WhiplashAuth(w.base_url, w.grant, w.client_id, w.client_secret, w.refresh_token, w.scope)
        budget = WhiplashBudget(w.max_requests_per_second, w.max_concurrent_requests)
        tokens = TokenManager(session, auth, vault, timeout=w.timeout_seconds, budget=budget)
        return cls(session, tokens, base_url=w.base_url, page_size=w.page_size, timeout=w.timeout_seconds)

    def __repr__(self) -> str:
        return f"WhiplashClient(url={self._url!r}, page_size={self.page_size})"

    async def fetch_page(
        self,
        customer_id: int,
        search: Mapping[str, object],
        *,
        sort: str = ORDER_SORT,
        page: int = 1,
        lane: Lane = Lane.LIVE,
    ) -> list[object]:
        """Return one page of raw orders matching the Ransack ``search``, retrying transient failures."""
        params = {
            "search": json.dumps(search, separators=(",", ":")),
            "sort": sort,
            "page": str(page),
            "per_page": str(self.page_size),
        }
        body: list[object] = await self._get_json(customer_id, params, lane)
        return body

    async def fetch_by_ids(
        self, customer_id: int, ids: Sequence[int], *, lane: Lane = Lane.BACKGROUND
    ) -> list[object]:
        """Return the raw orders with the given ids, fetched in batches of ``page_size``."""
        found: list[object] = []
        for start in range(0, len(ids), self.page_size):
            batch = list(ids[start : start + self.page_size])
            search = {"customer_id_eq": customer_id, "id_in": batch}
            found += await self.fetch_page(customer_id, search, sort="id asc", lane=lane)
        return found

    async def walk_changes(
        self, customer_id: int, since: datetime, *, until: datetime | None = None, lane: Lane = Lane.LIVE
    ) -> AsyncGenerator[Page, None]:
        """Yield pages of orders changed at or after ``since`` (and before ``until``), in (updated_at, id) order.

        Keyset paging: every request is page 1 of "key > cursor", so rows updated mid-walk cannot shift
        later rows past us. Such an order moves to a later key and is met again later in this walk (or
        the next cycle) — never skipped. When more than a page of orders share one updated_at, the walk
        drains that instant by id, then resumes strictly after it.
        Assumes updated_at in responses carries the full stored precision (Whiplash sends whole
        milliseconds; the docs' examples show ``.000``).
        """
        ahead = self._prefetch(customer_id, keyset_from(customer_id, since), until, lane)
        try:
            while ahead is not None:
                step = await ahead
                # Fetch the next page while the caller maps and commits this one: both take time per page.
                ahead = self._prefetch(customer_id, step.next, until, lane)
                if step.page is not None:
                    yield step.page
                if step.stalled is not None:
                    raise step.stalled
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, BridgeError):
                    await ahead

    async def step(
        self, customer_id: int, at: Keyset, *, until: datetime | None = None, lane: Lane = Lane.LIVE
    ) -> Step:
        """Read the page after ``at`` (orders changed before ``until``, when given) and say where the walk stands."""
        assert at.query is not None, "the walk is over"
        raw = await self.fetch_page(customer_id, _bounded(at.query.search, until), sort=at.query.sort, lane=lane)
        page = build_page(raw, at.key)
        try:
            query, key = self._next_query(customer_id, at.query, raw, at.key)
        except MalformedPayload as exc:
            return Step(page, Keyset(None, at.key), exc)
        return Step(page, Keyset(query, key), None)

    def _prefetch(
        self, customer_id: int, at: Keyset, until: datetime | None, lane: Lane
    ) -> asyncio.Task[Step] | None:
        """Start reading the page after ``at`` in the background (None when the walk is done)."""
        if at.done:
            return None
        return asyncio.ensure_future(self.step(customer_id, at, until=until, lane=lane))

    def _next_query(
        self, customer_id: int, query: _Query, raw: Sequence[object], key: Key
    ) -> tuple[_Query | None, Key]:
        """Return the request after ``query`` (None when the walk is done) and the advanced key."""
        new_key = max_key(raw, key)
        if len(raw) < self.page_size:
            return (_after_query(customer_id, key) if query.mode == "tie" else None), new_key
        if new_key > key:
            return (_tie_query if query.mode == "tie" else _since_query)(customer_id, new_key), new_key
        if query.mode == "since":
            return _tie_query(customer_id, key), key
        # A full page that cannot move the cursor would be fetched forever; stop the walk loudly.
        where = f"customer={customer_id} mode={query.mode} at={iso(key[0])} id={key[1]}"
        raise MalformedPayload(SERVICE, 200, f"keyset stalled {where}")

    async def _get_once(self, customer_id: int, params: Mapping[str, str], lane: Lane) -> list[object]:
        """Make one GET (plus one retry with a fresh token after a 401) and return the JSON array."""
        used = [await self._tokens.access_token()]
        reply = await self._send(used[0], customer_id, params, lane)
        if reply.status == 401:
            await self._tokens.invalidate(used[0])
            used.append(await self._tokens.access_token())
            reply = await self._send(used[-1], customer_id, params, lane)
        log.debug("whiplash orders customer=%s status=%d bytes=%d", customer_id, reply.status, len(reply.text))
        secrets = (*used, *self._tokens.secrets())
        _raise_for_status(reply, secrets, time.time())
        data = _json_body(reply, secrets)
        if not isinstance(data, list):
            raise MalformedPayload(SERVICE, reply.status, f"expected a JSON array, got a JSON {type(data).__name__}")
        return data

    async def _send(self, token: str, customer_id: int, params: Mapping[str, str], lane: Lane) -> Reply:
        """GET the orders URL as ``customer_id`` with ``token``, in a slot of the shared budget."""
        headers = {
            "Authorization": f"Bearer {token}",
            "X-CUSTOMER-ID": str(customer_id),
            "Accept": "application/json",
            "Accept-Version": "v2",
        }
        secrets = (token, *self._tokens.secrets())
        async with self.budget.slot(lane):
            reply = await exchange(
                self._session, SERVICE, "GET", self._url, secrets=secrets, params=params, headers=headers,
                timeout=self._timeout,
            )
        report_throttle(self.budget, reply, time.time())
        return reply

