"""Full sync of several customers with realistic generated orders, by the real process (`run --once`).

Scenario: four customers on one simulated Whiplash (small pages, so the keyset walk spans many pages) —
launched yesterday with 14 backfill days, launched 10 days ago with 3 backfill days (so some changes after
launch are stale), before launch, and disabled. The expected Klaviyo state is derived from the orders and the
documented rules (tests/e2e/expect.py), then a second run must send nothing at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from kit.expect import (
    SAMPLE_EMAIL,
    expected_names,
    first_sight_events,
    profile_names,
    read_orders,
    recorded,
    samples,
)
from kit.harness import CLIENT_ID, CLIENT_SECRET, Customer, Harness

from klaviyo_bridge.sandbox.klaviyo import FakeKlaviyo, serve_klaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, OrderScript, SimOrder, serve_whiplash

YESTERDAY, TEN_DAYS, PRE, DISABLED = 101, 102, 103, 104


@dataclass
class World:
    """The simulators, the harness, the customers and the orders deliberately outside the window."""

    whiplash: FakeWhiplash
    klaviyo: FakeKlaviyo
    harness: Harness
    customers: dict[int, Customer]
    too_old: dict[int, int]


def make_customers(now: datetime) -> dict[int, Customer]:
    """Return the four customers by id."""
    today = now.date()
    return {c.cid: c for c in (
        Customer(YESTERDAY, "Yesterday Shop", "pk_yesterday_0123456789ab", today - timedelta(days=1), 14),
        Customer(TEN_DAYS, "Ten Days Shop", "pk_tendays_0123456789abcd", today - timedelta(days=10), 3),
        Customer(PRE, "Prelaunch Shop", "pk_prelaunch_0123456789ab", today + timedelta(days=5), 14),
        Customer(DISABLED, "Disabled Shop", "pk_disabled_0123456789abc", today - timedelta(days=3), 14,
                 enabled=False),
    )}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Generate history per customer, plus one order just before each launched customer's window."""
    now = datetime.now(UTC)
    customers = make_customers(now)
    whiplash = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, seed=3)
    for seed, (cid, count) in enumerate([(YESTERDAY, 30), (TEN_DAYS, 30), (PRE, 8), (DISABLED, 8)]):
        OrderScript(whiplash, cid, seed=seed).backfill(count, days=20)
    too_old = {
        cid: int(whiplash.create_order(cid, status=300, at=customers[cid].window_start - timedelta(minutes=1),
                                       email=f"old{cid}@example.com")["id"])
        for cid in (YESTERDAY, TEN_DAYS)
    }
    klaviyo = FakeKlaviyo()
    for c in customers.values():
        klaviyo.add_account(c.key, label=str(c.cid))
    async with serve_whiplash(whiplash) as w_url, serve_klaviyo(klaviyo) as k_url:
        harness = Harness(tmp_path, w_url, k_url, list(customers.values()),
                          overrides={"whiplash": {"page_size": "7"}})
        harness.write_config()
        yield World(whiplash, klaviyo, harness, customers, too_old)


def order_value(order: SimOrder) -> float:
    """Return Σ price × quantity, rounded to cents."""
    total = sum((Decimal(i.spec.price) * i.spec.quantity for i in order.items), Decimal(0))
    return float(total.quantize(Decimal("0.01")))


def check_launched(w: World, cid: int, nows: list[datetime]) -> None:
    """Assert one launched customer's Klaviyo account holds exactly what its read orders call for."""
    c, acct = w.customers[cid], w.klaviyo.account(str(cid))
    orders = read_orders(w.whiplash, c)
    events = recorded(acct)
    expected = first_sight_events(orders, c, nows)
    assert set(events) == set(expected) | {uid for _, uid, _ in samples()}
    wrong_flag = {uid: events[uid] for uid, allowed in expected.items() if events[uid] not in allowed}
    assert wrong_flag == {}
    names = expected_names(orders)
    assert profile_names(acct) == {**names, SAMPLE_EMAIL: (None, None, None)}
    klist = acct.list_named("Whiplash")
    assert klist is not None
    assert set(klist.members) == set(acct.profiles)
    by_id = {o.id: o for o in orders}
    for e in acct.events:
        if (e.unique_id or "").startswith("sample:"):
            continue
        order = by_id[int(e.properties["OrderId"])]  # KeyError: an event for an order that is not this customer's
        assert (e.properties["StatusCode"], e.value, e.value_currency) == (order.status, order_value(order), "USD")
        if order.status == 300:
            assert e.properties["TrackingNumbers"] == order.tracking
    assert acct.profile_by_email(f"old{cid}@example.com") is None
    assert f"{w.too_old[cid]}:shipped" not in events


async def test_full_sync_of_several_customers_then_an_idle_second_run(world: World) -> None:
    """1. Run once. 2. Compare every account with the expectation from the orders. 3. Run again.
    Result: exact profiles, names, list, events and backfill flags per customer; the second run sends nothing."""
    w, h, k = world, world.harness, world.klaviyo
    before = datetime.now(UTC)
    first = await h.run("run", "--once")
    assert first.returncode == 0, first.stderr
    nows = [before, datetime.now(UTC)]

    for cid in (YESTERDAY, TEN_DAYS):
        check_launched(w, cid, nows)
    flags = {e.backfill for e in k.account(str(TEN_DAYS)).events if not (e.unique_id or "").startswith("sample:")}
    assert flags == {True, False}  # stale changes after launch are backfill too, recent ones are live
    pre = k.account(str(PRE))
    assert {(e.metric, e.unique_id, e.backfill) for e in pre.events} == samples()
    assert set(profile_names(pre)) == {SAMPLE_EMAIL}
    disabled = k.account(str(DISABLED))
    assert (disabled.counters.requests, disabled.profiles) == ({}, {})
    assert k.rejections == []
    assert all(a.duplicate_events == 0 for a in k.accounts)

    requests_before = {a.label: a.counters.requests.copy() for a in k.accounts}
    second = await h.run("run", "--once")
    assert second.returncode == 0, second.stderr
    assert {a.label: a.counters.requests for a in k.accounts} == requests_before
    status = {r["customer_id"]: r for r in await h.status()}
    assert [status[c]["queued"] for c in (YESTERDAY, TEN_DAYS, PRE)] == [0, 0, 0]
    assert status[YESTERDAY]["sent_total"] > 30
