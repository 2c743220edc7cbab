"""Webhooks end to end: the real daemon with its receiver on, the simulated Whiplash delivering signed webhooks.

Every test checks the delivery contract of the fault suite (``assert_delivered_once``: Klaviyo holds exactly the
events the observed order states mandate, once each) and what the simulator recorded of its deliveries and of
the orders requests the daemon made. Deadlines here are correctness bounds, not benchmarks: with
``poll_interval_seconds = 120``, an event that arrives within a few seconds can only have been fetched because
a webhook woke the poller (``make bench`` measures the latency).
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from kit.bridgekit import eventually
from kit.faultkit import (
    CLIENT_SECRET,
    Bridge,
    Ledger,
    Proc,
    Sims,
    assert_delivered_once,
    caught_up,
    facts,
    serve,
    shops,
)
from kit.hookkit import (
    free_port,
    hook_sections,
    last_polls,
    metric,
    orders_requests,
    outcomes,
    polls_settled,
    post,
    receiver_url,
    sign,
    wake_all,
    webhook_body,
)

from klaviyo_bridge.sandbox.whiplash import OrderScript

SHOP, OTHER = shops(701, 702)
BACKSTOP_S = 120.0
WITHIN_S = 30.0  # far below the 120 s backstop: only a webhook can have made it this fast


async def started(bridge: Bridge, proc: Proc, sims: Sims, cids: Iterable[int], port: int) -> None:
    """Wait until the receiver listens and a first poll (woken now) has ended, caught up and sent everything."""
    await proc.wait_for_line("webhooks listening on http://127.0.0.1:", 20)
    wanted = list(cids)
    before = last_polls(bridge.state_path, wanted)
    await wake_all(port)
    await eventually(lambda: all(at != before[cid] for cid, at in last_polls(bridge.state_path, wanted).items()),
                     limit_s=20, what="the woken polls")
    try:
        await eventually(lambda: caught_up(bridge.state_path, sims.whiplash, wanted)
                         and facts(bridge.state_path).pending_rows == 0, limit_s=30, what="the first sync")
        await polls_settled(sims.whiplash, wanted)  # what a test counts from here on is its own doing
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the bridge's log:\n{proc.log[-4000:]}") from None


async def settled(bridge: Bridge, sims: Sims, cids: Iterable[int], limit_s: float = WITHIN_S) -> None:
    """Wait until the bridge remembers every current status and has sent everything."""
    wanted = list(cids)
    await eventually(lambda: caught_up(bridge.state_path, sims.whiplash, wanted)
                     and facts(bridge.state_path).pending_rows == 0, limit_s=limit_s, what="the bridge to catch up")


def move(scripts: Iterable[OrderScript], ledger: Ledger, *, share: float = 0.5, spawn: int = 1) -> int:
    """Move orders one lifecycle step (each order at most once, so the bridge sees every state) and record it."""
    changed = 0
    for script in scripts:
        changed += len(script.tick(share=share)) + len(script.spawn(spawn))
    ledger.observe_all()
    return changed


async def test_webhooks_deliver_long_before_the_backstop_poll(tmp_path: Path) -> None:
    """1. Two customers with history; the daemon polls every 120 s, its receiver subscribed to every order event.
    2. Five rounds: move orders, then wait until the bridge caught up, each within 30 s.
    Result: every event once; every delivery answered 202 (none refused); the poller was woken by webhooks,
    not by its interval (the rounds end long before 120 s)."""
    port = free_port()
    async with serve([SHOP, OTHER]) as sims:
        scripts = [OrderScript(sims.whiplash, shop.cid, seed=shop.cid) for shop in (SHOP, OTHER)]
        for script in scripts:
            script.backfill(15, days=5)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, [SHOP, OTHER], hook_sections(port)).write()
        async with bridge.running() as proc:
            await started(bridge, proc, sims, [SHOP.cid, OTHER.cid], port)
            sims.whiplash.subscribe(receiver_url(port))
            began = time.monotonic()
            changes = 0
            for _ in range(5):
                changes += move(scripts, ledger)
                await settled(bridge, sims, [SHOP.cid, OTHER.cid])
            elapsed = time.monotonic() - began
            assert await proc.stop() == 0
        assert changes >= 10
        assert elapsed < BACKSTOP_S / 2
        assert_delivered_once(sims, bridge, ledger)
        delivered = outcomes(sims.whiplash.webhook_deliveries)
        assert set(delivered) == {"delivered:202"}, delivered
    assert "webhook rejected" not in proc.log


async def test_dropped_webhooks_are_covered_by_the_backstop_poll(tmp_path: Path) -> None:
    """1. Backstop poll every 3 s; Whiplash loses every webhook. 2. Move orders three times.
    Result: each time the interval's poll delivers every event, once; no webhook ever reached the bridge."""
    port = free_port()
    async with serve([SHOP]) as sims:
        script = OrderScript(sims.whiplash, SHOP.cid, seed=3)
        script.backfill(12, days=5)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, [SHOP], hook_sections(port, poll_s=3.0)).write()
        async with bridge.running() as proc:
            await started(bridge, proc, sims, [SHOP.cid], port)
            sims.whiplash.subscribe(receiver_url(port))
            sims.whiplash.webhooks.drop_next(100_000)
            for _ in range(3):
                move([script], ledger)
                await settled(bridge, sims, [SHOP.cid], limit_s=20)
            assert await proc.stop() == 0
        assert_delivered_once(sims, bridge, ledger)
        deliveries = outcomes(sims.whiplash.webhook_deliveries)
        assert set(deliveries) == {"dropped"}, deliveries
        assert deliveries["dropped"] >= 3


