"""Tests for the pure mapping core: names, milestones, at-most-once events and their payloads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klaviyo_bridge.core import (
    DEFAULT_METRIC_NAMES,
    DEFAULT_STATUS_EVENTS,
    MAX_ITEMS,
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    EventKind,
    EventRow,
    OrderMemory,
    Plan,
    ProfileChange,
    ProfileName,
    Rules,
    event_for,
    event_kind_of_key,
    event_payload,
    order_of_key,
    plan_page,
    profile_name,
    sample_events,
    setup_profile,
    should_send_name,
)
from klaviyo_bridge.orders import Order, OrderItem, Package

P, C, S, D = EventKind.PROCESSING, EventKind.CANCELLED, EventKind.SHIPPED, EventKind.DELIVERED
NOW = datetime(2026, 3, 14, 12, 0, 0, tzinfo=UTC)
T0 = datetime(2026, 3, 13, 15, 39, 21, 500000, tzinfo=UTC)
RULES = Rules(
    customer_id=7,
    launch_date=date(2026, 3, 1),
    metric_names=DEFAULT_METRIC_NAMES,
    status_events=DEFAULT_STATUS_EVENTS,
    stale_after=timedelta(days=3),
)
BASE = Order(
    id=1001,
    customer_id=7,
    status=100,
    status_name=None,
    updated_at=T0,
    email="ann@example.com",
    first_name="Ann",
    last_name="Lee",
    shipping_name="Ann Lee",
    shipping_company=None,
    humanize_id=None,
    shop_order_id=None,
    items=(),
    tracking=(),
    tracking_links=(),
    packages=(),
    carrier=None,
    shipping_method=None,
    shipped_on=None,
    estimated_delivery=None,
)


def order(**changes: Any) -> Order:
    """Return the base order with ``changes`` applied."""
    return replace(BASE, **changes)


def real(first: str | None, last: str | None) -> ProfileName:
    """Return a real name."""
    return ProfileName(first, last, None, "real")


def company(name: str) -> ProfileName:
    """Return a company fallback name."""
    return ProfileName(name, None, name, "company")


NONE = ProfileName(None, None, None, "none")


@dataclass
class Ledger:
    """Play the store: feed memory and names back into successive ``plan_page`` calls."""

    rules: Rules = RULES
    memory: dict[int, OrderMemory] = field(default_factory=dict)
    names: dict[str, ProfileName] = field(default_factory=dict)
    events: list[EventRow] = field(default_factory=list)
    profiles: list[ProfileChange] = field(default_factory=list)

    def run(self, orders: Sequence[Order], now: datetime = NOW) -> Plan:
        """Plan one page with what the store would load, then record the plan as committed."""
        known = {o.id: self.memory[o.id] for o in orders if o.id in self.memory}
        names = {o.email: self.names[o.email] for o in orders if o.email and o.email in self.names}
        plan = plan_page(self.rules, orders, known, names, now)
        self.memory.update(plan.orders)
        self.names.update(plan.names)
        self.events += plan.events
        self.profiles += plan.profiles
        return plan

    def kinds(self) -> list[EventKind]:
        """Return the kinds of every event planned so far, in order."""
        return [e.kind for e in self.events]


def steps(statuses: Sequence[int], oid: int = 1001, **changes: Any) -> list[Order]:
    """Return one order at successive statuses, each a second later."""
    return [
        order(id=oid, status=s, updated_at=T0 + timedelta(seconds=i), **changes)
        for i, s in enumerate(statuses)
    ]


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({}, real("Ann", "Lee"), id="first-and-last"),
        pytest.param({"first_name": None}, real(None, "Lee"), id="only-last"),
        pytest.param({"last_name": None}, real("Ann", None), id="only-first"),
        pytest.param(
            {"first_name": "  Mary   Ann ", "last_name": None}, real("Mary Ann", None), id="collapsed"
        ),
        pytest.param(
            {"first_name": None, "last_name": None, "shipping_name": "Ann Lee"},
            real("Ann", "Lee"),
            id="ship-split",
        ),
        pytest.param(
            {"first_name": None, "last_name": None, "shipping_name": "Cher"},
            real("Cher", None),
            id="ship-one-word",
        ),
        pytest.param(
            {"first_name": None, "last_name": None, "shipping_name": "  José   María  de la Cruz "},
            real("José", "María de la Cruz"),
            id="ship-multiple-spaces-unicode",
        ),
        pytest.param(
            {"first_name": None, "last_name": None, "shipping_name": "Zoë\u00a0Ångström"},
            real("Zoë", "Ångström"),
            id="ship-nbsp",
        ),
        pytest.param(
            {"first_name": " ", "last_name": "\t", "shipping_name": "Ann Lee"},
            real("Ann", "Lee"),
            id="whitespace-names-fall-through",
        ),
        pytest.param(
            {"first_name": None, "last_name": None, "shipping_name": None, "shipping_company": "Acme Co"},
            company("Acme Co"),
            id="company",
        ),
        pytest.param(
            {"first_name": None, "last_name": None, "shipping_name": "  ", "shipping_company": " Acme "},
            company("Acme"),
            id="blank-ship-name-then-company",
        ),
        pytest.param(
            {"first_name": None, "last_name": None, "shipping_name": None, "shipping_company": "   "},
            NONE,
            id="whitespace-company-is-none",
        ),
        pytest.param({"first_name": None, "last_name": None, "shipping_name": None}, NONE, id="none"),
    ],
)
def test_profile_name(changes: dict[str, Any], expected: ProfileName) -> None:
    assert profile_name(order(**changes)) == expected


LONG = "x" * MAX_NAME_CHARS


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({"first_name": LONG, "last_name": LONG}, real(LONG, LONG), id="at-limit-kept"),
        pytest.param({"first_name": LONG + "y", "last_name": "Lee"}, real(LONG, "Lee"), id="over-limit-cut"),
        pytest.param(
            {"first_name": None, "last_name": "x" * (MAX_NAME_CHARS - 1) + " Lee"},
            real(None, "x" * (MAX_NAME_CHARS - 1)),
            id="cut-at-a-space-right-stripped",
        ),
        pytest.param(
            {"first_name": None, "last_name": None, "shipping_name": f"{LONG}y {LONG} Lee"},
            real(LONG, LONG),
            id="shipping-name-parts-cut",
        ),
        pytest.param(
            {"first_name": None, "last_name": None, "shipping_name": None, "shipping_company": LONG + "y"},
            company(LONG),
            id="company-cut",
        ),
    ],
)
def test_names_are_clipped_to_255_characters(changes: dict[str, Any], expected: ProfileName) -> None:
    assert MAX_NAME_CHARS == 255
    assert profile_name(order(**changes)) == expected


@pytest.mark.parametrize(
    ("new", "sent", "expected"),
    [
        pytest.param(NONE, None, True, id="never-sent-no-name-still-creates-profile"),
        pytest.param(real("Ann", "Lee"), None, True, id="never-sent-real"),
        pytest.param(company("Acme"), None, True, id="never-sent-company"),
        pytest.param(NONE, real("Ann", "Lee"), False, id="none-never-clears-real"),
        pytest.param(NONE, company("Acme"), False, id="none-never-clears-company"),
        pytest.param(NONE, NONE, False, id="none-after-none"),
        pytest.param(real("Ann", "Lee"), real("Ann", "Lee"), False, id="real-same"),
        pytest.param(real("Ann", "Smith"), real("Ann", "Lee"), True, id="real-changed-latest-wins"),
        pytest.param(real("Ann", "Lee"), company("Acme"), True, id="real-over-company"),
        pytest.param(real("Ann", "Lee"), NONE, True, id="real-over-none"),
        pytest.param(company("Acme"), real("Ann", "Lee"), False, id="company-never-over-real"),
        pytest.param(company("Acme"), company("Acme"), False, id="company-same"),
        pytest.param(company("Beta"), company("Acme"), True, id="company-changed"),
        pytest.param(company("Acme"), NONE, True, id="company-over-none"),
    ],
)
def test_should_send_name(new: ProfileName, sent: ProfileName | None, expected: bool) -> None:
    assert should_send_name(new, sent) is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(
            real("Ann", "Lee"), {"email": "a@x.io", "first_name": "Ann", "last_name": "Lee"}, id="real"
        ),
        pytest.param(
            real("Cher", None), {"email": "a@x.io", "first_name": "Cher", "last_name": None},
            id="real-name-clears-a-stale-last-name",
        ),
        pytest.param(
            real(None, "Lee"), {"email": "a@x.io", "first_name": None, "last_name": "Lee"},
            id="real-name-clears-a-stale-first-name",
        ),
        pytest.param(
            company("Acme"), {"email": "a@x.io", "first_name": "Acme", "organization": "Acme"}, id="company"
        ),
        pytest.param(NONE, {"email": "a@x.io"}, id="none-never-null"),
    ],
)
def test_profile_attributes_omit_unknown_fields_but_send_whole_real_names(
    name: ProfileName, expected: dict[str, Any]
) -> None:
    assert ProfileChange("a@x.io", name).attributes() == expected


def test_setup_profile_is_nameless() -> None:
    change = setup_profile("ops@merchant.example")
    assert change == ProfileChange("ops@merchant.example", NONE)
    assert change.attributes() == {"email": "ops@merchant.example"}


# ---------------------------------------------------------------- status → event


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        *(
            pytest.param(code, P, id=f"{code}-processing")
            for code in (100, 120, 140, 150, 155, 160, 200, 250)
        ),
        pytest.param(40, C, id="40-cancelled"),
        pytest.param(300, S, id="300-shipped"),
        pytest.param(350, D, id="350-delivered"),
        pytest.param(45, None, id="45-closed-by-originator-nothing"),
        pytest.param(90, None, id="90-paused-nothing"),
        pytest.param(30, None, id="30-shipped-externally-nothing"),
        pytest.param(325, None, id="325-picked-up-nothing"),
        pytest.param(999, None, id="999-unknown-nothing"),
    ],
)
def test_event_for_default_statuses(status: int, expected: EventKind | None) -> None:
    assert event_for(order(status=status), RULES) is expected


# ---------------------------------------------------------------- at most once, milestones in order

PROGRESSIONS = [
    pytest.param([100], [P], id="processing"),
    pytest.param([100, 300, 350], [P, S, D], id="100-300-350-three-events"),
    pytest.param([350], [D], id="first-seen-delivered-only"),
    pytest.param([300], [S], id="first-seen-shipped-only"),
    pytest.param([300, 100], [S], id="300-100-regression-nothing"),
    pytest.param([350, 300], [D], id="350-300-regression-nothing"),
    pytest.param([100, 120, 160, 250], [P], id="warehouse-steps-once"),
    pytest.param([100, 300, 100, 300], [P, S], id="flapping-at-most-once"),
    pytest.param([300, 40], [S, C], id="cancelled-after-shipped"),
    pytest.param([300, 350, 40], [S, D, C], id="cancelled-after-delivered"),
    pytest.param([40, 40, 45, 40], [C], id="cancelled-once"),
    pytest.param([40, 100], [C, P], id="reinstated-after-cancel"),
    pytest.param([45, 90], [], id="unmapped-nothing"),
    pytest.param([90, 100], [P], id="paused-then-processing"),
    pytest.param([999, 350], [D], id="unknown-then-delivered"),
]


@pytest.mark.parametrize(("statuses", "expected"), PROGRESSIONS)
def test_progression_across_pages(statuses: list[int], expected: list[EventKind]) -> None:
    ledger = Ledger()
    for one in steps(statuses):
        ledger.run([one])
    assert ledger.kinds() == expected
    assert ledger.memory[1001] == OrderMemory(statuses[-1], frozenset(expected))


@pytest.mark.parametrize(("statuses", "expected"), PROGRESSIONS)
def test_progression_within_one_page(statuses: list[int], expected: list[EventKind]) -> None:
    ledger = Ledger()
    ledger.run(steps(statuses))
    assert ledger.kinds() == expected


def test_at_most_once_across_calls_with_memory_fed_back() -> None:
    ledger = Ledger()
    for status in (100, 300, 100, 300, 350, 300, 350):
        ledger.run(steps([status]))
    ids = [e.unique_id for e in ledger.events]
    assert ids == ["1001:processing", "1001:shipped", "1001:delivered"]


def test_unique_id_format_and_row_fields() -> None:
    (row,) = plan_page(RULES, [order(id=42, status=300)], {}, {}, NOW).events
    assert (row.unique_id, row.order_id, row.kind) == ("42:shipped", 42, S)
    assert row.payload["unique_id"] == "42:shipped"
    assert row.payload["metric"] == "Order shipped"
    assert row.payload["email"] == "ann@example.com"


def test_unmapped_status_updates_memory_without_event() -> None:
    plan = plan_page(RULES, [order(status=45)], {1001: OrderMemory(100, frozenset({P}))}, {}, NOW)
    assert plan.events == []
    assert plan.orders == {1001: OrderMemory(45, frozenset({P}))}


def test_rereading_unchanged_orders_gives_empty_plan() -> None:
    page = [
        order(id=1, status=100),
        order(id=2, status=300, email="bo@example.com"),
        order(id=3, status=45, email=None),
    ]
    ledger = Ledger()
    first = ledger.run(page)
    assert len(first.events) == 2
    assert ledger.run(page) == Plan()


def test_round_trip_within_page_stores_nothing() -> None:
    known = {1001: OrderMemory(300, frozenset({S}))}
    plan = plan_page(RULES, steps([45, 300], email=None), known, {}, NOW)
    assert plan.orders == {}
    assert plan.events == []


# ---------------------------------------------------------------- profiles in a page


def test_two_orders_same_email_one_page_behave_sequentially() -> None:
    ann = order(id=1, status=100)
    acme = order(
        id=2, status=300, first_name=None, last_name=None, shipping_name=None, shipping_company="Acme"
    )
    renamed = order(id=3, status=100, first_name="Ann", last_name="Smith")
    plan = plan_page(RULES, [ann, acme, renamed], {}, {}, NOW)
    assert plan.profiles == [
        ProfileChange("ann@example.com", real("Ann", "Lee")),
        ProfileChange("ann@example.com", real("Ann", "Smith")),
    ]
    assert plan.names == {"ann@example.com": real("Ann", "Smith")}
    assert [e.unique_id for e in plan.events] == ["1:processing", "2:shipped", "3:processing"]


def test_known_real_name_is_not_overwritten_by_company() -> None:
    acme = order(first_name=None, last_name=None, shipping_name=None, shipping_company="Acme")
    plan = plan_page(RULES, [acme], {}, {"ann@example.com": real("Ann", "Lee")}, NOW)
    assert (plan.profiles, plan.names) == ([], {})
    assert len(plan.events) == 1


def test_new_email_without_name_still_gets_profile() -> None:
    nameless = order(first_name=None, last_name=None, shipping_name=None)
    plan = plan_page(RULES, [nameless], {}, {}, NOW)
    assert plan.profiles == [ProfileChange("ann@example.com", NONE)]
    assert plan.names == {"ann@example.com": NONE}


def test_orders_without_email_are_counted_remembered_and_silent() -> None:
    ledger = Ledger()
    plan = ledger.run([order(id=1, status=100, email=None), order(id=2, status=300)])
    assert plan.skipped_no_email == 1
    assert plan.orders[1] == OrderMemory(100, frozenset())
    assert [e.unique_id for e in plan.events] == ["2:shipped"]
    assert [p.email for p in plan.profiles] == ["ann@example.com"]
    again = ledger.run([order(id=1, status=100, email=None)])
    assert again == Plan()


def test_email_appearing_later_announces_later_status() -> None:
    ledger = Ledger()
    ledger.run([order(status=100, email=None)])
    ledger.run([order(status=300)])
    assert ledger.kinds() == [S]


def test_milestone_seen_without_email_is_announced_when_the_email_arrives() -> None:
    ledger = Ledger()
    ledger.run([order(status=100, email=None)])
    ledger.run([order(status=120)])
    assert [e.payload["metric"] for e in ledger.events] == ["Processing order"]
    assert ledger.memory[1001] == OrderMemory(120, frozenset({P}))


def test_every_changed_order_without_email_is_counted() -> None:
    page = [
        order(id=1, status=100, email=None),
        order(id=2, status=100, email=None),
        order(id=1, status=300, email=None),
        order(id=3, status=300),
    ]
    plan = plan_page(RULES, page, {2: OrderMemory(100)}, {}, NOW)
    assert plan.skipped_no_email == 2  # order 1 twice (it changed); order 2 is a re-read
    assert plan.orders == {1: OrderMemory(300), 3: OrderMemory(300, frozenset({S}))}


def test_no_email_milestone_still_blocks_late_regression() -> None:
    ledger = Ledger()
    ledger.run([order(status=300, email=None)])
    ledger.run([order(status=100)])
    assert ledger.kinds() == []


# ---------------------------------------------------------------- payload: time and backfill


@pytest.mark.parametrize(
    ("kind", "changes", "expected"),
    [
        pytest.param(P, {}, "2026-03-13T15:39:21+00:00", id="processing-updated-at-whole-seconds"),
        pytest.param(
            S,
            {"shipped_on": datetime(2026, 3, 13, 10, 0, 5, 900000, tzinfo=UTC)},
            "2026-03-13T10:00:05+00:00",
            id="shipped-uses-shipped-on",
        ),
        pytest.param(
            S,
            {"packages": (Package("1Z", None, datetime(2026, 3, 13, 9, 30, tzinfo=UTC)),)},
            "2026-03-13T09:30:00+00:00",
            id="shipped-falls-back-to-package",
        ),
        pytest.param(S, {}, "2026-03-13T15:39:21+00:00", id="shipped-without-ship-time-uses-updated-at"),
        pytest.param(
            D,
            {"shipped_on": datetime(2026, 3, 12, tzinfo=UTC)},
            "2026-03-13T15:39:21+00:00",
            id="delivered-ignores-shipped-on",
        ),
        pytest.param(
            C,
            {"updated_at": NOW + timedelta(hours=2)},
            "2026-03-14T12:00:00+00:00",
            id="future-clamped-to-now",
        ),
        pytest.param(
            P,
            {"updated_at": datetime(1970, 1, 1, tzinfo=UTC)},
            "2000-01-01T00:00:00+00:00",
            id="ancient-clamped-to-2000",
        ),
    ],
)
def test_event_time(kind: EventKind, changes: dict[str, Any], expected: str) -> None:
    assert event_payload(order(**changes), kind, RULES, NOW)["time"] == expected


LAUNCH = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("kind", "changes", "now", "expected"),
    [
        pytest.param(P, {"updated_at": LAUNCH - timedelta(seconds=1)}, LAUNCH, True, id="pre-launch"),
        pytest.param(P, {"updated_at": LAUNCH}, LAUNCH, False, id="launch-midnight-live"),
        pytest.param(P, {}, NOW, False, id="post-launch-recent"),
        pytest.param(P, {"updated_at": NOW - timedelta(days=3, seconds=1)}, NOW, True, id="stale"),
        pytest.param(P, {"updated_at": NOW - timedelta(days=3)}, NOW, False, id="just-not-stale"),
        pytest.param(
            S, {"shipped_on": NOW - timedelta(days=4)}, NOW, True, id="shipped-long-ago-learned-late"
        ),
        pytest.param(D, {"shipped_on": NOW - timedelta(days=4)}, NOW, False, id="delivered-recent"),
    ],
)
def test_backfill_flag(kind: EventKind, changes: dict[str, Any], now: datetime, expected: bool) -> None:
    assert event_payload(order(**changes), kind, RULES, now)["backfill"] is expected


JST = timezone(timedelta(hours=9))


@pytest.mark.usefixtures("tokyo")
@pytest.mark.parametrize(
    ("changes", "now", "expected"),
    [
        pytest.param({}, NOW.replace(tzinfo=None), "2026-03-13T15:39:21+00:00", id="naive-now"),
        pytest.param(
            {"updated_at": NOW + timedelta(hours=2)},
            NOW.replace(tzinfo=None),
            "2026-03-14T12:00:00+00:00",
            id="naive-now-clamps-as-utc",
        ),
        pytest.param(
            {"updated_at": NOW + timedelta(hours=2)}, NOW.astimezone(JST), "2026-03-14T12:00:00+00:00",
            id="tokyo-now-clamps-at-the-same-instant",
        ),
        pytest.param(
            {"updated_at": T0.astimezone(JST)}, NOW, "2026-03-13T15:39:21+00:00", id="tokyo-time-sent-as-utc"
        ),
    ],
)
def test_times_are_utc_whatever_the_local_zone(changes: dict[str, Any], now: datetime, expected: str) -> None:
    payload = event_payload(order(**changes), C, RULES, now)
    assert payload["time"] == expected
    assert payload["backfill"] is False


@pytest.mark.usefixtures("tokyo")
def test_naive_now_is_utc_for_backfill_and_samples() -> None:
    naive = datetime(2026, 3, 1, 0, 0, 30)  # 30 s after launch in UTC; 9 h before it if read as Tokyo time
    assert event_payload(order(updated_at=LAUNCH), P, RULES, naive)["backfill"] is False
    (processing, *_) = sample_events(RULES, "o@x.io", naive)
    assert processing.payload["time"] == "2026-03-01T00:00:30+00:00"


# ---------------------------------------------------------------- payload: value and properties


def item(price: str | None, quantity: int = 1, currency: str | None = "USD", **kw: Any) -> OrderItem:
    """Return an order line."""
    return OrderItem(
        kw.get("sku"), kw.get("name"), quantity, None if price is None else Decimal(price), currency
    )


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        pytest.param((), {}, id="no-items-no-value"),
        pytest.param((item(None),), {}, id="unpriced-no-value"),
        pytest.param(
            (item("72.99", 2),), {"value": 145.98, "value_currency": "USD"}, id="price-times-quantity"
        ),
        pytest.param(
            (item("10.00"), item(None, 5), item("2.50", 2)),
            {"value": 15.0, "value_currency": "USD"},
            id="unpriced-ignored",
        ),
        pytest.param(
            (item("10", currency="USD"), item("5", currency="EUR")), {"value": 15.0}, id="mixed-currency"
        ),
        pytest.param((item("10"), item("5", currency=None)), {"value": 15.0}, id="partly-unknown-currency"),
        pytest.param((item("10", currency=None),), {"value": 10.0}, id="no-currency"),
        pytest.param((item("0.335", 3),), {"value": 1.01, "value_currency": "USD"}, id="rounded-half-up"),
        pytest.param((item("19.99", 0),), {"value": 0.0, "value_currency": "USD"}, id="zero-quantity"),
    ],
)
def test_value_and_currency(items: tuple[OrderItem, ...], expected: dict[str, Any]) -> None:
    payload = event_payload(order(items=items), P, RULES, NOW)
    assert {k: payload[k] for k in ("value", "value_currency") if k in payload} == expected


FULL = order(
    id=555,
    status=300,
    status_name="Shipped",
    humanize_id="1030",
    shop_order_id="68539350",
    items=(
        item("72.99", 2, sku="TS-1", name="T-shirt"),
        item(None, 1, currency=None, sku="STICKER"),
    ),
    tracking=("9400111", "9400222"),
    tracking_links=("https://t.example/9400111",),
    packages=(
        Package("9400111", "https://t.example/9400111", datetime(2026, 3, 13, 14, tzinfo=UTC)),
        Package("9400333", None, None),
    ),
    carrier="USPS",
    shipping_method="USPS Priority Mail",
    shipped_on=datetime(2026, 3, 13, 14, 0, 0, 123000, tzinfo=UTC),
    estimated_delivery=date(2026, 3, 17),
)


def test_full_payload() -> None:
    assert event_payload(FULL, S, RULES, NOW) == {
        "email": "ann@example.com",
        "metric": "Order shipped",
        "unique_id": "555:shipped",
        "time": "2026-03-13T14:00:00+00:00",
        "backfill": False,
        "value": 145.98,
        "value_currency": "USD",
        "properties": {
            "OrderId": "555",
            "OrderNumber": "1030",
            "ShopOrderId": "68539350",
            "Status": "Shipped",
            "StatusCode": 300,
            "ItemNames": ["T-shirt"],
            "Items": [
                {
                    "SKU": "TS-1",
                    "ProductName": "T-shirt",
                    "Quantity": 2,
                    "ItemPrice": 72.99,
                    "RowTotal": 145.98,
                },
                {"SKU": "STICKER", "Quantity": 1},
            ],
            "TrackingNumbers": ["9400111", "9400222", "9400333"],
            "TrackingURLs": ["https://t.example/9400111"],
            "Carrier": "USPS",
            "ShippingMethod": "USPS Priority Mail",
            "ShippedAt": "2026-03-13T14:00:00+00:00",
            "EstimatedDelivery": "2026-03-17",
        },
    }


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {}, {"OrderId": "1001", "Status": "Processing", "StatusCode": 100}, id="minimal-omits-empties"
        ),
        pytest.param(
            {"status": 350, "status_name": "Delivered to neighbour"},
            {"OrderId": "1001", "Status": "Delivered to neighbour", "StatusCode": 350},
            id="status-name-wins",
        ),
        pytest.param(
            {"status": 999}, {"OrderId": "1001", "StatusCode": 999}, id="unknown-status-has-no-name"
        ),
        pytest.param(
            {"tracking": ("A", "B", "A"), "packages": (Package("B", "u", None), Package(None, "u", None))},
            {
                "OrderId": "1001",
                "Status": "Processing",
                "StatusCode": 100,
                "TrackingNumbers": ["A", "B"],
                "TrackingURLs": ["u"],
            },
            id="tracking-deduplicated-order-kept",
        ),
    ],
)
def test_properties(changes: dict[str, Any], expected: dict[str, Any]) -> None:
    assert event_payload(order(**changes), P, RULES, NOW)["properties"] == expected


FULL_TEXT = "x" * MAX_TEXT_CHARS


@pytest.mark.parametrize(
    ("text", "sent"),
    [
        pytest.param("Mug ", "Mug ", id="short-kept-verbatim"),
        pytest.param(FULL_TEXT[:-1] + " ", FULL_TEXT[:-1] + " ", id="at-limit-kept-verbatim"),
        pytest.param(FULL_TEXT + "yz", FULL_TEXT, id="over-limit-cut"),
        pytest.param(FULL_TEXT[:-1] + " yz", FULL_TEXT[:-1], id="cut-at-a-space-right-stripped"),
    ],
)
def test_item_texts_are_clipped_to_1000_characters(text: str, sent: str) -> None:
    assert MAX_TEXT_CHARS == 1000
    props = event_payload(order(items=(item(None, sku=text, name=text),)), P, RULES, NOW)["properties"]
    assert props["ItemNames"] == [sent]
    assert props["Items"] == [{"SKU": sent, "ProductName": sent, "Quantity": 1}]


def test_items_are_capped_at_1000_but_all_count_towards_the_value() -> None:
    assert MAX_ITEMS == 1000
    items = tuple(item("1.00", name=f"n{i}") for i in range(MAX_ITEMS + 1))
    payload = event_payload(order(items=items), P, RULES, NOW)
    assert payload["properties"]["ItemNames"] == [f"n{i}" for i in range(MAX_ITEMS)]
    assert len(payload["properties"]["Items"]) == MAX_ITEMS
    assert (payload["value"], payload["value_currency"]) == (1001.0, "USD")


def test_metric_names_follow_rules() -> None:
    rules = replace(RULES, metric_names={**DEFAULT_METRIC_NAMES, S: "Shipped by Acme 3PL"})
    assert event_payload(order(), S, rules, NOW)["metric"] == "Shipped by Acme 3PL"


def test_default_metric_names_are_pinned() -> None:
    # Every merchant's flows are triggered by these names: renaming one silently stops them.
    assert DEFAULT_METRIC_NAMES == {
        P: "Processing order",
        C: "Order cancelled",
        S: "Order shipped",
        D: "Order delivered",
    }


def test_metric_name_missing_from_rules_is_the_default() -> None:
    rules = replace(RULES, metric_names={S: "Shipped by Acme 3PL"})
    metrics = [event_payload(order(), kind, rules, NOW)["metric"] for kind in (P, C, S, D)]
    assert metrics == ["Processing order", "Order cancelled", "Shipped by Acme 3PL", "Order delivered"]


def test_payload_is_deterministic() -> None:
    first = plan_page(RULES, [FULL], {}, {}, NOW).events[0].payload
    second = plan_page(RULES, [replace(FULL)], {}, {}, NOW).events[0].payload
    assert first == second
    assert json.dumps(first) == json.dumps(second)
    assert first is not second


# ---------------------------------------------------------------- samples


def test_sample_events() -> None:
    rows = sample_events(RULES, "ops@merchant.example", NOW + timedelta(microseconds=700))
    assert [r.kind for r in rows] == [P, C, S, D]
    assert [r.unique_id for r in rows] == [f"sample:{k.value}" for k in (P, C, S, D)]
    for row in rows:
        assert row.order_id is None
        assert row.payload["unique_id"] == row.unique_id
        assert row.payload["backfill"] is True
        assert row.payload["time"] == "2026-03-14T12:00:00+00:00"
        assert row.payload["email"] == "ops@merchant.example"
        assert row.payload["metric"] == DEFAULT_METRIC_NAMES[row.kind]
        props = row.payload["properties"]
        assert (props["OrderId"], props["OrderNumber"], props["Sample"]) == ("SAMPLE", "SAMPLE-1", True)
        assert props["ItemNames"] == ["Sample product"]
        assert props["Items"][0]["SKU"] == "SAMPLE-SKU"
        assert event_for(order(status=props["StatusCode"]), RULES) is row.kind
        assert ("TrackingNumbers" in props) is (row.kind in (S, D))


SAMPLE_ITEM = {"SKU": "SAMPLE-SKU", "ProductName": "Sample product", "Quantity": 1, "ItemPrice": 25.0, "RowTotal": 25.0}
SAMPLE_SHIPPING = {
    "TrackingNumbers": ["1Z999AA10123456784"],
    "TrackingURLs": ["https://www.ups.com/track?tracknum=1Z999AA10123456784"],
    "Carrier": "UPS",
    "ShippingMethod": "UPS Ground",
    "ShippedAt": "2026-03-14T12:00:00+00:00",
    "EstimatedDelivery": "2026-03-17",
}


@pytest.mark.parametrize(
    ("kind", "status", "shipping"),
    [
        pytest.param(P, (100, "Processing"), {}, id="processing"),
        pytest.param(C, (40, "Cancelled"), {}, id="cancelled"),
        pytest.param(S, (300, "Shipped"), SAMPLE_SHIPPING, id="shipped"),
        pytest.param(D, (350, "Delivered"), SAMPLE_SHIPPING, id="delivered"),
    ],
)
def test_sample_event_contents_are_pinned(
    kind: EventKind, status: tuple[int, str], shipping: dict[str, Any]
) -> None:
    # What a merchant sees in the flow builder before launch: every property a real event can carry.
    rows = sample_events(RULES, "ops@merchant.example", NOW + timedelta(microseconds=700))
    (row,) = [r for r in rows if r.kind is kind]
    assert row.payload == {
        "email": "ops@merchant.example",
        "metric": DEFAULT_METRIC_NAMES[kind],
        "unique_id": f"sample:{kind.value}",
        "time": "2026-03-14T12:00:00+00:00",
        "backfill": True,
        "value": 25.0,
        "value_currency": "USD",
        "properties": {
            "OrderId": "SAMPLE",
            "OrderNumber": "SAMPLE-1",
            "Status": status[1],
            "StatusCode": status[0],
            "ItemNames": ["Sample product"],
            "Items": [SAMPLE_ITEM],
            **shipping,
            "Sample": True,
        },
    }


NOT_CANCELLED = {code: kind for code, kind in DEFAULT_STATUS_EVENTS.items() if kind is not C}


@pytest.mark.parametrize(
    ("status_events", "expected"),
    [
        pytest.param(NOT_CANCELLED, {P: 100, C: 40, S: 300, D: 350}, id="cancelled-empty"),
        pytest.param({120: P, 325: D}, {P: 120, C: 40, S: 300, D: 325}, id="some-mapped"),
        pytest.param({}, {P: 100, C: 40, S: 300, D: 350}, id="none-mapped"),
    ],
)
def test_milestone_without_status_codes_still_gets_a_sample(
    status_events: dict[int, EventKind], expected: dict[EventKind, int]
) -> None:
    # `[statuses] cancelled = []` is valid config: set-up still sends the sample, with Whiplash's usual code.
    rows = sample_events(replace(RULES, status_events=status_events), "o@x.io", NOW)
    assert {r.kind: r.payload["properties"]["StatusCode"] for r in rows} == expected


def test_sample_events_follow_custom_status_map() -> None:
    rules = replace(RULES, status_events={**DEFAULT_STATUS_EVENTS, 325: D, 350: S})
    by_kind = {r.kind: r.payload["properties"]["StatusCode"] for r in sample_events(rules, "o@x.io", NOW)}
    assert (by_kind[S], by_kind[D]) == (300, 325)


# ---------------------------------------------------------------- property: never twice, never unmapped

_statuses = st.sampled_from([40, 45, 90, 100, 120, 250, 300, 325, 350, 999])
_step = st.tuples(st.integers(1, 4), _statuses, st.booleans())
Step = tuple[int, int, bool]  # (order id, status, has email)


@settings(max_examples=200, deadline=None)
@given(pages=st.lists(st.lists(_step, max_size=6), max_size=8))
def test_plan_page_never_repeats_unique_id_nor_maps_unmapped(pages: list[list[Step]]) -> None:
    ledger = Ledger()
    tick = 0
    for page in pages:
        orders = []
        for oid, status, has_email in page:
            tick += 1
            email = f"c{oid}@example.com" if has_email else None
            orders.append(order(id=oid, status=status, email=email, updated_at=T0 + timedelta(seconds=tick)))
        plan = ledger.run(orders)
        for row in plan.events:
            assert DEFAULT_STATUS_EVENTS.get(row.payload["properties"]["StatusCode"]) is row.kind
    ids = [row.unique_id for row in ledger.events]
    assert len(ids) == len(set(ids))
    for row in ledger.events:
        assert row.order_id is not None
        assert row.kind in ledger.memory[row.order_id].announced


# ---------------------------------------------------------------- per-merchant events

ONLY_SHIPPED_DELIVERED = replace(RULES, enabled=frozenset({S, D}),
                                 metric_names={**DEFAULT_METRIC_NAMES, D: "Whiplash: Delivered"})


def walk(rules: Rules, statuses: Sequence[int], known: dict[int, OrderMemory] | None = None) -> tuple[
        list[str], dict[int, OrderMemory]]:
    """Plan one order through ``statuses`` (each its own page); return the unique_ids announced and the memory."""
    memory = dict(known or {})
    announced: list[str] = []
    for step, status in enumerate(statuses):
        plan = plan_page(rules, [order(status=status, updated_at=T0 + timedelta(minutes=step))], memory, {}, NOW)
        memory.update(plan.orders)
        announced += [e.unique_id for e in plan.events]
    return announced, memory


def test_an_invalid_email_is_named_not_counted_as_missing() -> None:
    """1. A page: an order with an invalid email, one without email, one changing again with an invalid email.
    Result: the invalid ones are listed by id (for the log and status), the missing one counted apart; none of
    them gets a profile or an event; their statuses are remembered so a re-read does not list them again."""
    page = [order(id=11, email=None, email_invalid=True), order(id=12, email=None),
            order(id=13, email=None, email_invalid=True, status=300)]
    plan = plan_page(RULES, page, {13: OrderMemory(100)}, {}, NOW)
    assert plan.invalid_email == [11, 13]
    assert plan.skipped_no_email == 1
    assert (plan.events, plan.profiles) == ([], [])
    assert set(plan.orders) == {11, 12, 13}
    again = plan_page(RULES, page, plan.orders, {}, NOW)
    assert (again.invalid_email, again.skipped_no_email) == ([], 0)


def test_a_disabled_milestone_is_remembered_not_announced() -> None:
    """1. Rules with only shipped and delivered; the order goes 100 → 300 → 350. Result: no processing event, the
    others under the merchant's metric names; the memory still knows the status (and that processing was not
    announced); the profile is upserted at the first sight all the same."""
    plan = plan_page(ONLY_SHIPPED_DELIVERED, [order(status=100)], {}, {}, NOW)
    assert plan.events == []
    assert plan.orders == {1001: OrderMemory(100, frozenset())}
    assert [p.email for p in plan.profiles] == ["ann@example.com"]
    announced, memory = walk(ONLY_SHIPPED_DELIVERED, [100, 300, 350])
    assert announced == ["1001:shipped", "1001:delivered"]
    assert memory[1001] == OrderMemory(350, frozenset({S, D}))
    payloads = plan_page(ONLY_SHIPPED_DELIVERED, [order(status=350)], {}, {}, NOW).events[0].payload
    assert payloads["metric"] == "Whiplash: Delivered"


def test_enabling_later_sends_no_old_news() -> None:
    """1. Delivered is disabled while the order reaches 350. 2. It is enabled (a reload); the same order is read
    again, unchanged. Result: nothing: it reached delivered before the change. 3. A new order reaches 350 after
    the change. Result: its "Order delivered" is announced."""
    before = replace(RULES, enabled=frozenset({P, C, S}))
    announced, memory = walk(before, [300, 350])
    assert announced == ["1001:shipped"]
    after = replace(RULES, enabled=frozenset(EventKind))
    again, _ = walk(after, [350], memory)
    assert again == []
    fresh = plan_page(after, [order(id=1002, status=350)], memory, {}, NOW)
    assert [e.unique_id for e in fresh.events] == ["1002:delivered"]


def test_a_disabled_later_milestone_still_blocks_late_news() -> None:
    """1. Shipped is disabled; the order reaches 300, then goes back to 100. Result: no processing event: the
    order was seen shipped, so processing would be late news even though shipped was never announced."""
    rules = replace(RULES, enabled=frozenset({P, D}))
    announced, _ = walk(rules, [300, 100])
    assert announced == []


def test_samples_only_for_enabled_metrics_with_their_own_names() -> None:
    """1. Sample events for rules with shipped and delivered (delivered renamed); for rules with none.
    Result: two samples; the renamed one's unique_id carries its name (its metric needs its own sample); none."""
    rows = sample_events(ONLY_SHIPPED_DELIVERED, "s@example.com", NOW)
    assert [(r.kind, r.unique_id, r.payload["metric"]) for r in rows] == [
        (S, "sample:shipped", "Order shipped"),
        (D, "sample:delivered:Whiplash: Delivered", "Whiplash: Delivered"),
    ]
    assert sample_events(replace(RULES, enabled=frozenset()), "s@example.com", NOW) == []


