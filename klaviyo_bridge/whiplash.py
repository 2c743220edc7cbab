"""Whiplash API v2 orders client: one orders page, orders by id, and the keyset walk over changed orders.

Signing in and reading Whiplash's replies (tokens, error details, the status table) is ``whiplash_auth``'s.
Invariants:
- Every response body is checked before use: a page is a JSON array or ``MalformedPayload`` is raised.
- Transient failures (408/429/5xx/network/timeouts) are retried within ``RETRY_BUDGET_S`` and leave as
  ``TransientUpstream`` once retries are spent; a 401 is answered by one fresh token, then ``AuthFailed``.
- ``walk_changes`` yields each order changed at or after ``since`` (and before ``until``, when given) at
  least once, in (updated_at, id) order, and terminates: it never loops on a page that cannot advance the
  cursor. ``step`` is one page of the same walk, for callers that run several walks side by side.
- Every request first takes a slot of the process's one ``WhiplashBudget`` (the token manager's), and every 429
  is reported to it: the limit belongs to the OAuth application, not to a customer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import aiohttp
import backoff
from backoff.types import Details

from .budget import Lane
from .config import WhiplashSettings
from .errors import BridgeError, MalformedOrder, MalformedPayload, TransientUpstream
from .http import Reply, exchange
from .orders import Order, order_key, parse_order
from .whiplash_auth import SERVICE, TokenManager, TokenVault, json_body, raise_for_status, report_throttle

# Re-exported for the store, which imports the record type from here until its own split (branch
# split-store) moves that import to whiplash_auth, where the record now lives.

log = logging.getLogger(__name__)

ORDER_SORT = "updated_at asc,id asc"
# How long one page may keep retrying transient failures; the daemon's watchdog window builds on it.
RETRY_BUDGET_S = 120.0
Key = tuple[datetime, int]


@dataclass(frozen=True, slots=True)
class Page:
    """The fresh orders of one fetched page, in server order, plus how far the cursor may move."""

    orders: tuple[Order, ...]
    malformed: tuple[MalformedOrder, ...]
    last_key: Key | None  # key of the last fresh object whose key is readable
    safe_key: Key | None  # key of the last good order before the first malformed one


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
        tokens = TokenManager.from_settings(settings, session, vault)
        w = settings
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
        raise_for_status(reply, secrets, time.time())
        data = json_body(reply, secrets)
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

