"""Whiplash order model and its parser: raw JSON in, a typed ``Order`` or ``MalformedOrder`` out.

Pure: no I/O. Invariants:
- every timestamp leaves here as an aware UTC datetime whatever offset Whiplash used;
- ``parse_order`` raises ``MalformedOrder`` and nothing else, whatever JSON value it is given;
- the fields the bridge decides with (``id``, ``status``, ``updated_at``) and the money fields
  (item ``quantity`` and ``price``) are strict; display fields are tolerant: a blank or mistyped
  one becomes None (or is dropped from its list) rather than costing the customer an email;
- an email is either valid by syntax (email-validator, no DNS) and normalised (trimmed, lower-cased), or
  absent: an invalid one is dropped and flagged (``email_invalid``), so Klaviyo never receives it;
- a ``MalformedOrder``'s excerpt quotes only the order's identity and status fields, never a shopper's
  name, email or address.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, TypeGuard

from email_validator import EmailNotValidError, validate_email

from .errors import MalformedOrder

# Whiplash v2 `status` → `status_name` (whiplash-api.md §4, ApiV2EntitiesOrder.status enum).
STATUS_NAMES: Mapping[int, str] = {
    30: "Shipped Externally",
    35: "Quote",
    40: "Cancelled",
    45: "Closed by Originator",
    50: "Unpaid",
    75: "Pending Return",
    77: "Return Verified",
    80: "Pre-Order",
    90: "Paused",
    95: "Insufficient Inventory",
    100: "Processing",
    120: "Printed",
    140: "Pending Pick Confirmation",
    150: "Picked",
    155: "Prepacking in Progress",
    160: "Packed",
    200: "Label Scheduled for Purchase",
    250: "Label Purchased",
    300: "Shipped",
    325: "Picked Up",
    350: "Delivered",
    375: "Return Expired",
    380: "Replacement Cancelled",
    400: "Returned Undeliverable",
    410: "Replacement Requested",
    430: "Exchanged",
    450: "Refund Requested",
}

EXCERPT_CHARS = 200
# What a malformed order's excerpt may quote: identity and status, nothing about the shopper.
EXCERPT_FIELDS = ("id", "customer_id", "status", "status_name", "updated_at")
# SQLite INTEGER is signed 64-bit; a larger id or status could not be remembered.
_MAX_INT64 = 2**63 - 1
# Bounds that keep Σ price×quantity a finite float; anything beyond is garbage, not an order.
_MAX_QUANTITY = 10**9
_MAX_PRICE = Decimal(10) ** 12


@dataclass(frozen=True, slots=True)
class OrderItem:
    """One order line."""

    sku: str | None
    name: str | None  # Whiplash `description`
    quantity: int
    price: Decimal | None  # unit price; Whiplash sends a decimal string
    currency: str | None


@dataclass(frozen=True, slots=True)
class Package:
    """One shipped package."""

    tracking: str | None
    tracking_link: str | None
    shipped_on: datetime | None


@dataclass(frozen=True, slots=True)
class Order:
    """The fields of a Whiplash v2 order that the bridge uses."""

    id: int
    customer_id: int | None
    status: int
    status_name: str | None
    updated_at: datetime  # UTC
    email: str | None  # valid by syntax, stripped and lower-cased; None when absent, blank or invalid
    first_name: str | None
    last_name: str | None
    shipping_name: str | None
    shipping_company: str | None
    humanize_id: str | None
    shop_order_id: str | None  # originator.original_id
    items: tuple[OrderItem, ...]
    tracking: tuple[str, ...]  # order-level `tracking`
    tracking_links: tuple[str, ...]  # order-level `tracking_links`
    packages: tuple[Package, ...]
    carrier: str | None  # shipping_method.carrier
    shipping_method: str | None  # ship_method, else shipping_method.name
    shipped_on: datetime | None  # UTC
    estimated_delivery: date | None  # approximate_delivery_date
    email_invalid: bool = False  # Whiplash sent an email that is not one: no profile, no event

    @property
    def key(self) -> tuple[datetime, int]:
        """Return the keyset position (updated_at, id) used for paging and cursors."""
        return (self.updated_at, self.id)


class _Bad(Exception):
    """Internal: one field is unusable; ``parse_order`` adds the id and excerpt."""


# ---------------------------------------------------------------- public API


def parse_order(obj: object) -> Order:
    """Parse one raw Whiplash order; raise ``MalformedOrder`` if it cannot be used."""
    order_id = order_id_of(obj)
    try:
        return _parse(obj)
    except _Bad as exc:
        raise MalformedOrder(order_id, str(exc), excerpt(obj)) from None


def order_id_of(obj: object) -> int | None:
    """Return the raw order's usable id, or None."""
    if not isinstance(obj, dict):
        return None
    try:
        return _order_id(obj.get("id"))
    except _Bad:
        return None


