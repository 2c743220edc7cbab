"""Stateful simulated Whiplash v2 API (aiohttp.web) for integration tests, the demo and benchmarks.

It models the real service as described in the Whiplash fact sheet (OAuth token endpoint, ``/api/v2/orders``
with Ransack-style ``search``, ``sort`` and page paging, ``X-CUSTOMER-ID``, the application's request budget,
signed webhooks with their subscription API), independently of our client. Tests drive it in-process
(``FakeWhiplash`` methods, ``OrderScript``) or over HTTP (``/__sim/`` control API).

Invariants:
- Every stored timestamp is an aware UTC datetime truncated to whole seconds, because Whiplash stores
  seconds (the API prints ``.000``); it is serialised in US Eastern with its offset, like the real API.
- ``updated_at`` moves only when a write asks for it: status changes bump it unless the fake's bump mode
  is off or the caller passes ``bump_updated_at=False`` (a carrier-driven change Whiplash may not record).
- Refresh tokens rotate like Doorkeeper's: a refresh grant revokes the presented refresh token and the
  access token issued with it, so only the newest refresh token works. With ``refresh_revoked_on_use``
  (Doorkeeper's ``refresh_token_revoked_on_use``) the presented row is revoked only when the access token
  issued in exchange is first used, so a client that died before storing the new tokens can refresh again.
- Injected faults are one-shot and taken first-in-first-out by the next request whose path matches.
- Rate limit: the budget is the OAuth application's, one for every customer, as Whiplash's own client
  throttles it. Every request outside ``/__sim/`` counts (token requests and unknown paths too), in fixed
  1-second windows starting at whole seconds of the sim's monotonic clock, before faults and auth: past
  ``rate_limit_per_s`` a request gets 429, ``Retry-After`` and ``{"message": "Rate limit exceeded"}`` at
  once, does no work and takes no fault. Each window's admitted count is kept whether or not a limit is set.
- ``response_ms``: an orders request (list, one order, count) that passed auth reads the state when it
  arrives and answers ``response_ms`` later without blocking the loop, so concurrent requests overlap.
- Every write of an order (``create_order``, ``set_status``, ``update_order``; ``OrderScript`` and the control
  API call these) ends in ``_publish``, which queues the webhooks it raises without ever waiting for one;
  see ``whiplash_webhooks`` for delivery, its controls and the no-retry assumption.
- The ``/__sim/`` control API needs no token, is never faulted, rate limited or counted.
- Every token the endpoint issues (each access token, then its refresh token) is remembered in order, so a
  test can scan a client's output for all of them (``issued_tokens()``, ``GET /__sim/tokens``).
- Secrets never appear in logs (the access log has no query strings) or in ``/__sim/state``; only short
  fingerprints do. ``/__sim/tokens`` is the one place that hands tokens out, on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import enum
import hashlib
import itertools
import json
import logging
import math
import operator
import random
import secrets
import signal
import time
import unicodedata
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cached_property, partial
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

from aiohttp import web
from aiohttp.typedefs import Handler

from ._server import CLIENT_CLOSED, quiet_disconnects, serve_app
from .control import ControlRoute, index_handler, index_route
from .whiplash_webhooks import (
    ORDER_CREATED,
    ORDER_UPDATED,
    NotificationApi,
    Subscription,
    WebhookDelivery,
    WebhookHub,
    status_events,
)

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]
Clock = Callable[[], datetime]

EASTERN: Final = ZoneInfo("America/New_York")
API_PREFIX: Final = "/api/"
CONTROL_PREFIX: Final = "/__sim/"
DEFAULT_PER_PAGE: Final = 50
MAX_PER_PAGE: Final = 250
USER_ID: Final = 4242  # the token's user (GET /api/v2/me), owner of subscriptions made without user_id

STATUS_NAMES: Final[Mapping[int, str]] = MappingProxyType({
    30: "Shipped Externally", 35: "Quote", 40: "Cancelled", 45: "Closed by Originator", 50: "Unpaid",
    75: "Pending Return", 77: "Return Verified", 80: "Pre-Order", 90: "Paused", 95: "Insufficient Inventory",
    100: "Processing", 120: "Printed", 140: "Pending Pick Confirmation", 150: "Picked",
    155: "Prepacking in Progress", 160: "Packed", 200: "Label Scheduled for Purchase", 250: "Label Purchased",
    300: "Shipped", 325: "Picked Up", 350: "Delivered", 375: "Return Expired", 380: "Replacement Cancelled",
    400: "Returned Undeliverable", 410: "Replacement Requested", 430: "Exchanged", 450: "Refund Requested",
})
SHIPPING_STATUSES: Final = frozenset({300, 325, 350})
PACKED_FROM: Final = 160
_dumps: Final = partial(json.dumps, ensure_ascii=False)  # Rails emits raw UTF-8, not \u escapes


# ---------------------------------------------------------------------------------------------- time


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def to_whiplash_time(value: datetime) -> str:
    """Serialise an instant like Whiplash: US Eastern wall time, milliseconds, numeric offset."""
    return value.astimezone(EASTERN).isoformat(timespec="milliseconds")


def parse_search_time(raw: str) -> datetime:
    """Parse a datetime as the sim reads it; a value without an offset is US Eastern (Rails Time.zone)."""
    parsed = datetime.fromisoformat(raw.strip())
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=EASTERN)


def _stored(value: datetime) -> datetime:
    """Return ``value`` as Whiplash stores it: aware, UTC, whole seconds."""
    if value.tzinfo is None:
        raise ValueError("sim timestamps must be timezone-aware")
    return value.astimezone(UTC).replace(microsecond=0)


class ManualClock:
    """A settable clock for deterministic simulations; call the instance to read the time."""

    def __init__(self, start: datetime) -> None:
        self._now = _stored(start)

    def __call__(self) -> datetime:
        """Return the current simulated time."""
        return self._now

    def advance(self, seconds: float = 1.0) -> datetime:
        """Move the clock forward and return the new time."""
        self._now += timedelta(seconds=seconds)
        return self._now

    def set(self, value: datetime) -> None:
        """Jump to ``value`` (aware)."""
        self._now = _stored(value)


# ------------------------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class ShippingMethod:
    """A carrier service as nested under an order's ``shipping_method``."""

    id: int
    carrier: str
    service: str
    name: str
    scac: str
    international: bool
    tracking_url: str  # format string with {tracking}
    transit_days: int


SHIPPING_METHODS: Final[tuple[ShippingMethod, ...]] = (
    ShippingMethod(5, "USPS", "Priority", "USPS Priority Mail", "USPS", False,
                   "https://tools.usps.com/go/TrackConfirmAction?tLabels={tracking}", 3),
    ShippingMethod(12, "UPS", "Ground", "UPS Ground", "UPSN", False,
                   "https://www.ups.com/track?tracknum={tracking}", 5),
    ShippingMethod(21, "FedEx", "Home Delivery", "FedEx Home Delivery", "FDEG", False,
                   "https://www.fedex.com/fedextrack/?trknbr={tracking}", 4),
    ShippingMethod(33, "DHL", "Express Worldwide", "DHL Express Worldwide", "DHLC", True,
                   "https://www.dhl.com/en/express/tracking.html?AWB={tracking}", 6),
)
_TRACKING_SHAPES: Final[Mapping[str, tuple[str, int]]] = {
    "USPS": ("9400", 18), "UPS": ("1Z999AA1", 10), "FedEx": ("", 12), "DHL": ("", 10),
}


def shipping_method(carrier: str | None = None, *, international: bool = False) -> ShippingMethod:
    """Return the simulated shipping method for ``carrier`` (default: USPS, or DHL abroad)."""
    wanted = carrier or ("DHL" if international else "USPS")
    for method in SHIPPING_METHODS:
        if method.carrier.casefold() == wanted.casefold():
            return method
    raise ValueError(f"unknown carrier {wanted!r}")


@dataclass(frozen=True, slots=True)
class ItemSpec:
    """A line to put on a new order; ``price`` is a unit-price decimal string such as "72.99"."""

    sku: str
    description: str
    price: str
    quantity: int = 1
    currency: str = "USD"


DEFAULT_ITEMS: Final = (ItemSpec("TEE-BLK-M", "Logo Tee - Black / M", "24.0"),)


@dataclass(frozen=True, slots=True)
class SimItem:
    """One stored order line."""

    id: int
    item_id: int
    spec: ItemSpec


@dataclass(frozen=True, slots=True)
class SimPackage:
    """One shipped package."""

    id: int
    tracking: str
    tracking_link: str
    shipped_on: datetime
    order_item_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Originator:
    """The shop-side origin of an order."""

    id: int
    provider: str
    original_id: str
    shop_id: int
    shop_domain: str


@dataclass(slots=True)
class SimOrder:
    """One order as the simulated Whiplash stores it; ``FakeWhiplash.order_json`` renders it."""

    id: int
    customer_id: int
    status: int
    created_at: datetime
    updated_at: datetime
    originator: Originator
    shipping_method: ShippingMethod
    humanize_id: str
    order_orig: str
    items: list[SimItem] = field(default_factory=list)
    previous_status: int | None = None
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    shipping_name: str | None = None
    shipping_company: str | None = None
    shipping_address_1: str | None = "8534 Gerhold Pines"
    shipping_address_2: str | None = None
    shipping_city: str | None = "Portland"
    shipping_state: str | None = "OR"
    shipping_zip: str | None = "97209"
    shipping_country: str | None = "US"
    shipping_phone: str | None = None
    residential: bool = True
    packages: list[SimPackage] = field(default_factory=list)
    tracking: list[str] = field(default_factory=list)
    tracking_links: list[str] = field(default_factory=list)
    shipped_on: datetime | None = None
    approximate_delivery_date: date | None = None
    order_type: str = "direct_to_consumer"
    gift: bool = False
    public_note: str | None = None
    meta_data: str | None = None
    warehouse_id: int = 1

    @property
    def full_name(self) -> str | None:
        """Return "first last" as Whiplash derives it, or None without either part."""
        parts = [p for p in (self.first_name, self.last_name) if p]
        return " ".join(parts) or None


_PROTECTED_FIELDS: Final = frozenset({
    "id", "customer_id", "status", "previous_status", "created_at", "updated_at", "items", "packages",
    "originator", "shipping_method",
})
WRITABLE_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(SimOrder)) - _PROTECTED_FIELDS


# ------------------------------------------------------------------------------------------ render


def _item_json(order: SimOrder, item: SimItem) -> JSONDict:
    """Render one ``order_items`` entry."""
    packed = item.spec.quantity if PACKED_FROM <= order.status < 400 else 0
    stamp = to_whiplash_time(order.created_at)
    return {
        "id": item.id, "order_id": order.id, "customer_id": order.customer_id, "item_id": item.item_id,
        "package_id": None, "quote_item_id": None, "sku": item.spec.sku, "description": item.spec.description,
        "quantity": item.spec.quantity, "price": item.spec.price, "currency": item.spec.currency,
        "created_at": stamp, "updated_at": stamp, "unshippable": False, "available": True, "packed": packed,
        "packaging": False, "wholesale_cost": None, "is_bundle": False, "retail_fee": None,
        "promo": float(item.spec.price) == 0, "returnable": None, "wholesale_fee": None, "hazmat": False,
        "misc": None, "request_serial_number": None, "goh": False, "originator": None, "wholesale_item": None,
    }