@pytest.mark.parametrize(
    ("key", "kind"),
    [("7001:shipped", S), ("sample:delivered", D), ("sample:delivered:Whiplash: Delivered", D),
     ("sample:processing:a:b", P), ("7001", None), ("7001:lost", None), ("", None)],
)
def test_event_kind_of_key(key: str, kind: EventKind | None) -> None:
    assert event_kind_of_key(key) is kind


@pytest.mark.parametrize(
    ("key", "order_id"),
    [("7001:shipped", "7001"), ("42:delivered", "42"), ("sample:shipped", None), ("buyer@example.com", None),
     ("7001", "7001"), ("", None), ("-3:shipped", None), ("12a:shipped", None)],
)
def test_order_of_key(key: str, order_id: str | None) -> None:
    """The order an event row names is the digits before the first colon; samples and profiles name none."""
    assert order_of_key(key) == order_id


def test_a_profile_is_history_only_when_every_order_of_its_shopper_in_the_page_is() -> None:
    """1. A page with an old (stale) order of Ann and Bob, and a fresh order of Bob. Result: Ann's profile is history
    (it may wait for a full import), Bob's is live (his fresh order's flow should greet him by name)."""
    old = NOW - RULES.stale_after - timedelta(hours=1)
    ann = order(id=1, email="ann@example.com", updated_at=old)
    bob_old = order(id=2, email="bob@example.com", first_name="Bob", updated_at=old)
    bob_new = order(id=3, email="bob@example.com", first_name="Bob", updated_at=NOW - timedelta(minutes=5), status=300)
    plan = plan_page(RULES, [ann, bob_old, bob_new], {}, {}, NOW)
    assert [(p.email, p.history) for p in plan.profiles] == [("ann@example.com", True), ("bob@example.com", False)]
    assert plan_page(RULES, [bob_new], {}, {}, NOW).profiles[0].history is False
    before_launch = order(id=4, email="cy@example.com", updated_at=datetime(2026, 2, 27, tzinfo=UTC))
    assert plan_page(RULES, [before_launch], {}, {}, NOW).profiles[0].history is True


def test_order_of_key_reads_only_before_the_first_colon() -> None:
    """A key with more colons (none today, but a metric name could add some) still names the order before the first."""
    assert order_of_key("7001:shipped:extra") == "7001"
