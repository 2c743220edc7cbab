"""Upstream faults, in-process (the daemon's own worker, client and store code, with millisecond backoffs):
Whiplash storms, throttling, unreadable bodies, slow answers, token expiry and pages that shift mid-walk;
Klaviyo storms, throttling, timeouts and resets mid-request, a refused row, a refused key and a 409.

Every test ends with everything deliverable delivered exactly once (or, for a refused row, dead-lettered with
Klaviyo's answer while the queue moves on), and checks what the fault should have caused on the way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kit.faultkit import (
    Bridge,
    Ledger,
    Shop,
    Sims,
    assert_delivered_once,
    facts,
    fake_whiplash,
    in_process,
    serve,
    shops,
)

from klaviyo_bridge.sandbox.klaviyo import EventMatch, FakeKlaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, OrderScript

A, B = shops(601, 602)


def seed(sims: Sims, *merchants: Shop, history: int = 15, live: int = 3) -> Ledger:
    """Give each shop history (sent in bulk) and live orders (sent one by one); record what the bridge will see."""
    for shop in merchants:
        script = OrderScript(sims.whiplash, shop.cid, seed=shop.cid)
        script.backfill(history, days=10)
        script.spawn(live)
    ledger = Ledger(sims.whiplash)
    ledger.observe_all()
    return ledger


class Hooked(FakeWhiplash):
    """A Whiplash that runs a test's callback right after serving the N-th orders page."""

    hooks: dict[int, Callable[[], None]]

    async def _handle_orders(self, request: web.Request) -> web.StreamResponse:
        response = await super()._handle_orders(request)
        hook = self.hooks.pop(self.counters.pages_served, None)
        if hook is not None:
            hook()
        return response


def hooked(**hooks: Callable[[], None]) -> Hooked:
    """Return a Hooked Whiplash; keys are ``page_<n>``."""
    fake = fake_whiplash(Hooked)
    assert isinstance(fake, Hooked)
    fake.hooks = {int(name.removeprefix("page_")): hook for name, hook in hooks.items()}
    return fake


class Timed(FakeKlaviyo):
    """A Klaviyo that notes when each request arrived (monotonic), on which path, and what it answered."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[tuple[float, str, int]] = []

    async def _serve(self, op: Any, impl: Any, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        response = await super()._serve(op, impl, request)
        self.arrivals.append((arrived, request.path, response.status))
        return response


class SlowAfterReading(FakeKlaviyo):
    """A Klaviyo whose injected delay comes after it received the body: a timed-out request still takes effect."""

    async def _inject_before(self, request: web.Request) -> web.StreamResponse | None:
        if self.faults.delay_for(request.path) > 0 and request.can_read_body:
            await request.read()
        return await super()._inject_before(request)


# ------------------------------------------------------------------------------------------- Whiplash


async def test_whiplash_5xx_storm_between_pages_keeps_the_cursor_before_the_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. After the first page, Whiplash answers 500, 500, 502, 502, 503, 503 (more than a page's retries).
    2. Cycle. Result: the poll fails with one WARNING that the outage started; the first page is committed,
    nothing after it. 3. Drain. Result: the walk resumes at the cut; one INFO says Whiplash recovered;
    everything is delivered once."""
    caplog.set_level(logging.INFO, logger="klaviyo_bridge.health")
    fake = hooked()
    async with serve([A], whiplash=fake) as sims:
        ledger = seed(sims, A)
        bridge = Bridge(tmp_path, sims, [A]).write()
        fake.hooks = {1: lambda: [fake.fail_next(2, status) for status in (500, 502, 503)]}
        async with in_process(bridge) as run:
            await run.cycle()
            first_page = sorted(sims.whiplash.orders.values(), key=lambda o: (o.updated_at, o.id))[:10]
            assert set(facts(bridge.state_path).statuses[A.cid]) == {o.id for o in first_page}
            failed = [r for r in caplog.records if r.getMessage().startswith("whiplash errors started")]
            assert len(failed) == 1
            assert failed[0].levelno == logging.WARNING
            assert "status=503" in failed[0].getMessage()
            assert "whiplash 503" in failed[0].getMessage()
            await run.drain()
        recovered = [r for r in caplog.records if r.getMessage().startswith("whiplash recovered")]
        assert len(recovered) == 1
        assert recovered[0].levelno == logging.INFO
        assert "failed_requests=1 customers=1" in recovered[0].getMessage()
        assert_delivered_once(sims, bridge, ledger)


