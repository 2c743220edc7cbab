"""The shared Whiplash budget with the real daemon: many customers, one limit; a 429 slows everyone; live polls go
before a big merchant's onboarding. The simulated Whiplash enforces a per-application limit on fixed one-second
windows (429 + Retry-After past it) and keeps a record of every request, which is what these tests read.
"""

from __future__ import annotations

from pathlib import Path

from kit.faultkit import Bridge, Ledger, assert_delivered_once, fake_whiplash, serve, shops

from klaviyo_bridge.sandbox.whiplash import OrderScript

MANY = shops(501, 502, 503, 504, 505)


def orders_requests(whiplash: object) -> list[tuple[float, int, str]]:
    """Return (arrival, status, customer) of every orders request the simulator answered, in order."""
    log = whiplash.counters.log  # type: ignore[attr-defined]
    return [(r.at, r.status, r.headers.get("x-customer-id", "")) for r in log if r.path == "/api/v2/orders"]


async def test_many_customers_share_one_limit(tmp_path: Path) -> None:
    """1. Five customers, each with 40 orders of history (page size 10: four slices each, all at once), Whiplash
    limited to 4 requests/s, the bridge's budget 4 requests/s. 2. Run once.
    Result: no second at Whiplash over 4 requests, not one 429, every event recorded once."""
    whiplash = fake_whiplash()
    whiplash.rate_limit_per_s = 4
    async with serve(MANY, whiplash=whiplash) as sims:
        for shop in MANY:
            OrderScript(sims.whiplash, shop.cid, seed=shop.cid).backfill(40, days=10)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, MANY, {"whiplash": {"max_requests_per_second": "4"}}).write()
        run = await bridge.once(limit_s=120)
        assert run.code == 0, run.log
        assert_delivered_once(sims, bridge, ledger)
        assert max(sims.whiplash.window_counts().values()) <= 4
        assert sims.whiplash.counters.throttled == 0
        assert {cid for _, _, cid in orders_requests(sims.whiplash)} == {str(s.cid) for s in MANY}


async def test_a_429_slows_every_customer(tmp_path: Path) -> None:
    """1. Five customers with history; the bridge's budget is 10 requests/s but Whiplash allows only 3.
    2. Run once. Result: 429s happen, but after each one no customer's request arrives until Retry-After (1 s) has
    passed (requests already in flight aside), the budget halves so 429s stay few, and every event is recorded once.
    """
    whiplash = fake_whiplash()
    whiplash.rate_limit_per_s = 3
    async with serve(MANY, whiplash=whiplash) as sims:
        for shop in MANY:
            OrderScript(sims.whiplash, shop.cid, seed=shop.cid).backfill(40, days=10)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, MANY, {"whiplash": {"max_requests_per_second": "10"}}).write()
        run = await bridge.once(limit_s=180)
        assert run.code == 0, run.log
        assert_delivered_once(sims, bridge, ledger)
        requests = orders_requests(sims.whiplash)
        refused = [at for at, status, _ in requests if status == 429]
        assert refused, "Whiplash's limit was never reached: the test proves nothing"
        assert len(refused) <= 8
        for at in refused:
            # Requests sent before the 429 came back may still arrive just after it; none is sent during the pause.
            during = [(t, cid) for t, status, cid in requests if at + 0.2 < t < at + 0.9]
            assert not during, f"requests during the pause after the 429 at {at:.2f}: {during}"


async def test_live_polls_go_before_onboardings(tmp_path: Path) -> None:
    """1. Two live customers, caught up. 2. Five new customers are added, each with 40 orders of history (their
    first reads are background work: four slices each, queued at once), and each live customer ships an order.
    3. Run once with one request at a time (4 requests/s), the live customers listed last.
    Result: the live customers' polls are among the first orders requests Whiplash sees — ahead of some twenty
    queued onboarding pages, though they asked last — and everything is delivered once."""
    live = shops(601, 602)
    onboarding = shops(611, 612, 613, 614, 615)
    async with serve([*onboarding, *live], whiplash=fake_whiplash()) as sims:
        for shop in live:
            OrderScript(sims.whiplash, shop.cid, seed=shop.cid).spawn(2)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        budget = {"whiplash": {"max_requests_per_second": "4", "max_concurrent_requests": "1"}}
        first = await Bridge(tmp_path, sims, live, budget).write().once(limit_s=60)
        assert first.code == 0, first.log
        for shop in onboarding:
            OrderScript(sims.whiplash, shop.cid, seed=shop.cid).backfill(40, days=10)
        for shop in live:
            order_id = next(o.id for o in sims.whiplash.orders.values() if o.customer_id == shop.cid)
            sims.whiplash.set_status(order_id, 300)
        ledger.observe_all()
        before = len(orders_requests(sims.whiplash))
        bridge = Bridge(tmp_path, sims, [*onboarding, *live], budget).write()
        run = await bridge.once(limit_s=120)
        assert run.code == 0, run.log
        assert_delivered_once(sims, bridge, ledger)
        order = [cid for _, _, cid in orders_requests(sims.whiplash)[before:]]
        assert sum(cid in {str(s.cid) for s in onboarding} for cid in order) >= 20
        for shop in live:
            position = order.index(str(shop.cid))
            assert position < 4, f"customer {shop.cid} polled at position {position}"
