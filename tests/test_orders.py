"""Tests for the Whiplash order parser: strict on what decides, tolerant on what decorates."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klaviyo_bridge.errors import MalformedOrder
from klaviyo_bridge.orders import (
    EXCERPT_CHARS,
    STATUS_NAMES,
    Order,
    OrderItem,
    Package,
    excerpt,
    order_id_of,
    order_key,
    parse_order,
)

DROP = object()  # marks a key to remove from the base raw order


def raw(**changes: Any) -> dict[str, Any]:
    """Return a valid raw v2 order (shaped like Whiplash's shipped example) with ``changes`` applied."""
    base: dict[str, Any] = {
        "id": 12345,
        "customer_id": 77,
        "status": 300,
        "status_name": "Shipped",
        "updated_at": "2026-03-13T11:39:21.000-04:00",
        "email": "ann@example.com",
        "first_name": "Ann",
        "last_name": "Lee",
        "shipping_name": "Ann Lee",
        "shipping_company": None,
        "humanize_id": "1030",
        "originator": {"provider": "shopify", "original_id": "68539350"},
        "order_items": [
            {"sku": "TS-1", "description": "T-shirt", "quantity": 2, "price": "72.99", "currency": "USD"}
        ],
        "tracking": [],
        "tracking_links": [],
        "packages": [
            {
                "tracking": "9400111",
                "tracking_link": "https://tools.usps.com/go/TrackConfirmAction?tLabels=9400111",
                "shipped_on": "2026-03-13T10:00:00.000-04:00",
            }
        ],
        "ship_method": "USPS Priority Mail",
        "shipping_method": {"carrier": "USPS", "name": "Priority Mail"},
        "shipped_on": "2026-03-13T10:00:00.000-04:00",
        "approximate_delivery_date": "2026-03-17",
    }
    for key, value in changes.items():
        if value is DROP:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def item(**changes: Any) -> dict[str, Any]:
    """Return a raw order item with ``changes`` applied."""
    base: dict[str, Any] = {"sku": "S", "description": "D", "quantity": 1, "price": "1.00", "currency": "USD"}
    for key, value in changes.items():
        if value is DROP:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def malformed(obj: object) -> MalformedOrder:
    """Parse ``obj`` expecting MalformedOrder and return it."""
    with pytest.raises(MalformedOrder) as info:
        parse_order(obj)
    return info.value


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> datetime:
    """Return an aware UTC datetime."""
    return datetime(y, mo, d, h, mi, s, us, tzinfo=UTC)


# ---------------------------------------------------------------- the whole order


def test_full_order_parses_every_field() -> None:
    order = parse_order(raw())
    assert order == Order(
        id=12345,
        customer_id=77,
        status=300,
        status_name="Shipped",
        updated_at=utc(2026, 3, 13, 15, 39, 21),
        email="ann@example.com",
        first_name="Ann",
        last_name="Lee",
        shipping_name="Ann Lee",
        shipping_company=None,
        humanize_id="1030",
        shop_order_id="68539350",
        items=(OrderItem("TS-1", "T-shirt", 2, Decimal("72.99"), "USD"),),
        tracking=(),
        tracking_links=(),
        packages=(
            Package(
                "9400111",
                "https://tools.usps.com/go/TrackConfirmAction?tLabels=9400111",
                utc(2026, 3, 13, 14, 0, 0),
            ),
        ),
        carrier="USPS",
        shipping_method="USPS Priority Mail",
        shipped_on=utc(2026, 3, 13, 14, 0, 0),
        estimated_delivery=date(2026, 3, 17),
    )
    assert order.key == (utc(2026, 3, 13, 15, 39, 21), 12345)


def test_minimal_order_has_empty_optionals() -> None:
    order = parse_order({"id": 1, "status": 100, "updated_at": "2026-03-13T15:39:21Z"})
    assert (order.email, order.first_name, order.humanize_id, order.shop_order_id) == (None, None, None, None)
    assert (order.items, order.tracking, order.packages) == ((), (), ())
    assert (order.carrier, order.shipping_method, order.shipped_on, order.estimated_delivery) == (
        None,
        None,
        None,
        None,
    )


# ---------------------------------------------------------------- timestamps


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("2026-03-13T11:39:21.000-04:00", utc(2026, 3, 13, 15, 39, 21), id="eastern-offset"),
        pytest.param("2026-03-13T15:39:21Z", utc(2026, 3, 13, 15, 39, 21), id="zulu"),
        pytest.param("2026-03-13T15:39:21+00:00", utc(2026, 3, 13, 15, 39, 21), id="plus-zero"),
        pytest.param("2026-03-14T01:09:21+09:30", utc(2026, 3, 13, 15, 39, 21), id="half-hour-offset"),
        pytest.param("2026-03-13T23:30:00-04:00", utc(2026, 3, 14, 3, 30, 0), id="crosses-midnight"),
        pytest.param(" 2026-03-13T15:39:21.250Z ", utc(2026, 3, 13, 15, 39, 21, 250000), id="padded-ms"),
    ],
)
def test_updated_at_is_converted_to_utc(text: str, expected: datetime) -> None:
    order = parse_order(raw(updated_at=text))
    assert order.updated_at == expected
    assert order.updated_at.utcoffset() is not None
    assert order.updated_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