async def test_duplicated_reordered_and_late_webhooks_deliver_each_event_once(tmp_path: Path) -> None:
    """1. Backstop 120 s; Whiplash sends every webhook twice, 0.3 s late, and holds groups of five to send them
    newest first. 2. Four rounds of order moves.
    Result: every event recorded once (Klaviyo never even saw a repeat), all within the 30 s bound."""
    port = free_port()
    async with serve([SHOP]) as sims:
        script = OrderScript(sims.whiplash, SHOP.cid, seed=4)
        script.backfill(12, days=5)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, [SHOP], hook_sections(port)).write()
        async with bridge.running() as proc:
            await started(bridge, proc, sims, [SHOP.cid], port)
            hub = sims.whiplash.webhooks
            sims.whiplash.subscribe(receiver_url(port))
            hub.duplicate, hub.delay_s = True, 0.3
            for _ in range(4):
                hub.reorder_next(5)
                move([script], ledger, share=0.7, spawn=2)
                hub.reorder_next(0)  # release a group the round left incomplete
                await settled(bridge, sims, [SHOP.cid])
            assert await proc.stop() == 0
        assert_delivered_once(sims, bridge, ledger)
        assert sims.duplicates() == 0
        assert hub.counts["duplicated"] >= 5


async def test_forged_oversized_and_malformed_requests_wake_nothing(tmp_path: Path) -> None:
    """1. Backstop 120 s. 2. Whiplash forges the signatures of the webhooks of three order moves; the test posts
    an unsigned request, an oversized one and a signed one that is not JSON. 3. Then one genuine webhook.
    Result: 401, 401, 413, 400; no orders request and no new event until the genuine webhook, whose poll then
    delivers all three moves; the log has one WARNING line per reason and neither body, signature, secret nor
    email."""
    port = free_port()
    async with serve([SHOP]) as sims:
        w = sims.whiplash
        script = OrderScript(w, SHOP.cid, seed=5)
        script.backfill(12, days=5)
        ledger = Ledger(w)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, [SHOP], hook_sections(port, webhooks={"max_body_bytes": "65536"})).write()
        async with bridge.running() as proc, aiohttp.ClientSession() as http:
            await started(bridge, proc, sims, [SHOP.cid], port)
            w.subscribe(receiver_url(port), customer_id=SHOP.cid, events=["order.status_changed", "order.created"])
            quiet_since = time.monotonic()
            events_before = len(sims.account(SHOP).events)
            w.webhooks.forge_next(100)
            moved = [c.order_id for c in script.tick(share=1.0)][:3]
            assert moved, "nothing to move"
            ledger.observe_all()
            await eventually(lambda: w.webhooks.is_idle, limit_s=10, what="the forged deliveries")
            body = webhook_body(w, moved[0])
            url = receiver_url(port)
            assert await post(http, url, body, None) == 401
            assert await post(http, url, body + b" " * 70_000, sign(CLIENT_SECRET, body + b" " * 70_000)) == 413
            assert await post(http, url, b"<html>not json</html>", sign(CLIENT_SECRET, b"<html>not json</html>")) == 400
            await asyncio.sleep(1.0)  # what a wrongly woken poller would need to fetch
            forged = outcomes(w.webhook_deliveries)
            assert forged == {"refused:401": len(w.webhook_deliveries)}, forged
            assert orders_requests(w, SHOP.cid, quiet_since) == 0
            assert len(sims.account(SHOP).events) == events_before
            w.webhooks.forge_next(0)
            assert await post(http, url, body, sign(CLIENT_SECRET, body)) == 202
            await settled(bridge, sims, [SHOP.cid])
            assert await proc.stop() == 0
        assert_delivered_once(sims, bridge, ledger)
    rejected = re.findall(r"webhook rejected reason=(\w+)", proc.log)
    assert sorted(rejected) == ["bad_signature", "malformed", "too_large", "unsigned"], rejected
    for secret in (CLIENT_SECRET, sign(CLIENT_SECRET, body), *(d.signature or "-" for d in w.webhook_deliveries)):
        assert secret not in proc.log
    for data in ("@example", "not json", '"order"'):
        assert data not in proc.log


