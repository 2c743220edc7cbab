"""The long-running daemon (`klaviyo-bridge run`) as a process: SIGTERM, restart, and a revoked key.

Orders move while the daemon runs (seeded ``OrderScript`` ticks); outcomes are read from the simulated
Klaviyo: every read order's current status announced (nothing lost), no event request sent twice (nothing
doubled), and nothing the simulator had to reject.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from kit.bridgekit import eventually
from kit.expect import missing_current_events, recorded, samples
from kit.harness import CLIENT_ID, CLIENT_SECRET, Customer, Harness

from klaviyo_bridge.sandbox._server import serve_app
from klaviyo_bridge.sandbox.klaviyo import Account, FakeKlaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, OrderScript, StatusChange, serve_whiplash

A, B, REVOKED = 101, 102, 303
KEYS = {A: "pk_life_a_0123456789abcdef", B: "pk_life_b_0123456789abcdef", REVOKED: "pk_life_r_0123456789abcdef"}
GRACE_S = 2.5
EVENT_PATHS = "/api/event"  # /api/events and /api/event-bulk-create-jobs


@dataclass
class World:
    """The simulators, one order script per customer, the harness, and in-flight event requests."""

    whiplash: FakeWhiplash
    klaviyo: FakeKlaviyo
    scripts: dict[int, OrderScript]
    harness: Harness
    in_flight: list[int]  # event requests Klaviyo is still answering; one counter in a list

    def account(self, cid: int) -> Account:
        """Return a customer's simulated Klaviyo account."""
        return self.klaviyo.account(str(cid))

    def customer(self, cid: int) -> Customer:
        """Return a customer of the harness."""
        return next(c for c in self.harness.customers if c.cid == cid)

    def missing(self, cid: int) -> list[str]:
        """Return the unique_ids of read orders whose current status is not announced yet."""
        return missing_current_events(self.whiplash, self.account(cid), self.customer(cid))

    def synced(self, cid: int) -> bool:
        """Tell whether every read order's current status and every set-up sample is in Klaviyo."""
        have = recorded(self.account(cid))
        return not self.missing(cid) and all(uid in have for _, uid, _ in samples())


def in_flight_counter(counter: list[int]) -> web.middleware:  # type: ignore[valid-type]
    """Return a middleware counting event requests (single or bulk) that are being answered."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(EVENT_PATHS):
            return await handler(request)
        counter[0] += 1
        try:
            return await handler(request)
        finally:
            counter[0] -= 1

    return count


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Serve both simulators (Klaviyo with an in-flight counter) for three customers launched yesterday."""
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    whiplash = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, seed=5)
    scripts = {cid: OrderScript(whiplash, cid, seed=cid) for cid in KEYS}
    for script in scripts.values():
        script.backfill(10, days=3)
    klaviyo = FakeKlaviyo()
    for cid, key in KEYS.items():
        klaviyo.add_account(key, label=str(cid))
    in_flight = [0]
    app = klaviyo.make_app()
    app.middlewares.append(in_flight_counter(in_flight))
    customers = [Customer(cid, f"Shop {cid}", key, yesterday) for cid, key in KEYS.items()]
    async with serve_whiplash(whiplash) as w_url, serve_app(app) as k_url:
        harness = Harness(tmp_path, w_url, k_url, customers,
                          overrides={"bridge": {"shutdown_grace_seconds": str(GRACE_S)}})
        harness.write_config()
        yield World(whiplash, klaviyo, scripts, harness, in_flight)


@contextlib.asynccontextmanager
async def moving(world: World, cids: tuple[int, ...], every_s: float = 0.2) -> AsyncIterator[list[StatusChange]]:
    """Tick the customers' order scripts (a new order every fourth tick) until the block ends."""
    changes: list[StatusChange] = []

    async def tick() -> None:
        for n in range(10_000):
            await asyncio.sleep(every_s)
            for cid in cids:
                world.scripts[cid].spawn(1 if n % 4 == 0 else 0)
                changes.extend(world.scripts[cid].tick(share=0.4))

    task = asyncio.create_task(tick())
    try:
        yield changes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def sent_once(acct: Account) -> bool:
    """Tell whether Klaviyo received each recorded event exactly once (no resend, no duplicate)."""
    return acct.duplicate_events == 0 and acct.received_event_requests == len(acct.events)