@pytest.mark.usefixtures("tokyo")
def test_times_are_utc_whatever_the_local_zone() -> None:
    order = parse_order(raw())
    for at in (order.updated_at, order.shipped_on, order.packages[0].shipped_on):
        assert at is not None
        assert at.utcoffset() == timedelta(0)
    assert order.updated_at.isoformat() == "2026-03-13T15:39:21+00:00"
    assert order_key(raw()) == (utc(2026, 3, 13, 15, 39, 21), 12345)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        pytest.param("shipped_on", "2026-03-13T10:00:00-04:00", utc(2026, 3, 13, 14), id="shipped-offset"),
        pytest.param("shipped_on", "2026-03-13T10:00:00", None, id="shipped-naive-dropped"),
        pytest.param("shipped_on", "soon", None, id="shipped-garbage-dropped"),
        pytest.param("shipped_on", 1710000000, None, id="shipped-epoch-dropped"),
        pytest.param("shipped_on", "0001-01-01T00:00:00+01:00", None, id="shipped-overflow-dropped"),
    ],
)
def test_optional_datetimes_are_tolerant(field: str, value: object, expected: datetime | None) -> None:
    assert parse_order(raw(**{field: value})).shipped_on == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("2026-03-17", date(2026, 3, 17), id="date"),
        pytest.param("2026-03-17T00:00:00.000-04:00", date(2026, 3, 17), id="datetime-keeps-local-date"),
        pytest.param("2026-03-17T23:00:00-04:00", date(2026, 3, 17), id="late-evening-not-shifted"),
        pytest.param("next week", None, id="garbage"),
        pytest.param(20260317, None, id="int"),
        pytest.param(None, None, id="null"),
    ],
)
def test_approximate_delivery_date(value: object, expected: date | None) -> None:
    assert parse_order(raw(approximate_delivery_date=value)).estimated_delivery == expected


# ---------------------------------------------------------------- required fields


@pytest.mark.parametrize(
    ("changes", "order_id", "why"),
    [
        pytest.param({"id": DROP}, None, "id", id="id-missing"),
        pytest.param({"id": None}, None, "id", id="id-null"),
        pytest.param({"id": "12345"}, None, "id", id="id-string"),
        pytest.param({"id": 12345.0}, None, "id", id="id-float"),
        pytest.param({"id": True}, None, "id", id="id-bool"),
        pytest.param({"id": 0}, None, "id", id="id-zero"),
        pytest.param({"id": -4}, None, "id", id="id-negative"),
        pytest.param({"id": 2**64}, None, "id", id="id-beyond-int64"),
        pytest.param({"status": DROP}, 12345, "status", id="status-missing"),
        pytest.param({"status": "300"}, 12345, "status", id="status-string"),
        pytest.param({"status": True}, 12345, "status", id="status-bool"),
        pytest.param({"status": 300.0}, 12345, "status", id="status-float"),
        pytest.param({"updated_at": DROP}, 12345, "updated_at", id="updated-missing"),
        pytest.param({"updated_at": "2026-03-13T11:39:21"}, 12345, "updated_at", id="updated-naive"),
        pytest.param({"updated_at": "2026-03-13"}, 12345, "updated_at", id="updated-date-only"),
        pytest.param({"updated_at": "yesterday"}, 12345, "updated_at", id="updated-garbage"),
        pytest.param({"updated_at": 1773416361}, 12345, "updated_at", id="updated-epoch"),
        pytest.param({"updated_at": None}, 12345, "updated_at", id="updated-null"),
    ],
)
def test_required_fields_are_strict(changes: dict[str, Any], order_id: int | None, why: str) -> None:
    exc = malformed(raw(**changes))
    assert exc.order_id == order_id
    assert why in exc.why


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        pytest.param({"id": None}, "id missing or not a positive integer", id="id"),
        pytest.param({"status": None}, "status missing or not an integer", id="status"),
        pytest.param({"updated_at": None}, "updated_at missing or not an ISO-8601 time with offset", id="updated_at"),
    ],
)
def test_malformed_reason_is_stated_exactly(changes: dict[str, Any], why: str) -> None:
    # The reason is what an operator reads in `dead-letters list`.
    assert malformed(raw(**changes)).why == why


