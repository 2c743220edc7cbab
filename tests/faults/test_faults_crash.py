"""Crash matrix: the real daemon SIGKILLs itself at each named failpoint, is restarted without it, and the
delivery contract still holds — every expected event recorded by Klaviyo exactly once, re-sends bounded by the
rows in flight at the crash, no dead letter, a sound state DB, and a Whiplash token chain that still works.

Each test also checks the crash landed where its name says (what was committed or sent at the kill), so a
failpoint that silently moved would fail here. The first tests read one page at a time
(``max_concurrent_requests = 1``: the plain walk, whose page order is fixed); the sliced walk (several slices
read side by side, the default) is killed at the same failpoints below, where the check is the one its design
rests on: at the kill, every order at or before the stored cursor was committed.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from kit.bridgekit import eventually
from kit.faultkit import (
    Bridge,
    Facts,
    Ledger,
    Shop,
    Sims,
    assert_delivered_once,
    caught_up,
    facts,
    serve,
    shops,
)
from kit.hookkit import free_port, hook_sections, last_polls, orders_requests, receiver_url, wake_all

from klaviyo_bridge.sandbox.whiplash import OrderScript

SHOP = shops(401)[0]
BACKFILLED, LIVE = 25, 3  # page_size 10: three pages, the last one partly live orders
ONE_AT_A_TIME = {"whiplash": {"max_concurrent_requests": "1"}}  # the plain walk: pages in a fixed order
SLICED_BACKFILL = 160  # page_size 10, four slices read side by side: 16+ pages


@dataclass
class Crash:
    """What the killed run left behind, and what the recovery run re-sent."""

    at_kill: Facts
    kept_at_kill: int  # events Klaviyo had recorded when the process died
    redone: int  # event re-sends plus profile re-imports after the restart
    resends: int  # event re-sends only (Klaviyo dropped them as duplicates)


def seed(sims: Sims, shop: Shop, backfilled: int = BACKFILLED) -> Ledger:
    """Give the shop history (backfill, sent in bulk) and a few live orders (sent one by one)."""
    script = OrderScript(sims.whiplash, shop.cid, seed=shop.cid)
    script.backfill(backfilled, days=10)
    script.spawn(LIVE)
    ledger = Ledger(sims.whiplash)
    ledger.observe_all()
    return ledger


def redone(sims: Sims, shop: Shop) -> int:
    """Count requests Klaviyo received again for the same thing: duplicate events and repeated profile upserts."""
    account = sims.account(shop)
    imports = account.counters.requests["create_or_update_profile"]
    return account.duplicate_events + max(0, imports - len(account.profiles))


async def crash_and_recover(sims: Sims, bridge: Bridge, ledger: Ledger, spec: str) -> Crash:
    """Run once with ``spec`` armed (it must kill), run once clean, and check the contract."""
    killed = await bridge.once(failpoints=spec)
    assert killed.code == -signal.SIGKILL, f"failpoint {spec} did not fire; log:\n{killed.log}"
    at_kill = facts(bridge.state_path)
    kept = len(sims.account(SHOP).events)
    recovered = await bridge.once()
    assert recovered.code == 0, recovered.log
    assert_delivered_once(sims, bridge, ledger)
    resends = sims.account(SHOP).duplicate_events
    # Only rows still unmarked at the crash can go out twice (at most the batch in flight).
    assert resends <= sum(at_kill.pending_events.values())
    after = facts(bridge.state_path)
    assert after.poll_errors == {SHOP.cid: None}
    assert after.refresh_token == sims.whiplash.current_refresh_token  # the chain still works
    return Crash(at_kill, kept, redone(sims, SHOP), resends)


async def test_kill_after_fetch(tmp_path: Path) -> None:
    """1. Kill when the second page is fetched. 2. Restart.
    Result: only the first page was committed (10 orders; `run --once` may already be sending it); after the
    restart all is delivered once."""
    async with serve([SHOP]) as sims:
        ledger = seed(sims, SHOP)
        bridge = Bridge(tmp_path, sims, [SHOP], ONE_AT_A_TIME).write()
        crash = await crash_and_recover(sims, bridge, ledger, "after_fetch=kill@2")
    assert len(crash.at_kill.statuses[SHOP.cid]) == 10
    # Sending overlaps polling, so page one may be partly in Klaviyo; re-sends are bounded in crash_and_recover.
    assert sum(crash.at_kill.pending_events.values()) > 0


async def test_kill_during_cursor_update(tmp_path: Path) -> None:
    """1. Kill inside the second page's transaction, after its writes, before COMMIT. 2. Restart.
    Result: the second page left no trace (its memory, rows and cursor rolled back together)."""
    async with serve([SHOP]) as sims:
        ledger = seed(sims, SHOP)
        bridge = Bridge(tmp_path, sims, [SHOP], ONE_AT_A_TIME).write()
        crash = await crash_and_recover(sims, bridge, ledger, "during_cursor_update=kill@2")
    assert len(crash.at_kill.statuses[SHOP.cid]) == 10
    assert sum(crash.at_kill.pending_events.values()) > 0


async def test_kill_after_outbox_commit(tmp_path: Path) -> None:
    """1. Kill right after the second page's commit. 2. Restart.
    Result: two pages (not three) committed and queued, not all sent; all delivered once after the restart."""
    async with serve([SHOP]) as sims:
        ledger = seed(sims, SHOP)
        bridge = Bridge(tmp_path, sims, [SHOP], ONE_AT_A_TIME).write()
        crash = await crash_and_recover(sims, bridge, ledger, "after_outbox_commit=kill@2")
    # Page two starts at the last key of page one (>=, for same-second ties), so it adds 9 or 10 orders.
    assert 10 < len(crash.at_kill.statuses[SHOP.cid]) < BACKFILLED + LIVE
    assert sum(crash.at_kill.pending_events.values()) > 0


async def test_kill_mid_batch(tmp_path: Path) -> None:
    """1. Kill before the fourth send of the delivery round. 2. Restart.
    Result: the kill came mid-delivery (some events recorded, not all); nothing lost or doubled after."""
    async with serve([SHOP]) as sims:
        ledger = seed(sims, SHOP)
        bridge = Bridge(tmp_path, sims, [SHOP], ONE_AT_A_TIME).write()
        crash = await crash_and_recover(sims, bridge, ledger, "mid_batch=kill@4")
        total = len(sims.account(SHOP).events)
    assert crash.at_kill.pending_rows > 0
    assert crash.kept_at_kill < total


async def test_kill_after_send_before_mark(tmp_path: Path) -> None:
    """1. Kill after Klaviyo's 2xx for the third request, before the row is marked sent. 2. Restart.
    Result: that request is sent again (Klaviyo absorbs it: one event per unique_id, upsert for profiles)."""
    async with serve([SHOP]) as sims:
        ledger = seed(sims, SHOP)
        bridge = Bridge(tmp_path, sims, [SHOP], ONE_AT_A_TIME).write()
        crash = await crash_and_recover(sims, bridge, ledger, "after_send_before_mark=kill@3")
    assert crash.redone >= 1


async def test_kill_during_token_refresh_keeps_the_chain(tmp_path: Path) -> None:
    """1. Kill after Whiplash issued the first tokens (from the seed), before they are stored. 2. Restart.
    3. Expire access tokens; kill after the stored refresh token was exchanged, before the new one is stored.
    4. Restart. Result: each restart authenticates with the last stored token (Doorkeeper revokes it only when
    its successor is first used), the stored token ends as Whiplash's newest, and everything is delivered."""
    async with serve([SHOP]) as sims:
        ledger = seed(sims, SHOP)
        bridge = Bridge(tmp_path, sims, [SHOP], ONE_AT_A_TIME).write()
        crash = await crash_and_recover(sims, bridge, ledger, "during_token_refresh=kill")
        assert crash.at_kill.refresh_token is None
        stored = facts(bridge.state_path).refresh_token
        sims.whiplash.expire_access_tokens()
        killed = await bridge.once(failpoints="during_token_refresh=kill")
        assert killed.code == -signal.SIGKILL, killed.log
        assert facts(bridge.state_path).refresh_token == stored  # the new token died with the process
        assert sims.whiplash.current_refresh_token != stored
        recovered = await bridge.once()
        assert recovered.code == 0, recovered.log
        assert facts(bridge.state_path).refresh_token == sims.whiplash.current_refresh_token
        assert_delivered_once(sims, bridge, ledger)
        assert sims.whiplash.oauth.rotations == 4