def order_key(obj: object) -> tuple[datetime, int] | None:
    """Return the raw order's (updated_at UTC, id) keyset position, or None if either is unusable."""
    order_id = order_id_of(obj)
    if order_id is None or not isinstance(obj, dict):
        return None
    updated_at = _aware_datetime(obj.get("updated_at"))
    return None if updated_at is None else (updated_at, order_id)


def excerpt(obj: object, limit: int = EXCERPT_CHARS) -> str:
    """Return compact JSON of the order's identity and status fields, cut to ``limit``; never raises.

    Everything else of an order is the shopper's (names, email, address): logs and status never show it.
    """
    if not isinstance(obj, dict):
        return f"<{_kind(obj)}>"
    shown = {key: obj[key] for key in EXCERPT_FIELDS if key in obj}
    try:
        text = json.dumps(shown, separators=(",", ":"), ensure_ascii=False, default=repr)
    except Exception:  # huge ints, odd values: an excerpt must never hide the real error
        text = _safe_repr(shown)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:
        return f"<unprintable {type(obj).__name__}>"


# ---------------------------------------------------------------- the order


def _parse(obj: object) -> Order:
    if not isinstance(obj, dict):
        raise _Bad(f"order is a {_kind(obj)}, not an object")
    order_id, status = _order_id(obj.get("id")), _status(obj.get("status"))
    updated_at = _aware_datetime(obj.get("updated_at"))
    if updated_at is None:
        raise _Bad("updated_at missing or not an ISO-8601 time with offset")
    email = _email(obj.get("email"))
    return Order(
        id=order_id,
        customer_id=_opt_int(obj.get("customer_id")),
        status=status,
        status_name=_opt_str(obj.get("status_name")),
        updated_at=updated_at,
        email=email,
        email_invalid=email is None and _opt_str(obj.get("email")) is not None,
        first_name=_opt_str(obj.get("first_name")),
        last_name=_opt_str(obj.get("last_name")),
        shipping_name=_opt_str(obj.get("shipping_name")),
        shipping_company=_opt_str(obj.get("shipping_company")),
        humanize_id=_id_str(obj.get("humanize_id")),
        shop_order_id=_id_str(_field(obj.get("originator"), "original_id")),
        items=tuple(_item(i, raw) for i, raw in enumerate(_dicts(obj.get("order_items")))),
        tracking=_str_list(obj.get("tracking")),
        tracking_links=_str_list(obj.get("tracking_links")),
        packages=tuple(_package(raw) for raw in _dicts(obj.get("packages"))),
        **_shipping(obj),
    )


def _shipping(obj: dict[Any, Any]) -> dict[str, Any]:
    method = obj.get("shipping_method")
    # v2.1 flattens shipping_method into shipping_method_{carrier,name}; read both shapes.
    carrier = _opt_str(_field(method, "carrier")) or _opt_str(obj.get("shipping_method_carrier"))
    name = _opt_str(_field(method, "name")) or _opt_str(obj.get("shipping_method_name"))
    return {
        "carrier": carrier,
        "shipping_method": _opt_str(obj.get("ship_method")) or name,
        "shipped_on": _aware_datetime(obj.get("shipped_on")),
        "estimated_delivery": _date(obj.get("approximate_delivery_date")),
    }