INT64 = 2**63 - 1


@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [
        pytest.param({"id": INT64}, "id", INT64, id="id-int64-max"),
        pytest.param({"status": INT64}, "status", INT64, id="status-int64-max"),
        pytest.param({"status": -INT64}, "status", -INT64, id="status-int64-min"),
        pytest.param({"status": 0}, "status", 0, id="status-zero"),
    ],
)
def test_int64_bounds_accepted(changes: dict[str, Any], field: str, expected: int) -> None:
    assert getattr(parse_order(raw(**changes)), field) == expected


@pytest.mark.parametrize(
    ("changes", "order_id", "why"),
    [
        pytest.param({"id": INT64 + 1}, None, "id", id="id-over-int64"),
        pytest.param({"status": INT64 + 1}, 12345, "status", id="status-over-int64"),
        pytest.param({"status": -INT64 - 1}, 12345, "status", id="status-under-int64"),
    ],
)
def test_int64_bounds_rejected(changes: dict[str, Any], order_id: int | None, why: str) -> None:
    exc = malformed(raw(**changes))
    assert (exc.order_id, exc.why.split()[0]) == (order_id, why)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(INT64, INT64, id="int64-max"),
        pytest.param(-INT64, -INT64, id="int64-min"),
        pytest.param(INT64 + 1, None, id="over-int64"),
        pytest.param(-INT64 - 1, None, id="under-int64"),
        pytest.param("77", None, id="string"),
        pytest.param(True, None, id="bool"),
        pytest.param(None, None, id="null"),
    ],
)
def test_customer_id_is_tolerant(value: object, expected: int | None) -> None:
    assert parse_order(raw(customer_id=value)).customer_id == expected


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        pytest.param(None, "order is a null, not an object", id="null"),
        pytest.param([raw()], "order is a list, not an object", id="list"),
        pytest.param("order", "order is a str, not an object", id="string"),
        pytest.param(12345, "order is a int, not an object", id="int"),
        pytest.param(1.5, "order is a float, not an object", id="float"),
        pytest.param(True, "order is a bool, not an object", id="bool"),
        pytest.param({}, "id missing or not a positive integer", id="empty-object"),
    ],
)
def test_non_orders_are_malformed(obj: object, why: str) -> None:
    exc = malformed(obj)
    assert (exc.order_id, exc.why) == (None, why)


# ---------------------------------------------------------------- items


@pytest.mark.parametrize(
    ("price", "expected"),
    [
        pytest.param("72.99", Decimal("72.99"), id="decimal-string"),
        pytest.param(" 72.99 ", Decimal("72.99"), id="padded-string"),
        pytest.param(72.99, Decimal("72.99"), id="float-keeps-cents"),
        pytest.param(10, Decimal(10), id="int"),
        pytest.param("0.0", Decimal("0.0"), id="free"),
        pytest.param(None, None, id="null"),
        pytest.param(DROP, None, id="missing"),
        pytest.param("", None, id="blank"),
    ],
)
def test_item_price_accepted(price: object, expected: Decimal | None) -> None:
    parsed = parse_order(raw(order_items=[item(price=price)])).items[0].price
    assert parsed == expected
    assert str(parsed) == str(expected)


