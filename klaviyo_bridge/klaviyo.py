"""Narrow async client for the Klaviyo REST API calls the bridge makes into one merchant's account.

Invariants:
- Every request first waits on the account's limiter (``acquire``, again on each retry); every non-429
  response is shown to the limiter (``observe``); a 429 with a retry hint penalizes the endpoint.
- Bodies are serialised once, deterministically (sorted keys, compact), before the first attempt, so a
  retry sends byte-identical bytes; ``unique_id`` in the event body makes repeats idempotent at Klaviyo.
- Remote failures leave this module only as ``errors.UpstreamError`` subclasses; only ``TransientUpstream``
  (429, 5xx, timeouts, connection errors) is retried, and it propagates once retries are exhausted so
  the caller can reschedule the outbox row.
- The private API key exists only in the request headers: never in logs, reprs or exception messages.
- The client never calls the Subscribe endpoints: list membership is not marketing consent, and
  subscribing would also lift suppressions (unsubscribe, spam report) the shopper may have set. The
  bridge only maintains the merchant's 'Whiplash' list and sends order events.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import aiohttp
import backoff
from backoff.types import Details
from pydantic import SecretStr

from klaviyo_bridge.errors import (
    AuthFailed,
    MalformedPayload,
    PermanentUpstream,
    RateLimited,
    TransientUpstream,
    UpstreamError,
)
from klaviyo_bridge.ratelimit import AccountLimiter, Endpoint

log = logging.getLogger(__name__)

SERVICE = "klaviyo"
JSON_API = "application/vnd.api+json"
MAX_LIST_BATCH = 1000  # add_profiles_to_list accepts at most 1000 profiles per call
BODY_EXCERPT = 4000
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504, 524})
# A single backoff wait never exceeds this many backoff_base units.
_MAX_WAIT_UNITS = 30.0
_DETAIL_EXCERPT = 300
_AVAILABLE_IN = re.compile(r"available in (\d+(?:\.\d+)?) seconds?", re.IGNORECASE)
_OPTIONAL_EVENT_KEYS = ("time", "value", "value_currency", "unique_id", "backfill")


# --- pure body builders -------------------------------------------------------------------------------


def event_body(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Build the create-event body from a stored outbox payload; absent or null optionals are omitted."""
    attributes: dict[str, Any] = {"properties": payload["properties"]}
    for key in _OPTIONAL_EVENT_KEYS:
        if payload.get(key) is not None:
            attributes[key] = payload[key]
    attributes["metric"] = {"data": {"type": "metric", "attributes": {"name": payload["metric"]}}}
    attributes["profile"] = {"data": {"type": "profile", "attributes": {"email": payload["email"]}}}
    return {"data": {"type": "event", "attributes": attributes}}