def _package_json(order: SimOrder, package: SimPackage) -> JSONDict:
    """Render one ``packages`` entry."""
    stamp = to_whiplash_time(package.shipped_on)
    return {
        "id": package.id, "order_id": order.id, "tracking": package.tracking,
        "tracking_link": package.tracking_link, "shipped_on": stamp,
        "order_item_ids": list(package.order_item_ids),
        "weight": "1.2", "length": "12.0", "width": "9.0", "height": "3.0", "ship_actual_cost": "7.85",
        "ship_actual_currency": "USD", "created_at": stamp, "updated_at": stamp,
    }


def _shipping_method_json(method: ShippingMethod) -> JSONDict:
    """Render the nested ``shipping_method`` object."""
    stamp = "2025-07-29T17:02:06.000-04:00"
    return {
        "id": method.id, "carrier": method.carrier, "service": method.service, "description": method.service,
        "name": method.name, "international": method.international, "active": True, "flat_rate": False,
        "expedited": False, "trackable": True, "scac": method.scac, "origins": ["US"],
        "extended_description": None, "created_at": stamp, "updated_at": stamp,
    }


def _originator_json(origin: Originator) -> JSONDict:
    """Render the nested ``originator`` object."""
    return {
        "id": origin.id, "provider": origin.provider, "original_id": origin.original_id, "group_id": None,
        "shop_id": origin.shop_id, "shop_domain": origin.shop_domain, "integration_id": None,
        "application_id": None, "originated_type": "Order",
    }


def _order_head_json(order: SimOrder) -> JSONDict:
    """Render identity, status and lifecycle fields."""
    return {
        "id": order.id, "customer_id": order.customer_id, "order_batch_id": None,
        "warehouse_id": order.warehouse_id, "shipping_method_id": order.shipping_method.id,
        "humanize_id": order.humanize_id, "status": order.status, "status_name": STATUS_NAMES[order.status],
        "previous_status": order.previous_status,
        "order_orig": order.order_orig, "workable_at": to_whiplash_time(order.created_at), "due_at": None,
        "created_at": to_whiplash_time(order.created_at), "updated_at": to_whiplash_time(order.updated_at),
        "meta_data": order.meta_data, "purchase_order": None, "order_type": order.order_type,
        "shop_created_at": to_whiplash_time(order.created_at), "shop_updated_at": None,
        "shop_warehouse_ids": [], "shop_shipping_method_price": "0.0", "shop_shipping_method_currency": "USD",
        "is_workable": order.status >= 100, "is_gestating": None, "gift": order.gift,
        "public_note": order.public_note,
    }


def _order_contact_json(order: SimOrder) -> JSONDict:
    """Render contact and address fields (billing is left empty, as on most shop orders)."""
    billing = ("billing_name", "billing_company", "billing_address_1", "billing_address_2",
               "billing_address_3", "billing_city", "billing_state", "billing_zip", "billing_country",
               "billing_phone")
    return {
        "email": order.email, "first_name": order.first_name, "last_name": order.last_name,
        "full_name": order.full_name, "shipping_name": order.shipping_name,
        "shipping_company": order.shipping_company, "shipping_address_1": order.shipping_address_1,
        "shipping_address_2": order.shipping_address_2, "shipping_city": order.shipping_city,
        "shipping_state": order.shipping_state, "shipping_zip": order.shipping_zip,
        "shipping_country": order.shipping_country, "shipping_country_iso2": order.shipping_country,
        "shipping_phone": order.shipping_phone, "residential": order.residential,
        **dict.fromkeys(billing),
    }


def _order_shipping_json(order: SimOrder) -> JSONDict:
    """Render carrier, tracking and nested association fields."""
    estimate = order.approximate_delivery_date
    return {
        "ship_method": order.shipping_method.name, "scac": None, "customer_provided_label_carrier": None,
        "shipped_on": to_whiplash_time(order.shipped_on) if order.shipped_on else None,
        "approximate_delivery_date": estimate.isoformat() if estimate else None,
        "days_in_transit": None, "days_in_transit_carrier_estimate": None,
        "shipping_confirmation_sent": order.shipped_on is not None, "ship_actual_cost": None,
        "req_insurance_value": None, "tracking": list(order.tracking),
        "tracking_links": list(order.tracking_links),
        "calculated_time_limit": 30, "within_return_time_limit": True,
        "order_items": [_item_json(order, item) for item in order.items],
        "originator": _originator_json(order.originator), "proto_originator_id": order.originator.original_id,
        "packages": [_package_json(order, package) for package in order.packages],
        "shipping_method": _shipping_method_json(order.shipping_method), "serial_numbers": [],
    }


def render_order(order: SimOrder) -> JSONDict:
    """Render an order exactly as ``GET /api/v2/orders`` returns it."""
    return {**_order_head_json(order), **_order_contact_json(order), **_order_shipping_json(order)}


# ------------------------------------------------------------------------------------ search, sort


class _ApiError(Exception):
    """A JSON error response raised from deep inside a handler."""

    def __init__(self, status: int, body: JSONDict, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        """Render the error."""
        return web.json_response(self.body, status=self.status, headers=self.headers, dumps=_dumps)


_FieldKind = Literal["int", "time", "str"]
_SEARCH_FIELDS: Final[Mapping[str, tuple[_FieldKind, Callable[[SimOrder], Any]]]] = {
    "id": ("int", operator.attrgetter("id")),
    "customer_id": ("int", operator.attrgetter("customer_id")),
    "status": ("int", operator.attrgetter("status")),
    "previous_status": ("int", operator.attrgetter("previous_status")),
    "warehouse_id": ("int", operator.attrgetter("warehouse_id")),
    "created_at": ("time", operator.attrgetter("created_at")),
    "updated_at": ("time", operator.attrgetter("updated_at")),
    "shipped_on": ("time", operator.attrgetter("shipped_on")),
    "email": ("str", operator.attrgetter("email")),
    "humanize_id": ("str", operator.attrgetter("humanize_id")),
    "order_orig": ("str", operator.attrgetter("order_orig")),
    "first_name": ("str", operator.attrgetter("first_name")),
    "last_name": ("str", operator.attrgetter("last_name")),
    "shipping_name": ("str", operator.attrgetter("shipping_name")),
    "originator_original_id": ("str", lambda order: order.originator.original_id),
}
_FIELD_ALIASES: Final = {"ids": "id"}  # the official Rydership adapter sends ids_in
_LIST_PREDICATES: Final = frozenset({"in", "not_in"})
_TEXT_PREDICATES: Final = frozenset({"cont", "start"})
_COMPARATORS: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
    "eq": operator.eq, "not_eq": operator.ne, "lt": operator.lt, "lteq": operator.le, "gt": operator.gt,
    "gteq": operator.ge, "in": lambda actual, wanted: actual in wanted,
    "not_in": lambda actual, wanted: actual not in wanted,
    "cont": lambda actual, wanted: wanted in actual,
    "start": lambda actual, wanted: actual.startswith(wanted),
}
_PREDICATES: Final = (*_COMPARATORS, "null")


def _coerce(kind: _FieldKind, raw: Any) -> Any:
    """Cast one search value like ActiveRecord would; strings compare case-insensitively (MySQL *_ci)."""
    if kind == "int":
        if isinstance(raw, bool):
            raise ValueError("boolean is not an integer")
        return int(raw)
    if kind == "time":
        return parse_search_time(str(raw))
    return str(raw).casefold()


@dataclass(frozen=True, slots=True)
class Condition:
    """One parsed Ransack predicate, e.g. ``updated_at_gteq``."""

    name: str
    kind: _FieldKind
    predicate: str
    value: Any

    def matches(self, order: SimOrder) -> bool:
        """Return whether ``order`` satisfies the predicate; NULL fails every comparison, as in SQL."""
        actual = _SEARCH_FIELDS[self.name][1](order)
        if self.predicate == "null":
            return (actual is None) == bool(self.value)
        if actual is None:
            return False
        if self.kind == "str" or self.predicate in _TEXT_PREDICATES:
            actual = str(actual).casefold()
        return _COMPARATORS[self.predicate](actual, self.value)


def _split_key(key: str) -> tuple[str, str] | None:
    """Split ``updated_at_gteq`` into (field, predicate), or None for an unknown condition."""
    for predicate in _PREDICATES:
        suffix = "_" + predicate
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            name = _FIELD_ALIASES.get(name, name)
            if name in _SEARCH_FIELDS:
                return name, predicate
    return None


def _condition(key: str, raw: Any) -> Condition | None:
    """Build one condition; None when Ransack would drop it (unknown key, blank or uncastable value)."""
    split = _split_key(key)
    if split is None or raw is None or raw in ("", []):
        return None
    name, predicate = split
    kind: _FieldKind = "str" if predicate in _TEXT_PREDICATES else _SEARCH_FIELDS[name][0]
    try:
        if predicate == "null":
            return Condition(name, kind, predicate, raw in (True, 1, "1", "true"))
        if predicate in _LIST_PREDICATES:
            values = raw if isinstance(raw, list) else [raw]
            return Condition(name, kind, predicate, frozenset(_coerce(kind, v) for v in values))
        return Condition(name, kind, predicate, _coerce(kind, raw))
    except (TypeError, ValueError):
        return None


def parse_search(raw: str | None) -> tuple[list[Condition], list[str]]:
    """Parse the ``search`` parameter into conditions plus the keys Ransack would silently ignore."""
    if raw is None or not raw.strip():
        return [], []
    try:
        decoded = json.loads(raw)
    except ValueError as exc:
        raise _ApiError(400, {"message": f"search is not valid JSON: {exc}"}) from exc
    if not isinstance(decoded, dict):
        raise _ApiError(400, {"message": "search must be a JSON object"})
    conditions: list[Condition] = []
    ignored: list[str] = []
    for key, value in decoded.items():
        condition = _condition(str(key), value)
        if condition is None:
            ignored.append(str(key))
        else:
            conditions.append(condition)
    return conditions, ignored


_SORT_FIELDS: Final[Mapping[str, Callable[[SimOrder], Any]]] = {
    name: _SEARCH_FIELDS[name][1] for name in ("id", "customer_id", "status", "created_at", "updated_at")
}


def parse_sort(raw: str | None) -> list[tuple[str, bool]]:
    """Parse ``"updated_at asc,id asc"`` into (field, descending) pairs; unknown fields are dropped."""
    keys: list[tuple[str, bool]] = []
    for part in (raw or "").split(","):
        words = part.split()
        if words and words[0] in _SORT_FIELDS:
            keys.append((words[0], len(words) > 1 and words[1].lower() == "desc"))
    return keys


def sort_orders(orders: Iterable[SimOrder], keys: Sequence[tuple[str, bool]]) -> list[SimOrder]:
    """Sort by ``keys``; ties keep primary-key order, as MySQL does in practice."""
    rows = sorted(orders, key=operator.attrgetter("id"))
    for name, descending in reversed(keys):
        rows.sort(key=_SORT_FIELDS[name], reverse=descending)  # stable, so earlier keys win
    return rows


# ------------------------------------------------------------------------------------------- oauth


_OAUTH_DESCRIPTIONS: Final[Mapping[str, str]] = {
    "invalid_client": "Client authentication failed due to unknown client, no client authentication "
                      "included, or unsupported authentication method.",
    "invalid_grant": "The provided authorization grant is invalid, expired, revoked, does not match the "
                     "redirection URI used in the authorization request, or was issued to another client.",
    "invalid_request": "The request is missing a required parameter, includes an unsupported parameter "
                       "value, or is otherwise malformed.",
    "unsupported_grant_type": "The authorization grant type is not supported by the authorization server.",
}


