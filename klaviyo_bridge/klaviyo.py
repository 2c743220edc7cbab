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
- Bulk requests (event-bulk-create-jobs, profile-bulk-import-jobs) are built within Klaviyo's limits by the
  pure planners here (``plan_chunks``): at most 1,000 events / 10,000 profiles and well under 5 MB per request,
  and never one (profile, metric, unique_id) twice in one event request, which would fail it whole.
- A profile import job is only reported done once Klaviyo says it is ``complete``; its per-profile failures
  are read from ``/import-errors`` and mapped back to the positions of the profiles sent.
- The client never calls the Subscribe endpoints: list membership is not marketing consent, and
  subscribing would also lift suppressions (unsubscribe, spam report) the shopper may have set. The
  bridge only maintains the merchant's 'Whiplash' list and sends order events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import aiohttp
import backoff
from backoff.types import Details
from pydantic import SecretStr
from yarl import URL

from .errors import (
    MalformedPayload,
    TransientUpstream,
    UpstreamError,
)
from .http import Reply, body_reason, error_for, exchange, one_line, retry_after
from .ratelimit import AccountLimiter, Endpoint

log = logging.getLogger(__name__)

SERVICE = "klaviyo"
JSON_API = "application/vnd.api+json"
MAX_LIST_BATCH = 1000  # add_profiles_to_list accepts at most 1000 profiles per call
BODY_EXCERPT = 4000
# A single backoff wait never exceeds this many backoff_base units.
_MAX_WAIT_UNITS = 30.0
_AVAILABLE_IN = re.compile(r"available in (\d+(?:\.\d+)?) seconds?", re.IGNORECASE)
_OPTIONAL_EVENT_KEYS = ("time", "value", "value_currency", "unique_id", "backfill")
MAX_BULK_EVENTS = 1000  # events per event-bulk-create-jobs request
MAX_BULK_PROFILES = 10_000  # profiles per profile-bulk-import-jobs request
MAX_BULK_BYTES = 5 * 1024 * 1024  # per bulk request, measured by Klaviyo after decompression
# Chunks are planned from estimated sizes; this slack keeps the real body under MAX_BULK_BYTES.
BULK_BYTE_BUDGET = int(MAX_BULK_BYTES * 0.9)
EVENT_WRAPPER_BYTES = 256  # generous per-event JSON:API wrapping around a stored payload
PROFILE_WRAPPER_BYTES = 64
IMPORT_ERRORS_PAGE = 100  # page[size] maximum of /import-errors
JOB_DONE = frozenset({"complete", "cancelled"})
_ERROR_INDEX = re.compile(r"^/data/attributes/profiles/data/(\d+)(?:/|$)")

Sleep = Callable[[float], Awaitable[None]]


# --- pure body builders -------------------------------------------------------------------------------