async def test_whiplash_429_with_and_without_retry_after(tmp_path: Path) -> None:
    """1. Whiplash answers 429 with Retry-After: 1, then 429 without it. 2. Cycle.
    Result: the request after the hinted 429 waits at least a second; the poll succeeds; all delivered once."""
    async with serve([A]) as sims:
        ledger = seed(sims, A)
        bridge = Bridge(tmp_path, sims, [A]).write()
        sims.whiplash.fail_next(1, 429, retry_after=1)
        sims.whiplash.fail_next(1, 429)
        async with in_process(bridge) as run:
            await run.drain()
        orders = [r for r in sims.whiplash.counters.log if r.path == "/api/v2/orders"]
        assert [r.status for r in orders[:3]] == [429, 429, 200]
        assert orders[1].at - orders[0].at >= 1.0
        assert_delivered_once(sims, bridge, ledger)


async def test_whiplash_unreadable_bodies_hold_the_cursor(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """1. Whiplash serves an HTML page with status 200. 2. Cycle. 3. It truncates the JSON of a page. 4. Cycle.
    5. It resets the connection mid-body (retried within the poll). 6. Drain.
    Result: steps 2 and 4 fail the poll and commit nothing: one WARNING names the page (its title, not the page),
    the second failure is part of the same outage (DEBUG), described by size, never quoted (it would start with
    shoppers' data); after the drain one INFO says Whiplash recovered; all delivered once."""
    caplog.set_level(logging.DEBUG, logger="klaviyo_bridge.health")
    async with serve([A]) as sims:
        ledger = seed(sims, A)
        bridge = Bridge(tmp_path, sims, [A]).write()
        async with in_process(bridge) as run:
            sims.whiplash.serve_html_next()
            await run.cycle()
            [started] = [r for r in caplog.records if r.getMessage().startswith("whiplash errors started")]
            assert 'not JSON: HTML page "' in started.getMessage()
            assert "Scheduled Maintenance" in started.getMessage()
            assert "<" not in started.getMessage()
            sims.whiplash.truncate_next()
            await run.cycle()
            assert facts(bridge.state_path).statuses == {}
            [again] = [r for r in caplog.records if r.getMessage().startswith("whiplash error customer=")]
            assert again.levelno == logging.DEBUG
            assert "invalid or truncated JSON" in again.getMessage()
            sims.whiplash.drop_next()
            await run.drain()
        assert caplog.text.count("whiplash errors started") == 1
        assert caplog.text.count("whiplash recovered") == 1
        assert_delivered_once(sims, bridge, ledger)


async def test_whiplash_slower_than_the_timeout_is_retried(tmp_path: Path) -> None:
    """1. timeout_seconds = 0.3; Whiplash stalls the next two requests for 0.8 s. 2. Cycle.
    Result: both time out and are retried within the same poll; everything delivered once."""
    async with serve([A]) as sims:
        ledger = seed(sims, A)
        bridge = Bridge(tmp_path, sims, [A], {"whiplash": {"timeout_seconds": "0.3"}}).write()
        sims.whiplash.set_delay(0.8, n=2)
        async with in_process(bridge) as run:
            await run.cycle()
            assert facts(bridge.state_path).poll_errors == {A.cid: None}
            await run.drain()
        assert_delivered_once(sims, bridge, ledger)


async def test_token_expiry_mid_walk(tmp_path: Path) -> None:
    """1. Whiplash expires every access token right after serving the first page. 2. Cycle.
    Result: the next page gets a 401, the bridge refreshes (rotating the chain, stored) and the walk goes on."""
    fake = hooked(page_1=lambda: fake.expire_access_tokens())
    async with serve([A], whiplash=fake) as sims:
        ledger = seed(sims, A)
        bridge = Bridge(tmp_path, sims, [A]).write()
        async with in_process(bridge) as run:
            await run.cycle()
            assert facts(bridge.state_path).poll_errors == {A.cid: None}
            await run.drain()
        assert sims.whiplash.counters.unauthorized == 1
        assert sims.whiplash.token_requests["refresh_token"] == 2
        assert facts(bridge.state_path).refresh_token == sims.whiplash.current_refresh_token
        assert_delivered_once(sims, bridge, ledger)


async def test_page_that_shifts_while_paged(tmp_path: Path) -> None:
    """1. 25 orders at status 250, an hour apart (three pages). 2. After the first page is served, an order on
    it ships (updated_at bumped: it jumps behind the rest) and so does one on the last page. 3. Cycle.
    Result: nothing is skipped: the moved order is met again (both its milestones are sent), the later one is
    read at its new status only (its old one was never observed, so never announced)."""
    fake = hooked()
    async with serve([A], whiplash=fake) as sims:
        start = datetime.now(UTC) - timedelta(days=2)
        ids = [int(sims.whiplash.create_order(A.cid, status=250, at=start + timedelta(hours=n))["id"])
               for n in range(25)]
        early, late = ids[3], ids[22]
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        del ledger.states[late]

        def move_on() -> None:
            sims.whiplash.set_status(early, 300)
            sims.whiplash.set_status(late, 300)

        fake.hooks = {1: move_on}
        bridge = Bridge(tmp_path, sims, [A]).write()
        async with in_process(bridge) as run:
            await run.cycle()
            ledger.observe_all()
            ids_sent = {e.unique_id for e in sims.account(A).events}
            assert {f"{early}:processing", f"{early}:shipped", f"{late}:shipped"} <= ids_sent
            assert f"{late}:processing" not in ids_sent
            await run.drain()
        assert_delivered_once(sims, bridge, ledger)


async def test_malformed_and_unknown_orders_hold_one_customer_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. A's orders include one without a status and one with an unknown status code (777). 2. Cycle twice.
    3. Whiplash fixes the bad order (re-saving it). 4. Drain.
    Result: B is delivered in full at once; A up to the bad order; the bad order is recorded and logged once
    (ERROR, with an excerpt); the unknown code announces nothing; after the fix all is delivered once."""
    async with serve([A, B]) as sims:
        seed(sims, A, B)
        mine = sorted((o for o in sims.whiplash.orders.values() if o.customer_id == A.cid),
                      key=lambda o: (o.updated_at, o.id))
        bad, odd = mine[5], mine[8]
        sims.whiplash.garble(bad.id, drop=["status"])
        sims.whiplash.garble(odd.id, status=777, status_name=None)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        del ledger.states[bad.id]
        bridge = Bridge(tmp_path, sims, [A, B]).write()
        async with in_process(bridge) as run:
            await run.cycle()
            await run.cycle()
            assert {e.unique_id for e in sims.account(B).events} == ledger.expected(bridge.rules()[B.cid])
            assert not any(e.unique_id.startswith(f"{bad.id}:") for e in sims.account(A).events if e.unique_id)
            errors = [r for r in caplog.records if r.getMessage().startswith("malformed order")]
            assert len(errors) == 1
            assert f"order={bad.id}" in errors[0].getMessage()
            assert "status missing" in errors[0].getMessage()
            assert (await run.store.counts(A.cid, run.clock.utc())).malformed == 1
            sims.whiplash.ungarble(bad.id)
            sims.whiplash.update_order(bad.id, public_note="fixed")  # re-saved: updated_at moves
            ledger.observe(bad.id)
            await run.drain()
            assert (await run.store.counts(A.cid, run.clock.utc())).malformed == 0
        assert not any(e.unique_id.startswith(f"{odd.id}:") for e in sims.account(A).events if e.unique_id)
        assert_delivered_once(sims, bridge, ledger)


# -------------------------------------------------------------------------------------------- Klaviyo


async def test_klaviyo_503_storm_on_one_account_does_not_hold_the_other(tmp_path: Path) -> None:
    """1. A's Klaviyo answers 503 to its next 40 requests. 2. Cycle.
    Result: B is delivered in full; A's rows are rescheduled, not lost or dead. 3. Drain: A delivered once."""
    async with serve([A, B]) as sims:
        ledger = seed(sims, A, B)
        bridge = Bridge(tmp_path, sims, [A, B]).write()
        sims.klaviyo.fail_next(40, 503, account=A.label)
        async with in_process(bridge, klaviyo_tries=3) as run:
            await run.cycle()
            assert {e.unique_id for e in sims.account(B).events} == ledger.expected(bridge.rules()[B.cid])
            assert sims.account(A).events == []
            await run.drain()
        assert_delivered_once(sims, bridge, ledger)


async def test_klaviyo_429_is_waited_out(tmp_path: Path) -> None:
    """1. Klaviyo answers one event request with 429 and Retry-After: 1. 2. Drain.
    Result: no event request reaches Klaviyo from 0.1 s to 1 s after the 429; all delivered once."""
    timed = Timed()
    async with serve([A], klaviyo=timed) as sims:
        ledger = seed(sims, A, history=2, live=12)
        bridge = Bridge(tmp_path, sims, [A]).write()
        timed.fail_next(1, 429, path_prefix="/api/events", retry_after=1)
        async with in_process(bridge) as run:
            await run.drain()
        events = [(at, status) for at, path, status in timed.arrivals if path == "/api/events"]
        [throttled_at] = [at for at, status in events if status == 429]
        assert not [at for at, _ in events if throttled_at + 0.1 < at < throttled_at + 1.0]
        assert_delivered_once(sims, bridge, ledger)


async def test_klaviyo_resets_and_timeouts_resend_byte_identical_bodies(tmp_path: Path) -> None:
    """1. Klaviyo takes the next three events, then drops the connection. 2. Cycle. 3. Five live orders are
    cancelled; Klaviyo stalls events past the client timeout, after reading them (so it records them).
    4. Cycle. 5. The stall ends. 6. Drain. Result: each retried event is byte for byte the first attempt;
    Klaviyo keeps one per unique_id; everything is delivered once."""
    async with serve([A], klaviyo=SlowAfterReading()) as sims:
        ledger = seed(sims, A, history=2, live=10)
        live = sorted(o.id for o in sims.whiplash.orders.values() if o.status == 100)[-5:]
        bridge = Bridge(tmp_path, sims, [A], {"klaviyo": {"timeout_seconds": "0.3"}}).write()
        sims.klaviyo.reset_connections(3, after_processing=True, path_prefix="/api/events")
        async with in_process(bridge, klaviyo_tries=2) as run:
            await run.cycle()
            for oid in live:
                sims.whiplash.set_status(oid, 40)
            ledger.observe_all()
            sims.klaviyo.delay(0.6, path_prefix="/api/events")
            await run.cycle()
            sims.klaviyo.delay(0)
            await run.drain()
        bodies = sims.account(A).event_bodies
        retried = {uid: sent for uid, sent in bodies.items() if len(sent) > 1}
        assert {f"{oid}:cancelled" for oid in live} <= set(retried)  # the timed-out sends, sent again
        assert len(retried) >= 3 + len(live)
        assert all(len(set(sent)) == 1 for sent in retried.values())
        assert sims.account(A).duplicate_events >= 3 + len(live)
        assert_delivered_once(sims, bridge, ledger)


async def test_klaviyo_refused_rows_are_dead_lettered_and_the_queue_moves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Klaviyo refuses (400) one live event and one backfill event (sent in bulk). 2. Drain.
    Result: exactly those two rows are dead letters holding Klaviyo's answer, one ERROR each; everything else
    is delivered. 3. The rule is lifted and the dead letters replayed. Result: delivered once."""
    async with serve([A]) as sims:
        ledger = seed(sims, A, history=15, live=3)
        bridge = Bridge(tmp_path, sims, [A]).write()
        expected = ledger.expected(bridge.rules()[A.cid])
        live_id = f"{max(sims.whiplash.orders)}:processing"
        history_id = next(uid for uid in sorted(expected) if uid[0].isdigit() and uid != live_id)
        for uid in (live_id, history_id):
            sims.klaviyo.reject_event_if(EventMatch(unique_id=uid))
        async with in_process(bridge) as run:
            await run.drain()
            dead = facts(bridge.state_path).dead
            assert sorted(key for _, key, _, _ in dead) == sorted([live_id, history_id])
            assert all(status == 400 and "rejected by simulator rule" in body for _, _, status, body in dead)
            assert {e.unique_id for e in sims.account(A).events} == expected - {live_id, history_id}
            refused = [r for r in caplog.records if r.getMessage().startswith("klaviyo refused row")]
            assert len(refused) == 2
            assert all(r.levelno == logging.ERROR for r in refused)
            sims.klaviyo.clear_faults()
            assert await run.store.replay_dead(A.cid, None, run.clock.utc()) == 2
            await run.drain()
        assert_delivered_once(sims, bridge, ledger)


async def test_klaviyo_refused_key_pauses_only_its_customer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """1. A's key is revoked (401). 2. Cycle twice.
    Result: B is delivered in full; A sends nothing, its rows wait (queued, not dead), one ERROR is logged.
    3. The key works again. 4. Drain. Result: A's rows go out, everything once."""
    async with serve([A, B]) as sims:
        ledger = seed(sims, A, B)
        bridge = Bridge(tmp_path, sims, [A, B]).write()
        sims.klaviyo.revoke(A.key)
        async with in_process(bridge) as run:
            await run.cycle()
            for worker in run.workers.values():
                worker.deliverer.key_refused = False  # the key probe
            await run.cycle()
            assert {e.unique_id for e in sims.account(B).events} == ledger.expected(bridge.rules()[B.cid])
            assert sims.account(A).events == []
            state = facts(bridge.state_path)
            assert state.pending_events[A.cid] > 0
            assert state.dead == []
            assert not (await run.store.customer_state(A.cid)).key_healthy
            assert len([r for r in caplog.records if r.getMessage().startswith("klaviyo key refused")]) == 1
            sims.klaviyo.restore(A.key)
            await run.drain()
            assert (await run.store.customer_state(A.cid)).key_healthy
        assert_delivered_once(sims, bridge, ledger)


async def test_klaviyo_409_duplicate_profile_dead_letters_that_profile_only(tmp_path: Path) -> None:
    """1. Klaviyo answers one profile import with 409 duplicate_profile. 2. Drain.
    Result: that profile row is a dead letter holding the 409 (with the duplicate profile's id); every event,
    including that shopper's, is delivered once; nothing else is dead or queued."""
    async with serve([A]) as sims:
        ledger = seed(sims, A)
        bridge = Bridge(tmp_path, sims, [A]).write()
        sims.klaviyo.fail_next(1, 409, path_prefix="/api/profile-import")
        async with in_process(bridge) as run:
            await run.drain()
        state = facts(bridge.state_path)
        [(_, email, status, body)] = state.dead
        assert status == 409
        assert "duplicate_profile" in body
        assert "duplicate_profile_id" in body
        account = sims.account(A)
        got = [e.unique_id for e in account.events]
        assert sorted(got) == sorted(ledger.expected(bridge.rules()[A.cid]))
        assert account.profile_by_email(email) is not None  # its events still created it, by email
        assert state.pending_rows == 0
        assert state.integrity == ["ok"]