class _OAuthError(Exception):
    """A Doorkeeper-style token endpoint error."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error

    def response(self) -> web.Response:
        """Render the RFC 6749 error body."""
        body = {"error": self.error, "error_description": _OAUTH_DESCRIPTIONS[self.error]}
        return web.json_response(body, status=self.status, dumps=_dumps)


@dataclass(slots=True)
class _Grant:
    """One issued token row: an access token and (maybe) its refresh token, like a Doorkeeper record."""

    access_token: str | None
    refresh_token: str | None
    scope: str
    expires_at: float
    revoked: bool = False
    previous: _Grant | None = None  # revoked on first use of this access token (refresh_revoked_on_use)


def fingerprint(secret: str | None) -> str | None:
    """Return a short, non-reversible tag of a token, safe to log or expose."""
    return None if secret is None else hashlib.sha256(secret.encode()).hexdigest()[:12]


class SimOAuth:
    """Token endpoint state: client check, grants, rotating refresh tokens, access-token expiry."""

    def __init__(
        self, client_id: str, client_secret: str, *, refresh_token: str | None, token_ttl: int, scope: str,
        wall: Callable[[], float], counts: Counter[str], invalid_grant_status: int,
        revoked_on_use: bool = False,
    ) -> None:
        self._client = (client_id, client_secret)
        self._revoked_on_use = revoked_on_use
        self._ttl = token_ttl
        self._scope = scope
        self._wall = wall
        self._counts = counts
        self._invalid_grant_status = invalid_grant_status
        self._by_access: dict[str, _Grant] = {}
        self._by_refresh: dict[str, _Grant] = {}
        self._issued: list[str] = []
        self.initial_refresh_token = refresh_token
        self.current_refresh_token: str | None = None
        self.rotations = 0
        if refresh_token is not None:
            self._store(_Grant(None, refresh_token, scope, 0.0))

    def grant(self, params: Mapping[str, str], basic: tuple[str, str] | None) -> JSONDict:
        """Handle one ``POST /oauth/token``; raise ``_OAuthError`` on refusal."""
        grant_type = params.get("grant_type", "")
        self._counts[grant_type or "(none)"] += 1
        if basic is None and not params.get("client_id"):
            raise _OAuthError(401, "invalid_client")
        client = basic or (params.get("client_id", ""), params.get("client_secret", ""))
        if not _same_client(client, self._client):
            raise _OAuthError(401, "invalid_client")
        if grant_type == "client_credentials":
            return self._issue(params.get("scope") or self._scope, with_refresh=False)
        if grant_type == "refresh_token":
            return self._refresh(params)
        raise _OAuthError(400, "unsupported_grant_type" if grant_type else "invalid_request")

    def check_bearer(self, header: str | None) -> str | None:
        """Return why an Authorization header is refused, or None when its access token is live."""
        scheme, _, token = (header or "").partition(" ")
        grant = self._by_access.get(token.strip()) if scheme.lower() == "bearer" else None
        if grant is None or grant.revoked:
            return "The access token is invalid"
        if self._wall() >= grant.expires_at:
            return "The access token expired"
        if grant.previous is not None:
            grant.previous.revoked, grant.previous = True, None
        return None

    @property
    def issued(self) -> list[str]:
        """Return every token issued so far, in order: each grant's access token, then its refresh token."""
        return list(self._issued)

    def expire_access_tokens(self) -> None:
        """Make every issued access token expired (refresh tokens stay valid)."""
        for grant in self._by_access.values():
            grant.expires_at = 0.0

    def _refresh(self, params: Mapping[str, str]) -> JSONDict:
        """Rotate: revoke the presented row (refresh and access token) and issue a new one."""
        presented = params.get("refresh_token")
        if not presented:
            raise _OAuthError(400, "invalid_request")
        grant = self._by_refresh.get(presented)
        if grant is None or grant.revoked:
            log.info("sim token refresh refused fingerprint=%s", fingerprint(presented))
            raise _OAuthError(self._invalid_grant_status, "invalid_grant")
        grant.revoked = not self._revoked_on_use
        self.rotations += 1
        return self._issue(params.get("scope") or grant.scope, with_refresh=True,
                           previous=grant if self._revoked_on_use else None)

    def _issue(self, scope: str, *, with_refresh: bool, previous: _Grant | None = None) -> JSONDict:
        """Create a token row and return the token response body."""
        created = self._wall()
        refresh = secrets.token_urlsafe(32) if with_refresh else None
        grant = _Grant(secrets.token_urlsafe(32), refresh, scope, created + self._ttl, previous=previous)
        self._store(grant)
        self._issued += [token for token in (grant.access_token, refresh) if token is not None]
        body: JSONDict = {"access_token": grant.access_token, "token_type": "bearer", "expires_in": self._ttl,
                          "scope": scope, "created_at": int(created)}
        if refresh is not None:
            body["refresh_token"] = refresh
        return body

    def _store(self, grant: _Grant) -> None:
        """Index a new token row."""
        if grant.access_token is not None:
            self._by_access[grant.access_token] = grant
        if grant.refresh_token is not None:
            self._by_refresh[grant.refresh_token] = grant
            self.current_refresh_token = grant.refresh_token


def _same_client(given: tuple[str, str], expected: tuple[str, str]) -> bool:
    """Compare client credentials in constant time."""
    return all(secrets.compare_digest(a.encode(), b.encode()) for a, b in zip(given, expected, strict=True))


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    """Return (client_id, client_secret) from HTTP Basic auth, which Doorkeeper also accepts."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    with suppress(binascii.Error, UnicodeDecodeError):
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        if sep:
            return user, password
    return None


async def _token_params(request: web.Request) -> dict[str, str]:
    """Merge query-string and body parameters (JSON or form) of a token request."""
    params = {key: str(value) for key, value in request.query.items()}
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError as exc:
            raise _OAuthError(400, "invalid_request") from exc
        if isinstance(body, dict):
            params.update({str(k): str(v) for k, v in body.items() if v is not None})
    elif request.can_read_body:
        form = await request.post()
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return params


# ------------------------------------------------------------------------------------------ faults


FaultKind = Literal["fail", "html", "truncate", "drop", "delay"]
_PRE_HANDLER_FAULTS: Final = frozenset({"fail", "html"})
MAINTENANCE_HTML: Final = (
    "<!DOCTYPE html><html><head><title>Whiplash | Scheduled Maintenance</title></head>"
    "<body><h1>We'll be right back.</h1><p>Whiplash is down for scheduled maintenance.</p></body></html>"
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One queued fault, taken by the next request whose path starts with ``path_prefix``."""

    kind: FaultKind
    path_prefix: str = API_PREFIX
    status: int = 200
    retry_after: int | str | None = None
    seconds: float = 0.0


def _fail_response(fault: Fault) -> web.Response:
    """Render an injected error: JSON for 4xx (like the app), an nginx-style page for 5xx (like the edge)."""
    headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
    phrase = HTTPStatus(fault.status).phrase
    if fault.status >= 500:
        title = f"{fault.status} {phrase}"
        html = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
        return web.Response(status=fault.status, text=html, content_type="text/html", headers=headers)
    message = "Rate limit exceeded" if fault.status == 429 else phrase
    return web.json_response({"message": message}, status=fault.status, headers=headers, dumps=_dumps)


def _response_bytes(response: web.StreamResponse) -> bytes:
    """Return the body of a plain response, or b"" for anything streamed."""
    body = response.body if isinstance(response, web.Response) else None
    return body if isinstance(body, bytes) else b""