def committed_prefix_holds(path: Path, sims: Sims, shop: Shop) -> tuple[int, int]:
    """Check that every order at or before the stored cursor is remembered; return (remembered, total)."""
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT cursor_ts, cursor_id FROM customers WHERE customer_id = ?", (shop.cid,)).fetchone()
        known = {oid for (oid,) in db.execute("SELECT order_id FROM orders WHERE customer_id = ?", (shop.cid,))}
    keys = sorted((o.updated_at, o.id) for o in sims.whiplash.orders.values() if o.customer_id == shop.cid)
    if row is not None and row[0] is not None:
        cursor = (datetime.fromisoformat(row[0]), int(row[1]))
        behind = {oid for at, oid in keys if (at, oid) <= cursor}
        assert behind <= known, f"cursor {cursor} passes orders never committed: {sorted(behind - known)[:5]}"
    return len(known), len(keys)


@pytest.mark.parametrize("spec", ["after_fetch=kill@6", "after_outbox_commit=kill@5", "during_cursor_update=kill@4"])
async def test_sliced_walk_killed_mid_read(tmp_path: Path, spec: str) -> None:
    """1. A backfill of 160 orders read as four slices side by side (page size 10); kill at a failpoint of the walk.
    2. Restart. Result: at the kill the read was incomplete and the stored cursor passed no uncommitted order
    (the contiguous prefix); after the restart every event is recorded once."""
    async with serve([SHOP]) as sims:
        ledger = seed(sims, SHOP, SLICED_BACKFILL)
        bridge = Bridge(tmp_path, sims, [SHOP]).write()
        killed = await bridge.once(failpoints=spec)
        assert killed.code == -signal.SIGKILL, f"failpoint {spec} did not fire; log:\n{killed.log}"
        remembered, total = committed_prefix_holds(bridge.state_path, sims, SHOP)
        assert remembered < total
        recovered = await bridge.once()
        assert recovered.code == 0, recovered.log
        assert_delivered_once(sims, bridge, ledger)
        assert committed_prefix_holds(bridge.state_path, sims, SHOP) == (total, total)