@pytest.mark.parametrize(
    "price",
    [
        pytest.param("abc", id="word"),
        pytest.param("72,99", id="comma"),
        pytest.param("NaN", id="nan"),
        pytest.param("sNaN", id="signalling-nan"),
        pytest.param("Infinity", id="infinity"),
        pytest.param(float("inf"), id="float-inf"),
        pytest.param(True, id="bool"),
        pytest.param(["1"], id="list"),
        pytest.param({"amount": "1"}, id="object"),
        pytest.param("-5.00", id="negative"),
        pytest.param("1e13", id="absurd"),
    ],
)
def test_item_price_invalid_is_malformed(price: object) -> None:
    exc = malformed(raw(order_items=[item(), item(price=price)]))
    assert exc.order_id == 12345
    assert "order_items[1].price" in exc.why


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        pytest.param(DROP, 1, id="missing-defaults-1"),
        pytest.param(None, 1, id="null-defaults-1"),
        pytest.param(0, 0, id="zero"),
        pytest.param(3, 3, id="three"),
    ],
)
def test_item_quantity_accepted(quantity: object, expected: int) -> None:
    assert parse_order(raw(order_items=[item(quantity=quantity)])).items[0].quantity == expected


def test_item_bounds() -> None:
    # Σ price × quantity must stay a finite float: quantity ≤ 10⁹ and price < 10¹² are the bounds.
    ok = parse_order(raw(order_items=[item(quantity=10**9, price="999999999999.99")])).items[0]
    assert (ok.quantity, ok.price) == (10**9, Decimal("999999999999.99"))
    assert "quantity" in malformed(raw(order_items=[item(quantity=10**9 + 1)])).why
    assert "price" in malformed(raw(order_items=[item(price=10**12)])).why


@pytest.mark.parametrize(
    ("currency", "expected"),
    [
        pytest.param(DROP, None, id="missing"),
        pytest.param(None, None, id="null"),
        pytest.param(" ", None, id="blank"),
        pytest.param(840, None, id="number"),
        pytest.param("eur", "EUR", id="upper-cased"),
    ],
)
def test_item_currency(currency: object, expected: str | None) -> None:
    assert parse_order(raw(order_items=[item(currency=currency)])).items[0].currency == expected


@pytest.mark.parametrize(
    "quantity",
    [
        pytest.param(-1, id="negative"),
        pytest.param(1.5, id="fraction"),
        pytest.param(2.0, id="float"),
        pytest.param("2", id="string"),
        pytest.param(True, id="bool"),
        pytest.param(10**12, id="absurd"),
    ],
)
def test_item_quantity_invalid_is_malformed(quantity: object) -> None:
    exc = malformed(raw(order_items=[item(quantity=quantity)]))
    assert (exc.order_id, exc.why) == (12345, "order_items[0].quantity is not a non-negative integer")


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        pytest.param("none", (), id="not-a-list"),
        pytest.param(None, (), id="null"),
        pytest.param([None, "x", 3], (), id="non-object-entries-skipped"),
        pytest.param(
            [{"sku": "  ", "description": "\t", "currency": " usd "}],
            (OrderItem(None, None, 1, None, "USD"),),
            id="blank-strings-and-currency-case",
        ),
    ],
)
def test_items_tolerate_shapes(items: object, expected: tuple[OrderItem, ...]) -> None:
    assert parse_order(raw(order_items=items)).items == expected


# ---------------------------------------------------------------- contact fields


@pytest.mark.parametrize(
    ("email", "expected", "invalid"),
    [
        pytest.param("ann@example.com", "ann@example.com", False, id="plain"),
        pytest.param("Ann.Lee@Example.COM", "ann.lee@example.com", False, id="uppercase"),
        pytest.param("  ann@example.com\n", "ann@example.com", False, id="whitespace"),
        pytest.param("Ann+Orders@Example.com", "ann+orders@example.com", False, id="plus-tag-kept"),
        pytest.param("", None, False, id="empty"),
        pytest.param("   ", None, False, id="whitespace-only"),
        pytest.param(None, None, False, id="null"),
        pytest.param(42, None, False, id="number"),
        pytest.param(["ann@example.com"], None, False, id="list"),
        pytest.param("ann.example.com", None, True, id="no-at"),
        pytest.param("ann@@example.com", None, True, id="two-ats"),
        pytest.param("ann smith@example.com", None, True, id="space-inside"),
        pytest.param("ann@localhost", None, True, id="no-dot-domain"),
        pytest.param("ann@example..com", None, True, id="empty-label"),
        pytest.param("ann@example.test", None, True, id="reserved-domain"),
    ],
)
def test_email_normalisation(email: object, expected: str | None, invalid: bool) -> None:
    """An email is either an address by syntax (trimmed, lower-cased) or absent; one that is present but not an
    address is flagged, so the order gets no profile and no event and is counted as such."""
    order = parse_order(raw(email=email))
    assert (order.email, order.email_invalid) == (expected, invalid)