def _event_attributes(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Return an event's attributes without its profile; absent or null optionals are omitted."""
    attributes: dict[str, Any] = {"properties": payload["properties"]}
    for key in _OPTIONAL_EVENT_KEYS:
        if payload.get(key) is not None:
            attributes[key] = payload[key]
    attributes["metric"] = {"data": {"type": "metric", "attributes": {"name": payload["metric"]}}}
    return attributes


def _profile_ref(email: str) -> dict[str, Any]:
    """Return the profile an event belongs to, identified by email only (names come from profile rows)."""
    return {"data": {"type": "profile", "attributes": {"email": email}}}


def event_body(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Build the create-event body from a stored outbox payload; absent or null optionals are omitted."""
    attributes = _event_attributes(payload)
    attributes["profile"] = _profile_ref(payload["email"])
    return {"data": {"type": "event", "attributes": attributes}}


def bulk_events_body(payloads: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Build the bulk create-events body: events grouped per profile (email), groups in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for payload in payloads:
        groups.setdefault(payload["email"], []).append({"type": "event", "attributes": _event_attributes(payload)})
    data = [
        {"type": "event-bulk-create", "attributes": {"profile": _profile_ref(email), "events": {"data": events}}}
        for email, events in groups.items()
    ]
    return {"data": {"type": "event-bulk-create-job", "attributes": {"events-bulk-create": {"data": data}}}}


def profile_import_job_body(profiles: Sequence[Mapping[str, Any]], list_id: str | None) -> dict[str, Any]:
    """Build the bulk profile import body; with ``list_id`` the job also adds every imported profile to it."""
    rows = [{"type": "profile", "attributes": dict(attributes)} for attributes in profiles]
    data: dict[str, Any] = {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": rows}}}
    if list_id is not None:
        data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id}]}}
    return {"data": data}


def plan_chunks(
    sizes: Sequence[int], keys: Sequence[Hashable] | None, *, max_items: int, max_bytes: int = BULK_BYTE_BUDGET
) -> list[list[int]]:
    """Split items (by index, order kept) into chunks of at most ``max_items`` and ``max_bytes``.

    Equal ``keys`` never share a chunk (a repeated unique_id fails a whole bulk event request). An item
    larger than ``max_bytes`` gets a chunk of its own: Klaviyo's verdict on it is what dead-letters it.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0
    seen: set[Hashable] = set()
    for index, size in enumerate(sizes):
        key = keys[index] if keys is not None else index
        if current and (len(current) >= max_items or used + size > max_bytes or key in seen):
            chunks.append(current)
            current, used, seen = [], 0, set()
        current.append(index)
        used += size
        seen.add(key)
    if current:
        chunks.append(current)
    return chunks


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


def filter_any(field: str, values: Sequence[str]) -> str:
    """Return a Klaviyo ``any`` filter whose list items are JSON strings (quotes and backslashes escaped)."""
    # ``any`` with a list is the form get_lists' x-klaviyo-filters declares for ``name``; a single-valued
    # ``equals(name,"…")`` is not declared there, so Klaviyo may refuse it.
    items = ",".join(json.dumps(value, ensure_ascii=False) for value in values)
    return f"any({field},[{items}])"


# --- response classification --------------------------------------------------------------------------


def error_detail(text: str) -> str:
    """Return 'code: detail' of the first JSON:API error, else a one-line description (never an HTML page)."""
    try:
        first = json.loads(text)["errors"][0]
        return one_line(f"{first.get('code', '?')}: {first.get('detail') or first.get('title') or ''}".strip())
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return body_reason(text)


def wait_hint(status: int, headers: Mapping[str, str], detail: str, now: float) -> float | None:
    """Return the server's wait hint: Retry-After (seconds or a date), else a 429's 'available in N seconds'."""
    hint = retry_after(headers.get("Retry-After"), now)
    if hint is None and status == 429:
        match = _AVAILABLE_IN.search(detail)
        hint = float(match.group(1)) if match else None
    return hint


def response_error(
    status: int, headers: Mapping[str, str], text: str, now: float | None = None
) -> UpstreamError | None:
    """Map an HTTP response to the bridge's error tree (the shared table); None for 2xx."""
    detail = error_detail(text)
    wait = wait_hint(status, headers, detail, time.time() if now is None else now)
    return error_for(SERVICE, Reply(status, headers, text), detail, wait=wait, body=text[:BODY_EXCERPT])


def _document(status: int, text: str) -> dict[str, Any]:
    """Parse a 2xx JSON:API document, or raise MalformedPayload."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise MalformedPayload(SERVICE, status, f"not JSON: {body_reason(text)}") from exc
    if not isinstance(doc, dict):
        raise MalformedPayload(SERVICE, status, f"not a JSON:API document: a JSON {type(doc).__name__}")
    return doc


def _list_name(resource: object) -> object:
    """Return ``resource['attributes']['name']``, or None when the resource has no such field."""
    attributes = resource.get("attributes") if isinstance(resource, dict) else None
    return attributes.get("name") if isinstance(attributes, dict) else None


def _resource_id(status: int, resource: object) -> str:
    """Return ``resource['id']`` as a non-empty string, or raise MalformedPayload."""
    rid = resource.get("id") if isinstance(resource, dict) else None
    if not isinstance(rid, str) or not rid:
        raise MalformedPayload(SERVICE, status, f"resource without id ({type(resource).__name__})")
    return rid


# --- bulk profile import jobs: parsed replies ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImportJob:
    """A profile bulk import job as Klaviyo reports it."""

    id: str
    status: str  # queued | processing | complete | cancelled
    total: int
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class ImportFailure:
    """One profile a job could not import: where it was in the request, and Klaviyo's words."""

    index: int | None  # position in the profiles sent, when it could be mapped back
    email: str | None
    detail: str  # "code: detail"
    raw: str  # the import-error resource as JSON, for the dead letter


@dataclass(frozen=True, slots=True)
class ImportOutcome:
    """A finished profile import: the job and its failures (``index`` set when mapped to a profile sent)."""

    job: ImportJob
    failures: tuple[ImportFailure, ...]

    def failed_indexes(self) -> dict[int, ImportFailure]:
        """Return the mapped failures by position in the profiles sent."""
        return {f.index: f for f in self.failures if f.index is not None}

    def unmapped(self) -> list[ImportFailure]:
        """Return failures that could not be tied to a profile sent."""
        return [f for f in self.failures if f.index is None]


def _count(attributes: Mapping[str, Any], key: str) -> int:
    """Return a job counter, 0 when missing or not a number."""
    value = attributes.get(key)
    return value if isinstance(value, int) else 0


def parse_import_job(status: int, text: str) -> ImportJob:
    """Parse a profile-bulk-import-job document, or raise MalformedPayload."""
    resource = _document(status, text).get("data")
    job_id = _resource_id(status, resource)
    attributes = cast(dict[str, Any], resource).get("attributes")
    if not isinstance(attributes, dict) or not isinstance(attributes.get("status"), str):
        raise MalformedPayload(SERVICE, status, "import job without status")
    return ImportJob(
        id=job_id,
        status=attributes["status"],
        total=_count(attributes, "total_count"),
        completed=_count(attributes, "completed_count"),
        failed=_count(attributes, "failed_count"),
    )


def parse_import_error(resource: object) -> ImportFailure:
    """Turn one import-error resource into an ImportFailure (index and email as Klaviyo gave them)."""
    attributes = _obj(_obj(resource).get("attributes"))
    match = _ERROR_INDEX.match(str(_obj(attributes.get("source")).get("pointer") or ""))
    original = attributes.get("original_payload")
    detail = f"{attributes.get('code', '?')}: {attributes.get('detail') or attributes.get('title') or ''}".strip()
    return ImportFailure(
        index=int(match.group(1)) if match else None,
        email=_original_email(original),
        detail=detail,
        raw=json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)[:BODY_EXCERPT],
    )


def _obj(value: object) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object, else an empty one."""
    return cast(dict[str, Any], value) if isinstance(value, dict) else {}


def _original_email(original: object) -> str | None:
    """Return the email of an import error's original payload (a profile resource or bare attributes)."""
    if not isinstance(original, dict):
        return None
    attributes = original.get("attributes", original)
    email = attributes.get("email") if isinstance(attributes, dict) else None
    return email.strip().lower() if isinstance(email, str) else None


def map_failures(
    failures: Sequence[ImportFailure], profiles: Sequence[Mapping[str, Any]]
) -> tuple[ImportFailure, ...]:
    """Tie each failure to the position of the profile it is about: its pointer if the email agrees, else the email."""
    emails = [str(p.get("email", "")).lower() for p in profiles]
    positions = {email: i for i, email in enumerate(emails)}
    return tuple(
        ImportFailure(_position(f, emails, positions), f.email, f.detail, f.raw) for f in failures
    )


def _position(failure: ImportFailure, emails: Sequence[str], positions: Mapping[str, int]) -> int | None:
    """Return the position a failure refers to; the echoed email wins over a pointer that disagrees with it."""
    index = failure.index
    if index is not None and 0 <= index < len(emails) and failure.email in (None, emails[index]):
        return index
    return positions.get(failure.email) if failure.email is not None else None


# --- client -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    """One logical call; retries resend exactly this."""

    endpoint: Endpoint
    method: str
    path: str
    body: bytes | None = None
    params: Mapping[str, str] | None = None


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
        job_poll: tuple[float, float] = (0.05, 10.0),
        job_timeout: float = 900.0,
        sleep: Sleep = asyncio.sleep,
        on_throttled: Callable[[], None] | None = None,
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
        self._job_poll = job_poll  # (first wait, longest wait) between polls of a bulk import job
        self._job_timeout = job_timeout
        self._sleep = sleep
        self._on_throttled = on_throttled  # counts every 429, retried or not (the metrics' throttled counter)

    def __repr__(self) -> str:
        return f"KlaviyoClient(base_url={self._base_url!r}, revision={self._revision!r})"

    async def find_list(self, name: str) -> str | None:
        """Return the id of the first list whose name is exactly ``name``, or None."""
        params: dict[str, str] | None = {"filter": filter_any("name", [name])}
        while params is not None:
            reply = await self._request(_Request(Endpoint.LISTS_READ, "GET", "/api/lists", params=params))
            doc = _document(reply.status, reply.text)
            data = doc.get("data")
            if not isinstance(data, list):
                raise MalformedPayload(SERVICE, reply.status, f"lists without data array: {reply.text[:300]}")
            # The filter should leave only lists of that name, but a list is used only after its own name
            # is checked: adding shoppers to another of the merchant's lists would be worse than a second list.
            found = next((item for item in data if _list_name(item) == name), None)
            if found is not None:
                return _resource_id(reply.status, found)
            params = _next_page(doc)
        return None

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

    async def create_event(self, payload: Mapping[str, Any]) -> None:
        """Send one stored outbox event (its parsed payload); 202 means Klaviyo queued it."""
        body = encode(event_body(payload))
        await self._request(_Request(Endpoint.EVENTS, "POST", "/api/events", body=body))

    async def create_events_bulk(self, payloads: Sequence[Mapping[str, Any]]) -> None:
        """Send up to 1,000 stored event payloads in one bulk request; 202 means Klaviyo queued them all."""
        if not 0 < len(payloads) <= MAX_BULK_EVENTS:
            raise ValueError(f"a bulk event request carries 1 to {MAX_BULK_EVENTS} events, got {len(payloads)}")
        body = encode(bulk_events_body(payloads))
        await self._request(_Request(Endpoint.BULK_EVENTS, "POST", "/api/event-bulk-create-jobs", body=body))

    async def start_profile_import(self, profiles: Sequence[Mapping[str, Any]], list_id: str | None) -> str:
        """Submit a bulk profile import job (adding the profiles to ``list_id``) and return its id."""
        if not 0 < len(profiles) <= MAX_BULK_PROFILES:
            raise ValueError(f"an import job carries 1 to {MAX_BULK_PROFILES} profiles, got {len(profiles)}")
        body = encode(profile_import_job_body(profiles, list_id))
        request = _Request(Endpoint.BULK_PROFILES, "POST", "/api/profile-bulk-import-jobs", body=body)
        reply = await self._request(request)
        return parse_import_job(reply.status, reply.text).id

    async def profile_import_job(self, job_id: str) -> ImportJob:
        """Return the current state of a bulk profile import job."""
        path = f"/api/profile-bulk-import-jobs/{quote(job_id, safe='')}"
        reply = await self._request(_Request(Endpoint.BULK_PROFILES, "GET", path))
        return parse_import_job(reply.status, reply.text)

    async def profile_import_errors(self, job_id: str) -> list[ImportFailure]:
        """Return every import error of a job, following the cursor pages."""
        path = f"/api/profile-bulk-import-jobs/{quote(job_id, safe='')}/import-errors"
        params: dict[str, str] | None = {"page[size]": str(IMPORT_ERRORS_PAGE)}
        failures: list[ImportFailure] = []
        while params is not None:
            reply = await self._request(_Request(Endpoint.BULK_PROFILES, "GET", path, params=params))
            doc = _document(reply.status, reply.text)
            failures.extend(parse_import_error(item) for item in doc.get("data") or [])
            params = _next_page(doc)
        return failures

    async def wait_for_import(self, job_id: str) -> ImportJob:
        """Poll a job until it is complete or cancelled; TransientUpstream if it takes longer than allowed."""
        delay, longest = self._job_poll
        waited = 0.0
        while True:
            await self._sleep(delay)
            waited += delay
            job = await self.profile_import_job(job_id)
            if job.status in JOB_DONE:
                return job
            if waited >= self._job_timeout:
                raise TransientUpstream(SERVICE, None, f"import job {job_id} still {job.status} after {waited:.0f}s")
            delay = min(delay * 2, longest)

    async def import_profiles(self, profiles: Sequence[Mapping[str, Any]], list_id: str | None) -> ImportOutcome:
        """Import profiles in one bulk job, wait for it, and return its per-profile failures.

        A cancelled job raises TransientUpstream: its profiles may or may not be imported, and importing
        them again is a harmless upsert.
        """
        job = await self.wait_for_import(await self.start_profile_import(profiles, list_id))
        if job.status != "complete":
            raise TransientUpstream(SERVICE, None, f"import job {job.id} was {job.status}")
        failures = await self.profile_import_errors(job.id) if job.failed else []
        return ImportOutcome(job, map_failures(failures, profiles))

    async def _create(self, endpoint: Endpoint, path: str, body: Mapping[str, Any]) -> str:
        """POST a JSON:API document and return the id of the resource in the reply."""
        reply = await self._request(_Request(endpoint, "POST", path, body=encode(body)))
        resource = _document(reply.status, reply.text).get("data")
        return _resource_id(reply.status, resource)

    async def _request(self, request: _Request) -> Reply:
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

    async def _attempt(self, request: _Request) -> Reply:
        """Make one paced HTTP attempt and classify its outcome."""
        await self._limiter.acquire(request.endpoint)
        reply = await exchange(
            self._session, SERVICE, request.method, self._base_url + request.path,
            params=request.params, data=request.body, headers=self._headers(write=request.body is not None),
            timeout=self._timeout,
            allow_redirects=False,  # a redirect must never carry the key anywhere else
        )
        self._learn(request.endpoint, reply)
        return reply

    def _learn(self, endpoint: Endpoint, reply: Reply) -> None:
        """Feed the response to the limiter, then raise its mapped error if it is one."""
        if reply.status != 429:
            # 429s carry no RateLimit-* headers; their hint becomes a penalty below.
            self._limiter.observe(endpoint, reply.headers)
        elif self._on_throttled is not None:
            self._on_throttled()
        error = response_error(reply.status, reply.headers, reply.text)
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


def _next_page(doc: Mapping[str, Any]) -> dict[str, str] | None:
    """Return the query of the next page named by ``links.next`` (its cursor), or None on the last page."""
    links = doc.get("links")
    following = links.get("next") if isinstance(links, dict) else None
    if not isinstance(following, str) or not following:
        return None
    query = dict(URL(following).query)
    return query if "page[cursor]" in query else None


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
