"""Name override/fallback rules across runs, and the backfill window and flags, by the real process.

Each test builds its orders by hand at chosen times, runs `klaviyo-bridge run --once` and checks what the
simulated Klaviyo recorded: profile attributes, how many profile upserts were sent, events and their flags.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kit.expect import SAMPLE_EMAIL, recorded, samples
from kit.harness import CLIENT_ID, CLIENT_SECRET, Customer, Harness

from klaviyo_bridge.sandbox.klaviyo import Account, FakeKlaviyo, serve_klaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash

SHOP, WINDOWED, NO_BACKFILL = 101, 201, 202
NO_NAME: dict[str, Any] = {"first_name": None, "last_name": None, "shipping_name": None}


@dataclass
class World:
    """The simulators and a harness whose customers the test chose."""

    whiplash: FakeWhiplash
    klaviyo: FakeKlaviyo
    harness: Harness
    now: datetime


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Serve empty simulators with the three customers' accounts; each test adds its orders."""
    now = datetime.now(UTC).replace(microsecond=0)
    today = now.date()
    customers = [
        Customer(SHOP, "Name Shop", "pk_names_0123456789abcdef", today - timedelta(days=1)),
        Customer(WINDOWED, "Window Shop", "pk_window_0123456789abcde", today - timedelta(days=1), backfill_days=2),
        Customer(NO_BACKFILL, "Late Shop", "pk_late_0123456789abcdefg", today - timedelta(days=6), backfill_days=0),
    ]
    whiplash = FakeWhiplash(CLIENT_ID, CLIENT_SECRET)
    klaviyo = FakeKlaviyo()
    for c in customers:
        whiplash.add_customer(c.cid)
        klaviyo.add_account(c.key, label=str(c.cid))
    async with serve_whiplash(whiplash) as w_url, serve_klaviyo(klaviyo) as k_url:
        harness = Harness(tmp_path, w_url, k_url, customers)
        harness.write_config()
        yield World(whiplash, klaviyo, harness, now)


def profile(acct: Account, email: str) -> tuple[str | None, str | None, str | None]:
    """Return (first, last, organization) of the profile with ``email``, which must exist."""
    p = acct.profile_by_email(email)
    assert p is not None, f"no profile for {email}"
    return p.first_name, p.last_name, p.organization


async def run_once(w: World, acct: Account) -> int:
    """Run the bridge once and return how many profile upserts it sent."""
    before = acct.counters.requests["create_or_update_profile"]
    result = await w.harness.run("run", "--once")
    assert result.returncode == 0, result.stderr
    return acct.counters.requests["create_or_update_profile"] - before


async def test_names_real_overrides_fallback_never_overrides_real(world: World) -> None:
    """1. Run with a company-only, a real, a shipping-name and a nameless order. 2. Add a real name for the
    company email, a company for the real one, a company for the nameless one; run. 3. Add a company for the
    now-real email and a new real name; run.
    Result: real names replace anything, a company only fills in for no name, and only changes are sent."""
    w, fake = world, world.whiplash
    acct = w.klaviyo.account(str(SHOP))
    at = w.now - timedelta(hours=3)

    def order(email: str, **names: Any) -> None:
        fake.create_order(SHOP, status=100, at=at, email=email, **{**NO_NAME, **names})

    order("xena@example.com", shipping_company="Xena Corp")
    order("yuri@example.com", first_name="Yuri", last_name="Gagarin")
    order("zoe@example.com", shipping_name="  Zoë   van der Berg ")
    order("nobody@example.com")
    assert await run_once(w, acct) == 5  # four shoppers plus the set-up sample profile
    assert profile(acct, "xena@example.com") == ("Xena Corp", None, "Xena Corp")
    assert profile(acct, "yuri@example.com") == ("Yuri", "Gagarin", None)
    assert profile(acct, "zoe@example.com") == ("Zoë", "van der Berg", None)
    assert profile(acct, "nobody@example.com") == (None, None, None)

    at = w.now - timedelta(hours=2)
    order("XENA@Example.com", first_name="Xena", last_name="Warrior")
    order("yuri@example.com", shipping_company="Vostok Ltd")
    order("nobody@example.com", shipping_company="Nobody Inc")
    assert await run_once(w, acct) == 2  # Xena's real name and Nobody's company; not Yuri's company
    # Klaviyo keeps attributes an upsert omits: the company stays as organization beside the real name.
    assert profile(acct, "xena@example.com") == ("Xena", "Warrior", "Xena Corp")
    assert profile(acct, "yuri@example.com") == ("Yuri", "Gagarin", None)
    assert profile(acct, "nobody@example.com") == ("Nobody Inc", None, "Nobody Inc")

    at = w.now - timedelta(hours=1)
    order("xena@example.com", shipping_company="Other Corp")
    order("yuri@example.com", shipping_name="Yuri Alekseyevich Gagarin")
    order("zoe@example.com", shipping_name="Zoë")
    assert await run_once(w, acct) == 2
    # A real name is the whole name: a missing last name clears the old one instead of keeping it.
    assert profile(acct, "zoe@example.com") == ("Zoë", None, None)
    assert profile(acct, "xena@example.com") == ("Xena", "Warrior", "Xena Corp")
    assert profile(acct, "yuri@example.com") == ("Yuri", "Alekseyevich Gagarin", None)
    assert {p.email for p in acct.profiles.values()} == {
        SAMPLE_EMAIL, "xena@example.com", "yuri@example.com", "zoe@example.com", "nobody@example.com"}
    assert acct.duplicate_events == 0
    assert w.klaviyo.rejections == []