@pytest.mark.parametrize(
    "field", ["first_name", "last_name", "shipping_name", "shipping_company", "status_name", "humanize_id"]
)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("", None, id="empty"),
        pytest.param(" \t\n", None, id="whitespace"),
        pytest.param("\u00a0", None, id="nbsp"),
        pytest.param(" José ", "José", id="stripped-unicode"),
        pytest.param({"x": 1}, None, id="object"),
    ],
)
def test_strings_are_stripped_and_blank_is_none(field: str, value: object, expected: str | None) -> None:
    assert getattr(parse_order(raw(**{field: value})), field) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({"humanize_id": 1030}, "1030", id="humanize-int"),
        pytest.param({"humanize_id": True}, None, id="humanize-bool"),
        pytest.param({"originator": {"original_id": 68539350}}, "68539350", id="originator-int"),
        pytest.param({"originator": {"original_id": " 685 "}}, "685", id="originator-str"),
        pytest.param({"originator": {"original_id": None}}, None, id="originator-id-null"),
        pytest.param({"originator": "shopify"}, None, id="originator-not-object"),
        pytest.param({"originator": DROP}, None, id="originator-missing"),
    ],
)
def test_identifiers_become_text(changes: dict[str, Any], expected: str | None) -> None:
    order = parse_order(raw(**changes))
    value = order.humanize_id if "humanize_id" in changes else order.shop_order_id
    assert value == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(INT64, str(INT64), id="int64-max"),
        pytest.param(-INT64, str(-INT64), id="int64-min"),
        pytest.param(INT64 + 1, None, id="over-int64"),
    ],
)
def test_integer_identifiers_are_bounded(value: int, expected: str | None) -> None:
    assert parse_order(raw(humanize_id=value)).humanize_id == expected


# ---------------------------------------------------------------- shipping


@pytest.mark.parametrize(
    ("tracking", "expected"),
    [
        pytest.param("1Z999", ("1Z999",), id="single-string"),
        pytest.param(["1Z1", " 1Z2 "], ("1Z1", "1Z2"), id="list-stripped"),
        pytest.param(["1Z1", "", None, 7, "1Z1"], ("1Z1", "1Z1"), id="junk-dropped-order-kept"),
        pytest.param("  ", (), id="blank-string"),
        pytest.param(None, (), id="null"),
        pytest.param({"n": "1Z"}, (), id="object"),
    ],
)
def test_tracking_lists(tracking: object, expected: tuple[str, ...]) -> None:
    order = parse_order(raw(tracking=tracking, tracking_links=tracking))
    assert order.tracking == expected
    assert order.tracking_links == expected


@pytest.mark.parametrize(
    ("changes", "carrier", "method"),
    [
        pytest.param({}, "USPS", "USPS Priority Mail", id="ship-method-wins"),
        pytest.param({"ship_method": " "}, "USPS", "Priority Mail", id="falls-back-to-object-name"),
        pytest.param({"ship_method": DROP, "shipping_method": None}, None, None, id="none"),
        pytest.param({"shipping_method": "USPS"}, None, "USPS Priority Mail", id="object-mistyped"),
        pytest.param(
            {
                "ship_method": DROP,
                "shipping_method": DROP,
                "shipping_method_carrier": "UPS",
                "shipping_method_name": "UPS Ground",
            },
            "UPS",
            "UPS Ground",
            id="v2_1-flat-fields",
        ),
    ],
)
def test_shipping_method(changes: dict[str, Any], carrier: str | None, method: str | None) -> None:
    order = parse_order(raw(**changes))
    assert (order.carrier, order.shipping_method) == (carrier, method)


