"""Per-merchant events, end to end with the real daemon: a partial choice, own metric names, and changing the
choice by reload (nothing old sent live, nothing disabled sent).

The expected Klaviyo state is the mapping core's replay of every order state the bridge was made to see
(faultkit.Ledger), under each customer's own rules, so "only the enabled metrics" is checked exactly.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kit.faultkit import SAMPLE_EMAIL, Bridge, Ledger, Shop, assert_delivered_once, caught_up, serve

from klaviyo_bridge.sandbox.whiplash import OrderScript

TODAY = datetime.now(UTC).date()
PARTIAL = Shop(611, "pk_partial_611_0123456789abcdef", events=("shipped", "delivered"),
               metrics=(("delivered", "Whiplash: Delivered"),))
FULL = Shop(612, "pk_full_612_0123456789abcdef")
NOTHING = Shop(613, "pk_nothing_613_0123456789abcdef", events=())


async def status_of(bridge: Bridge) -> dict[int, dict[str, object]]:
    """Return ``status --json`` rows by customer id."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "klaviyo_bridge", "status", "--json", "--config", str(bridge.config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(bridge.tmp),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode in (0, 2), err.decode()
    return {int(row["customer_id"]): row for row in json.loads(out)}


async def test_a_partial_choice_sends_only_the_enabled_metrics(tmp_path: Path) -> None:
    """1. Three merchants on one Whiplash: one gets only shipped and delivered (delivered under its own name),
    one gets all four, one gets none. 2. run --once over a backfill plus live orders.
    Result: each Klaviyo account holds exactly the events its rules allow (the partial one only "Order shipped"
    and "Whiplash: Delivered", samples of those two only); every order with an email made a profile on the list,
    whatever its status; status names each one's events."""
    async with serve([PARTIAL, FULL, NOTHING]) as sims:
        for shop in (PARTIAL, FULL, NOTHING):
            script = OrderScript(sims.whiplash, shop.cid, seed=shop.cid)
            script.backfill(25, days=10)
            script.spawn(8)
            script.tick(share=0.6)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, [PARTIAL, FULL, NOTHING]).write()
        result = await bridge.once()
        assert result.code == 0, result.log
        assert_delivered_once(sims, bridge, ledger)
        partial = sims.account(PARTIAL)
        assert {e.metric for e in partial.events} == {"Order shipped", "Whiplash: Delivered"}
        assert {e.unique_id for e in partial.events if (e.unique_id or "").startswith("sample:")} == {
            "sample:shipped", "sample:delivered:Whiplash: Delivered"}
        assert {e.metric for e in sims.account(FULL).events} == {
            "Processing order", "Order cancelled", "Order shipped", "Order delivered"}
        assert sims.account(NOTHING).events == []
        for shop in (PARTIAL, FULL, NOTHING):
            account = sims.account(shop)
            emails = {p.email for p in account.profiles.values()}
            assert emails == ledger.emails(shop.cid) | {SAMPLE_EMAIL}, shop.cid
            members = account.list_named("Whiplash")
            assert members is not None
            assert len(members.members) == len(emails)
        rows = await status_of(bridge)
    assert (rows[PARTIAL.cid]["events"], rows[FULL.cid]["events"], rows[NOTHING.cid]["events"]) == (
        "shipped,delivered", "all", "none")


async def test_changing_the_choice_by_reload(tmp_path: Path) -> None:
    """1. A merchant gets processing and shipped. Its Klaviyo is down (503), so its events queue up; some of its
    orders are already delivered. 2. Reload with shipped disabled and delivered enabled.
    Result: the queued "Order shipped" rows are dropped at once, counted in the log and in status, never sent;
    "Order delivered" is not sent for the orders delivered before the change (no burst of old news).
    3. Klaviyo recovers; an order is delivered after the change. Result: its "Order delivered" goes out live,
    once; nothing else of "Order shipped" or old "Order delivered" ever reaches Klaviyo."""
    shop = Shop(621, "pk_reload_621_0123456789abcdef", launch=TODAY - timedelta(days=3), backfill_days=0,
                events=("processing", "shipped"))
    async with serve([shop]) as sims:
        w = sims.whiplash
        now = datetime.now(UTC).replace(microsecond=0)
        shipped = [int(w.create_order(shop.cid, status=300, at=now - timedelta(hours=2),
                                      email=f"ship{i}@example.com")["id"]) for i in range(4)]
        delivered = [int(w.create_order(shop.cid, status=350, at=now - timedelta(hours=1),
                                        email=f"done{i}@example.com")["id"]) for i in range(3)]
        later = int(w.create_order(shop.cid, status=300, at=now - timedelta(minutes=30),
                                   email="later@example.com")["id"])
        sims.klaviyo.fail_next(10_000, 503, account=shop.label)
        bridge = Bridge(tmp_path, sims, [shop], {"klaviyo": {"timeout_seconds": "2.0"}}).write()
        async with bridge.running() as proc:
            await proc.wait_for_line(rf"klaviyo errors started customer={shop.cid}", 30)
            await asyncio.sleep(0.5)
            assert caught_up(bridge.state_path, w, [shop.cid])
            enabled = Shop(shop.cid, shop.key, launch=shop.launch, backfill_days=0, events=("processing", "delivered"))
            Bridge(tmp_path, sims, [enabled], {"klaviyo": {"timeout_seconds": "2.0"}}).write()
            proc.proc.send_signal(signal.SIGHUP)
            dropped = await proc.wait_for_line(
                rf"queued events dropped customer={shop.cid} events=cancelled,shipped", 20)
            assert f"rows={len(shipped) + 1}" in dropped  # the four shipped and "later" (set-up never got through)
            sims.klaviyo.clear_faults()
            w.set_status(later, 350)
            await proc.wait_for_line(rf"cycle customer={shop.cid} .*sent=[1-9]", 30)
            for _ in range(100):
                if f"{later}:delivered" in {e.unique_id for e in sims.account(shop).events}:
                    break
                await asyncio.sleep(0.1)
            rows = await status_of(bridge)
            assert await proc.stop() == 0
        events = sims.account(shop).events
    ids = [e.unique_id for e in events]
    assert not [uid for uid in ids if (uid and uid.endswith(":shipped")) or uid == "sample:shipped"]
    assert not [oid for oid in delivered if f"{oid}:delivered" in ids]
    live = [e for e in events if e.unique_id == f"{later}:delivered"]
    assert len(live) == 1
    assert live[0].backfill is False
    assert "sample:delivered" in ids  # the newly enabled metric gets its sample for the flow builder
    assert rows[shop.cid]["dropped"] == len(shipped) + 1
    assert rows[shop.cid]["events"] == "processing,delivered"
    assert sims.account(shop).duplicate_events == 0