async def test_backfill_window_and_flags(world: World) -> None:
    """1. Orders around each boundary: launch − backfill_days, launch, and now − stale_after (72 h).
    2. Run once. Result: nothing before the window is read; changes before launch or older than 72 h are
    backfill; recent changes after launch are live; event times are the status-change times."""
    w, fake, now = world, world.whiplash, world.now
    windowed = w.harness.customers[1]
    late = w.harness.customers[2]
    ids: dict[str, int] = {}

    def order(label: str, cid: int, at: datetime, status: int) -> None:
        ids[label] = int(fake.create_order(cid, status=status, at=at, email=f"{label}@example.com")["id"])

    order("out", WINDOWED, windowed.window_start - timedelta(minutes=1), 300)
    order("edge", WINDOWED, windowed.window_start + timedelta(minutes=1), 100)
    order("pre", WINDOWED, windowed.launch_at - timedelta(hours=1), 350)
    order("live", WINDOWED, now - timedelta(minutes=1), 300)
    order("cross", WINDOWED, windowed.window_start + timedelta(hours=1), 100)
    fake.set_status(ids["cross"], 300, at=now - timedelta(minutes=2))  # read once, already shipped
    order("late_out", NO_BACKFILL, late.launch_at - timedelta(minutes=1), 300)
    order("late_edge", NO_BACKFILL, late.launch_at + timedelta(minutes=1), 100)
    order("late_stale", NO_BACKFILL, now - timedelta(hours=73), 350)
    order("late_fresh", NO_BACKFILL, now - timedelta(hours=71), 300)

    result = await w.harness.run("run", "--once")
    assert result.returncode == 0, result.stderr

    sample_ids = {uid: True for _, uid, _ in samples()}
    assert recorded(w.klaviyo.account(str(WINDOWED))) == {
        **sample_ids,
        f"{ids['edge']}:processing": True,
        f"{ids['pre']}:delivered": True,
        f"{ids['live']}:shipped": False,
        f"{ids['cross']}:shipped": False,
    }
    assert recorded(w.klaviyo.account(str(NO_BACKFILL))) == {
        **sample_ids,
        f"{ids['late_edge']}:processing": True,  # after launch, but days old: no flow for stale news
        f"{ids['late_stale']}:delivered": True,
        f"{ids['late_fresh']}:shipped": False,
    }
    for label in ("out", "late_out"):
        assert w.klaviyo.account(str(WINDOWED)).profile_by_email(f"{label}@example.com") is None
        assert w.klaviyo.account(str(NO_BACKFILL)).profile_by_email(f"{label}@example.com") is None
    times = {e.unique_id: e.time for a in w.klaviyo.accounts for e in a.events}
    assert times[f"{ids['pre']}:delivered"] == windowed.launch_at - timedelta(hours=1)
    assert times[f"{ids['cross']}:shipped"] == now - timedelta(minutes=2)
    assert times[f"{ids['late_fresh']}:shipped"] == now - timedelta(hours=71)
    assert w.klaviyo.rejections == []