def test_packages_skip_non_objects_and_tolerate_fields() -> None:
    packages = [None, {"tracking": " 1Z ", "tracking_link": "", "shipped_on": "2026-03-13T10:00:00Z"}, {}]
    assert parse_order(raw(packages=packages)).packages == (
        Package("1Z", None, utc(2026, 3, 13, 10)),
        Package(None, None, None),
    )


# ---------------------------------------------------------------- keys and excerpts


@pytest.mark.parametrize(
    ("obj", "key", "order_id"),
    [
        pytest.param(raw(), (utc(2026, 3, 13, 15, 39, 21), 12345), 12345, id="valid"),
        pytest.param(raw(status="x"), (utc(2026, 3, 13, 15, 39, 21), 12345), 12345, id="bad-status-keyed"),
        pytest.param(raw(updated_at="2026-03-13T11:39:21"), None, 12345, id="naive-time"),
        pytest.param(raw(id=True), None, None, id="bool-id"),
        pytest.param(raw(id=DROP), None, None, id="no-id"),
        pytest.param([1, 2], None, None, id="not-object"),
        pytest.param(None, None, None, id="null"),
    ],
)
def test_order_key_and_id(obj: object, key: tuple[datetime, int] | None, order_id: int | None) -> None:
    assert order_key(obj) == key
    assert order_id_of(obj) == order_id


def test_excerpt_quotes_identity_and_status_only() -> None:
    """1. An order with a bad status. Result: the excerpt is compact JSON of its id, customer, status and time;
    nothing of the shopper (name, email, address, items) appears."""
    exc = malformed(raw(status=None, shipping_address_1="1 Main St", notes="x" * 1000))
    assert exc.excerpt == (
        '{"id":12345,"customer_id":77,"status":null,"status_name":"Shipped",'
        '"updated_at":"2026-03-13T11:39:21.000-04:00"}'
    )
    for personal in ("ann", "Ann", "Lee", "Main St", "T-shirt", "xxx"):
        assert personal not in exc.excerpt


def test_excerpt_is_cut_to_limit() -> None:
    exc = malformed(raw(status=None, status_name="x" * 1000))
    assert exc.excerpt.startswith('{"id":12345,"customer_id":77,"status":null,')
    assert len(exc.excerpt) <= EXCERPT_CHARS
    assert exc.excerpt.endswith("…")


def test_excerpt_short_object_is_whole() -> None:
    assert malformed({"id": "ö"}).excerpt == '{"id":"ö"}'


def _circular() -> list[object]:
    loop: list[object] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({"id": 1, "x": object()}, id="unserialisable-value"),
        pytest.param({(1, 2): "tuple key"}, id="tuple-key"),
        pytest.param(_circular(), id="circular"),
        pytest.param({"id": 10**5000}, id="huge-int"),
        pytest.param({"id": 1, "status": float("nan")}, id="nan"),
    ],
)
def test_excerpt_never_crashes(obj: object) -> None:
    exc = malformed(obj)
    assert 0 < len(exc.excerpt) <= EXCERPT_CHARS
    assert len(excerpt(obj)) <= EXCERPT_CHARS


def test_excerpt_limit_is_200_characters_ellipsis_included() -> None:
    assert EXCERPT_CHARS == 200
    at_limit = {"id": 1, "status_name": "x" * (EXCERPT_CHARS - len('{"id":1,"status_name":""}'))}
    assert excerpt(at_limit) == '{"id":1,"status_name":"' + at_limit["status_name"] + '"}'
    assert len(excerpt(at_limit)) == EXCERPT_CHARS
    longer = {"id": 1, "status_name": at_limit["status_name"] + "y"}
    assert excerpt(longer) == ('{"id":1,"status_name":"' + longer["status_name"])[: EXCERPT_CHARS - 1] + "…"
    assert len(excerpt(longer)) == EXCERPT_CHARS


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no")


