"""The real daemon (`klaviyo-bridge run --once`) against independent simulated Whiplash and Klaviyo.

Scenario: three customers in a config written from config.example.toml — one live with history in its
backfill window, one before launch, one whose Klaviyo key is revoked. Every body the bridge sends is
validated against Klaviyo's OpenAPI spec by the simulator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kit.harness import CLIENT_ID, CLIENT_SECRET, Customer, Harness

from klaviyo_bridge.sandbox.klaviyo import Account, FakeKlaviyo, serve_klaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash

LIVE, PRE, REVOKED = 101, 202, 303
KEYS = {LIVE: "pk_live_0123456789abcdef", PRE: "pk_pre_0123456789abcdef", REVOKED: "pk_revoked_0123456789abcd"}
SAMPLE_EMAIL = "bridge-samples@example.com"
NO_NAME = {"first_name": None, "last_name": None, "shipping_name": None}


@dataclass
class World:
    """The simulators, the harness and the ids of the orders created."""

    whiplash: FakeWhiplash
    klaviyo: FakeKlaviyo
    harness: Harness
    orders: dict[str, int]


def seed_orders(w: FakeWhiplash, now: datetime) -> dict[str, int]:
    """Create the live customer's orders, each exercising one rule."""
    ids: dict[str, int] = {}

    def make(label: str, cid: int, ago: timedelta, **kw: object) -> None:
        ids[label] = int(w.create_order(cid, at=now - ago, **kw)["id"])  # type: ignore[arg-type]

    make("ann", LIVE, timedelta(days=3), status=100, email="Ann.Lee@Example.com", first_name="Ann", last_name="Lee")
    make("ann_company", LIVE, timedelta(hours=2), status=300, email="ann.lee@example.com",
         **{**NO_NAME, "shipping_company": "Lee Holdings"})
    make("bob", LIVE, timedelta(hours=1), status=300, email="bob@example.com",
         **{**NO_NAME, "shipping_name": "Bob van Stone"})
    make("acme", LIVE, timedelta(minutes=30), status=350, email="orders@acme.example",
         **{**NO_NAME, "shipping_company": "Acme Co"})
    make("no_email", LIVE, timedelta(minutes=20), status=100, email=None)
    make("closed", LIVE, timedelta(minutes=15), status=45, email="erin@example.com", **NO_NAME)
    make("gone", LIVE, timedelta(minutes=50), status=100, email="gail@example.com", first_name="Gail", last_name="Fox")
    w.set_status(ids["gone"], 40, at=now - timedelta(minutes=10))
    make("ancient", LIVE, timedelta(days=20), status=300, email="old@example.com")
    make("dana1", LIVE, timedelta(minutes=40), status=100, email="dana@example.com", first_name="Dana",
         last_name="Smith")
    make("dana2", LIVE, timedelta(minutes=5), status=120, email="dana@example.com", first_name="Dana",
         last_name="Jones")
    make("pre", PRE, timedelta(hours=1), status=300, email="pre@example.com")
    make("revoked", REVOKED, timedelta(hours=1), status=300, email="rex@example.com", first_name="Rex",
         last_name="King")
    return ids


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Serve both simulators on loopback and write the bridge config."""
    now = datetime.now(UTC)
    today = now.date()
    whiplash = FakeWhiplash(CLIENT_ID, CLIENT_SECRET)
    for cid in (LIVE, PRE, REVOKED):
        whiplash.add_customer(cid)
    orders = seed_orders(whiplash, now)
    klaviyo = FakeKlaviyo()
    for cid, key in KEYS.items():
        klaviyo.add_account(key, label=str(cid))
    klaviyo.revoke(KEYS[REVOKED])
    customers = [
        Customer(LIVE, "Live Shop", KEYS[LIVE], today - timedelta(days=1)),
        Customer(PRE, "Prelaunch Shop", KEYS[PRE], today + timedelta(days=3)),
        Customer(REVOKED, "Revoked Shop", KEYS[REVOKED], today - timedelta(days=1)),
    ]
    async with serve_whiplash(whiplash) as w_url, serve_klaviyo(klaviyo) as k_url:
        harness = Harness(tmp_path, w_url, k_url, customers)
        harness.write_config()
        yield World(whiplash, klaviyo, harness, orders)


def names(acct: Account, email: str) -> tuple[str | None, str | None, str | None]:
    """Return (first, last, organization) of a profile, which must exist."""
    p = acct.profile_by_email(email)
    assert p is not None, f"no profile for {email}"
    return p.first_name, p.last_name, p.organization


def event_keys(acct: Account) -> list[tuple[str, str | None, bool]]:
    """Return (metric, unique_id, backfill) of every recorded event."""
    return sorted((e.metric, e.unique_id, e.backfill) for e in acct.events)


def expected_samples() -> list[tuple[str, str | None, bool]]:
    """Return the four setup sample events."""
    metrics = {"processing": "Processing order", "cancelled": "Order cancelled", "shipped": "Order shipped",
               "delivered": "Order delivered"}
    return [(m, f"sample:{k}", True) for k, m in metrics.items()]


async def test_run_once_syncs_live_prelaunch_and_isolates_revoked_key(world: World) -> None:
    """1. Run once. 2. Check profiles, names, list, events per customer. 3. Run again: nothing new.
    4. Restore the revoked key and run: its queued rows go out.
    Result: exactly the rule-mandated Klaviyo state, no spec rejection, no duplicate event."""
    h, k, ids = world.harness, world.klaviyo, world.orders
    # Validation is against Klaviyo's OpenAPI spec when ../shared has it, else the simulator's hand checks.
    first = await h.run("run", "--once")
    assert first.returncode == 0, first.stderr
    assert k.rejections == []

    live = k.account(str(LIVE))
    # Names: real name; fallback (company) never overwrites it; shipping_name split; company; none; latest real wins.
    assert names(live, "ann.lee@example.com") == ("Ann", "Lee", None)
    assert names(live, "bob@example.com") == ("Bob", "van Stone", None)
    assert names(live, "orders@acme.example") == ("Acme Co", None, "Acme Co")
    assert names(live, "erin@example.com") == (None, None, None)
    assert names(live, "dana@example.com") == ("Dana", "Jones", None)
    assert live.profile_by_email("old@example.com") is None  # outside the backfill window
    emails = {p.email for p in live.profiles.values()}
    assert emails == {SAMPLE_EMAIL, "ann.lee@example.com", "bob@example.com", "orders@acme.example",
                      "erin@example.com", "gail@example.com", "dana@example.com"}
    whiplash_list = live.list_named("Whiplash")
    assert whiplash_list is not None
    assert set(whiplash_list.members) == set(live.profiles)

    o = ids
    assert event_keys(live) == sorted([
        *expected_samples(),
        ("Processing order", f"{o['ann']}:processing", True),  # before launch: backfill, no flow
        ("Order shipped", f"{o['ann_company']}:shipped", False),
        ("Order shipped", f"{o['bob']}:shipped", False),
        ("Order delivered", f"{o['acme']}:delivered", False),  # first seen at 350: only delivered
        ("Order cancelled", f"{o['gone']}:cancelled", False),
        ("Processing order", f"{o['dana1']}:processing", False),
        ("Processing order", f"{o['dana2']}:processing", False),
    ])
    assert live.duplicate_events == 0
    shipped = next(e for e in live.events if e.unique_id == f"{o['bob']}:shipped")
    assert shipped.properties["OrderId"] == str(o["bob"])
    assert shipped.properties["StatusCode"] == 300
    assert shipped.properties["TrackingNumbers"]
    assert shipped.value is not None
    assert shipped.value_currency == "USD"
    assert all(e.properties.get("Sample") is True for e in live.events if (e.unique_id or "").startswith("sample:"))

    pre = k.account(str(PRE))
    assert event_keys(pre) == sorted(expected_samples())  # before launch: set-up only
    assert {p.email for p in pre.profiles.values()} == {SAMPLE_EMAIL}
    pre_list = pre.list_named("Whiplash")
    assert pre_list is not None
    assert set(pre_list.members) == set(pre.profiles)

    revoked = k.account(str(REVOKED))
    assert revoked.events == []
    assert revoked.profiles == {}
    assert "klaviyo key refused customer=303" in first.stderr

    status = await h.run("status", "--json")
    assert '"key": "REFUSED"' in status.stdout

    before = (len(live.events), live.received_event_requests, live.counters.requests.copy())
    second = await h.run("run", "--once")
    assert second.returncode == 0, second.stderr
    assert (len(live.events), live.received_event_requests, live.counters.requests) == before

    k.restore(KEYS[REVOKED])
    third = await h.run("run", "--once")
    assert third.returncode == 0, third.stderr
    assert event_keys(revoked) == sorted([*expected_samples(), ("Order shipped", f"{o['revoked']}:shipped", False)])
    assert names(revoked, "rex@example.com") == ("Rex", "King", None)
    assert k.rejections == []
    for secret in (*KEYS.values(), CLIENT_SECRET):
        assert secret not in first.stderr + second.stderr + third.stderr + status.stdout