def _item(index: int, raw: dict[Any, Any]) -> OrderItem:
    return OrderItem(
        sku=_opt_str(raw.get("sku")),
        name=_opt_str(raw.get("description")),
        quantity=_quantity(index, raw.get("quantity")),
        price=_price(index, raw.get("price")),
        currency=_currency(raw.get("currency")),
    )


def _package(raw: dict[Any, Any]) -> Package:
    return Package(
        tracking=_opt_str(raw.get("tracking")),
        tracking_link=_opt_str(raw.get("tracking_link")),
        shipped_on=_aware_datetime(raw.get("shipped_on")),
    )


# ---------------------------------------------------------------- strict fields


def _order_id(value: object) -> int:
    if not _is_int(value) or not 0 < value <= _MAX_INT64:
        raise _Bad("id missing or not a positive integer")
    return value


def _status(value: object) -> int:
    if not _is_int(value) or not -_MAX_INT64 <= value <= _MAX_INT64:
        raise _Bad("status missing or not an integer")
    return value


def _quantity(index: int, value: object) -> int:
    if value is None:
        return 1
    if not _is_int(value) or not 0 <= value <= _MAX_QUANTITY:
        raise _Bad(f"order_items[{index}].quantity is not a non-negative integer")
    return value


def _price(index: int, value: object) -> Decimal | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    price = _decimal(value)
    if price is None or not price.is_finite() or not 0 <= price < _MAX_PRICE:
        raise _Bad(f"order_items[{index}].price is not a decimal amount")
    return price


def _decimal(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        value = repr(value)  # repr gives the shortest decimal that round-trips: 72.99 stays 72.99
    if not isinstance(value, int | str):
        return None
    try:
        return Decimal(value)
    except (InvalidOperation, ValueError):
        return None


# ---------------------------------------------------------------- tolerant fields


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_int(value: object) -> int | None:
    return value if _is_int(value) and abs(value) <= _MAX_INT64 else None


def _opt_str(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _id_str(value: object) -> str | None:
    """Return a string or integer identifier as text (shop ids come as either)."""
    if _is_int(value) and abs(value) <= _MAX_INT64:
        return str(value)
    return _opt_str(value)


def _email(value: object) -> str | None:
    text = _opt_str(value)
    return None if text is None else valid_email(text)


@lru_cache(maxsize=65536)
def valid_email(text: str) -> str | None:
    """Return ``text`` trimmed and lower-cased if it is an email address by syntax (no DNS), else None."""
    # Cached: a shopper's address recurs on every change of each of their orders, and a check costs ~40 µs.
    lowered = text.strip().lower()
    try:
        validate_email(lowered, check_deliverability=False)
    except EmailNotValidError:
        return None
    return lowered


def _currency(value: object) -> str | None:
    text = _opt_str(value)
    return None if text is None else text.upper()


def _field(value: object, name: str) -> object:
    return value.get(name) if isinstance(value, dict) else None


def _dicts(value: object) -> Iterable[dict[Any, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _str_list(value: object) -> tuple[str, ...]:
    raw = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return tuple(s for s in map(_opt_str, raw) if s is not None)


def _aware_datetime(value: object) -> datetime | None:
    """Return an ISO-8601 time with offset as UTC; None if absent, unparseable or naive."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
        # A naive time could be any zone; guessing would shift every event by hours.
        return None if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _date(value: object) -> date | None:
    """Return the calendar date of "YYYY-MM-DD" or of a datetime string, as written."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        return date.fromisoformat(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).date()
    except ValueError:
        return None


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