@pytest.mark.parametrize(
    ("obj", "text"),
    [
        pytest.param({"id": 1, "status": Decimal("1.50")}, '{"id":1,"status":"Decimal(\'1.50\')"}',
                     id="value-by-repr"),
        pytest.param({"id": _circular()}, "{'id': [[...]]}", id="circular-by-repr"),
        pytest.param({"id": _Unprintable()}, "<unprintable dict>", id="unprintable"),
        pytest.param("a string", "<str>", id="not-an-object"),
        pytest.param([1, 2], "<list>", id="a-list"),
        pytest.param(None, "<null>", id="null"),
        pytest.param({"email": "ann@example.com", "first_name": "Ann"}, "{}", id="only-personal-fields"),
    ],
)
def test_excerpt_of_what_json_cannot_show(obj: object, text: str) -> None:
    assert excerpt(obj) == text


def test_status_table_covers_the_documented_codes() -> None:
    assert len(STATUS_NAMES) == 27
    assert (STATUS_NAMES[45], STATUS_NAMES[300], STATUS_NAMES[350]) == (
        "Closed by Originator",
        "Shipped",
        "Delivered",
    )


def test_status_table_is_pinned_to_the_spec() -> None:
    # The "Status" property of every event whose order has no status_name (whiplash-api.md §4).
    assert dict(STATUS_NAMES) == {
        30: "Shipped Externally", 35: "Quote", 40: "Cancelled", 45: "Closed by Originator", 50: "Unpaid",
        75: "Pending Return", 77: "Return Verified", 80: "Pre-Order", 90: "Paused", 95: "Insufficient Inventory",
        100: "Processing", 120: "Printed", 140: "Pending Pick Confirmation", 150: "Picked",
        155: "Prepacking in Progress", 160: "Packed", 200: "Label Scheduled for Purchase", 250: "Label Purchased",
        300: "Shipped", 325: "Picked Up", 350: "Delivered", 375: "Return Expired", 380: "Replacement Cancelled",
        400: "Returned Undeliverable", 410: "Replacement Requested", 430: "Exchanged", 450: "Refund Requested",
    }


# ---------------------------------------------------------------- property: never anything but MalformedOrder

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
_json = st.recursive(
    _scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
_times = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.one_of(st.none(), st.timezones()),
).map(lambda d: d.isoformat()) | st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00"])
_money = st.decimals(allow_nan=True, allow_infinity=True).map(str) | st.floats() | st.integers() | _json
_item = st.fixed_dictionaries(
    {},
    optional={
        "sku": _json,
        "description": _json,
        "quantity": st.integers(min_value=-3, max_value=10**10) | _json,
        "price": _money,
        "currency": _json,
    },
)
_order = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(min_value=-2, max_value=2**64) | _json,
        "status": st.sampled_from([40, 100, 300, 350]) | _json,
        "updated_at": _times | _json,
        "email": st.emails() | _json,
        "first_name": _json,
        "shipping_name": _json,
        "humanize_id": _json,
        "originator": st.fixed_dictionaries({}, optional={"original_id": _json}) | _json,
        "order_items": st.lists(_item | _json, max_size=3) | _json,
        "packages": st.lists(st.fixed_dictionaries({}, optional={"shipped_on": _times, "tracking": _json}))
        | _json,
        "tracking": _json,
        "tracking_links": _json,
        "shipping_method": st.fixed_dictionaries({}, optional={"carrier": _json, "name": _json}) | _json,
        "ship_method": _json,
        "shipped_on": _times | _json,
        "approximate_delivery_date": _times | st.dates().map(date.isoformat) | _json,
    },
)


def _outcome(obj: object) -> Order | MalformedOrder:
    """Return the parsed order or the MalformedOrder raised; any other exception fails the test."""
    try:
        return parse_order(obj)
    except MalformedOrder as exc:
        return exc


@settings(max_examples=200, deadline=None)
@given(obj=_json | _order)
def test_parse_order_returns_order_or_raises_malformed_only(obj: object) -> None:
    order = _outcome(obj)
    if isinstance(order, MalformedOrder):
        assert len(order.excerpt) <= EXCERPT_CHARS
        assert order.order_id is None or order.order_id == order_id_of(obj)
        return
    assert isinstance(order, Order)
    assert order.id > 0
    assert order.updated_at.utcoffset() is not None
    assert order.updated_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert order_key(obj) == order.key
    json.dumps([str(i.price) for i in order.items])  # prices are plain finite decimals