def profile_body(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Build the profile-import (upsert) body."""
    return {"data": {"type": "profile", "attributes": dict(attributes)}}


def list_body(name: str) -> dict[str, Any]:
    """Build the create-list body; the account's default opt-in process applies."""
    return {"data": {"type": "list", "attributes": {"name": name}}}


def list_members_body(profile_ids: Sequence[str]) -> dict[str, Any]:
    """Build the add-profiles-to-list body (Klaviyo profile ids, not emails)."""
    return {"data": [{"type": "profile", "id": pid} for pid in profile_ids]}


def encode(body: Mapping[str, Any]) -> bytes:
    """Serialise a body deterministically so equal bodies are equal bytes."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def filter_equals(field: str, value: str) -> str:
    """Return a Klaviyo ``equals`` filter with the string value quoted and escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'equals({field},"{escaped}")'


# --- response classification --------------------------------------------------------------------------


def error_detail(text: str) -> str:
    """Return 'code: detail' of the first JSON:API error, else a short excerpt of the body."""
    try:
        first = json.loads(text)["errors"][0]
        return f"{first.get('code', '?')}: {first.get('detail') or first.get('title') or ''}".strip()
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return " ".join(text.split())[:_DETAIL_EXCERPT] or "(empty body)"


def retry_after(headers: Mapping[str, str], detail: str) -> float | None:
    """Return the server's wait hint: Retry-After seconds, else 'available in N seconds', else None."""
    raw = headers.get("Retry-After")
    if raw is not None:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0  # an HTTP-date hint; fall through to the body
        if seconds >= 0:
            return seconds
    match = _AVAILABLE_IN.search(detail)
    return float(match.group(1)) if match else None


def response_error(status: int, headers: Mapping[str, str], text: str) -> UpstreamError | None:
    """Map an HTTP response to the bridge's error tree; None for 2xx."""
    if 200 <= status < 300:
        return None
    detail = error_detail(text)
    if status == 429:
        return RateLimited(SERVICE, status, detail, retry_after(headers, detail))
    if status in TRANSIENT_STATUSES or (status >= 500 and status not in (501, 505)):
        # Unlisted 5xx (e.g. CDN 520-523) are gateway hiccups too; 501/505 say "never", so park them.
        return TransientUpstream(SERVICE, status, detail, retry_after(headers, ""))
    if status in (401, 403):
        return AuthFailed(SERVICE, status, detail)
    return PermanentUpstream(SERVICE, status, detail, body=text[:BODY_EXCERPT])


def transport_error(exc: BaseException) -> TransientUpstream:
    """Map a network failure or timeout (no HTTP status) to a retryable error."""
    return TransientUpstream(SERVICE, None, f"{type(exc).__name__}: {exc}".rstrip(": ")[:_DETAIL_EXCERPT])


def _document(status: int, text: str) -> dict[str, Any]:
    """Parse a 2xx JSON:API document, or raise MalformedPayload."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise MalformedPayload(SERVICE, status, f"not JSON: {text[:_DETAIL_EXCERPT]!r}") from exc
    if not isinstance(doc, dict):
        raise MalformedPayload(SERVICE, status, f"not a JSON:API document: {text[:_DETAIL_EXCERPT]!r}")
    return doc


def _resource_id(status: int, resource: object) -> str:
    """Return ``resource['id']`` as a non-empty string, or raise MalformedPayload."""
    rid = resource.get("id") if isinstance(resource, dict) else None
    if not isinstance(rid, str) or not rid:
        raise MalformedPayload(SERVICE, status, f"resource without id: {str(resource)[:_DETAIL_EXCERPT]}")
    return rid


# --- client -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    """One logical call; retries resend exactly this."""

    endpoint: Endpoint
    method: str
    path: str
    body: bytes | None = None
    params: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class _Reply:
    """The parts of a successful response the callers read."""

    status: int
    text: str


class KlaviyoClient:
    """Talk to one merchant's Klaviyo account with its private key, paced by that account's limiter."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        revision: str,
        api_key: SecretStr,
        limiter: AccountLimiter,
        timeout: float = 30,
        max_tries: int = 5,
        max_time: float = 60,
        backoff_base: float = 1.0,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._revision = revision
        self._api_key = api_key
        self._limiter = limiter
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_tries = max_tries
        self._max_time = max_time
        self._backoff_base = backoff_base

    def __repr__(self) -> str:
        return f"KlaviyoClient(base_url={self._base_url!r}, revision={self._revision!r})"

    async def find_list(self, name: str) -> str | None:
        """Return the id of the first list named ``name``, or None."""
        params = {"filter": filter_equals("name", name)}
        reply = await self._request(_Request(Endpoint.LISTS_READ, "GET", "/api/lists", params=params))
        data = _document(reply.status, reply.text).get("data")
        if not isinstance(data, list):
            raise MalformedPayload(SERVICE, reply.status, f"lists without data array: {reply.text[:300]}")
        return _resource_id(reply.status, data[0]) if data else None

    async def create_list(self, name: str) -> str:
        """Create a list named ``name`` and return its id (lists are not unique by name)."""
        return await self._create(Endpoint.LISTS_CREATE, "/api/lists", list_body(name))

    async def ensure_list(self, name: str) -> str:
        """Return the id of the list named ``name``, creating it if missing (callers lock per account)."""
        found = await self.find_list(name)
        return found if found is not None else await self.create_list(name)

    async def import_profile(self, attributes: Mapping[str, Any]) -> str:
        """Create or update a profile and return its Klaviyo id."""
        return await self._create(Endpoint.PROFILE_IMPORT, "/api/profile-import", profile_body(attributes))

    async def add_to_list(self, list_id: str, profile_ids: Sequence[str]) -> None:
        """Add profiles (by Klaviyo id) to a list, at most 1000 per request."""
        path = f"/api/lists/{quote(list_id, safe='')}/relationships/profiles"
        for start in range(0, len(profile_ids), MAX_LIST_BATCH):
            chunk = profile_ids[start : start + MAX_LIST_BATCH]
            body = encode(list_members_body(chunk))
            await self._request(_Request(Endpoint.LIST_ADD, "POST", path, body=body))

    async def create_event(self, payload_json: str) -> None:
        """Send one stored outbox event; 202 means Klaviyo queued it."""
        body = encode(event_body(json.loads(payload_json)))
        await self._request(_Request(Endpoint.EVENTS, "POST", "/api/events", body=body))

    async def _create(self, endpoint: Endpoint, path: str, body: Mapping[str, Any]) -> str:
        """POST a JSON:API document and return the id of the resource in the reply."""
        reply = await self._request(_Request(endpoint, "POST", path, body=encode(body)))
        resource = _document(reply.status, reply.text).get("data")
        return _resource_id(reply.status, resource)

    async def _request(self, request: _Request) -> _Reply:
        """Send ``request``, retrying transient failures with full-jitter exponential backoff."""
        # A server wait hint (Retry-After) is not handled here: _attempt turns it into a limiter penalty,
        # an absolute deadline for the whole endpoint of this account that every caller's acquire()
        # honours, including our own next attempt. So the effective delay is max(jitter, hint), not
        # their sum, other coroutines stop hammering the throttled endpoint too, and backoff's clamp
        # of a wait to the remaining max_time cannot cut the hint short.
        retrying = backoff.on_exception(
            backoff.expo,
            TransientUpstream,
            max_tries=self._max_tries,
            max_time=self._max_time,
            jitter=backoff.full_jitter,
            giveup=self._hint_exceeds_budget,
            on_backoff=_log_retry,
            on_giveup=_log_giveup,
            logger=None,
            factor=self._backoff_base,
            max_value=self._backoff_base * _MAX_WAIT_UNITS,
        )
        return await retrying(self._attempt)(request)

    def _hint_exceeds_budget(self, exc: Exception) -> bool:
        """Give up at once when the server asks us to wait longer than the whole retry budget."""
        # E.g. the 150/day cap on list creation: holding the caller for hours helps nobody; it
        # reschedules, and the penalty keeps this account's endpoint quiet meanwhile.
        hint = getattr(exc, "retry_after", None)
        return hint is not None and hint > self._max_time

    async def _attempt(self, request: _Request) -> _Reply:
        """Make one paced HTTP attempt and classify its outcome."""
        await self._limiter.acquire(request.endpoint)
        try:
            async with self._session.request(
                request.method,
                self._base_url + request.path,
                params=request.params,
                data=request.body,
                headers=self._headers(write=request.body is not None),
                timeout=self._timeout,
                allow_redirects=False,  # a redirect must never carry the key anywhere else
            ) as response:
                raw = await response.read()
                status, headers = response.status, response.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise transport_error(exc) from exc
        text = raw.decode("utf-8", errors="replace")
        self._learn(request.endpoint, status, headers, text)
        return _Reply(status, text)

    def _learn(self, endpoint: Endpoint, status: int, headers: Mapping[str, str], text: str) -> None:
        """Feed the response to the limiter, then raise its mapped error if it is one."""
        if status != 429:
            # 429s carry no RateLimit-* headers; their hint becomes a penalty below.
            self._limiter.observe(endpoint, headers)
        error = response_error(status, headers, text)
        if error is None:
            return
        if isinstance(error, TransientUpstream) and error.retry_after is not None:
            self._limiter.penalize(endpoint, error.retry_after)
        raise error

    def _headers(self, *, write: bool) -> dict[str, str]:
        """Return the request headers; the only place the key is revealed."""
        headers = {
            "Authorization": f"Klaviyo-API-Key {self._api_key.get_secret_value()}",
            "revision": self._revision,
            "Accept": JSON_API,
        }
        if write:
            headers["Content-Type"] = JSON_API
        return headers


def _log_retry(details: Details) -> None:
    """Record a retry at DEBUG (the exception text never holds the key)."""
    info = cast(Mapping[str, Any], details)
    request = info["args"][0]
    log.debug(
        "klaviyo retry endpoint=%s try=%d wait=%.3f error=%s",
        request.endpoint.name, info["tries"], info.get("wait", 0.0), info.get("exception"),
    )


def _log_giveup(details: Details) -> None:
    """Record the end of retrying at DEBUG; the caller decides how loud the failure is."""
    info = cast(Mapping[str, Any], details)
    request = info["args"][0]
    log.debug(
        "klaviyo giving up endpoint=%s tries=%d elapsed=%.3f error=%s",
        request.endpoint.name, info["tries"], info["elapsed"], info.get("exception"),
    )