async def test_sigterm_mid_run_exits_0_and_restart_loses_and_doubles_nothing(world: World) -> None:
    """1. Run the daemon while orders move; SIGTERM with event requests in flight. 2. Move orders while it is
    down. 3. Restart and wait until Klaviyo holds every current status.
    Result: exit 0 within the grace period; every change announced; no event request sent twice."""
    w, h = world, world.harness
    w.klaviyo.delay(0.1, path_prefix=EVENT_PATHS)  # keeps event requests in flight when SIGTERM arrives
    async with h.running() as bridge, moving(w, (A, B)):
        await eventually(lambda: len(w.account(A).events) >= 10 and w.in_flight[0] > 0, what="events in flight")
        code, took = await bridge.stop()
    assert code == 0, bridge.log
    assert took < GRACE_S, bridge.log
    assert "stopped queued=" in bridge.log

    downtime = [c for cid in (A, B) for c in w.scripts[cid].advance(2, share=0.6)]
    downtime_ids = {c.order_id for c in downtime}
    new_ids = {i for cid in (A, B) for i in w.scripts[cid].spawn(2)}
    async with h.running() as again:
        await eventually(lambda: w.synced(A) and w.synced(B), limit_s=20, what="both customers in sync")
        code, _ = await again.stop()
    assert code == 0, again.log

    have = recorded(w.account(A)) | recorded(w.account(B))
    assert downtime_ids
    assert new_ids
    assert {uid.split(":")[0] for uid in have} >= {str(i) for i in downtime_ids | new_ids if w.whiplash.orders[i].email}
    assert sent_once(w.account(A))
    assert sent_once(w.account(B))
    assert w.klaviyo.rejections == []
    status = {r["customer_id"]: r for r in await h.status()}
    assert (status[A]["queued"], status[B]["queued"]) == (0, 0)


async def test_sigterm_with_a_hung_request_exits_0_after_grace_and_restart_delivers(world: World) -> None:
    """1. Klaviyo stalls every event request; SIGTERM once one hangs. 2. Restart without the stall.
    Result: the process waits out the grace period, cancels, exits 0; the restart announces everything."""
    w, h = world, world.harness
    w.klaviyo.delay(60.0, path_prefix=EVENT_PATHS)
    async with h.running() as bridge:
        await eventually(lambda: w.in_flight[0] > 0, what="a hanging event request")
        code, took = await bridge.stop(limit_s=GRACE_S + 10)
    assert code == 0, bridge.log
    assert GRACE_S - 0.5 < took < GRACE_S + 3, bridge.log
    assert [w.account(cid).events for cid in KEYS] == [[], [], []]  # every event request was stuck

    w.klaviyo.delay(0.0)
    result = await h.run("run", "--once")
    assert result.returncode == 0, result.stderr
    assert [w.missing(cid) for cid in KEYS] == [[], [], []]
    assert w.klaviyo.rejections == []


async def test_revoked_key_pauses_only_its_customer_until_restored(world: World) -> None:
    """1. Revoke one customer's key; run while orders move. 2. Check the others stay in sync and status shows
    the refusal. 3. Restore the key. Result: its queued rows go out at the next probe; nothing is doubled."""
    w, h = world, world.harness
    w.klaviyo.revoke(KEYS[REVOKED])
    async with h.running() as bridge:
        async with moving(w, (A, REVOKED)):
            await eventually(lambda: w.account(REVOKED).counters.unauthorized >= 2, what="two refused probes")
        await eventually(lambda: w.synced(A) and w.synced(B), what="the other customers in sync")
        refused = await h.status_of(REVOKED)
        assert (refused["key"], refused["queued"] > 0) == ("REFUSED", True)
        assert (await h.status_of(A))["key"] == "ok"
        assert w.account(REVOKED).events == []

        w.klaviyo.restore(KEYS[REVOKED])
        await eventually(lambda: w.synced(REVOKED), limit_s=10, what="the restored customer in sync")
        code, _ = await bridge.stop()
    assert code == 0, bridge.log
    assert "klaviyo key refused customer=303" in bridge.log
    assert all(sent_once(w.account(cid)) for cid in KEYS)
    assert w.klaviyo.rejections == []
    assert KEYS[REVOKED] not in bridge.log