async def test_a_burst_of_1000_webhooks_costs_at_most_two_polls(tmp_path: Path) -> None:
    """1. 1,000 orders of one customer, synced; the daemon's metrics on; Whiplash's request budget 25/s (its own
    gem's default). 2. Webhooks held while all 1,000 ship, then released at once: 1,000 order.shipped webhooks
    back to back. Result: every shipped event once; the daemon polled that customer at most twice for the whole
    burst (its own poll counter and Whiplash's request log agree); no request was throttled."""
    port, metrics_port = free_port(), free_port()
    async with serve([SHOP]) as sims:
        w = sims.whiplash
        w.rate_limit_per_s = 25
        before_launch = w.now() - timedelta(days=2)  # history: sent in bulk, so the start-up sync is quick
        ids = [int(w.create_order(SHOP.cid, status=200, at=before_launch, email=f"burst{i}@example.com")["id"])
               for i in range(1000)]
        ledger = Ledger(w)
        ledger.observe_all()
        sections = hook_sections(port, bridge={"metrics_listen": f'"127.0.0.1:{metrics_port}"'},
                                 whiplash={"page_size": "250"})
        bridge = Bridge(tmp_path, sims, [SHOP], sections).write()
        scrape_url = f"http://127.0.0.1:{metrics_port}/metrics"
        async with bridge.running() as proc, aiohttp.ClientSession() as http:
            await started(bridge, proc, sims, [SHOP.cid], port)
            before = await (await http.get(scrape_url)).text()
            polls_before = metric(before, "klaviyo_bridge_polls_total", customer=SHOP.cid, outcome="ok")
            asked_before = metric(before, "klaviyo_bridge_webhook_polls_total", customer=SHOP.cid)
            w.subscribe(receiver_url(port), customer_id=SHOP.cid, events=["order.shipped"])
            w.webhooks.pause()
            shipped_at = w.now()  # one second for all: a loop of 1,000 under load may cross into the next
            for oid in ids:
                w.set_status(oid, 300, at=shipped_at)
            ledger.observe_all()
            released = time.monotonic()
            w.webhooks.resume()
            await eventually(lambda: w.webhooks.is_idle, limit_s=60, what="the burst to be delivered")
            await settled(bridge, sims, [SHOP.cid])
            await asyncio.sleep(0.5)
            text = await (await http.get(scrape_url)).text()
            assert await proc.stop() == 0
        polls = metric(text, "klaviyo_bridge_polls_total", customer=SHOP.cid, outcome="ok") - polls_before
        assert 1 <= polls <= 2, polls
        assert metric(text, "klaviyo_bridge_webhook_polls_total", customer=SHOP.cid) - asked_before <= 2
        assert metric(text, "klaviyo_bridge_webhooks_total", outcome="accepted") + metric(
            text, "klaviyo_bridge_webhooks_total", outcome="already_seen") == 1000 + 1  # and started()'s wake-up
        # One walk over 1,000 orders changed in the same second, 250 a page, is 7 requests: the first page, the
        # same page again (nothing fresh: the keyset stalls on the tie), the tie drained by id in 3 full pages and
        # an empty one, then the empty "after" page. Two polls are at most 14.
        assert orders_requests(w, SHOP.cid, released) <= 2 * 7
        assert outcomes(w.webhook_deliveries) == {"delivered:202": 1000}
        assert w.counters.throttled == 0
        assert_delivered_once(sims, bridge, ledger)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_webhooks_lost_while_the_daemon_is_down_are_covered_by_a_later_poll(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """1. The daemon binds the receiver itself (no socket activation). 2. Stop it (SIGTERM or SIGKILL), move
    orders, restart; a later webhook wakes it. Result: those webhooks found no listener (without the socket unit
    nothing queues them); the first poll after the restart delivered the moves anyway, once. (With the socket
    unit they wait in the kernel instead: tests/system/test_socket_activation.py.)"""
    port = free_port()
    async with serve([SHOP]) as sims:
        script = OrderScript(sims.whiplash, SHOP.cid, seed=6)
        script.backfill(10, days=5)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, [SHOP], hook_sections(port)).write()
        sims.whiplash.subscribe(receiver_url(port))
        async with bridge.running() as proc:
            await started(bridge, proc, sims, [SHOP.cid], port)
            proc.proc.send_signal(stop)
            await proc.wait(20)
        move([script], ledger, share=1.0)
        await eventually(lambda: sims.whiplash.webhooks.is_idle, limit_s=10, what="the deliveries")
        assert set(outcomes(sims.whiplash.webhook_deliveries)) == {"error"}
        async with bridge.running() as proc:
            await started(bridge, proc, sims, [SHOP.cid], port)
            assert await proc.stop() == 0
        assert_delivered_once(sims, bridge, ledger)
