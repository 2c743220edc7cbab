"""Whiplash order model and its parser: raw JSON in, a typed ``Order`` or ``MalformedOrder`` out.

Pure: no I/O. Every timestamp leaves here as an aware UTC datetime whatever offset Whiplash used.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal


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
    email: str | None  # stripped and lower-cased; None when absent or blank
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

    @property
    def key(self) -> tuple[datetime, int]:
        """Return the keyset position (updated_at, id) used for paging and cursors."""
        return (self.updated_at, self.id)