# ------------------------------------------------------------------------ with the webhook receiver on

# Where each point is first reached after the armed daemon's first poll: that poll (nothing new, one page)
# passes each page point once and sends nothing, so the next hit is in the poll the orders' webhooks wake, or
# its sends.
WEBHOOK_KILLS = [("after_fetch", 2), ("during_cursor_update", 2), ("after_outbox_commit", 2), ("mid_batch", 1),
                 ("after_send_before_mark", 1)]


@pytest.mark.parametrize(("point", "nth"), WEBHOOK_KILLS, ids=[point for point, _ in WEBHOOK_KILLS])
async def test_kill_in_a_poll_a_webhook_woke(tmp_path: Path, point: str, nth: int) -> None:
    """1. The daemon (backstop poll 120 s, receiver on, Whiplash subscribed) syncs the history and stops.
    2. Restarted with ``point`` armed, it polls once (nothing new), then is woken by the webhooks of moving orders
    and SIGKILLs itself in that poll (or its sends). 3. Restarted clean, more orders move, by webhook only.
    Result: the webhooks were answered 202 before the kill; every expected event is recorded once, re-sends stay
    within the rows unmarked at the kill, no dead letter, a sound DB and a working token chain."""
    port = free_port()
    async with serve([SHOP]) as sims:
        ledger = seed(sims, SHOP)
        script = OrderScript(sims.whiplash, SHOP.cid, seed=SHOP.cid + 1)
        bridge = Bridge(tmp_path, sims, [SHOP], hook_sections(port, whiplash={"page_size": "250"})).write()
        async with bridge.running() as proc:
            await proc.wait_for_line("webhooks listening", 20)
            await wake_all(port)
            await synced(bridge, sims)
            assert await proc.stop() == 0
        sims.whiplash.subscribe(receiver_url(port), customer_id=SHOP.cid)
        polled = last_polls(bridge.state_path, [SHOP.cid])
        restarted = time.monotonic()
        async with bridge.running(failpoints=f"{point}=kill@{nth}") as proc:
            await proc.wait_for_line("webhooks listening", 20)
            await first_poll(bridge, sims, port, polled, restarted)
            script.spawn(2)
            script.tick(share=1.0)
            ledger.observe_all()
            code = await proc.exited_within(20)
        assert code == -signal.SIGKILL, f"{point} did not fire; log:\n{proc.log}"
        assert "delivered" in {d.outcome for d in sims.whiplash.webhook_deliveries}
        at_kill = facts(bridge.state_path)
        before = sims.duplicates()
        async with bridge.running() as proc:
            await proc.wait_for_line("webhooks listening", 20)
            await wake_all(port)
            await synced(bridge, sims)
            script.tick(share=1.0)
            ledger.observe_all()
            await synced(bridge, sims)
            assert await proc.stop() == 0
        assert_delivered_once(sims, bridge, ledger)
        assert sims.duplicates() - before <= sum(at_kill.pending_events.values())
        assert facts(bridge.state_path).refresh_token == sims.whiplash.current_refresh_token


async def synced(bridge: Bridge, sims: Sims) -> None:
    """Wait until the bridge remembers every current status and has sent everything."""
    await eventually(lambda: caught_up(bridge.state_path, sims.whiplash, [SHOP.cid])
                     and facts(bridge.state_path).pending_rows == 0, limit_s=30, what="the bridge to catch up")



async def first_poll(bridge: Bridge, sims: Sims, port: int, before: dict[int, str | None], since: float) -> None:
    """Wait for the daemon's first poll (nothing new: one page, nothing to send) to be recorded: the start-up poll,
    or, when the first scheduled poll waits for a later slot of the interval, one a webhook wakes now.

    A poll is seen starting in Whiplash's request log at once; its record reaches the state DB up to POLL_FLUSH_S
    later (poll times are written in batches). Waking it only when none has started keeps it one poll: a wake
    during the start-up poll would add a second one, which would reach the armed point before any order moves."""
    def started() -> bool:
        return orders_requests(sims.whiplash, SHOP.cid, since) > 0

    def recorded() -> bool:
        return last_polls(bridge.state_path, [SHOP.cid]) != before

    try:
        await eventually(started, limit_s=3, what="the start-up poll")
    except AssertionError:
        await wake_all(port)
    await eventually(recorded, limit_s=15, what="the first poll to be recorded")
