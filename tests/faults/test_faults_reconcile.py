"""The delivered status nobody announces: Whiplash may mark an order delivered without bumping ``updated_at``,
so the keyset walk never sees it. The reconcile sweep re-reads orders last seen shipped by id (``id_in``,
batched) every ``reconcile_interval_minutes`` for ``reconcile_days``, so "Order delivered" still goes out once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kit.faultkit import Bridge, Ledger, assert_delivered_once, facts, in_process, serve, shops

from klaviyo_bridge.core import EventKind, OrderMemory, Plan
from klaviyo_bridge.sandbox.whiplash import RequestRecord
from klaviyo_bridge.store import Store

A = shops(801)[0]


def id_in_searches(log: Iterable[RequestRecord]) -> list[list[int]]:
    """Return the id lists of every ``id_in`` search Whiplash answered."""
    searches = (json.loads(record.query.get("search", "{}")) for record in log)
    return [search["id_in"] for search in searches if "id_in" in search]


async def test_sweep_sends_delivered_that_did_not_bump_updated_at(tmp_path: Path) -> None:
    """1. Orders shipped an hour ago and two days ago, all announced. 2. Whiplash marks both delivered without
    touching updated_at. 3. Cycle before the sweep is due. Result: the walk sees nothing.
    4. The sweep comes due (reconcile_interval_minutes = 5; reconcile_days = 1); cycle.
    Result: "Order delivered" for the recent order, live (no backfill) and timed when it was noticed; the
    order shipped two days ago is past reconcile_days and not re-read. Nothing else changes."""
    async with serve([A]) as sims:
        now = datetime.now(UTC)
        recent = int(sims.whiplash.create_order(A.cid, status=300, at=now - timedelta(hours=1))["id"])
        older = int(sims.whiplash.create_order(A.cid, status=300, at=now - timedelta(days=2))["id"])
        other = int(sims.whiplash.create_order(A.cid, status=100, at=now - timedelta(minutes=30))["id"])
        sections = {"whiplash": {"reconcile_interval_minutes": "5.0", "reconcile_days": "1"}}
        bridge = Bridge(tmp_path, sims, [A], sections).write()
        async with in_process(bridge) as run:
            await run.drain()
            assert id_in_searches(sims.whiplash.counters.log) == []  # the first walk just read them all
            for oid in (recent, older):
                sims.whiplash.set_status(oid, 350, bump_updated_at=False)
            await run.cycle()
            assert not [e for e in sims.account(A).events if e.unique_id == f"{recent}:delivered"]
            run.clock.advance(timedelta(minutes=6))
            await run.cycle()
            noticed = run.clock.utc()
            await run.drain()
        delivered = [e for e in sims.account(A).events if e.metric == "Order delivered" and not e.backfill]
        assert [e.unique_id for e in delivered] == [f"{recent}:delivered"]
        assert not delivered[0].backfill
        assert abs((delivered[0].time - noticed).total_seconds()) < 5
        assert id_in_searches(sims.whiplash.counters.log) == [[recent]]
        assert {e.unique_id for e in sims.account(A).events} >= {f"{other}:processing", f"{older}:shipped"}
        assert facts(bridge.state_path).statuses[A.cid][older] == 300  # never re-read: past reconcile_days


async def test_no_sweep_for_a_merchant_without_delivered(tmp_path: Path) -> None:
    """1. A merchant that gets "processing" and "shipped" only; an order shipped an hour ago, announced. 2. Whiplash
    marks it delivered without touching updated_at. 3. The sweep comes due; cycle.
    Result: no id_in re-read at all (the sweep looks only for "delivered", which this merchant does not get: it would
    spend the shared Whiplash budget on nothing) and no "Order delivered" event."""
    shop = replace(A, events=("processing", "shipped"))
    async with serve([shop]) as sims:
        shipped = int(sims.whiplash.create_order(shop.cid, status=300, at=datetime.now(UTC) - timedelta(hours=1))["id"])
        sections = {"whiplash": {"reconcile_interval_minutes": "5.0", "reconcile_days": "1"}}
        bridge = Bridge(tmp_path, sims, [shop], sections).write()
        async with in_process(bridge) as run:
            await run.drain()
            sims.whiplash.set_status(shipped, 350, bump_updated_at=False)
            for _ in range(2):
                run.clock.advance(timedelta(minutes=6))
                await run.cycle()
            await run.drain()
        assert id_in_searches(sims.whiplash.counters.log) == []
        assert f"{shipped}:shipped" in {e.unique_id for e in sims.account(shop).events}
        assert not [e for e in sims.account(shop).events if e.metric == "Order delivered"]


async def test_daemon_sweeps_on_its_interval(tmp_path: Path) -> None:
    """1. reconcile_interval_minutes = 0.01; 23 shipped orders. 2. Run once: "Order shipped" for each.
    3. Whiplash stops bumping updated_at on status changes and marks them delivered. 4. Wait past the
    interval; run once. Result: they are re-read by id, a page (10) per request, and "Order delivered" goes
    out for each, exactly once."""
    async with serve([A]) as sims:
        now = datetime.now(UTC)
        ids = [int(sims.whiplash.create_order(A.cid, status=300, at=now - timedelta(hours=h))["id"])
               for h in range(1, 24)]
        sims.whiplash.create_order(A.cid, status=100, at=now - timedelta(minutes=5))  # the cursor ends here
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, [A], {"whiplash": {"reconcile_interval_minutes": "0.01"}}).write()
        first = await bridge.once()
        assert first.code == 0, first.log
        sims.whiplash.bump_on_status_change = False
        for oid in ids:
            sims.whiplash.set_status(oid, 350)
        ledger.observe_all()
        await asyncio.sleep(1.0)
        second = await bridge.once()
        assert second.code == 0, second.log
        assert "reconciled customer=801 checked=23 queued=23" in second.log
        batches = id_in_searches(sims.whiplash.counters.log)
        assert [len(batch) for batch in batches] == [10, 10, 3]  # page_size ids per request
        assert sorted(oid for batch in batches for oid in batch) == sorted(ids)
        assert_delivered_once(sims, bridge, ledger)
        assert {e.unique_id for e in sims.account(A).events if e.metric == "Order delivered" and not e.backfill} == {
            f"{oid}:delivered" for oid in ids
        }


async def test_status_time_is_kept_until_the_status_changes(tmp_path: Path) -> None:
    """1. Store order 1 shipped at T0, then again (same status) at T1, order 2 shipped and delivered.
    2. Move order 1 on to 325 at T2, then back to 300 at T3.
    Result: the sweep's candidates are the shipped orders without "delivered", by the time their status was
    set: order 1 counts from T0 until its status changes, then from T3; paging by id works."""
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    shipped = frozenset({EventKind.SHIPPED})

    def plan(**orders: OrderMemory) -> Plan:
        return Plan(orders={int(k.removeprefix("o")): v for k, v in orders.items()})

    async with await Store.open(tmp_path / "s.db") as store:
        async def commit(at: datetime, **orders: OrderMemory) -> None:
            p = plan(**orders)
            await store.commit_page(7, p, None, [], at, status_at={oid: at for oid in p.orders})

        def candidates(since: datetime, after: int = 0) -> Awaitable[list[int]]:
            return store.orders_to_reconcile(7, [300], EventKind.DELIVERED, since, after_id=after, limit=1)

        await commit(t0, o1=OrderMemory(300, shipped), o2=OrderMemory(300, shipped))
        await commit(t0 + timedelta(days=1), o1=OrderMemory(300, shipped),
                     o2=OrderMemory(300, shipped | {EventKind.DELIVERED}))
        assert await candidates(t0) == [1]
        assert await candidates(t0 + timedelta(hours=1)) == []  # still set at T0, not at the re-read
        await commit(t0 + timedelta(days=2), o1=OrderMemory(325, shipped))
        assert await candidates(t0) == []
        await commit(t0 + timedelta(days=3), o1=OrderMemory(300, shipped), o3=OrderMemory(300, shipped))
        assert await candidates(t0 + timedelta(days=3)) == [1]
        assert await candidates(t0 + timedelta(days=3), after=1) == [3]
