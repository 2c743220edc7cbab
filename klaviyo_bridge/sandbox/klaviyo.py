"""Stateful simulated Klaviyo REST API (aiohttp.web) for integration tests, the demo and benchmarks.

It models the real API as described in shared/reference/klaviyo-api.md and Klaviyo's OpenAPI spec. It was
written without reading the bridge's own client, so the two can disagree and tests can catch that.

Invariants:
- Each account is identified by its private key. All state (profiles, lists, metrics, events, jobs, counters,
  rate-limit windows) belongs to one account and changes only synchronously inside one handler, so concurrent
  requests never see each other half-done.
- Every API request goes through one pipeline in a fixed order: injected faults, authentication and scopes,
  rate limits (fixed windows of 1 s, 60 s and a day, aligned to the clock), revision header, media type,
  payload size, JSON, OpenAPI schema, then the endpoint's semantic checks. Every response after
  authentication except a 429 carries RateLimit-* headers for the steady window.
- A ``filter`` parameter is accepted only in the forms the operation's ``x-klaviyo-filters`` declare (the
  spec's, or the hand-written copy without it; see ``filters``); any other form is a recorded 400 whose
  source is the ``filter`` parameter.
- A 400 ``detail`` never quotes an email address (an invalid one is "Invalid email address."; one echoed by a
  schema message is masked as ``<email>``), so neither the bridge's log of ``code: detail`` nor ours holds one.
- Every 400/410/415 the client causes is recorded as a ``Rejection``. Rejections caused by injected rules are
  only counted, so ``fake.rejections == []`` means "the client sent only valid requests".
- Profiles are found by lower-cased email, phone number, external id or anonymous id, through an index that
  is updated with every attribute change; no two profiles share an identifier.
- Events are deduplicated on (profile, metric, unique_id), or on the event time to the second when there is no
  unique_id; the first one wins, later ones are counted in ``duplicate_events``.
- The control API under /__sim/ needs no key and is never faulted or rate limited.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import random
import re
import signal
import string
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._server import quiet_disconnects, serve_app
from .control import CONTROL_PREFIX, ControlRoute, index_handler, index_route, model_fields
from .filters import Condition, FilterError, parse_filter, parse_rfc3339
from .openapi import BodyChecker, Problem, SpecChecker, default_spec_path, make_checker

log = logging.getLogger(__name__)

JSONAPI = "application/vnd.api+json"
MAX_PAYLOAD = 5 * 1024 * 1024
MAX_PROFILE_PAYLOAD = 100 * 1024
MAX_BULK_EVENTS = 1000
MAX_BULK_PROFILES = 10_000
MAX_LIST_MEMBERS = 1000
MAX_EVENT_PROPERTIES = 400
MAX_STRING_BYTES = 100 * 1024
MAX_ARRAY_ITEMS = 4000
MAX_NESTING = 10
MAX_METRIC_NAME = 128
MAX_PAGE_SIZE = 10
IDENTIFIERS = ("email", "phone_number", "external_id", "anonymous_id")
_TEXT_FIELDS = (*IDENTIFIERS, "first_name", "last_name", "organization", "locale", "title", "image")
_MEDIA_TYPES = ("application/vnd.api+json", "application/json")
_THROTTLE_DOCS = "https://developers.klaviyo.com/en/docs/rate_limits_and_error_handling#rate-limits"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_EMAIL_IN_TEXT = re.compile(r"""[^\s'"<>()\[\]{},;:@]+@[^\s'"<>()\[\]{},;:]*""")
_REVISION = re.compile(r"^(\d{4}-\d{2}-\d{2})(\.[A-Za-z0-9]+)?$")
_AUTH = re.compile(r"^Klaviyo-API-Key\s+(\S+)$")
_EARLIEST_EVENT = datetime(1990, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------- endpoints and their published limits


@dataclass(frozen=True)
class Limits:
    """Request caps of one endpoint per account: per second, per minute and optionally per day."""

    burst: int
    steady: int
    daily: int | None = None

    def scaled(self, factor: float) -> Limits:
        """Return these caps multiplied by ``factor``, never below one request."""

        def scale(cap: int) -> int:
            return max(1, math.floor(cap * factor))

        return Limits(
            scale(self.burst), scale(self.steady), None if self.daily is None else scale(self.daily)
        )


_XL = Limits(350, 3500)
_L = Limits(75, 750)
_M = Limits(10, 150)


@dataclass(frozen=True)
class Operation:
    """One simulated endpoint: its operationId, route, rate limits, scopes and maximum body size."""

    op_id: str
    method: str
    path: str
    limits: Limits
    scopes: tuple[str, ...]
    max_body: int = MAX_PAYLOAD


OPERATIONS: tuple[Operation, ...] = (
    Operation("create_event", "POST", "/api/events", _XL, ("events:write",)),
    Operation("bulk_create_events", "POST", "/api/event-bulk-create-jobs", _M, ("events:write",)),
    Operation(
        "create_or_update_profile",
        "POST",
        "/api/profile-import",
        _L,
        ("profiles:write",),
        MAX_PROFILE_PAYLOAD,
    ),
    Operation(
        "bulk_import_profiles", "POST", "/api/profile-bulk-import-jobs", _M, ("lists:write", "profiles:write")
    ),
    Operation(
        "get_bulk_import_profiles_job",
        "GET",
        "/api/profile-bulk-import-jobs/{job_id}",
        _M,
        ("lists:read", "profiles:read"),
    ),
    Operation(
        "get_errors_for_bulk_import_profiles_job",
        "GET",
        "/api/profile-bulk-import-jobs/{id}/import-errors",
        _M,
        ("profiles:read",),
    ),
    Operation("get_lists", "GET", "/api/lists", _L, ("lists:read",)),
    Operation("get_list", "GET", "/api/lists/{id}", _L, ("lists:read",)),
    Operation("create_list", "POST", "/api/lists", Limits(10, 150, 150), ("lists:write",)),
    Operation(
        "add_profiles_to_list",
        "POST",
        "/api/lists/{id}/relationships/profiles",
        _M,
        ("lists:write", "profiles:write"),
    ),
)


# ---------------------------------------------------------------- errors


def error_body(
    status: int,
    code: str,
    title: str,
    detail: str,
    source: Mapping[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build Klaviyo's error envelope ``{"errors": [{id, status, code, title, detail, source, ...}]}``."""
    error = {"id": str(uuid.uuid4()), "status": status, "code": code, "title": title, "detail": detail}
    error["source"] = dict(source) if source is not None else {"pointer": "/data"}
    return {"errors": [{**error, **extra}]}


class ApiError(Exception):
    """A Klaviyo error response; raised anywhere in the pipeline and rendered by it."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        *,
        source: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        recorded: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.title, self.detail = status, code, title, detail
        self.source = dict(source) if source is not None else {"pointer": "/data"}
        self.headers = dict(headers or {})
        self.recorded = recorded
        self.extra = extra

    @property
    def where(self) -> str:
        """Return the JSON pointer or parameter name the error points at."""
        return self.source.get("pointer") or self.source.get("parameter") or ""

    def response(self) -> web.Response:
        """Render this error as a JSON:API response."""
        body = error_body(self.status, self.code, self.title, self.detail, self.source, **self.extra)
        return web.json_response(body, status=self.status, headers=self.headers, content_type=JSONAPI)


def invalid(detail: str, pointer: str = "/data", *, parameter: str | None = None) -> ApiError:
    """Return the 400 ``invalid`` error Klaviyo gives for a bad body or parameter, with any email masked."""
    source = {"parameter": parameter} if parameter is not None else {"pointer": pointer}
    return ApiError(400, "invalid", "Invalid input.", masked_emails(detail), source=source, recorded=True)


def masked_emails(text: str) -> str:
    """Replace anything shaped like an email address (e.g. echoed by a schema message) with ``<email>``."""
    # The bridge logs Klaviyo's ``code: detail``; a shopper's address must not reach its logs (or ours)
    # through a message that merely quotes the refused value.
    return _EMAIL_IN_TEXT.sub("<email>", text)


def not_found(detail: str) -> ApiError:
    """Return a 404 ``not_found`` error."""
    return ApiError(404, "not_found", "Not found.", detail, source={"parameter": "id"})


def not_authenticated() -> ApiError:
    """Return the 401 Klaviyo sends for a missing, unknown or revoked private key."""
    detail = "Missing or invalid authorization scheme. Please use Klaviyo-API-Key."
    return ApiError(401, "not_authenticated", "Authentication credentials were not provided.", detail)


def throttled(retry_after: int) -> ApiError:
    """Return the 429 Klaviyo sends when a rate-limit window is full."""
    unit = "second" if retry_after == 1 else "seconds"
    detail = f"Request was throttled. Expected available in {retry_after} {unit}."
    headers = {"Retry-After": str(retry_after)}
    links = {"type": _THROTTLE_DOCS}
    return ApiError(429, "throttled", "Request was throttled.", detail, headers=headers, links=links, meta={})


def _duplicate_profile(existing_id: str) -> ApiError:
    """Return the 409 for identifiers that belong to two different profiles."""
    detail = "A profile already exists with one of these identifiers."
    meta = {"duplicate_profile_id": existing_id}
    return ApiError(
        409, "duplicate_profile", "Conflict.", detail, source={"pointer": "/data/attributes"}, meta=meta
    )


_FAULT_CODES: Mapping[int, tuple[str, str]] = {
    500: ("error", "A server error occurred."),
    502: ("bad_gateway", "Bad gateway."),
    503: ("service_unavailable", "Service unavailable."),
    504: ("gateway_timeout", "Gateway timeout."),
}
_HTTP_CODES: Mapping[int, str] = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def injected_error(status: int, retry_after: int = 1) -> ApiError:
    """Return the error an injected failure with ``status`` answers with."""
    if status == 429:
        return throttled(retry_after)
    if status == 409:  # what profile-import answers when the identifiers sent belong to two profiles
        return _duplicate_profile("01INJECTEDDUPLICATEPR0F1LE")
    code, title = _FAULT_CODES.get(status, ("error", "Injected failure."))
    return ApiError(status, code, title, f"Simulated failure (HTTP {status}).")


# ---------------------------------------------------------------- state model


def _iso(moment: datetime | None) -> str | None:
    """Render a datetime the way Klaviyo does (seconds, explicit offset)."""
    return None if moment is None else moment.isoformat(timespec="seconds")


def _normalized(key: str, value: Any) -> Any:
    """Return an attribute value as stored: emails trimmed and lower-cased, everything else as sent."""
    if key == "email" and isinstance(value, str):
        return value.strip().lower()
    return value


def _merged(current: dict[str, Any] | None, update: Any) -> dict[str, Any] | None:
    """Merge an object attribute: null clears it, keys sent replace, keys left out are kept."""
    if update is None:
        return None
    return {**(current or {}), **update}


@dataclass
class Profile:
    """A Klaviyo profile; string attributes are None when unset."""

    id: str
    created: datetime
    updated: datetime
    email: str | None = None
    phone_number: str | None = None
    external_id: str | None = None
    anonymous_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    organization: str | None = None
    locale: str | None = None
    title: str | None = None
    image: str | None = None
    location: dict[str, Any] | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    last_event_date: datetime | None = None

    def identifiers(self) -> list[tuple[str, str]]:
        """Return the (identifier, value) pairs that find this profile."""
        pairs = [(key, getattr(self, key)) for key in IDENTIFIERS]
        return [(key, value) for key, value in pairs if value is not None]

    def apply(self, attrs: Mapping[str, Any], when: datetime) -> None:
        """Apply sent attributes: omitted ones stay, null clears, objects merge key by key."""
        for key, value in attrs.items():
            if key in _TEXT_FIELDS:
                setattr(self, key, _normalized(key, value))
            elif key == "location":
                self.location = _merged(self.location, value)
            elif key == "properties":
                self.properties = _merged(self.properties, value) or {}
        self.updated = when

    def resource(self, origin: str) -> dict[str, Any]:
        """Render the profile as a JSON:API resource object."""
        text = {key: getattr(self, key) for key in _TEXT_FIELDS if key != "anonymous_id"}
        stamps = {"created": _iso(self.created), "updated": _iso(self.updated)}
        attributes = {**text, **stamps, "last_event_date": _iso(self.last_event_date)}
        attributes |= {"location": self.location, "properties": self.properties}
        links = {"self": f"{origin}/api/profiles/{self.id}"}
        return {"type": "profile", "id": self.id, "attributes": attributes, "links": links}


@dataclass
class KlaviyoList:
    """A list and its members (profile id -> time added, in insertion order)."""

    id: str
    name: str
    opt_in_process: str
    created: datetime
    updated: datetime
    members: dict[str, datetime] = field(default_factory=dict)

    @property
    def member_ids(self) -> list[str]:
        """Return the member profile ids in the order they were added."""
        return list(self.members)

    def resource(self, origin: str, fields: frozenset[str] | None = None) -> dict[str, Any]:
        """Render the list as a JSON:API resource object, optionally with a sparse fieldset."""
        attributes = {
            "name": self.name,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "opt_in_process": self.opt_in_process,
        }
        if fields is not None:
            attributes = {key: value for key, value in attributes.items() if key in fields}
        return {
            "type": "list",
            "id": self.id,
            "attributes": attributes,
            "links": {"self": f"{origin}/api/lists/{self.id}"},
        }

    def snapshot(self) -> dict[str, Any]:
        """Return the list as plain data for the state dump."""
        return {**self.resource("")["attributes"], "id": self.id, "member_ids": self.member_ids}


@dataclass(frozen=True)
class Metric:
    """A metric, created by the first event that names it."""

    id: str
    name: str
    created: datetime


@dataclass(frozen=True)
class EventIn:
    """One submitted event after validation; what rejection rules are given to judge."""

    metric: str
    profile_id: str | None
    profile: Mapping[str, Any]
    properties: Mapping[str, Any]
    time: datetime | None
    value: float | None
    value_currency: str | None
    unique_id: str | None
    backfill: bool

    @property
    def email(self) -> str | None:
        """Return the profile email as it will be stored (lower-cased), if one was sent."""
        email = self.profile.get("email")
        return _normalized("email", email) if isinstance(email, str) else None


@dataclass(frozen=True)
class RecordedEvent:
    """An event Klaviyo kept (i.e. not dropped as a duplicate)."""

    id: str
    metric: str
    profile_id: str
    email: str | None
    unique_id: str | None
    time: datetime
    value: float | None
    value_currency: str | None
    properties: Mapping[str, Any]
    backfill: bool
    received: datetime


@dataclass(frozen=True)
class ImportErrorRow:
    """One profile of a bulk import job that could not be imported."""

    id: str
    code: str
    title: str
    detail: str
    pointer: str
    original_payload: Mapping[str, Any]

    def resource(self) -> dict[str, Any]:
        """Render the error as an import-error resource object."""
        attributes = {
            "code": self.code,
            "title": self.title,
            "detail": self.detail,
            "source": {"pointer": self.pointer},
            "original_payload": self.original_payload,
        }
        return {"type": "import-error", "id": self.id, "attributes": attributes}


@dataclass
class ImportJob:
    """A profile bulk import job; it is processed in one go once ``due`` (epoch seconds) has passed."""

    id: str
    created_at: datetime
    due: float
    rows: list[dict[str, Any]] = field(repr=False)
    list_ids: list[str]
    status: Literal["queued", "processing", "complete", "cancelled"] = "queued"
    started_at: datetime | None = None
    completed_at: datetime | None = None
    profile_ids: list[str] = field(default_factory=list)
    errors: list[ImportErrorRow] = field(default_factory=list)

    @property
    def total_count(self) -> int:
        """Return how many profiles the job was given."""
        return len(self.rows)

    def resource(self, origin: str) -> dict[str, Any]:
        """Render the job as a profile-bulk-import-job resource object."""
        attributes = {
            "status": self.status,
            "created_at": _iso(self.created_at),
            "total_count": self.total_count,
            "completed_count": len(self.profile_ids),
            "failed_count": len(self.errors),
            "completed_at": _iso(self.completed_at),
            "expires_at": _iso(self.created_at + timedelta(days=30)),
            "started_at": _iso(self.started_at),
        }
        lists = {"data": [{"type": "list", "id": list_id} for list_id in self.list_ids]}
        links = {"self": f"{origin}/api/profile-bulk-import-jobs/{self.id}"}
        job = {"type": "profile-bulk-import-job", "id": self.id, "attributes": attributes}
        return {**job, "relationships": {"lists": lists}, "links": links}

    def snapshot(self) -> dict[str, Any]:
        """Return the job as plain data for the state dump (without the submitted rows)."""
        errors = [asdict(error) for error in self.errors]
        return {**self.resource("")["attributes"], "id": self.id, "list_ids": self.list_ids, "errors": errors}


@dataclass(frozen=True)
class EventBulkJob:
    """An accepted event-bulk-create-job (Klaviyo exposes no status endpoint for these)."""

    id: str
    created_at: datetime
    event_count: int


@dataclass(frozen=True)
class Rejection:
    """A request the simulator refused as invalid: request path, JSON pointer (or parameter) and why."""

    path: str
    pointer: str
    message: str


@dataclass
class Counters:
    """Per-account request accounting."""

    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    throttled: int = 0
    unauthorized: int = 0
    forbidden: int = 0
    injected_rejections: int = 0
    rejections: list[Rejection] = field(default_factory=list)

    def snapshot(self) -> dict[str, Any]:
        """Return the counters as plain data (``asdict`` would mangle the Counter fields)."""
        return {
            "requests": dict(self.requests),
            "statuses": dict(self.statuses),
            "throttled": self.throttled,
            "unauthorized": self.unauthorized,
            "forbidden": self.forbidden,
            "injected_rejections": self.injected_rejections,
            "rejections": [asdict(rejection) for rejection in self.rejections],
        }


class _Ids:
    """Make Klaviyo-shaped ids: 26-char ULID-like (profiles, jobs) or 6-char (lists, metrics)."""

    _CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    _SHORT = string.ascii_letters + string.digits

    def __init__(self, seed: int | None) -> None:
        self._rng = random.Random(seed)

    def long(self) -> str:
        """Return a new ULID-like id."""
        return "01" + "".join(self._rng.choices(self._CROCKFORD, k=24))

    def short(self) -> str:
        """Return a new six-character id."""
        return "".join(self._rng.choices(self._SHORT, k=6))


ProfileScreen = Callable[[Mapping[str, Any]], bool]


@dataclass(eq=False)
class Account:
    """One Klaviyo account (one merchant): its key, data and counters."""

    label: str
    api_key: str = field(repr=False)
    ids: _Ids = field(repr=False)
    scopes: frozenset[str] | None = None
    revoked: bool = False
    profiles: dict[str, Profile] = field(default_factory=dict)
    lists: dict[str, KlaviyoList] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    events: list[RecordedEvent] = field(default_factory=list)
    received_event_requests: int = 0
    duplicate_events: int = 0
    # unique_id -> raw bodies of every valid POST /api/events carrying it, in arrival order (retries included)
    event_bodies: dict[str, list[bytes]] = field(default_factory=dict, repr=False)
    import_jobs: dict[str, ImportJob] = field(default_factory=dict)
    event_jobs: list[EventBulkJob] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    _index: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    _seen_events: set[tuple[str, str, str]] = field(default_factory=set, repr=False)

    # -- queries

    def profile_by_email(self, email: str) -> Profile | None:
        """Return the profile with this email (case-insensitive), if any."""
        profile_id = self._index.get(("email", _normalized("email", email)))
        return None if profile_id is None else self.profiles[profile_id]

    def list_named(self, name: str) -> KlaviyoList | None:
        """Return the oldest list with this exact name, if any."""
        return next((klist for klist in self.lists.values() if klist.name == name), None)

    def events_for(self, metric: str) -> list[RecordedEvent]:
        """Return the recorded events of one metric, oldest first."""
        return [event for event in self.events if event.metric == metric]

    def keep_event_body(self, body: Any, raw: bytes) -> None:
        """Keep the raw bytes of a create-event request under its unique_id, so retries can be compared."""
        unique_id = body["data"]["attributes"].get("unique_id")
        if isinstance(unique_id, str):
            self.event_bodies.setdefault(unique_id, []).append(raw)

    # -- profiles

    def upsert_profile(
        self, profile_id: str | None, attrs: Mapping[str, Any], when: datetime, *, strict: bool
    ) -> tuple[Profile, bool]:
        """Create or update the profile the identifiers point at; return it and whether it is new.

        ``strict`` (profile import) turns an unknown id into 404 and identifiers of two different profiles
        into 409; otherwise (events) the first match wins and the conflicting identifiers are not applied.
        """
        matches = self._matching_ids(profile_id, attrs, strict=strict)
        if len(matches) > 1:
            if strict:
                raise _duplicate_profile(matches[1])
            attrs = {key: value for key, value in attrs.items() if key not in IDENTIFIERS}
        created = not matches
        profile = self._new_profile(when) if created else self.profiles[matches[0]]
        self._apply(profile, attrs, when)
        return profile, created

    def _matching_ids(self, profile_id: str | None, attrs: Mapping[str, Any], *, strict: bool) -> list[str]:
        """Return the distinct existing profiles named by the id and identifiers, id first."""
        found: list[str] = []
        if profile_id is not None and profile_id in self.profiles:
            found.append(profile_id)
        elif profile_id is not None and strict:
            raise not_found(f"A profile with id {profile_id} does not exist.")
        for key in IDENTIFIERS:
            value = attrs.get(key)
            match = self._index.get((key, _normalized(key, value))) if isinstance(value, str) else None
            if match is not None and match not in found:
                found.append(match)
        return found

    def _new_profile(self, when: datetime) -> Profile:
        """Create an empty profile."""
        profile = Profile(id=self.ids.long(), created=when, updated=when)
        self.profiles[profile.id] = profile
        return profile

    def _apply(self, profile: Profile, attrs: Mapping[str, Any], when: datetime) -> None:
        """Apply attributes and keep the identifier index in step."""
        for pair in profile.identifiers():
            self._index.pop(pair, None)
        profile.apply(attrs, when)
        for pair in profile.identifiers():
            self._index[pair] = profile.id

    # -- events

    def record_event(self, event: EventIn, when: datetime) -> RecordedEvent | None:
        """Apply the event's profile attributes and keep the event unless it duplicates an earlier one."""
        self.received_event_requests += 1
        profile, _ = self.upsert_profile(event.profile_id, event.profile, when, strict=False)
        metric = self._metric(event.metric, when)
        moment = (event.time or when).astimezone(UTC).replace(microsecond=0)
        tag = f"unique_id:{event.unique_id}" if event.unique_id is not None else f"time:{moment.isoformat()}"
        key = (profile.id, metric.name, tag)
        if key in self._seen_events:
            self.duplicate_events += 1
            return None
        self._seen_events.add(key)
        recorded = RecordedEvent(
            id=self.ids.long(), metric=metric.name, profile_id=profile.id, email=profile.email,
            unique_id=event.unique_id, time=moment, value=event.value, value_currency=event.value_currency,
            properties=dict(event.properties), backfill=event.backfill, received=when,
        )  # fmt: skip
        self.events.append(recorded)
        profile.last_event_date = max(profile.last_event_date or moment, moment)
        return recorded

    def _metric(self, name: str, when: datetime) -> Metric:
        """Return the metric called ``name``, creating it on first use."""
        if name not in self.metrics:
            self.metrics[name] = Metric(id=self.ids.short(), name=name, created=when)
        return self.metrics[name]

    # -- lists

    def create_list(self, name: str, opt_in_process: str, when: datetime) -> KlaviyoList:
        """Create a list; names are not unique, as in Klaviyo."""
        klist = KlaviyoList(
            id=self.ids.short(), name=name, opt_in_process=opt_in_process, created=when, updated=when
        )
        self.lists[klist.id] = klist
        return klist

    def add_members(self, klist: KlaviyoList, profile_ids: Sequence[str], when: datetime) -> None:
        """Add profiles to a list; profiles already on it keep their original time added."""
        for profile_id in profile_ids:
            klist.members.setdefault(profile_id, when)

    # -- bulk profile import jobs

    def create_import_job(
        self, rows: list[dict[str, Any]], list_ids: list[str], when: datetime, due: float
    ) -> ImportJob:
        """Queue a profile import job that becomes processable at ``due``."""
        job = ImportJob(id=self.ids.long(), created_at=when, due=due, rows=rows, list_ids=list_ids)
        self.import_jobs[job.id] = job
        return job

    def settle_jobs(self, now: float, rejects: ProfileScreen) -> None:
        """Process every queued import job whose time has come."""
        for job in self.import_jobs.values():
            if job.status == "queued" and job.due <= now:
                self._run_import(job, datetime.fromtimestamp(now, UTC), rejects)

    def _run_import(self, job: ImportJob, when: datetime, rejects: ProfileScreen) -> None:
        """Upsert every row, note failures per row, then add the imported profiles to the job's lists."""
        job.status, job.started_at = "processing", when
        for index, row in enumerate(job.rows):
            self._import_row(job, index, row, when, rejects)
        for list_id in job.list_ids:
            if list_id in self.lists:
                self.add_members(self.lists[list_id], job.profile_ids, when)
        job.status, job.completed_at = "complete", when

    def _import_row(
        self, job: ImportJob, index: int, row: dict[str, Any], when: datetime, rejects: ProfileScreen
    ) -> None:
        """Import one row or record why it failed."""
        pointer = f"/data/attributes/profiles/data/{index}"
        try:
            profile_id, attrs = parse_profile_ref(row, pointer)
            if rejects(attrs):
                raise ApiError(400, "invalid", "Invalid input.", "Profile rejected by simulator rule.")
            profile, _ = self.upsert_profile(profile_id, attrs, when, strict=True)
        except ApiError as exc:
            row_error = ImportErrorRow(self.ids.long(), exc.code, exc.title, exc.detail, pointer, row)
            job.errors.append(row_error)
            return
        job.profile_ids.append(profile.id)

    def snapshot(self) -> dict[str, Any]:
        """Return the account's state as JSON-ready data (the key itself is never included)."""
        return {
            "label": self.label,
            "revoked": self.revoked,
            "profiles": [asdict(profile) for profile in self.profiles.values()],
            "lists": [klist.snapshot() for klist in self.lists.values()],
            "metrics": [asdict(metric) for metric in self.metrics.values()],
            "events": [asdict(event) for event in self.events],
            "received_event_requests": self.received_event_requests,
            "duplicate_events": self.duplicate_events,
            "import_jobs": [job.snapshot() for job in self.import_jobs.values()],
            "event_jobs": [asdict(job) for job in self.event_jobs],
            "counters": self.counters.snapshot(),
        }


# ---------------------------------------------------------------- semantic checks the schema cannot express


def parse_profile_ref(data: Mapping[str, Any], pointer: str) -> tuple[str | None, dict[str, Any]]:
    """Return (id, attributes) of a profile resource object; require an identifier and a plausible email."""
    attrs = dict(data.get("attributes") or {})
    profile_id = data.get("id")
    if profile_id is None and not any(attrs.get(key) for key in IDENTIFIERS):
        raise invalid("One or more identifiers is required", f"{pointer}/attributes")
    email = attrs.get("email")
    if isinstance(email, str) and not _EMAIL.match(email.strip()):
        raise invalid("Invalid email address.", f"{pointer}/attributes/email")  # never echoes the address
    return profile_id, attrs


def parse_event(
    attrs: Mapping[str, Any],
    pointer: str,
    profile: tuple[str | None, dict[str, Any]],
    when: datetime,
    default_backfill: bool = False,
) -> EventIn:
    """Turn validated event attributes into an EventIn, enforcing name, time and property limits."""
    name = attrs["metric"]["data"]["attributes"]["name"]
    if not name or len(name) >= MAX_METRIC_NAME:
        raise invalid("Metric name must be 1 to 127 characters.", f"{pointer}/metric/data/attributes/name")
    _check_properties(attrs["properties"], f"{pointer}/properties")
    backfill = attrs.get("backfill")
    return EventIn(
        metric=name,
        profile_id=profile[0],
        profile=profile[1],
        properties=attrs["properties"],
        time=parse_event_time(attrs.get("time"), f"{pointer}/time", when),
        value=attrs.get("value"),
        value_currency=attrs.get("value_currency"),
        unique_id=attrs.get("unique_id"),
        backfill=default_backfill if backfill is None else bool(backfill),
    )


def parse_event_time(raw: Any, pointer: str, when: datetime) -> datetime | None:
    """Parse an event time: RFC 3339 with an offset, after 1990 and at most a year after ``when``."""
    if raw is None:
        return None
    moment = parse_rfc3339(raw)
    if moment is None:
        raise invalid(f"{raw!r} is not an RFC 3339 date-time with an offset", pointer)
    if moment < _EARLIEST_EVENT or moment > when + timedelta(days=365):
        raise invalid(f"Event time {raw} must be after 1990 and at most one year in the future", pointer)
    return moment


def _check_properties(properties: Mapping[str, Any], pointer: str) -> None:
    """Enforce Klaviyo's event property limits (count, string size, array size, nesting)."""
    if len(properties) > MAX_EVENT_PROPERTIES:
        raise invalid(f"Events may have at most {MAX_EVENT_PROPERTIES} properties", pointer)
    problem = _oversized(properties, pointer, depth=1)
    if problem is not None:
        raise invalid(problem.message, problem.pointer)


def _oversized(value: Any, pointer: str, depth: int) -> Problem | None:
    """Return the first limit a property value breaks, walking containers depth-first."""
    if isinstance(value, str):
        too_long = len(value.encode()) > MAX_STRING_BYTES
        return Problem(pointer, "Strings may be at most 100 KB") if too_long else None
    if not isinstance(value, dict | list):
        return None
    if depth > MAX_NESTING:
        return Problem(pointer, f"Properties may nest at most {MAX_NESTING} levels")
    if isinstance(value, list) and len(value) > MAX_ARRAY_ITEMS:
        return Problem(pointer, f"Arrays may have at most {MAX_ARRAY_ITEMS} items")
    children = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in children:
        problem = _oversized(child, f"{pointer}/{key}", depth + 1)
        if problem is not None:
            return problem
    return None


def _profile_identity(profile: tuple[str | None, Mapping[str, Any]]) -> str:
    """Return a key naming the profile an event refers to, for duplicate detection inside one request."""
    profile_id, attrs = profile
    if profile_id is not None:
        return f"id:{profile_id}"
    key = next(key for key in IDENTIFIERS if attrs.get(key))
    return f"{key}:{_normalized(key, attrs[key])}"


def check_revision(raw: str | None, today: date) -> None:
    """Require a ``revision`` header of the form YYYY-MM-DD[.suffix] that is not yet retired (2 years)."""
    match = _REVISION.match(raw.strip()) if raw is not None else None
    if match is None:
        detail = f"Invalid or missing revision header {raw!r}; expected YYYY-MM-DD[.suffix]."
        raise invalid(detail, parameter="revision")
    try:
        released = date.fromisoformat(match.group(1))
    except ValueError:
        raise invalid(f"Invalid revision date {raw!r}.", parameter="revision") from None
    if (released.year + 2, released.month, released.day) < (today.year, today.month, today.day):
        detail = f"Revision {raw} has been retired; use a newer revision."
        raise ApiError(410, "gone", "Gone.", detail, source={"parameter": "revision"}, recorded=True)


def check_media_type(content_type: str) -> None:
    """Require a JSON:API or JSON body on writes, as Klaviyo answers anything else with 415."""
    if content_type not in _MEDIA_TYPES:
        detail = f'Unsupported media type "{content_type}" in request.'
        raise ApiError(415, "unsupported_media_type", "Unsupported media type.", detail, recorded=True)


def parse_json(raw: bytes) -> Any:
    """Parse a request body as JSON or raise the 400 Klaviyo gives for malformed payloads."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise invalid(f"The payload provided in the request is invalid: {exc}") from None


# ---------------------------------------------------------------- GET /api/lists paging


def parse_page_size(raw: str | None) -> int:
    """Return ``page[size]`` (default and maximum 10) or raise 400."""
    if raw is None:
        return MAX_PAGE_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise invalid(f"page[size] must be an integer from 1 to {MAX_PAGE_SIZE}", parameter="page[size]")
    return int(raw)


def encode_cursor(offset: int) -> str:
    """Return the opaque cursor for a page starting at ``offset``."""
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def decode_cursor(raw: str | None) -> int:
    """Return the offset a ``page[cursor]`` points at, or raise 400 for a cursor we did not issue."""
    if raw is None:
        return 0
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        prefix, _, offset = text.partition(":")
        if prefix == "offset" and offset.isdigit():
            return int(offset)
    except ValueError:
        pass
    raise invalid("Invalid page[cursor]", parameter="page[cursor]")


# ---------------------------------------------------------------- rate limiting

_WINDOW_SECONDS: tuple[float, float, float] = (1.0, 60.0, 86_400.0)
_STEADY = _WINDOW_SECONDS[1]


def _window_start(length: float, now: float) -> float:
    """Return the start of the clock-aligned fixed window of ``length`` seconds containing ``now``."""
    return math.floor(now / length) * length


def _until_reset(length: float, now: float) -> int:
    """Return whole seconds (at least 1) until that window resets."""
    return max(1, math.ceil(_window_start(length, now) + length - now))


@dataclass(frozen=True)
class Verdict:
    """The limiter's answer: throttled (``retry_after`` set) or admitted, with steady-window numbers."""

    limit: int
    remaining: int
    reset: int
    retry_after: int | None = None

    def stamp(self, headers: MutableMapping[str, str]) -> None:
        """Add the RateLimit-* headers Klaviyo puts on every non-429 response."""
        headers["RateLimit-Limit"] = str(self.limit)
        headers["RateLimit-Remaining"] = str(self.remaining)
        headers["RateLimit-Reset"] = str(self.reset)


class RateLimiter:
    """Klaviyo's per-account, per-endpoint fixed windows (burst 1 s, steady 60 s, optional daily cap)."""

    def __init__(
        self, *, enabled: bool = True, scale: float = 1.0, overrides: Mapping[str, Limits] | None = None
    ) -> None:
        self.enabled = enabled
        self.scale = scale
        self.overrides: dict[str, Limits] = dict(overrides or {})
        self._windows: dict[tuple[str, str, float], tuple[float, int]] = {}

    def limits_for(self, op: Operation) -> Limits:
        """Return the caps in force for an operation (override, else published caps times ``scale``)."""
        return self.overrides.get(op.op_id) or op.limits.scaled(self.scale)

    def admit(self, scope: str, op: Operation, now: float) -> Verdict:
        """Count a request against every window, or refuse it if any window is full (when enabled)."""
        limits = self.limits_for(op)
        caps = [
            (length, cap)
            for length, cap in zip(_WINDOW_SECONDS, (limits.burst, limits.steady, limits.daily), strict=True)
            if cap is not None
        ]
        waits = [
            _until_reset(length, now) for length, cap in caps if self._used(scope, op, length, now) >= cap
        ]
        if self.enabled and waits:
            return Verdict(limits.steady, 0, _until_reset(_STEADY, now), retry_after=max(waits))
        for length, _ in caps:
            self._windows[(scope, op.op_id, length)] = (
                _window_start(length, now),
                self._used(scope, op, length, now) + 1,
            )
        remaining = max(0, limits.steady - self._used(scope, op, _STEADY, now))
        return Verdict(limits.steady, remaining, _until_reset(_STEADY, now))

    def _used(self, scope: str, op: Operation, length: float, now: float) -> int:
        """Return how many requests the current window has admitted."""
        start, count = self._windows.get((scope, op.op_id, length), (math.nan, 0))
        return count if start == _window_start(length, now) else 0


# ---------------------------------------------------------------- fault injection


@dataclass
class _Countdown:
    """A fault that fires for the next ``remaining`` requests whose path starts with ``path_prefix``."""

    remaining: int
    path_prefix: str | None

    def take(self, path: str) -> bool:
        """Consume one firing if this fault applies to ``path``."""
        if self.remaining <= 0 or not path.startswith(self.path_prefix or ""):
            return False
        self.remaining -= 1
        return True


@dataclass
class _Failure(_Countdown):
    status: int = 503
    retry_after: int = 1
    account: str | None = None  # label of the only account it applies to; None: any request


@dataclass
class _Reset(_Countdown):
    after_processing: bool = False


EventScreen = Callable[[EventIn], bool]


class EventMatch(BaseModel):
    """Match events on every given field; usable with ``reject_event_if`` and over the control API."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str | None = Field(None, description="metric name")
    unique_id: str | None = None
    unique_id_prefix: str | None = None
    email: str | None = Field(None, description="profile email, compared lower-cased")
    properties: dict[str, Any] | None = Field(None, description="each given property must be equal")

    def __call__(self, event: EventIn) -> bool:
        """Return whether ``event`` matches."""
        checks = (
            self.metric is None or event.metric == self.metric,
            self.unique_id is None or event.unique_id == self.unique_id,
            self.unique_id_prefix is None or (event.unique_id or "").startswith(self.unique_id_prefix),
            self.email is None or event.email == _normalized("email", self.email),
            all(event.properties.get(key) == value for key, value in (self.properties or {}).items()),
        )
        return all(checks)


class ProfileMatch(BaseModel):
    """Match profile attributes on every given field; usable with ``reject_profile_if``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    email: str | None = Field(None, description="compared lower-cased")
    attributes: dict[str, Any] | None = Field(None, description="each given profile attribute must be equal")

    def __call__(self, attrs: Mapping[str, Any]) -> bool:
        """Return whether the submitted profile attributes match."""
        email = _normalized("email", attrs.get("email"))
        if self.email is not None and email != _normalized("email", self.email):
            return False
        return all(attrs.get(key) == value for key, value in (self.attributes or {}).items())


class Faults:
    """Failures to inject into API requests (never into the control API)."""

    def __init__(self) -> None:
        self.failures: list[_Failure] = []
        self.resets: list[_Reset] = []
        self.delay_seconds = 0.0
        self.delay_prefix: str | None = None
        self.event_rules: list[EventScreen] = []
        self.profile_rules: list[ProfileScreen] = []
        self.fired: Counter[str] = Counter()

    def take_failure(self, path: str, account: str | None = None) -> _Failure | None:
        """Return the failure to answer this request (of ``account``, by label) with, if one is pending."""
        applies = (rule for rule in self.failures if rule.account in (None, account))
        failure = next((rule for rule in applies if rule.take(path)), None)
        if failure is not None:
            self.fired[f"status_{failure.status}"] += 1
        return failure

    def take_reset(self, path: str, *, after_processing: bool) -> bool:
        """Return whether this request's connection should be cut at this point."""
        rules = (rule for rule in self.resets if rule.after_processing == after_processing)
        fired = any(rule.take(path) for rule in rules)
        if fired:
            self.fired["reset_after" if after_processing else "reset_before"] += 1
        return fired

    def delay_for(self, path: str) -> float:
        """Return how long to stall this request."""
        return self.delay_seconds if path.startswith(self.delay_prefix or "") else 0.0

    def rejects_event(self, event: EventIn) -> bool:
        """Return whether a rejection rule refuses this event."""
        return any(rule(event) for rule in self.event_rules)

    def rejects_profile(self, attrs: Mapping[str, Any]) -> bool:
        """Return whether a rejection rule refuses these profile attributes."""
        return any(rule(attrs) for rule in self.profile_rules)

    def snapshot(self) -> dict[str, Any]:
        """Return pending faults and how often each kind fired."""
        return {
            "failures": [asdict(rule) for rule in self.failures if rule.remaining > 0],
            "resets": [asdict(rule) for rule in self.resets if rule.remaining > 0],
            "delay_seconds": self.delay_seconds,
            "event_rules": len(self.event_rules),
            "profile_rules": len(self.profile_rules),
            "fired": dict(self.fired),
        }


# ---------------------------------------------------------------- control API payloads


_PREFIX_TEXT = "only requests whose path starts with this"


class _AccountIn(BaseModel):
    api_key: str = Field(description="the private key its requests carry")
    label: str | None = Field(None, description="its name in /__sim/state (default account-N)")
    scopes: list[str] | None = Field(None, description="granted scopes, e.g. lists:read (default: all)")


class _KeyIn(BaseModel):
    api_key: str = Field(description="the account's private key")


class _FailNextIn(BaseModel):
    n: int = Field(1, description="how many requests")
    status: int = Field(503, description="status to answer; 429 carries Retry-After, 409 is duplicate_profile")
    path_prefix: str | None = Field(None, description=_PREFIX_TEXT)
    retry_after: int = Field(1, description="seconds, for 429")
    account: str | None = Field(None, description="only requests of the account with this label")


class _DelayIn(BaseModel):
    seconds: float = Field(description="how long to stall each request (0 turns the delay off)")
    path_prefix: str | None = Field(None, description=_PREFIX_TEXT)


class _ResetIn(BaseModel):
    n: int = Field(1, description="how many requests")
    after_processing: bool = Field(False, description="cut after the request took effect, not before")
    path_prefix: str | None = Field(None, description=_PREFIX_TEXT)


class _LimitsIn(BaseModel):
    enabled: bool | None = Field(None, description="switch rate limiting on or off")
    scale: float | None = Field(None, description="multiply every published limit, e.g. 0.1")


class _NothingIn(BaseModel):
    pass


@dataclass(frozen=True)
class _Action:
    """A control action: its JSON argument model, what it does (for ``GET /__sim/``) and how to run it."""

    model: type[BaseModel]
    description: str
    run: Callable[[Any], object]


# ---------------------------------------------------------------- the simulator


@dataclass(frozen=True)
class Call:
    """What an endpoint implementation gets: the request, its account, its validated body and the time."""

    request: web.Request
    account: Account
    body: Any
    now: float

    @property
    def when(self) -> datetime:
        """Return the request time as an aware UTC datetime."""
        return datetime.fromtimestamp(self.now, UTC)

    @property
    def origin(self) -> str:
        """Return scheme://host:port as the client addressed us, for ``links``."""
        return str(self.request.url.origin())


Impl = Callable[[Call], web.Response]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeKlaviyo:
    """A stateful, fault-injectable model of Klaviyo's REST API holding several accounts."""

    def __init__(
        self,
        *,
        spec_path: Path | Literal["auto"] | None = "auto",
        limits_enabled: bool = True,
        limits_scale: float = 1.0,
        limit_overrides: Mapping[str, Limits] | None = None,
        job_delay: float = 0.0,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        path = default_spec_path() if spec_path == "auto" else spec_path
        self.checker: BodyChecker = make_checker(path)
        self.limiter = RateLimiter(enabled=limits_enabled, scale=limits_scale, overrides=limit_overrides)
        self.faults = Faults()
        self.job_delay = job_delay
        self.unknown_key_requests = 0
        self._clock = clock
        self._ids = _Ids(seed)
        self._accounts: dict[str, Account] = {}
        self._app: web.Application | None = None

    @property
    def spec_validation(self) -> bool:
        """Return whether bodies are checked against the OpenAPI spec (else by hand rules)."""
        return isinstance(self.checker, SpecChecker)

    # -- accounts

    def add_account(
        self, api_key: str, label: str | None = None, scopes: Sequence[str] | None = None
    ) -> Account:
        """Create an account reachable with ``api_key``; ``scopes=None`` grants every scope."""
        label = label or f"account-{len(self._accounts) + 1}"
        if api_key in self._accounts or any(acct.label == label for acct in self._accounts.values()):
            raise ValueError(f"duplicate account label={label} or key")
        granted = None if scopes is None else frozenset(scopes)
        account = Account(label=label, api_key=api_key, ids=self._ids, scopes=granted)
        self._accounts[api_key] = account
        return account

    @property
    def accounts(self) -> list[Account]:
        """Return every account in creation order."""
        return list(self._accounts.values())

    def account(self, label: str) -> Account:
        """Return the account with this label."""
        return next(acct for acct in self._accounts.values() if acct.label == label)

    def revoke(self, api_key: str) -> None:
        """Make ``api_key`` answer 401 from now on."""
        self._accounts[api_key].revoked = True

    def restore(self, api_key: str) -> None:
        """Accept a revoked key again."""
        self._accounts[api_key].revoked = False

    @property
    def rejections(self) -> list[Rejection]:
        """Return every invalid-request rejection across accounts."""
        return [rejection for acct in self._accounts.values() for rejection in acct.counters.rejections]

    # -- faults

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        path_prefix: str | None = None,
        retry_after: int = 1,
        account: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching API requests (of the account labelled ``account``, if given) with
        ``status`` before looking at them."""
        self.faults.failures.append(_Failure(n, path_prefix, status, retry_after, account))

    def delay(self, seconds: float, path_prefix: str | None = None) -> None:
        """Stall every matching API request by ``seconds`` (0 turns the delay off)."""
        self.faults.delay_seconds, self.faults.delay_prefix = seconds, path_prefix

    def reset_connections(
        self, n: int = 1, *, after_processing: bool = False, path_prefix: str | None = None
    ) -> None:
        """Abort the TCP connection of the next ``n`` matching requests, before or after they took effect."""
        self.faults.resets.append(_Reset(n, path_prefix, after_processing))

    def reject_event_if(self, predicate: EventScreen) -> None:
        """Refuse (400) any event the predicate matches; a bulk request with one such event fails whole."""
        self.faults.event_rules.append(predicate)

    def reject_profile_if(self, predicate: ProfileScreen) -> None:
        """Refuse profile imports the predicate matches (400, or an import error row in bulk jobs)."""
        self.faults.profile_rules.append(predicate)

    def clear_faults(self) -> None:
        """Drop every pending failure, reset, delay and rejection rule."""
        self.faults = Faults()

    # -- state

    def settle(self) -> None:
        """Process every import job that is due, as the next request would."""
        now = self._clock()
        for account in self._accounts.values():
            account.settle_jobs(now, self.faults.rejects_profile)

    def snapshot(self) -> dict[str, Any]:
        """Return accounts (keyed by label, never by key), counters and faults as JSON-ready data."""
        self.settle()
        return {
            "accounts": {acct.label: acct.snapshot() for acct in self._accounts.values()},
            "unknown_key_requests": self.unknown_key_requests,
            "spec_validation": self.spec_validation,
            "limits": {"enabled": self.limiter.enabled, "scale": self.limiter.scale},
            "faults": self.faults.snapshot(),
        }

    # -- application

    @property
    def app(self) -> web.Application:
        """Return this simulator's application (built once; use ``make_app`` for a fresh one)."""
        if self._app is None:
            self._app = self.make_app()
        return self._app

    def make_app(self) -> web.Application:
        """Build a new aiohttp application serving the API and the /__sim/ control API over this state."""
        middlewares = [quiet_disconnects, _http_errors_as_envelopes]
        app = web.Application(middlewares=middlewares, client_max_size=2 * MAX_PAYLOAD)
        impls = self._impls()
        for op in OPERATIONS:
            app.router.add_route(op.method, op.path, self._endpoint(op, impls[op.op_id]))
        self._add_control_routes(app)
        return app

    def _add_control_routes(self, app: web.Application) -> None:
        """Mount the /__sim/ control API (no key, never faulted or limited); ``GET /__sim/`` lists it."""
        app.router.add_get(CONTROL_PREFIX, index_handler("Klaviyo", self.control_routes))
        app.router.add_get(f"{CONTROL_PREFIX}state", self._ctl_state)
        app.router.add_post(f"{CONTROL_PREFIX}accounts", self._ctl_add_account)
        for name, action in self._ctl_actions().items():
            app.router.add_post(CONTROL_PREFIX + name, self._ctl_action(action))

    def _impls(self) -> dict[str, Impl]:
        """Map operation ids to their implementations."""
        return {
            "create_event": self._create_event,
            "bulk_create_events": self._bulk_create_events,
            "create_or_update_profile": self._profile_import,
            "bulk_import_profiles": self._bulk_import_profiles,
            "get_bulk_import_profiles_job": self._get_import_job,
            "get_errors_for_bulk_import_profiles_job": self._get_import_errors,
            "get_lists": self._get_lists,
            "get_list": self._get_list,
            "create_list": self._create_list,
            "add_profiles_to_list": self._add_profiles_to_list,
        }

    def _endpoint(self, op: Operation, impl: Impl) -> Handler:
        """Wrap an implementation in the request pipeline."""

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(op, impl, request)

        return handle

    # -- pipeline

    async def _serve(self, op: Operation, impl: Impl, request: web.Request) -> web.StreamResponse:
        """Run one API request through faults, auth, rate limits, checks and the endpoint."""
        early = await self._inject_before(request)
        if early is not None:
            return early
        try:
            account = self._authenticate(request, op)
        except ApiError as exc:
            return exc.response()
        now = self._clock()
        account.settle_jobs(now, self.faults.rejects_profile)
        account.counters.requests[op.op_id] += 1
        verdict = self.limiter.admit(account.label, op, now)
        if verdict.retry_after is not None:
            account.counters.throttled += 1
            return throttled(verdict.retry_after).response()
        response = await self._run(op, impl, request, account, now)
        verdict.stamp(response.headers)
        account.counters.statuses[response.status] += 1
        if self.faults.take_reset(request.path, after_processing=True):
            return _abort(request)
        return response

    async def _inject_before(self, request: web.Request) -> web.StreamResponse | None:
        """Apply delay, connection reset or injected failure, in that order."""
        pause = self.faults.delay_for(request.path)
        if pause > 0:
            await asyncio.sleep(pause)
        if self.faults.take_reset(request.path, after_processing=False):
            return _abort(request)
        failure = self.faults.take_failure(request.path, self._label_of(request))
        return None if failure is None else injected_error(failure.status, failure.retry_after).response()

    def _label_of(self, request: web.Request) -> str | None:
        """Return the label of the account whose key the request carries, if it is one we know."""
        match = _AUTH.match(request.headers.get("Authorization", "").strip())
        account = self._accounts.get(match.group(1)) if match else None
        return None if account is None else account.label

    def _authenticate(self, request: web.Request, op: Operation) -> Account:
        """Return the account of the request's private key, or raise 401/403."""
        match = _AUTH.match(request.headers.get("Authorization", "").strip())
        account = self._accounts.get(match.group(1)) if match else None
        if account is None:
            self.unknown_key_requests += 1
            raise not_authenticated()
        if account.revoked:
            account.counters.unauthorized += 1
            raise not_authenticated()
        if account.scopes is not None and not account.scopes.issuperset(op.scopes):
            account.counters.forbidden += 1
            detail = f"This API key is missing required scopes: {', '.join(op.scopes)}."
            raise ApiError(
                403, "permission_denied", "You do not have permission to perform this action.", detail
            )
        return account

    async def _run(
        self, op: Operation, impl: Impl, request: web.Request, account: Account, now: float
    ) -> web.Response:
        """Check revision and body, then run the endpoint; render (and record) any ApiError."""
        try:
            check_revision(request.headers.get("revision"), datetime.fromtimestamp(now, UTC).date())
            body = await self._read_body(op, request)
            if op.op_id == "create_event":
                account.keep_event_body(body, await request.read())
            return impl(Call(request, account, body, now))
        except ApiError as exc:
            if exc.recorded:
                account.counters.rejections.append(Rejection(request.path, exc.where, exc.detail))
                log.info(
                    "sim rejected account=%s path=%s where=%s detail=%s",
                    account.label,
                    request.path,
                    exc.where,
                    exc.detail,
                )
            return exc.response()

    async def _read_body(self, op: Operation, request: web.Request) -> Any:
        """Return the validated JSON body of a write (None for reads)."""
        if op.method != "POST":
            return None
        check_media_type(request.content_type)
        raw = await request.read()
        if len(raw) > op.max_body:
            raise invalid(f"Payload exceeds the maximum size of {op.max_body} bytes.")
        body = parse_json(raw)
        problem = self.checker.check(op.op_id, body)
        if problem is not None:
            raise invalid(problem.message, problem.pointer)
        return body

    def _screen_event(self, account: Account, event: EventIn, pointer: str) -> None:
        """Raise the injected 400 if a rejection rule matches the event."""
        if self.faults.rejects_event(event):
            account.counters.injected_rejections += 1
            raise ApiError(
                400,
                "invalid",
                "Invalid input.",
                "Event rejected by simulator rule.",
                source={"pointer": pointer},
            )

    # -- endpoints: events

    def _create_event(self, call: Call) -> web.Response:
        """POST /api/events: upsert the profile, create the metric, keep the event unless duplicate; 202."""
        attrs = call.body["data"]["attributes"]
        profile = parse_profile_ref(attrs["profile"]["data"], "/data/attributes/profile/data")
        event = parse_event(attrs, "/data/attributes", profile, call.when)
        self._screen_event(call.account, event, "/data")
        call.account.record_event(event, call.when)
        return web.Response(status=202)

    def _bulk_create_events(self, call: Call) -> web.Response:
        """POST /api/event-bulk-create-jobs: all-or-nothing validation, then record each event; 202."""
        groups = call.body["data"]["attributes"]["events-bulk-create"]["data"]
        total = sum(len(group["attributes"]["events"]["data"]) for group in groups)
        if total > MAX_BULK_EVENTS:
            raise invalid(f"A request may contain at most {MAX_BULK_EVENTS} events; got {total}.")
        events = [
            event
            for index, group in enumerate(groups)
            for event in _group_events(group, f"/data/attributes/events-bulk-create/data/{index}", call.when)
        ]
        _reject_repeated_unique_ids(events)
        for event in events:
            self._screen_event(call.account, event, "/data")
        for event in events:
            call.account.record_event(event, call.when)
        call.account.event_jobs.append(EventBulkJob(self._ids.long(), call.when, len(events)))
        return web.Response(status=202)

    # -- endpoints: profiles

    def _profile_import(self, call: Call) -> web.Response:
        """POST /api/profile-import: upsert; 201 when created, 200 when updated, 409 on split identity."""
        profile_id, attrs = parse_profile_ref(call.body["data"], "/data")
        if self.faults.rejects_profile(attrs):
            call.account.counters.injected_rejections += 1
            raise ApiError(400, "invalid", "Invalid input.", "Profile rejected by simulator rule.")
        profile, created = call.account.upsert_profile(profile_id, attrs, call.when, strict=True)
        return _jsonapi({"data": profile.resource(call.origin)}, 201 if created else 200)

    def _bulk_import_profiles(self, call: Call) -> web.Response:
        """POST /api/profile-bulk-import-jobs: queue an upsert job (optionally adding to lists); 202."""
        data = call.body["data"]
        rows = data["attributes"]["profiles"]["data"]
        if len(rows) > MAX_BULK_PROFILES:
            raise invalid(f"A job may contain at most {MAX_BULK_PROFILES} profiles; got {len(rows)}.")
        _check_row_sizes(rows)
        list_ids = _job_list_ids(data)
        for index, list_id in enumerate(list_ids):
            if list_id not in call.account.lists:
                raise invalid(f"List {list_id} does not exist.", f"/data/relationships/lists/data/{index}/id")
        job = call.account.create_import_job(rows, list_ids, call.when, call.now + self.job_delay)
        response = _jsonapi({"data": job.resource(call.origin)}, 202)
        call.account.settle_jobs(call.now, self.faults.rejects_profile)
        return response

    def _get_import_job(self, call: Call) -> web.Response:
        """GET /api/profile-bulk-import-jobs/{job_id}: the job and its counts."""
        job = self._job(call, "job_id")
        return _jsonapi({"data": job.resource(call.origin)})

    def _get_import_errors(self, call: Call) -> web.Response:
        """GET /api/profile-bulk-import-jobs/{id}/import-errors: one import-error per failed row."""
        job = self._job(call, "id")
        links = {"self": str(call.request.url), "next": None, "prev": None}
        return _jsonapi({"data": [error.resource() for error in job.errors], "links": links})

    def _job(self, call: Call, param: str) -> ImportJob:
        """Return the job named in the URL or raise 404."""
        job = call.account.import_jobs.get(call.request.match_info[param])
        if job is None:
            raise not_found(
                f"A profile bulk import job with id {call.request.match_info[param]} does not exist."
            )
        return job

    # -- endpoints: lists

    def _get_lists(self, call: Call) -> web.Response:
        """GET /api/lists: filtered, cursor-paged (≤10) list objects."""
        query = call.request.query
        conditions = self._filter(call, "get_lists")
        size, offset = parse_page_size(query.get("page[size]")), decode_cursor(query.get("page[cursor]"))
        chosen = [
            klist
            for klist in call.account.lists.values()
            if all(condition.matches(getattr(klist, condition.field, None)) for condition in conditions)
        ]
        fields = frozenset(query["fields[list]"].split(",")) if "fields[list]" in query else None
        data = [klist.resource(call.origin, fields) for klist in chosen[offset : offset + size]]
        return _jsonapi({"data": data, "links": _page_links(call.request, offset, size, len(chosen))})

    def _filter(self, call: Call, op_id: str) -> list[Condition]:
        """Parse the ``filter`` parameter in the forms the operation declares, or raise Klaviyo's 400."""
        try:
            return parse_filter(call.request.query.get("filter"), self.checker.filters.get(op_id, {}))
        except FilterError as exc:
            raise invalid(str(exc), parameter="filter") from None

    def _get_list(self, call: Call) -> web.Response:
        """GET /api/lists/{id}: one list."""
        return _jsonapi({"data": self._list(call).resource(call.origin)})

    def _create_list(self, call: Call) -> web.Response:
        """POST /api/lists: create a list (opt-in defaults to the account's double opt-in); 201."""
        attrs = call.body["data"]["attributes"]
        name = attrs["name"]
        if not name.strip():
            raise invalid("List name may not be blank.", "/data/attributes/name")
        klist = call.account.create_list(name, attrs.get("opt_in_process") or "double_opt_in", call.when)
        return _jsonapi({"data": klist.resource(call.origin)}, 201)

    def _add_profiles_to_list(self, call: Call) -> web.Response:
        """POST /api/lists/{id}/relationships/profiles: add existing profiles by id (≤1000); 204."""
        klist = self._list(call)
        profile_ids = [item["id"] for item in call.body["data"]]
        if len(profile_ids) > MAX_LIST_MEMBERS:
            raise invalid(
                f"At most {MAX_LIST_MEMBERS} profiles may be added per request; got {len(profile_ids)}."
            )
        for index, profile_id in enumerate(profile_ids):
            if profile_id not in call.account.profiles:
                raise invalid(f"Profile {profile_id} does not exist.", f"/data/{index}/id")
        call.account.add_members(klist, profile_ids, call.when)
        return web.Response(status=204)

    def _list(self, call: Call) -> KlaviyoList:
        """Return the list named in the URL or raise 404."""
        klist = call.account.lists.get(call.request.match_info["id"])
        if klist is None:
            raise not_found(f"A list with id {call.request.match_info['id']} does not exist.")
        return klist

    # -- control API (/__sim/)

    async def _ctl_state(self, request: web.Request) -> web.Response:
        """GET /__sim/state: the whole simulator state as JSON."""
        return web.json_response(self.snapshot(), dumps=_dumps)

    async def _ctl_add_account(self, request: web.Request) -> web.Response:
        """POST /__sim/accounts {api_key, label?, scopes?}: add an account at runtime."""
        try:
            payload = _AccountIn.model_validate(await _control_json(request))
            account = self.add_account(payload.api_key, payload.label, payload.scopes)
        except (ValidationError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"label": account.label}, status=201)

    def _ctl_action(self, action: _Action) -> Handler:
        """Return the handler of ``POST /__sim/<action>``: validate its JSON arguments, then run it."""

        async def handle(request: web.Request) -> web.Response:
            try:
                action.run(action.model.model_validate(await _control_json(request)))
            except (ValidationError, KeyError, ValueError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
            return web.json_response({"ok": True})

        return handle

    def _ctl_actions(self) -> dict[str, _Action]:
        """Map control action names to their argument model, description and runner."""
        return {
            "revoke": _Action(_KeyIn, "make api_key answer 401 until restored", lambda a: self.revoke(a.api_key)),
            "restore": _Action(_KeyIn, "accept a revoked api_key again", lambda a: self.restore(a.api_key)),
            "fail_next": _Action(
                _FailNextIn, "answer the next n matching API requests with an error, before looking at them",
                lambda a: self.fail_next(**a.model_dump()),
            ),
            "delay": _Action(
                _DelayIn, "stall every matching API request by seconds", lambda a: self.delay(**a.model_dump())
            ),
            "reset_connections": _Action(
                _ResetIn, "drop the TCP connection of the next n matching API requests",
                lambda a: self.reset_connections(**a.model_dump()),
            ),
            "reject_events": _Action(
                EventMatch, "refuse (400) every event matching all given fields; a bulk request with one fails whole",
                self.reject_event_if,
            ),
            "reject_profiles": _Action(
                ProfileMatch, "refuse profile imports matching all given fields (400, or an import-error row)",
                self.reject_profile_if,
            ),
            "limits": _Action(_LimitsIn, "switch rate limiting on/off or rescale it", self._set_limits),
            "clear_faults": _Action(
                _NothingIn, "drop every pending failure, reset, delay and rejection rule",
                lambda _a: self.clear_faults(),
            ),
        }

    def control_routes(self) -> list[ControlRoute]:
        """Return the documentation of every /__sim/ route, as ``GET /__sim/`` serves it."""
        state = "every account (by label, never by key): profiles, lists, metrics, events, jobs, counters; faults"
        fixed = [
            index_route("Klaviyo"),
            ControlRoute("GET", f"{CONTROL_PREFIX}state", state),
            ControlRoute("POST", f"{CONTROL_PREFIX}accounts", "add an account at runtime", model_fields(_AccountIn)),
        ]
        actions = [
            ControlRoute("POST", CONTROL_PREFIX + name, action.description, model_fields(action.model))
            for name, action in self._ctl_actions().items()
        ]
        return fixed + actions

    def _set_limits(self, args: _LimitsIn) -> None:
        """Switch rate limiting on/off or rescale it at runtime."""
        if args.enabled is not None:
            self.limiter.enabled = args.enabled
        if args.scale is not None:
            self.limiter.scale = args.scale


# ---------------------------------------------------------------- small helpers


def _group_events(group: Mapping[str, Any], pointer: str, when: datetime) -> list[EventIn]:
    """Parse the events of one per-profile group of a bulk create request."""
    attrs = group["attributes"]
    profile = parse_profile_ref(attrs["profile"]["data"], f"{pointer}/attributes/profile/data")
    backfill = bool(attrs.get("backfill"))
    events = attrs["events"]["data"]
    return [
        parse_event(
            event["attributes"],
            f"{pointer}/attributes/events/data/{index}/attributes",
            profile,
            when,
            backfill,
        )
        for index, event in enumerate(events)
    ]


def _reject_repeated_unique_ids(events: Sequence[EventIn]) -> None:
    """Fail the whole bulk request if a unique_id repeats for the same profile and metric."""
    seen: set[tuple[str, str, str]] = set()
    for event in events:
        if event.unique_id is None:
            continue
        key = (_profile_identity((event.profile_id, event.profile)), event.metric, event.unique_id)
        if key in seen:
            detail = f"Duplicate unique_id {event.unique_id!r} for one profile and metric"
            raise invalid(f"{detail}; no event was processed.")
        seen.add(key)


def _check_row_sizes(rows: Sequence[Any]) -> None:
    """Refuse a bulk import whose single profile exceeds 100 KB."""
    for index, row in enumerate(rows):
        if len(json.dumps(row)) > MAX_PROFILE_PAYLOAD:
            raise invalid(
                "A single profile may be at most 100 KB.", f"/data/attributes/profiles/data/{index}"
            )


def _job_list_ids(data: Mapping[str, Any]) -> list[str]:
    """Return the list ids of a bulk import job's ``relationships.lists``."""
    lists = (data.get("relationships") or {}).get("lists") or {}
    return [item["id"] for item in lists.get("data") or []]


def _page_links(request: web.Request, offset: int, size: int, total: int) -> dict[str, str | None]:
    """Build JSON:API paging links with opaque cursors."""

    def at(start: int) -> str:
        return str(request.url.update_query({"page[cursor]": encode_cursor(start)}))

    following = at(offset + size) if offset + size < total else None
    previous = at(max(0, offset - size)) if offset > 0 else None
    return {"self": str(request.url), "next": following, "prev": previous}


def _jsonapi(payload: Mapping[str, Any], status: int = 200) -> web.Response:
    """Return a JSON:API response as Klaviyo does (application/vnd.api+json)."""
    return web.json_response(dict(payload), status=status, content_type=JSONAPI)


def _abort(request: web.Request) -> web.Response:
    """Drop the connection without an answer (the returned response is never sent)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)


def _json_default(value: Any) -> Any:
    """Encode datetimes and sets in the state dump."""
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


_dumps = functools.partial(json.dumps, default=_json_default)


async def _control_json(request: web.Request) -> Any:
    """Return a control request's JSON body, treating an empty body as ``{}``."""
    raw = await request.read()
    return json.loads(raw) if raw.strip() else {}


@web.middleware
async def _http_errors_as_envelopes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer unknown routes and methods with Klaviyo's error envelope instead of aiohttp's text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404 and request.path.startswith(CONTROL_PREFIX):
            hint = f"no control route {request.path}; GET {CONTROL_PREFIX} lists them"
            return web.json_response({"error": hint}, status=404)
        if exc.status < 400 or request.path.startswith(CONTROL_PREFIX):
            raise
        code = _HTTP_CODES.get(exc.status, "error")
        detail = f"{exc.reason}: {request.method} {request.path}"
        return ApiError(exc.status, code, f"{exc.reason}.", detail).response()


@asynccontextmanager
async def serve_klaviyo(fake: FakeKlaviyo, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``fake`` on host:port (0 = a free port) and yield its base URL."""
    async with serve_app(fake.make_app(), host, port) as base_url:
        yield base_url


# ---------------------------------------------------------------- command line (demo, subprocess tests)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the simulator's command line."""
    parser = argparse.ArgumentParser(description="Run a simulated Klaviyo API on loopback.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--account", action="append", default=[], metavar="KEY[=LABEL]")
    parser.add_argument("--no-spec", action="store_true", help="use hand rules instead of the OpenAPI spec")
    parser.add_argument("--limits-scale", type=float, default=1.0)
    parser.add_argument("--no-limits", action="store_true")
    parser.add_argument("--job-delay", type=float, default=0.0)
    return parser.parse_args(argv)


async def _serve_until_signalled(fake: FakeKlaviyo, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, printing the base URL first so a parent process can read it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve_klaviyo(fake, host, port) as base_url:
        print(base_url, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the simulator: ``python -m klaviyo_bridge.sandbox.klaviyo --account pk_test=shop``."""
    args = _parse_args(argv)
    fake = FakeKlaviyo(
        spec_path=None if args.no_spec else "auto",
        limits_enabled=not args.no_limits,
        limits_scale=args.limits_scale,
        job_delay=args.job_delay,
    )
    for item in args.account:
        key, _, label = item.partition("=")
        fake.add_account(key, label or None)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_signalled(fake, args.host, args.port))


if __name__ == "__main__":
    main()