def _truncated(response: web.StreamResponse) -> web.Response:
    """Return the same response with its JSON cut in half (and a matching Content-Length)."""
    body = _response_bytes(response)
    return web.Response(status=response.status, body=body[: max(1, len(body) // 2)],
                        content_type="application/json")


async def _dropped(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send half of the body under the full Content-Length, then reset the connection."""
    body = _response_bytes(response)
    stream = web.StreamResponse(status=response.status)
    stream.content_type = "application/json"
    stream.content_length = len(body)
    await stream.prepare(request)
    await stream.write(body[: len(body) // 2])
    if request.transport is not None:
        request.transport.close()
    return stream


# --------------------------------------------------------------------------------------- counters


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the sim answered (Authorization and Cookie headers are never kept)."""

    at: float  # the sim's monotonic clock (time.monotonic() unless injected)
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    status: int


@dataclass(slots=True)
class SimCounters:
    """What the simulator has served, for assertions and benchmarks."""

    requests: Counter[str] = field(default_factory=Counter)  # by path
    statuses: Counter[int] = field(default_factory=Counter)
    token_requests: Counter[str] = field(default_factory=Counter)  # by grant_type
    pages_served: int = 0
    throttled: int = 0  # 429s of the rate limit itself (rate_limited also counts injected 429 faults)
    ignored_search_keys: Counter[str] = field(default_factory=Counter)
    webhooks: Counter[str] = field(default_factory=Counter)  # queued, sent, delivered, refused, errors, ...
    log: deque[RequestRecord] = field(default_factory=lambda: deque(maxlen=10_000))

    @property
    def unauthorized(self) -> int:
        """Return how many 401s were served."""
        return self.statuses[401]

    @property
    def rate_limited(self) -> int:
        """Return how many 429s were served."""
        return self.statuses[429]

    def as_json(self) -> JSONDict:
        """Return the counters as a JSON-ready dict."""
        return {
            "requests": dict(self.requests), "statuses": {str(k): v for k, v in self.statuses.items()},
            "token_requests": dict(self.token_requests), "pages_served": self.pages_served,
            "unauthorized": self.unauthorized, "rate_limited": self.rate_limited, "throttled": self.throttled,
            "ignored_search_keys": dict(self.ignored_search_keys), "webhooks": dict(self.webhooks),
        }


_HIDDEN_HEADERS: Final = frozenset({"authorization", "cookie", "proxy-authorization"})


# -------------------------------------------------------------------------------------- rate limit


class WindowLimit:
    """The application's request budget: fixed 1-second windows starting at whole seconds of a clock.

    Each window keeps how many requests it admitted (the newest ``keep`` windows), limit or not, so tests and
    benchmarks can check "no second over N" from the simulator's own record.
    """

    def __init__(self, per_s: int | None = None, *, keep: int = 10_000) -> None:
        self.per_s = per_s
        self._keep = keep
        self._admitted: dict[int, int] = {}

    @property
    def per_s(self) -> int | None:
        """Return the limit (None: no limit)."""
        return self._per_s

    @per_s.setter
    def per_s(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ValueError("rate_limit_per_s must be a positive integer or None")
        self._per_s = value

    def admit(self, now: float) -> int | None:
        """Count a request arriving at ``now``: None when admitted, else the Retry-After in whole seconds."""
        start = math.floor(now)
        used = self._admitted.get(start, 0)
        if self._per_s is not None and used >= self._per_s:
            return max(1, math.ceil(start + 1 - now))
        self._admitted[start] = used + 1
        if len(self._admitted) > self._keep:
            del self._admitted[next(iter(self._admitted))]  # windows arrive in order: the first is the oldest
        return None

    def counts(self) -> dict[int, int]:
        """Return {window start: admitted requests}, oldest first."""
        return dict(self._admitted)


# ------------------------------------------------------------------------------------------- fake


class _Auto(enum.Enum):
    """Sentinel type for "derive this value"."""

    AUTO = enum.auto()


AUTO: Final = _Auto.AUTO


class FakeWhiplash:
    """A stateful, in-memory Whiplash v2 API: OAuth, orders, faults, counters and a control API."""

    def __init__(
        self, client_id: str, client_secret: str, *, refresh_token: str | None = None,
        token_ttl: int = 7200, scope: str = "user_read", clock: Clock = utc_now,
        wall: Callable[[], float] = time.time, seed: int = 0, max_per_page: int = MAX_PER_PAGE,
        order_level_tracking: bool = True, invalid_grant_status: int = 401, first_order_id: int = 7_000_001,
        refresh_revoked_on_use: bool = False, rate_limit_per_s: int | None = None, response_ms: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters = SimCounters()
        self._monotonic = monotonic
        self._limit = WindowLimit(rate_limit_per_s)
        self.response_ms = response_ms
        self.oauth = SimOAuth(client_id, client_secret, refresh_token=refresh_token, token_ttl=token_ttl,
                              scope=scope, wall=wall, counts=self.counters.token_requests,
                              invalid_grant_status=invalid_grant_status, revoked_on_use=refresh_revoked_on_use)
        self.bump_on_status_change = True
        self.max_per_page = max_per_page
        self.order_level_tracking = order_level_tracking
        self._clock = clock
        self._rng = random.Random(seed)
        self._orders: dict[int, SimOrder] = {}
        self._customers: dict[int, bool] = {}  # customer_id -> visible to the token's user
        starts = {"order": first_order_id, "item": 31_000_001, "package": 4_100_001, "origin": 880_001}
        self._ids = {name: itertools.count(start) for name, start in starts.items()}
        self._catalog: dict[str, int] = {}
        self._humanize: Counter[int] = Counter()
        self._faults: deque[Fault] = deque()
        self._delay_s = 0.0
        self._garbled: dict[int, tuple[JSONDict, frozenset[str]]] = {}
        self.scripts: dict[int, OrderScript] = {}
        self.webhooks = WebhookHub(client_id, client_secret, customers=self._visible_customers,
                                   monotonic=monotonic, counts=self.counters.webhooks, user_id=USER_ID)

    # -- state API ------------------------------------------------------------------------------

    def now(self) -> datetime:
        """Return the sim clock's current time, as stored (UTC, whole seconds)."""
        return _stored(self._clock())

    @property
    def orders(self) -> Mapping[int, SimOrder]:
        """Return a read-only view of all orders by id."""
        return MappingProxyType(self._orders)

    @property
    def customers(self) -> frozenset[int]:
        """Return every customer id the sim knows."""
        return frozenset(self._customers)

    @property
    def current_refresh_token(self) -> str | None:
        """Return the newest refresh token (the only one that still works)."""
        return self.oauth.current_refresh_token

    def issued_tokens(self) -> list[str]:
        """Return every access and refresh token issued, in order (the seeded refresh token is not one)."""
        return self.oauth.issued

    @property
    def token_requests(self) -> Counter[str]:
        """Return token requests counted per grant_type."""
        return self.counters.token_requests

    def add_customer(self, customer_id: int, *, visible: bool = True) -> None:
        """Register a merchant; an invisible one answers 403 to X-CUSTOMER-ID and hides its orders."""
        self._customers[customer_id] = visible

    # -- budget and speed -----------------------------------------------------------------------

    @property
    def rate_limit_per_s(self) -> int | None:
        """Return the application's requests-per-second budget (None: unlimited)."""
        return self._limit.per_s

    @rate_limit_per_s.setter
    def rate_limit_per_s(self, value: int | None) -> None:
        self._limit.per_s = value

    @property
    def response_ms(self) -> float:
        """Return how long every orders request takes to answer, in milliseconds."""
        return self._response_ms

    @response_ms.setter
    def response_ms(self, value: float) -> None:
        if value < 0:
            raise ValueError("response_ms must be 0 or more")
        self._response_ms = float(value)

    def window_counts(self) -> dict[int, int]:
        """Return {window start (whole seconds of the sim's monotonic clock): requests admitted in it}."""
        return self._limit.counts()

    # -- webhooks -------------------------------------------------------------------------------

    def subscribe(
        self, url: str, customer_id: int | None = None, events: Iterable[str] | None = None,
    ) -> list[Subscription]:
        """Subscribe ``url`` to webhooks without the OAuth dance: one subscription per event (default: all).

        ``customer_id`` None means every customer the token's user can see. Controls: ``self.webhooks``.
        """
        return self.webhooks.subscribe(url, customer_id=customer_id, events=events)

    @property
    def webhook_deliveries(self) -> list[WebhookDelivery]:
        """Return every recorded delivery attempt and dropped delivery, oldest first."""
        return list(self.webhooks.deliveries)

    def _visible_customers(self) -> frozenset[int]:
        """Return the customers the token's user can see."""
        return frozenset(c for c, visible in self._customers.items() if visible)

    def _publish(self, order: SimOrder, events: Sequence[str]) -> None:
        """Queue the webhooks a write raises; every write of an order ends here."""
        if events:
            self.webhooks.publish(order.id, order.customer_id, events, lambda: self.render(order))

    def create_order(
        self, customer_id: int, *, status: int = 100, at: datetime | None = None,
        items: Sequence[ItemSpec] | None = None, email: str | _Auto | None = AUTO,
        first_name: str | None = "Alex", last_name: str | None = "Rivera",
        shipping_name: str | _Auto | None = AUTO, carrier: str | None = None, **fields: Any,
    ) -> JSONDict:
        """Create an order at ``at`` (default: sim now), registering its customer; return its JSON."""
        _check_status(status)
        self._customers.setdefault(customer_id, True)
        when = self._when(at)
        order = self._new_order(customer_id, status, when, fields.get("shipping_country", "US"), carrier)
        order.first_name, order.last_name = first_name, last_name
        order.shipping_name = order.full_name if shipping_name is AUTO else shipping_name
        order.email = f"buyer{order.id}@example.com" if email is AUTO else email
        order.items = [self._new_item(spec) for spec in (items or DEFAULT_ITEMS)]
        _assign(order, fields)
        self._orders[order.id] = order
        self._apply_status_effects(order, when)
        self._publish(order, ORDER_CREATED)
        return render_order(order)

    def set_status(
        self, order_id: int, status: int, *, at: datetime | None = None, bump_updated_at: bool | None = None,
    ) -> JSONDict:
        """Move an order to ``status`` (recording previous_status); return its JSON.

        ``bump_updated_at=None`` follows the fake's bump mode; False models a carrier-driven change that
        does not touch ``updated_at``. Shipping statuses create packages with tracking at ``at``.
        """
        _check_status(status)
        order = self._get(order_id)
        when = self._when(at)
        old = order.status
        order.previous_status, order.status = old, status
        self._apply_status_effects(order, when)
        bump = self.bump_on_status_change if bump_updated_at is None else bump_updated_at
        if bump:
            order.updated_at = when
        log.debug("sim status order=%s status=%s previous=%s bumped=%s", order_id, status,
                  order.previous_status, bump)
        self._publish(order, status_events(old, status, order.order_type))
        return render_order(order)

    def update_order(
        self, order_id: int, *, at: datetime | None = None, bump_updated_at: bool = True, **fields: Any,
    ) -> JSONDict:
        """Change writable fields (see ``WRITABLE_FIELDS``) of an order; return its JSON."""
        order = self._get(order_id)
        _assign(order, fields)
        if bump_updated_at:
            order.updated_at = self._when(at)
        self._publish(order, ORDER_UPDATED)
        return render_order(order)

    def order_json(self, order_id: int) -> JSONDict:
        """Return one order as the API renders it."""
        return self.render(self._get(order_id))

    def garble(self, order_id: int, *, drop: Iterable[str] = (), **fields: Any) -> None:
        """Serve an order with raw JSON fields replaced or dropped (bad data Whiplash might send).

        Searching and sorting still use the stored order; only what the API returns changes.
        """
        self._get(order_id)
        self._garbled[order_id] = (dict(fields), frozenset(drop))

    def ungarble(self, order_id: int) -> None:
        """Serve an order as stored again."""
        self._garbled.pop(order_id, None)

    def render(self, order: SimOrder) -> JSONDict:
        """Render an order as the API returns it, garbled if a test asked for that."""
        body = render_order(order)
        fields, drop = self._garbled.get(order.id, ({}, frozenset()))
        return {k: v for k, v in {**body, **fields}.items() if k not in drop}

    # -- faults ---------------------------------------------------------------------------------

    def fail_next(
        self, n: int = 1, status: int = 503, *, retry_after: int | str | None = None,
        path_prefix: str = API_PREFIX,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (and Retry-After when given).

        4xx bodies are JSON ``{"message": ...}`` like the app's; 5xx bodies are an HTML page like a proxy's.
        """
        self.push_fault(Fault("fail", path_prefix, status, retry_after), n)

    def serve_html_next(self, n: int = 1, *, path_prefix: str = API_PREFIX) -> None:
        """Answer the next ``n`` matching requests with a 200 HTML maintenance page."""
        self.push_fault(Fault("html", path_prefix), n)

    def truncate_next(self, n: int = 1, *, path_prefix: str = API_PREFIX) -> None:
        """Answer the next ``n`` matching requests with their JSON body cut in half."""
        self.push_fault(Fault("truncate", path_prefix), n)

    def drop_next(self, n: int = 1, *, path_prefix: str = API_PREFIX) -> None:
        """Reset the connection mid-body on the next ``n`` matching requests."""
        self.push_fault(Fault("drop", path_prefix), n)

    def set_delay(self, seconds: float, *, n: int | None = None, path_prefix: str = API_PREFIX) -> None:
        """Delay matching responses by ``seconds``: the next ``n`` requests, or all of them when n is None."""
        if n is None:
            self._delay_s = seconds
        else:
            self.push_fault(Fault("delay", path_prefix, seconds=seconds), n)

    def clear_faults(self) -> None:
        """Drop every queued fault and the standing delay."""
        self._faults.clear()
        self._delay_s = 0.0

    def expire_access_tokens(self) -> None:
        """Expire every issued access token now."""
        self.oauth.expire_access_tokens()

    def state(self) -> JSONDict:
        """Return a JSON summary of the sim (as served at ``/__sim/state``); secrets only as fingerprints."""
        return {
            "customers": sorted(self._customers), "clock": to_whiplash_time(self.now()),
            "visible_customers": sorted(c for c, visible in self._customers.items() if visible),
            "orders": len(self._orders), "orders_by_status": _count_by_status(self._orders.values()),
            "bump_on_status_change": self.bump_on_status_change, "delay_s": self._delay_s,
            "pending_faults": [dataclasses.asdict(f) for f in self._faults],
            "refresh_token_fingerprint": fingerprint(self.current_refresh_token),
            "refresh_rotations": self.oauth.rotations, "counters": self.counters.as_json(),
            "rate_limit_per_s": self.rate_limit_per_s, "response_ms": self.response_ms,
            "busiest_window": max(self._limit.counts().values(), default=0), "webhooks": self.webhooks.summary(),
        }

    # -- internals ------------------------------------------------------------------------------

    @property
    def pending_faults(self) -> tuple[Fault, ...]:
        """Return the queued faults, next first."""
        return tuple(self._faults)

    def push_fault(self, fault: Fault, n: int = 1) -> None:
        """Queue ``n`` copies of a fault."""
        self._faults.extend([fault] * n)
        log.info("sim fault queued kind=%s n=%s status=%s prefix=%s", fault.kind, n, fault.status,
                 fault.path_prefix)

    def _delay_for(self, fault: Fault | None, path: str) -> float:
        """Return how long to stall a request: a queued delay fault, else the standing /api/ delay."""
        if fault is not None and fault.kind == "delay":
            return fault.seconds
        return self._delay_s if path.startswith(API_PREFIX) else 0.0

    def _take_fault(self, path: str) -> Fault | None:
        """Remove and return the first queued fault matching ``path``."""
        for index, fault in enumerate(self._faults):
            if path.startswith(fault.path_prefix):
                del self._faults[index]
                return fault
        return None

    def _when(self, at: datetime | None) -> datetime:
        """Return ``at`` (or sim now) as stored."""
        return _stored(at) if at is not None else self.now()

    def _get(self, order_id: int) -> SimOrder:
        """Return an order or raise KeyError naming it."""
        try:
            return self._orders[order_id]
        except KeyError:
            raise KeyError(f"no order {order_id}") from None

    def _new_order(self, customer_id: int, status: int, when: datetime, country: str,
                   carrier: str | None) -> SimOrder:
        """Allocate ids, shop references and a shipping method for a new order."""
        self._humanize[customer_id] += 1
        number = 1000 + self._humanize[customer_id]
        shop_order_id = str(self._rng.randrange(5 * 10**12, 6 * 10**12))
        origin = Originator(next(self._ids["origin"]), "shopify", shop_order_id, 9000 + customer_id,
                            f"merchant-{customer_id}.myshopify.com")
        method = shipping_method(carrier, international=country != "US")
        return SimOrder(id=next(self._ids["order"]), customer_id=customer_id, status=status, created_at=when,
                        updated_at=when, originator=origin, shipping_method=method, humanize_id=str(number),
                        order_orig=f"#{number}")

    def _new_item(self, spec: ItemSpec) -> SimItem:
        """Create an order line, reusing one catalog item id per SKU."""
        item_id = self._catalog.setdefault(spec.sku, 610_000 + len(self._catalog))
        return SimItem(next(self._ids["item"]), item_id, spec)

    def _apply_status_effects(self, order: SimOrder, when: datetime) -> None:
        """Ship the order (packages, tracking, shipped_on) the first time it reaches a shipping status."""
        if order.status in SHIPPING_STATUSES and not order.packages:
            self._ship(order, when)

    def _ship(self, order: SimOrder, when: datetime) -> None:
        """Create one package (two for some multi-line orders) with carrier tracking."""
        method = order.shipping_method
        item_ids = [item.id for item in order.items]
        groups = [item_ids]
        if len(item_ids) > 1 and self._rng.random() < 0.25:
            groups = [item_ids[:1], item_ids[1:]]
        for group in groups:
            tracking = _tracking_number(self._rng, method.carrier)
            link = method.tracking_url.format(tracking=tracking)
            order.packages.append(SimPackage(next(self._ids["package"]), tracking, link, when, tuple(group)))
        if self.order_level_tracking:
            order.tracking = [p.tracking for p in order.packages]
            order.tracking_links = [p.tracking_link for p in order.packages]
        order.shipped_on = when
        arrival = when.astimezone(EASTERN) + timedelta(days=method.transit_days)
        order.approximate_delivery_date = arrival.date()

    # -- HTTP -----------------------------------------------------------------------------------

    @cached_property
    def app(self) -> web.Application:
        """Return this fake's aiohttp application (built once)."""
        return self.make_app()

    def make_app(self) -> web.Application:
        """Build a fresh aiohttp application over this fake's state."""
        app = web.Application(middlewares=[quiet_disconnects, self._middleware])
        app.router.add_post("/oauth/token", self._handle_token)
        app.router.add_get("/api/v2/me", self._handle_me)
        app.router.add_get("/api/v2/customers", self._handle_customers)
        app.router.add_get("/api/v2/orders", self._slowed(self._handle_orders))
        app.router.add_get("/api/v2/orders/count", self._slowed(self._handle_count))
        app.router.add_get(r"/api/v2/orders/{order_id:\d+}", self._slowed(self._handle_order))
        NotificationApi(self.webhooks).mount(app)
        app.cleanup_ctx.append(self.webhooks.sender)
        _add_control_routes(app, self)
        return app

    def _slowed(self, handler: Handler) -> Handler:
        """Wrap an orders handler: the state is read on arrival, the answer leaves ``response_ms`` later."""

        async def handle(request: web.Request) -> web.StreamResponse:
            response = await _call(handler, request)
            if self._response_ms > 0:
                await asyncio.sleep(self._response_ms / 1000)
            return response

        return handle

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Route public requests through counters, faults and auth; control requests straight through."""
        if request.path.startswith(CONTROL_PREFIX):
            return await _call(handler, request)
        self.counters.requests[request.path] += 1
        status = 500
        try:
            response = await self._limited(request, handler)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except ConnectionError:
            status = CLIENT_CLOSED  # the client hung up: nobody received an answer, not even a 500
            raise
        finally:
            self._record(request, status)

    async def _limited(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse a request over the application's budget before it costs anything; serve the rest."""
        retry_after = self._limit.admit(self._monotonic())
        if retry_after is None:
            return await self._faulted(request, handler)
        self.counters.throttled += 1
        log.debug("sim rate limit path=%s retry_after=%s", request.path, retry_after)
        return _fail_response(Fault("fail", status=429, retry_after=retry_after))

    async def _faulted(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Apply the standing delay and any queued fault around the real handler."""
        fault = self._take_fault(request.path)
        await asyncio.sleep(self._delay_for(fault, request.path))
        if fault is not None and fault.kind in _PRE_HANDLER_FAULTS:
            if fault.kind == "html":
                return web.Response(text=MAINTENANCE_HTML, content_type="text/html")
            return _fail_response(fault)
        response = await self._guarded(request, handler)
        if fault is not None and fault.kind == "truncate":
            return _truncated(response)
        if fault is not None and fault.kind == "drop":
            return await _dropped(request, response)
        return response

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Check the bearer token on /api/ paths, then run the handler."""
        if request.path.startswith(API_PREFIX):
            refusal = self.oauth.check_bearer(request.headers.get("Authorization"))
            if refusal is not None:
                return _unauthorized(refusal)
        return await _call(handler, request)

    def _record(self, request: web.Request, status: int) -> None:
        """Count the status and keep a redacted record of the request."""
        self.counters.statuses[status] += 1
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() not in _HIDDEN_HEADERS}
        self.counters.log.append(RequestRecord(self._monotonic(), request.method, request.path,
                                               dict(request.query), headers, status))

    async def _handle_token(self, request: web.Request) -> web.StreamResponse:
        """Serve ``POST /oauth/token``."""
        try:
            params = await _token_params(request)
            body = self.oauth.grant(params, _basic_credentials(request))
        except _OAuthError as exc:
            return exc.response()
        no_store = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        return web.json_response(body, headers=no_store, dumps=_dumps)

    async def _handle_me(self, request: web.Request) -> web.StreamResponse:
        """Serve ``GET /api/v2/me``: the token's user and the customers it can reach."""
        visible = sorted(c for c, seen in self._customers.items() if seen)
        return web.json_response({"id": USER_ID, "email": "integrations@3pl.example", "first_name": "Sim",
                                  "last_name": "Operator", "role": "partner_admin", "partner_id": 17,
                                  "customer_ids": visible}, dumps=_dumps)

    async def _handle_customers(self, request: web.Request) -> web.StreamResponse:
        """Serve ``GET /api/v2/customers``."""
        visible = sorted(c for c, seen in self._customers.items() if seen)
        return web.json_response([{"id": c, "name": f"Merchant {c}", "active": True} for c in visible],
                                 dumps=_dumps)

    async def _handle_orders(self, request: web.Request) -> web.StreamResponse:
        """Serve ``GET /api/v2/orders``: filter, sort, then one page as a bare JSON array."""
        rows = self._query(request)
        page, per_page = self._paging(request.query)
        chunk = rows[(page - 1) * per_page: page * per_page]
        wanted = _fields_param(request.query.get("fields"))
        body = [_sparse(self.render(order), wanted) for order in chunk]
        self.counters.pages_served += 1
        headers = _paging_headers(request, len(rows), page, per_page)
        return web.json_response(body, headers=headers, dumps=_dumps)

    async def _handle_count(self, request: web.Request) -> web.StreamResponse:
        """Serve ``GET /api/v2/orders/count``."""
        return web.json_response({"count": len(self._query(request))}, dumps=_dumps)

    async def _handle_order(self, request: web.Request) -> web.StreamResponse:
        """Serve ``GET /api/v2/orders/{id}``."""
        scope = self._customer_scope(request)
        order = self._orders.get(int(request.match_info["order_id"]))
        if order is None or not self._is_visible(order, scope):
            raise _ApiError(404, {"error": "record could not be found"})
        return web.json_response(self.render(order), dumps=_dumps)

    def _query(self, request: web.Request) -> list[SimOrder]:
        """Return the visible orders matching ``search``, sorted by ``sort``."""
        scope = self._customer_scope(request)
        conditions, ignored = parse_search(request.query.get("search"))
        self.counters.ignored_search_keys.update(ignored)
        if ignored:
            log.warning("sim search ignored unknown or blank conditions keys=%s", ",".join(ignored))
        rows = [o for o in self._orders.values()
                if self._is_visible(o, scope) and all(c.matches(o) for c in conditions)]
        return sort_orders(rows, parse_sort(request.query.get("sort")))

    def _is_visible(self, order: SimOrder, scope: int | None) -> bool:
        """Return whether the token's user sees ``order`` under the X-CUSTOMER-ID scope."""
        return self._customers.get(order.customer_id, False) and scope in (None, order.customer_id)

    def _customer_scope(self, request: web.Request) -> int | None:
        """Read X-CUSTOMER-ID; 403 when the token's user cannot see that customer."""
        raw = request.headers.get("X-CUSTOMER-ID", "").strip()
        if not raw:
            return None
        try:
            customer_id = int(raw)
        except ValueError:
            raise _ApiError(400, {"message": "X-CUSTOMER-ID is invalid"}) from None
        if not self._customers.get(customer_id, False):
            raise _ApiError(403, {"message": f"You are not authorized to access customer {customer_id}"})
        return customer_id

    def _paging(self, query: Mapping[str, str]) -> tuple[int, int]:
        """Return (page, per_page): pages start at 1; per_page is clamped like api-pagination's max."""
        page = _int_param(query, "page", 1)
        per_page = _int_param(query, "per_page", DEFAULT_PER_PAGE)
        return max(page, 1), min(max(per_page, 1), self.max_per_page)


# ----------------------------------------------------------------------------------- HTTP helpers


async def _call(handler: Handler, request: web.Request) -> web.StreamResponse:
    """Run a handler, rendering ``_ApiError`` as its JSON response."""
    try:
        return await handler(request)
    except _ApiError as exc:
        return exc.response()


def _unauthorized(description: str) -> web.Response:
    """Render a Doorkeeper-protected API's 401."""
    challenge = f'Bearer realm="Doorkeeper", error="invalid_token", error_description="{description}"'
    return web.json_response({"message": description}, status=401, headers={"WWW-Authenticate": challenge},
                             dumps=_dumps)


def _int_param(query: Mapping[str, str], name: str, default: int) -> int:
    """Read an integer query parameter, answering 400 like Grape's validation when it is not one."""
    raw = query.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise _ApiError(400, {"message": f"{name} is invalid"}) from None


def _fields_param(raw: str | None) -> frozenset[str]:
    """Parse the sparse ``fields`` parameter (empty means every field)."""
    return frozenset(part.strip() for part in (raw or "").split(",") if part.strip())


def _sparse(body: JSONDict, wanted: frozenset[str]) -> JSONDict:
    """Keep only the requested top-level fields."""
    return {k: v for k, v in body.items() if k in wanted} if wanted else body


def _truthy(raw: str | None) -> bool:
    """Read a Grape boolean query parameter."""
    return (raw or "").strip().lower() in {"1", "true", "yes"}


def _paging_headers(request: web.Request, total: int, page: int, per_page: int) -> dict[str, str]:
    """Build ``Total`` and RFC 5988 ``Link`` headers when ``page_total`` / ``page_links`` ask for them."""
    headers: dict[str, str] = {}
    if _truthy(request.query.get("page_total")):
        headers["Total"] = str(total)
    if _truthy(request.query.get("page_links")):
        last = max(1, -(-total // per_page))
        rels = {"first": 1, "prev": page - 1 if page > 1 else None, "next": page + 1 if page < last else None,
                "last": last}
        links = [f'<{request.url.update_query(page=n, per_page=per_page)}>; rel="{rel}"'
                 for rel, n in rels.items() if n is not None]
        headers["Link"] = ", ".join(links)
    return headers


def _check_status(status: int) -> None:
    """Reject status codes Whiplash does not have."""
    if status not in STATUS_NAMES:
        raise ValueError(f"unknown Whiplash status {status}")


def _coerce_field(name: str, value: Any) -> Any:
    """Turn JSON-ish values (from the control API) into the stored types of date fields."""
    if name == "shipped_on" and isinstance(value, str):
        return _stored(parse_search_time(value))
    if name == "approximate_delivery_date" and isinstance(value, str):
        return date.fromisoformat(value)
    return value


def _assign(order: SimOrder, fields: Mapping[str, Any]) -> None:
    """Set writable fields on an order, refusing unknown or protected names."""
    unknown = set(fields) - WRITABLE_FIELDS
    if unknown:
        raise ValueError(f"not writable order fields: {', '.join(sorted(unknown))}")
    for name, value in fields.items():
        setattr(order, name, _coerce_field(name, value))


def _count_by_status(orders: Iterable[SimOrder]) -> dict[str, int]:
    """Count orders per status code (string keys, for JSON)."""
    return {str(status): n for status, n in sorted(Counter(o.status for o in orders).items())}


def _tracking_number(rng: random.Random, carrier: str) -> str:
    """Make a carrier-shaped tracking number."""
    prefix, digits = _TRACKING_SHAPES.get(carrier, ("", 12))
    return prefix + "".join(rng.choice("0123456789") for _ in range(digits))


# ------------------------------------------------------------------------------------ control API


_AT = "string (optional): when, e.g. 2026-09-01T10:00:00-04:00 (no offset: US Eastern); default sim now"
_PATH_PREFIX = "string (default /api/): only requests whose path starts with this"
CONTROL_ROUTES: Final[tuple[ControlRoute, ...]] = (
    index_route("Whiplash"),
    ControlRoute("GET", "/__sim/state", "summary: customers, clock, order counts by status, pending faults, "
                 "refresh-token fingerprint and rotations, request counters"),
    ControlRoute("GET", "/__sim/orders", "every order as the API renders it, unpaged and without a token; "
                 "query customer_id=N for one customer's"),
    ControlRoute("POST", "/__sim/customers", "register a merchant; an invisible one answers 403 to X-CUSTOMER-ID",
                 {"customer_id": "int (required)", "visible": "bool (default true)"}),
    ControlRoute("POST", "/__sim/orders", "create an order (its customer is registered if new)", {
        "customer_id": "int (required)", "status": "int (default 100): a Whiplash status code", "at": _AT,
        "items": "list (optional): of {sku, description, price, quantity?, currency?}",
        "email, first_name, last_name, shipping_name, carrier": "string (optional)",
        "<writable order field>": "any (optional): any other order field, e.g. shipping_country",
    }),
    ControlRoute("POST", "/__sim/orders/{order_id}/status", "move an order to a status (shipping ones add packages)",
                 {"status": "int (required)", "at": _AT,
                  "bump_updated_at": "bool (optional): false models a change that does not touch updated_at"}),
    ControlRoute("PATCH", "/__sim/orders/{order_id}", "change writable fields of an order", {
        "<writable order field>": "any: its new value", "at": _AT, "bump_updated_at": "bool (default true)",
    }),
    ControlRoute("POST", "/__sim/faults", "queue n one-shot faults for the next matching requests", {
        "kind": "fail | html | truncate | drop | delay (required): error status, 200 maintenance page, JSON cut "
                "in half, connection reset mid-body, or a stall",
        "n": "int (default 1)", "status": "int (default 503): for fail",
        "retry_after": "int or HTTP date (optional): for fail", "seconds": "float (default 0): for delay",
        "path_prefix": _PATH_PREFIX,
    }),
    ControlRoute("POST", "/__sim/settings", "change modes; answers the new summary", {
        "bump_on_status_change": "bool (optional)", "delay_s": "float (optional): stall every /api/ request",
        "clear_faults": "bool (optional): drop queued faults and the standing delay",
        "rate_limit_per_s": "int or null (optional): the application's budget, every request outside /__sim/ "
                            "in fixed 1 s windows; past it 429 with Retry-After; null turns it off",
        "response_ms": "float (optional): how long every orders request (list, one order, count) takes",
    }),
    ControlRoute("GET", "/__sim/windows", "requests admitted per 1-second window of the sim's monotonic clock "
                 "(window start -> count, kept with or without a limit), the limit and the 429s it answered"),
    ControlRoute("GET", "/__sim/webhooks", "subscriptions, queue, controls, counts and every recorded delivery "
                 "(time, subscription, event, order, status or error; bodies left out)"),
    ControlRoute("POST", "/__sim/webhooks", "change webhook delivery controls; answers the new summary", {
        "drop": "int (optional): never send the next n deliveries (recorded as dropped)",
        "forge": "int (optional): sign the next n deliveries with a wrong key",
        "reorder": "int (optional): hold the next n deliveries, send them newest first once all n are queued; "
                   "0 releases a partial group",
        "delay_s": "float (optional): send each delivery queued from now on no sooner than this after its change",
        "duplicate": "bool (optional): send every delivery twice",
        "paused": "bool (optional): true holds every delivery, false sends the backlog",
        "timeout_s": "float (optional): how long one POST may take before it is recorded as an error",
    }),
    ControlRoute("POST", "/__sim/webhooks/subscriptions", "subscribe a URL without a token, one subscription per "
                 "event", {
        "url": "string (required): an http(s) URL",
        "customer_id": "int (optional): only this customer's orders; default every visible customer's",
        "events": "list (optional): event names, e.g. [\"order.shipped\"]; default every event of the catalogue",
    }),
    ControlRoute("GET", "/__sim/tokens", "every token issued, in order (each access token, then its refresh "
                 "token), and the seeded refresh token: for tests that scan a client's output for secrets"),
    ControlRoute("POST", "/__sim/tokens/expire", "expire every access token now (refresh tokens stay valid)"),
    ControlRoute("POST", "/__sim/script", "attach a seeded order generator to a customer and backfill its history", {
        "customer_id": "int (required)", "seed": "int (default 0)", "count": "int (default 0): orders to backfill",
        "days": "float (default 20): spread over this many past days",
    }),
    ControlRoute("POST", "/__sim/tick", "advance every attached order generator", {
        "steps": "int (default 1)", "share": "float (default 0.5): chance each open order moves per step",
        "spawn": "int (default 0): new orders per customer first",
    }),
)


def _add_control_routes(app: web.Application, fake: FakeWhiplash) -> None:
    """Mount the ``/__sim/`` control API (no auth) used by subprocess tests and the demo; GET /__sim/ lists it."""
    control = _Control(fake)
    app.router.add_get(CONTROL_PREFIX, index_handler("Whiplash", lambda: CONTROL_ROUTES))
    app.router.add_get("/__sim/state", control.state)
    app.router.add_get("/__sim/orders", control.list_orders)
    app.router.add_post("/__sim/customers", control.add_customer)
    app.router.add_post("/__sim/orders", control.create_order)
    app.router.add_post(r"/__sim/orders/{order_id:\d+}/status", control.set_status)
    app.router.add_patch(r"/__sim/orders/{order_id:\d+}", control.update_order)
    app.router.add_post("/__sim/faults", control.add_fault)
    app.router.add_post("/__sim/settings", control.settings)
    app.router.add_get("/__sim/windows", control.windows)
    app.router.add_get("/__sim/webhooks", control.webhooks)
    app.router.add_post("/__sim/webhooks", control.webhook_controls)
    app.router.add_post("/__sim/webhooks/subscriptions", control.subscribe)
    app.router.add_get("/__sim/tokens", control.tokens)
    app.router.add_post("/__sim/tokens/expire", control.expire_tokens)
    app.router.add_post("/__sim/script", control.start_script)
    app.router.add_post("/__sim/tick", control.tick)


async def _json_body(request: web.Request) -> JSONDict:
    """Read a JSON object body (an empty body is {}); 400 otherwise."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise _ApiError(400, {"message": "body is not valid JSON"}) from exc
    if not isinstance(body, dict):
        raise _ApiError(400, {"message": "body must be a JSON object"})
    return body


def _optional_time(raw: Any) -> datetime | None:
    """Parse an optional ``at`` value from a control request."""
    if raw is None:
        return None
    try:
        return parse_search_time(str(raw))
    except ValueError:
        raise _ApiError(400, {"message": f"bad time {raw!r}"}) from None


def _item_specs(raw: Any) -> list[ItemSpec] | None:
    """Build item specs from control-API JSON."""
    if raw is None:
        return None
    try:
        return [ItemSpec(**entry) for entry in raw]
    except (TypeError, AttributeError):
        raise _ApiError(400, {"message": "items must be a list of {sku, description, price, ...}"}) from None


def _fault_from_json(body: Mapping[str, Any]) -> tuple[int, Fault]:
    """Build (n, fault) from a control-API fault request."""
    kind = body.get("kind")
    if kind not in ("fail", "html", "truncate", "drop", "delay"):
        raise _ApiError(400, {"message": "kind must be fail, html, truncate, drop or delay"})
    try:
        fault = Fault(kind, str(body.get("path_prefix", API_PREFIX)), int(body.get("status", 503)),
                      body.get("retry_after"), float(body.get("seconds", 0.0)))
        return int(body.get("n", 1)), fault
    except (TypeError, ValueError):
        raise _ApiError(400, {"message": "n, status and seconds must be numbers"}) from None


class _Control:
    """Handlers of the ``/__sim/`` control API."""

    def __init__(self, fake: FakeWhiplash) -> None:
        self._fake = fake

    async def state(self, request: web.Request) -> web.StreamResponse:
        """Return the sim summary."""
        return web.json_response(self._fake.state(), dumps=_dumps)

    async def list_orders(self, request: web.Request) -> web.StreamResponse:
        """Return every order (optionally one customer's), unpaged and unauthenticated."""
        customer = request.query.get("customer_id")
        rows = [o for o in self._fake.orders.values() if customer is None or str(o.customer_id) == customer]
        return web.json_response([render_order(o) for o in rows], dumps=_dumps)

    async def add_customer(self, request: web.Request) -> web.StreamResponse:
        """Register a customer: ``{"customer_id": 7, "visible": true}``."""
        body = await _json_body(request)
        customer_id = _required_int(body, "customer_id")
        self._fake.add_customer(customer_id, visible=bool(body.get("visible", True)))
        return web.json_response({"customer_id": customer_id}, status=201)

    async def create_order(self, request: web.Request) -> web.StreamResponse:
        """Create an order from ``{"customer_id": .., "status": .., "at": .., "items": [..], <fields>}``."""
        body = await _json_body(request)
        customer_id = _required_int(body, "customer_id")
        extra = {k: v for k, v in body.items() if k not in {"customer_id", "at", "items"}}
        try:
            order = self._fake.create_order(customer_id, at=_optional_time(body.get("at")),
                                            items=_item_specs(body.get("items")), **extra)
        except (TypeError, ValueError) as exc:
            raise _ApiError(422, {"message": str(exc)}) from exc
        return web.json_response(order, status=201, dumps=_dumps)

    async def set_status(self, request: web.Request) -> web.StreamResponse:
        """Change status from ``{"status": 300, "at": .., "bump_updated_at": false}``."""
        body = await _json_body(request)
        bump = body.get("bump_updated_at")
        try:
            order = self._fake.set_status(_path_order_id(request), _required_int(body, "status"),
                                          at=_optional_time(body.get("at")),
                                          bump_updated_at=None if bump is None else bool(bump))
        except KeyError as exc:
            raise _ApiError(404, {"message": str(exc)}) from exc
        except ValueError as exc:
            raise _ApiError(422, {"message": str(exc)}) from exc
        return web.json_response(order, dumps=_dumps)

    async def update_order(self, request: web.Request) -> web.StreamResponse:
        """Change writable fields from ``{<field>: <value>, "at": .., "bump_updated_at": true}``."""
        body = await _json_body(request)
        at = _optional_time(body.pop("at", None))
        bump = bool(body.pop("bump_updated_at", True))
        try:
            order = self._fake.update_order(_path_order_id(request), at=at, bump_updated_at=bump, **body)
        except KeyError as exc:
            raise _ApiError(404, {"message": str(exc)}) from exc
        except ValueError as exc:
            raise _ApiError(422, {"message": str(exc)}) from exc
        return web.json_response(order, dumps=_dumps)

    async def add_fault(self, request: web.Request) -> web.StreamResponse:
        """Queue faults: ``{"kind": "fail", "n": 2, "status": 429, "retry_after": 3}`` (see ``Fault``)."""
        n, fault = _fault_from_json(await _json_body(request))
        self._fake.push_fault(fault, n)
        return web.json_response({"queued": n, "pending": len(self._fake.pending_faults)}, status=201)

    async def settings(self, request: web.Request) -> web.StreamResponse:
        """Change modes: ``{"bump_on_status_change": false, "delay_s": 0.5, "rate_limit_per_s": 10, ...}``."""
        body = await _json_body(request)
        if body.get("clear_faults"):
            self._fake.clear_faults()
        _apply(self._fake, _SETTINGS, body)
        return web.json_response(self._fake.state(), dumps=_dumps)

    async def windows(self, request: web.Request) -> web.StreamResponse:
        """Return the admitted requests per 1-second window."""
        counts = {str(start): n for start, n in self._fake.window_counts().items()}
        return web.json_response({"rate_limit_per_s": self._fake.rate_limit_per_s, "window_counts": counts,
                                  "throttled": self._fake.counters.throttled})

    async def webhooks(self, request: web.Request) -> web.StreamResponse:
        """Return the webhook summary and every recorded delivery (without bodies)."""
        hub = self._fake.webhooks
        records = [d.as_json() for d in hub.deliveries]
        return web.json_response({**hub.summary(), "deliveries": records}, dumps=_dumps)

    async def webhook_controls(self, request: web.Request) -> web.StreamResponse:
        """Change delivery controls: ``{"drop": 2, "delay_s": 1.5, "paused": true, ...}``."""
        _apply(self._fake.webhooks, _WEBHOOK_CONTROLS, await _json_body(request))
        return web.json_response(self._fake.webhooks.summary(), dumps=_dumps)

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        """Subscribe a URL: ``{"url": "http://127.0.0.1:8787/hook", "customer_id": 7, "events": [...]}``."""
        body = await _json_body(request)
        customer = body.get("customer_id")
        if not isinstance(body.get("events", []), list):
            raise _ApiError(400, {"message": "events must be a list of event names"})
        try:
            created = self._fake.subscribe(str(body.get("url", "")), None if customer is None else int(customer),
                                           body.get("events"))
        except (TypeError, ValueError) as exc:
            raise _ApiError(400, {"message": str(exc)}) from exc
        return web.json_response([s.as_json() for s in created], status=201, dumps=_dumps)

    async def tokens(self, request: web.Request) -> web.StreamResponse:
        """Return every issued token (secrets, on purpose: leak-scanning tests need the values)."""
        oauth = self._fake.oauth
        body = {"issued": oauth.issued, "initial_refresh_token": oauth.initial_refresh_token}
        return web.json_response(body, headers={"Cache-Control": "no-store"}, dumps=_dumps)

    async def expire_tokens(self, request: web.Request) -> web.StreamResponse:
        """Expire every access token."""
        self._fake.expire_access_tokens()
        return web.json_response({"expired": True})

    async def start_script(self, request: web.Request) -> web.StreamResponse:
        """Attach an ``OrderScript``: ``{"customer_id": 7, "seed": 1, "count": 40, "days": 20}``."""
        body = await _json_body(request)
        customer_id = _required_int(body, "customer_id")
        script = OrderScript(self._fake, customer_id, seed=int(body.get("seed", 0)))
        self._fake.scripts[customer_id] = script
        ids = script.backfill(int(body.get("count", 0)), days=float(body.get("days", 20.0)))
        return web.json_response({"customer_id": customer_id, "order_ids": ids}, status=201)

    async def tick(self, request: web.Request) -> web.StreamResponse:
        """Advance every attached script: ``{"steps": 1, "share": 0.5, "spawn": 0}``."""
        body = await _json_body(request)
        changes: list[StatusChange] = []
        for script in self._fake.scripts.values():
            script.spawn(int(body.get("spawn", 0)))
            changes += script.advance(int(body.get("steps", 1)), share=float(body.get("share", 0.5)))
        return web.json_response({"changes": [c.as_json() for c in changes]}, dumps=_dumps)


def _set_rate_limit(fake: FakeWhiplash, raw: Any) -> None:
    """Set or clear (null) the rate limit from control JSON."""
    if raw is not None and (isinstance(raw, bool) or not isinstance(raw, int)):
        raise TypeError("rate_limit_per_s must be an integer or null")
    fake.rate_limit_per_s = raw


def _set_attr(name: str, cast: Callable[[Any], Any]) -> Callable[[Any, Any], None]:
    """Return a setter of ``target.name = cast(value)`` for a control table."""
    return lambda target, raw: setattr(target, name, cast(raw))


def _seconds(raw: Any) -> float:
    """Read a duration in seconds (0 or more)."""
    value = float(raw)
    if not value >= 0:  # also refuses NaN
        raise ValueError("must be 0 or more")
    return value


def _strict_bool(raw: Any) -> bool:
    """Accept only a JSON boolean, so "false" cannot switch something on."""
    if not isinstance(raw, bool):
        raise TypeError("expected true or false")
    return raw


_SETTINGS: Final[Mapping[str, Callable[[Any, Any], None]]] = {
    "bump_on_status_change": _set_attr("bump_on_status_change", bool),
    "delay_s": lambda fake, raw: fake.set_delay(float(raw)),
    "rate_limit_per_s": _set_rate_limit,
    "response_ms": _set_attr("response_ms", float),
}
_WEBHOOK_CONTROLS: Final[Mapping[str, Callable[[Any, Any], None]]] = {
    "drop": lambda hub, raw: hub.drop_next(int(raw)),
    "forge": lambda hub, raw: hub.forge_next(int(raw)),
    "reorder": lambda hub, raw: hub.reorder_next(int(raw)),
    "delay_s": _set_attr("delay_s", _seconds),
    "duplicate": _set_attr("duplicate", _strict_bool),
    "paused": lambda hub, raw: hub.pause() if _strict_bool(raw) else hub.resume(),
    "timeout_s": _set_attr("timeout_s", _seconds),
}


def _apply(target: Any, table: Mapping[str, Callable[[Any, Any], None]], body: Mapping[str, Any]) -> None:
    """Run the table's setter for each field present in a control body; 400 naming the first bad one."""
    for name, setter in table.items():
        if name not in body:
            continue
        try:
            setter(target, body[name])
        except (TypeError, ValueError) as exc:
            raise _ApiError(400, {"message": f"{name}: {exc}"}) from exc


def _required_int(body: Mapping[str, Any], name: str) -> int:
    """Read a required integer field of a control request."""
    try:
        return int(body[name])
    except (KeyError, TypeError, ValueError):
        raise _ApiError(400, {"message": f"{name} (integer) is required"}) from None


def _path_order_id(request: web.Request) -> int:
    """Read ``{order_id}`` from the path."""
    return int(request.match_info["order_id"])


# ------------------------------------------------------------------------------- order generator


FIRST_LAST_NAMES: Final = (
    ("Zoë", "Müller"), ("José", "Álvarez"), ("Siobhán", "Ó Briain"), ("Łukasz", "Wróbel"),
    ("Renée", "Dubois"), ("Chloé", "Nguyễn"), ("Søren", "Lund"), ("Mary", "O'Connor"),
    ("Anne-Marie", "Fontaine"), ("Emma", "Johnson"), ("Liam", "Smith"), ("Ava", "Brown"), ("Noah", "Garcia"),
    ("Mia", "Martinez"), ("Ethan", "Lee"), ("Olivia", "Davis"), ("Lucas", "Wilson"), ("Hana", "Sato"),
    ("DeShawn", "Jackson"), ("Priya", "Patel"),
)
SHIPPING_ONLY_NAMES: Final = (
    "Deidre O'Keefe", "Björn Åkesson", "Ana María López", "Sam Taylor", "Dr. Amara Okafor",
)
COMPANIES: Final = ("Acme Surf Co.", "Tiny Desk Records LLC", "Café Noir GmbH", "Northwind Traders")
EMAIL_DOMAINS: Final = ("example.com", "example.org", "mail.example.net")
ADDRESSES: Final = (
    ("8534 Gerhold Pines", "Portland", "OR", "97209", "US"),
    ("12 Elm St Apt 4B", "Brooklyn", "NY", "11201", "US"),
    ("401 Congress Ave", "Austin", "TX", "78701-3248", "US"),
    ("77 Lake Shore Dr", "Chicago", "IL", "60611", "US"),
    ("1600 Pennsylvania Ave NW", "Washington", "DC", "20500", "US"),
    ("221B Baker Street", "London", None, "NW1 6XE", "GB"),
    ("Kastanienallee 12", "Berlin", None, "10435", "DE"),
    ("88 Queen St W", "Toronto", "ON", "M5H 2M9", "CA"),
)
CATALOG: Final = (
    ItemSpec("TEE-BLK-M", "Logo Tee - Black / M", "24.0"),
    ItemSpec("HOOD-GRY-L", "Pullover Hoodie - Grey / L", "59.99"),
    ItemSpec("LP-DEBUT-01", "Debut Album (Vinyl LP)", "29.99"),
    ItemSpec("POSTER-18X24", "Tour Poster 18x24", "15.0"),
    ItemSpec("CAP-NVY", "Embroidered Cap - Navy", "22.5"),
    ItemSpec("MUG-11OZ", "Enamel Mug 11oz", "18.0"),
    ItemSpec("BOX-DELUXE", "Deluxe Box Set", "72.99"),
    ItemSpec("STICKER-PROMO", "Free Sticker Sheet", "0.0"),
)
MAIN_PATH: Final = (100, 120, 150, 160, 250, 300, 350)
_NEXT_STATUS: Final[Mapping[int, int]] = {a: b for a, b in itertools.pairwise(MAIN_PATH)} | {90: 100}
_FINAL_WEIGHTS: Final[Mapping[int, int]] = {
    100: 8, 120: 4, 150: 4, 160: 4, 250: 5, 300: 25, 350: 30, 40: 8, 90: 5, 45: 3,
}
PersonaKind = Literal[
    "full", "shipping_only", "company_only", "anonymous", "no_email", "repeat", "repeat_case",
]
_PERSONA_WEIGHTS: Final[Mapping[PersonaKind, int]] = {
    "full": 50, "shipping_only": 12, "company_only": 8, "anonymous": 5, "no_email": 5, "repeat": 12,
    "repeat_case": 8,
}


@dataclass(frozen=True, slots=True)
class Persona:
    """Who an order is for: any of these may be absent, as on real shop orders."""

    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    shipping_name: str | None = None
    shipping_company: str | None = None


@dataclass(frozen=True, slots=True)
class StatusChange:
    """One status move made by an ``OrderScript``."""

    order_id: int
    old: int
    new: int
    at: datetime

    def as_json(self) -> JSONDict:
        """Return the change as JSON."""
        return {"order_id": self.order_id, "old": self.old, "new": self.new, "at": to_whiplash_time(self.at)}


def ascii_slug(text: str) -> str:
    """Fold accents away and keep letters and digits: "Ó Briain" -> "obriain"."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _recase(email: str, rng: random.Random) -> str:
    """Return the same address in a different letter case, as shoppers type it."""
    local, _, domain = email.partition("@")
    options = [email.upper(), ".".join(p.capitalize() for p in local.split(".")) + "@" + domain.capitalize()]
    variant = rng.choice(options)
    return variant if variant != email else email.upper()


def _planned(
    weights: Mapping[Any, int], guaranteed: Sequence[Any], count: int, rng: random.Random,
) -> list[Any]:
    """Return ``count`` picks: each ``guaranteed`` value once (when room), the rest by weight, shuffled."""
    picks = list(guaranteed[:count])
    picks += rng.choices(list(weights), weights=list(weights.values()), k=count - len(picks))
    rng.shuffle(picks)
    return picks


def _path_to(final: int, rng: random.Random) -> list[int]:
    """Return a plausible status path from Processing to ``final`` (sometimes via a pause)."""
    if final in MAIN_PATH:
        path = list(MAIN_PATH[: MAIN_PATH.index(final) + 1])
        if len(path) > 2 and rng.random() < 0.15:
            path[1:1] = [90, 100]  # paused, then resumed: the status flaps back to Processing
        return path
    if final == 40 and rng.random() < 0.5:
        return [100, 120, 40]
    return [100, final]


class OrderScript:
    """Seeded generator of realistic orders and lifecycles for one customer of a ``FakeWhiplash``.

    Same seed, same fake settings and same clock give identical orders. ``backfill`` builds history in the
    past; ``tick``/``advance`` move a random subset one step forward at the sim's "now".
    """

    def __init__(self, fake: FakeWhiplash, customer_id: int, *, seed: int = 0) -> None:
        self._fake = fake
        self.customer_id = customer_id
        self._rng = random.Random(seed)
        self._ids: list[int] = []
        self._people: list[Persona] = []
        fake.add_customer(customer_id)

    @property
    def order_ids(self) -> tuple[int, ...]:
        """Return the ids of every order this script created, oldest first."""
        return tuple(self._ids)

    def backfill(self, count: int, *, days: float = 20.0, end: datetime | None = None) -> list[int]:
        """Create ``count`` orders spread over ``days`` before ``end`` (default now), each with its history.

        With ``count`` >= 10 every lifecycle end state (100-350, 40, 45, 90) and every persona kind occurs.
        """
        end = _stored(end) if end is not None else self._fake.now()
        starts = sorted(end - timedelta(seconds=self._rng.uniform(0, days * 86_400)) for _ in range(count))
        finals = _planned(_FINAL_WEIGHTS, list(_FINAL_WEIGHTS), count, self._rng)
        kinds = self._persona_plan(count)
        plan = zip(starts, finals, kinds, strict=True)
        created = [self._replay(start, final, kind, end) for start, final, kind in plan]
        log.info("sim backfill customer=%s orders=%s days=%s", self.customer_id, count, days)
        return created

    def spawn(self, count: int = 1) -> list[int]:
        """Create ``count`` new Processing orders now."""
        kinds: list[PersonaKind] = _planned(_PERSONA_WEIGHTS, [], count, self._rng)
        return [self._create(self._persona(kind), None) for kind in kinds]

    def tick(self, *, share: float = 0.5) -> list[StatusChange]:
        """Move each unfinished order one lifecycle step forward "now" with probability ``share``."""
        changes: list[StatusChange] = []
        for order_id in self._ids:
            status = self._fake.orders[order_id].status
            if status in _NEXT_STATUS and self._rng.random() < share:
                new = self._next_status(status)
                self._fake.set_status(order_id, new)
                changes.append(StatusChange(order_id, status, new, self._fake.now()))
        return changes

    def advance(self, steps: int, *, share: float = 0.5) -> list[StatusChange]:
        """Run ``tick`` ``steps`` times."""
        return [change for _ in range(steps) for change in self.tick(share=share)]

    def _next_status(self, status: int) -> int:
        """Pick the next status; a few Processing orders get cancelled or paused instead."""
        if status == 100:
            roll = self._rng.random()
            if roll < 0.05:
                return 40
            if roll < 0.10:
                return 90
        return _NEXT_STATUS[status]

    def _replay(self, start: datetime, final: int, kind: PersonaKind, end: datetime) -> int:
        """Create one order at ``start`` and walk it to ``final`` at sorted random times before ``end``."""
        path = _path_to(final, self._rng)
        span = max((end - start).total_seconds(), 0.0)
        times = sorted(start + timedelta(seconds=self._rng.uniform(0, span)) for _ in path[1:])
        order_id = self._create(self._persona(kind), start)
        for status, when in zip(path[1:], times, strict=True):
            self._fake.set_status(order_id, status, at=when, bump_updated_at=True)
        return order_id

    def _create(self, persona: Persona, at: datetime | None) -> int:
        """Create one order for ``persona`` with 1-3 catalog lines at a random address."""
        address = self._rng.choice(ADDRESSES)
        lines = self._rng.sample(CATALOG, k=self._rng.choices((1, 2, 3), weights=(55, 30, 15))[0])
        quantities = self._rng.choices((1, 2, 3), weights=(80, 15, 5), k=len(lines))
        items = [dataclasses.replace(s, quantity=q) for s, q in zip(lines, quantities, strict=True)]
        carrier = None if address[4] != "US" else self._rng.choice(("USPS", "UPS", "FedEx"))
        order = self._fake.create_order(
            self.customer_id, at=at, items=items, email=persona.email, first_name=persona.first_name,
            last_name=persona.last_name, shipping_name=persona.shipping_name, carrier=carrier,
            shipping_company=persona.shipping_company, shipping_address_1=address[0],
            shipping_city=address[1], shipping_state=address[2], shipping_zip=address[3],
            shipping_country=address[4],
            gift=self._rng.random() < 0.05,
        )
        self._ids.append(order["id"])
        return int(order["id"])

    def _persona_plan(self, count: int) -> list[PersonaKind]:
        """Plan persona kinds so a repeat never comes before someone to repeat, and each kind occurs."""
        if count == 0:
            return []
        rest: list[PersonaKind] = _planned(_PERSONA_WEIGHTS, list(_PERSONA_WEIGHTS)[1:], count - 1, self._rng)
        return ["full", *rest]

    def _persona(self, kind: PersonaKind) -> Persona:
        """Make a persona of ``kind``; repeats reuse an earlier shopper's email (maybe in another case)."""
        earlier = [p for p in self._people if p.email]
        if kind in ("repeat", "repeat_case") and earlier:
            person = self._rng.choice(earlier)
            if kind == "repeat_case" and person.email:
                person = dataclasses.replace(person, email=_recase(person.email, self._rng))
        else:
            person = self._new_persona(kind)
        self._people.append(person)
        return person

    def _new_persona(self, kind: PersonaKind) -> Persona:
        """Make a first-time shopper of ``kind`` (repeat kinds fall back to a full name)."""
        first, last = self._rng.choice(FIRST_LAST_NAMES)
        email = self._email(first, last)
        if kind == "shipping_only":
            name = self._rng.choice(SHIPPING_ONLY_NAMES)
            return Persona(email=self._email(*name.rsplit(" ", 1)), shipping_name=name)
        if kind == "company_only":
            company = self._rng.choice(COMPANIES)
            return Persona(email=f"orders@{ascii_slug(company)}.example", shipping_company=company)
        if kind == "anonymous":
            return Persona(email=email)
        full = Persona(email=email, first_name=first, last_name=last, shipping_name=f"{first} {last}")
        return dataclasses.replace(full, email=None) if kind == "no_email" else full

    def _email(self, first: str, last: str) -> str:
        """Make a plausible, mostly unique address for a name."""
        suffix = str(self._rng.randrange(1, 999)) if self._rng.random() < 0.6 else ""
        return f"{ascii_slug(first)}.{ascii_slug(last)}{suffix}@{self._rng.choice(EMAIL_DOMAINS)}"


# ------------------------------------------------------------------------------------------ serve


@asynccontextmanager
async def serve_whiplash(
    fake: FakeWhiplash, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False,
) -> AsyncIterator[str]:
    """Serve ``fake`` on ``host:port`` (0 = a free port) and yield its base URL, e.g. "http://127.0.0.1:54321"."""
    async with serve_app(fake.make_app(), host, port, access_log=access_log) as url:
        yield url


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the standalone simulator's command line."""
    parser = argparse.ArgumentParser(description="Run a simulated Whiplash v2 API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--client-id", default="sim-client")
    parser.add_argument("--client-secret", default="sim-secret")
    parser.add_argument("--refresh-token", default="sim-refresh-0")
    parser.add_argument("--token-ttl", type=int, default=7200)
    parser.add_argument("--customer", type=int, action="append", default=[], help="repeatable")
    parser.add_argument("--orders", type=int, default=40, help="backfilled orders per customer")
    parser.add_argument("--days", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate-limit-per-s", type=int, default=None, metavar="N",
                        help="the application's request budget per second (default: unlimited)")
    parser.add_argument("--response-ms", type=float, default=0.0, metavar="MS",
                        help="how long every orders request takes (default 0)")
    return parser.parse_args(argv)


def build_from_args(args: argparse.Namespace) -> FakeWhiplash:
    """Build a fake with a backfilled ``OrderScript`` per ``--customer``."""
    fake = FakeWhiplash(args.client_id, args.client_secret, refresh_token=args.refresh_token,
                        token_ttl=args.token_ttl, seed=args.seed, rate_limit_per_s=args.rate_limit_per_s,
                        response_ms=args.response_ms)
    for offset, customer_id in enumerate(args.customer):
        script = OrderScript(fake, customer_id, seed=args.seed + offset)
        fake.scripts[customer_id] = script
        script.backfill(args.orders, days=args.days)
    return fake


async def _serve_forever(fake: FakeWhiplash, host: str, port: int) -> None:
    """Serve until cancelled, announcing the URL on stdout so a parent process can read the port."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)  # so the runner cleans up instead of dying mid-response
    async with serve_whiplash(fake, host, port, access_log=True) as url:
        print(f"whiplash-sim listening url={url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the simulator standalone: ``python -m klaviyo_bridge.sandbox.whiplash --customer 101``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    asyncio.run(_serve_forever(build_from_args(args), args.host, args.port))


if __name__ == "__main__":
    main()
