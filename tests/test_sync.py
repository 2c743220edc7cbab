"""Sliced reads of a long window (sync.SlicedWalk) against the simulated Whiplash on loopback, with the real client
and store: each order once, the cursor only over the committed prefix, a failure mid-walk resumed without a gap.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from klaviyo_bridge.budget import Lane, WhiplashBudget
from klaviyo_bridge.core import DEFAULT_METRIC_NAMES, DEFAULT_STATUS_EVENTS, Rules
from klaviyo_bridge.errors import BridgeError
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash
from klaviyo_bridge.store import CustomerState, Store
from klaviyo_bridge.sync import PageHook, SyncStats, sync_window
from klaviyo_bridge.whiplash import Page, WhiplashClient
from klaviyo_bridge.whiplash_auth import TokenManager, WhiplashAuth

CID = 7
CLIENT_ID, CLIENT_SECRET = "sync-client", "sync-secret-value-1"
LAUNCH = date(2026, 11, 20)
NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
SINCE = datetime(2026, 11, 6, tzinfo=UTC)  # launch − 14 days
RULES = Rules(CID, LAUNCH, DEFAULT_METRIC_NAMES, DEFAULT_STATUS_EVENTS, stale_after=timedelta(days=3))


@dataclass
class Reading:
    fake: FakeWhiplash
    client: WhiplashClient
    store: Store

    async def sync(self, *, parallel: int = 4, move_cursor: bool = True, stop: asyncio.Event | None = None,
                   on_page: PageHook | None = None, lane: Lane = Lane.BACKGROUND) -> SyncStats:
        return await sync_window(self.client, self.store, RULES, SINCE, move_cursor=move_cursor, clock=lambda: NOW,
                                 lane=lane, parallel=parallel, stop=stop, on_page=on_page)

    def orders_requests(self) -> list[dict[str, object]]:
        """Return the search of every orders request the simulator answered."""
        return [json.loads(r.query["search"]) for r in self.fake.counters.log if r.path == "/api/v2/orders"]


@asynccontextmanager
async def reading(tmp_path: Path, *, page_size: int = 20, tries: int = 6) -> AsyncIterator[Reading]:
    fake = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, clock=lambda: NOW)
    fake.add_customer(CID)
    async with serve_whiplash(fake) as url, aiohttp.ClientSession() as session:
        store = await Store.open(tmp_path / "state.db")
        try:
            auth = WhiplashAuth(url, "client_credentials", CLIENT_ID, SecretStr(CLIENT_SECRET), None, "app_read")
            tokens = TokenManager(session, auth, store, budget=WhiplashBudget(1000, 4))
            client = WhiplashClient(session, tokens, base_url=url, page_size=page_size, max_tries=tries,
                                    backoff_factor=0.001, backoff_cap=0.01)
            yield Reading(fake, client, store)
        finally:
            await store.close()


def seed(fake: FakeWhiplash, count: int, *, start: datetime = SINCE, span: timedelta = timedelta(days=20)) -> None:
    """Create ``count`` shipped orders spread evenly from ``start`` over ``span`` (several per second at times)."""
    for n in range(count):
        fake.create_order(CID, status=300, at=start + span * n / count)


def keys_of(fake: FakeWhiplash) -> list[tuple[datetime, int]]:
    return sorted((o.updated_at, o.id) for o in fake.orders.values())


def assert_cursor_past(state: CustomerState, last: tuple[datetime, int]) -> None:
    """The cursor of a finished walk is the last order's key: an order Whiplash returned, never a slice's bound."""
    assert state.cursor == last


def outbox_events(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [k for (k,) in db.execute("SELECT key FROM outbox WHERE kind = 'event' ORDER BY key")]


async def test_a_long_window_is_read_as_parallel_slices_each_order_once(tmp_path: Path) -> None:
    """1. 400 shipped orders over 20 days, page size 20, four slices allowed. 2. Walk once.
    Result: every order is remembered and has exactly one "shipped" event; the cursor is past the last order; the
    reads were split (several upper bounds were asked for) and cost at most two requests per slice beyond the
    20 pages a single walk needs."""
    async with reading(tmp_path) as r:
        seed(r.fake, 400)
        stats = await r.sync()
        keys = keys_of(r.fake)
        memory = await r.store.load_memory(CID, [oid for _, oid in keys])
        assert len(memory) == 400
        assert all(m.status == 300 for m in memory.values())
        assert stats.fetched >= 400
        assert_cursor_past(await r.store.customer_state(CID), keys[-1])
        searches = r.orders_requests()
        bounds = {s["updated_at_lt"] for s in searches if "updated_at_lt" in s}
        starts = {s["updated_at_gteq"] for s in searches if "updated_at_gteq" in s}
        assert len(bounds) >= 3  # at least four slices
        assert len(starts) >= 4
        assert len(searches) <= 20 + 2 * len(starts)
    assert outbox_events(tmp_path / "state.db") == sorted(f"{oid}:shipped" for _, oid in keys)


async def test_a_short_live_window_costs_one_request(tmp_path: Path) -> None:
    """A live window of 5 orders (less than a page): one orders request, no split, cursor at the last order."""
    async with reading(tmp_path) as r:
        seed(r.fake, 5)
        await r.sync(lane=Lane.LIVE)
        assert len(r.orders_requests()) == 1
        assert (await r.store.customer_state(CID)).cursor == keys_of(r.fake)[-1]


async def test_a_live_window_is_split_once_a_page_shows_it_is_long(tmp_path: Path) -> None:
    """A live window that turns out long (300 orders, page 20): after the first page, the rest is read in slices;
    every order once, cursor past the last one."""
    async with reading(tmp_path) as r:
        seed(r.fake, 300)
        await r.sync(lane=Lane.LIVE)
        searches = r.orders_requests()
        assert "updated_at_lt" not in searches[0]
        assert len({s["updated_at_gteq"] for s in searches if "updated_at_lt" in s}) >= 3
        keys = keys_of(r.fake)
        assert len(await r.store.load_memory(CID, [oid for _, oid in keys])) == 300
        assert_cursor_past(await r.store.customer_state(CID), keys[-1])


async def test_an_empty_background_window_costs_one_request(tmp_path: Path) -> None:
    """A background window (a backfill, a catch-up) with nothing in it costs one request, not one per slice: a
    thousand idle customers catching up after a restart must not cost four requests each."""
    async with reading(tmp_path) as r:
        await r.sync(lane=Lane.BACKGROUND)
        assert len(r.orders_requests()) == 1
        assert (await r.store.customer_state(CID)).cursor is None


async def test_a_failure_mid_walk_leaves_a_cursor_behind_every_unread_order(tmp_path: Path) -> None:
    """1. 400 orders; after the 6th committed page Whiplash starts failing (one try per request): the walk fails.
    Result: every order at or before the stored cursor is remembered (no gap), some after it are not; 2. the next
    walk reads the rest: every order remembered, each event once."""
    async with reading(tmp_path, tries=1) as r:
        seed(r.fake, 400)
        pages = 0

        def break_whiplash(page: Page, queued: int) -> None:
            nonlocal pages
            pages += 1
            if pages == 6:
                r.fake.fail_next(1000, 500)

        with pytest.raises(BridgeError):
            await r.sync(on_page=break_whiplash)
        cursor = (await r.store.customer_state(CID)).cursor
        assert cursor is not None
        keys = keys_of(r.fake)
        memory = await r.store.load_memory(CID, [oid for _, oid in keys])
        assert all(oid in memory for key, oid in keys if (key, oid) <= cursor)
        assert len(memory) < 400
        r.fake.clear_faults()
        await r.sync()
        assert len(await r.store.load_memory(CID, [oid for _, oid in keys])) == 400
        assert_cursor_past(await r.store.customer_state(CID), keys[-1])
    assert outbox_events(tmp_path / "state.db") == sorted(f"{oid}:shipped" for _, oid in keys)


async def test_a_malformed_order_holds_the_cursor_but_not_the_other_slices(tmp_path: Path) -> None:
    """1. 300 orders; the 100th is unreadable (no id of a status). 2. Walk. Result: the cursor stays before it; every
    other order is remembered with its event (slices after it went on)."""
    async with reading(tmp_path) as r:
        seed(r.fake, 300)
        keys = keys_of(r.fake)
        bad_key, bad = keys[99]
        r.fake.garble(bad, status="shipped-ish")
        await r.sync()
        cursor = (await r.store.customer_state(CID)).cursor
        assert cursor is not None
        assert cursor < (bad_key, bad)
        memory = await r.store.load_memory(CID, [oid for _, oid in keys])
        assert set(memory) == {oid for _, oid in keys} - {bad}
        with sqlite3.connect(tmp_path / "state.db") as db:
            assert db.execute("SELECT order_id FROM malformed").fetchall() == [(bad,)]


async def test_a_resync_walk_leaves_the_cursor_alone(tmp_path: Path) -> None:
    """``move_cursor=False`` (resync) with slices: orders read and remembered, cursor untouched."""
    async with reading(tmp_path) as r:
        seed(r.fake, 200)
        await r.sync(move_cursor=False)
        assert (await r.store.customer_state(CID)).cursor is None
        assert len(await r.store.load_memory(CID, [oid for _, oid in keys_of(r.fake)])) == 200


async def test_stop_ends_the_sliced_walk_and_the_next_one_resumes(tmp_path: Path) -> None:
    """1. 400 orders; stop is set after the 3rd page. Result: the walk returns early with a cursor over the committed
    prefix; 2. a second walk finishes the window: every order remembered once."""
    async with reading(tmp_path) as r:
        seed(r.fake, 400)
        stop = asyncio.Event()
        seen = 0

        def stop_soon(page: Page, queued: int) -> None:
            nonlocal seen
            seen += 1
            if seen == 3:
                stop.set()

        await r.sync(stop=stop, on_page=stop_soon)
        assert seen < 20
        await r.sync()
        keys = keys_of(r.fake)
        assert len(await r.store.load_memory(CID, [oid for _, oid in keys])) == 400
        assert_cursor_past(await r.store.customer_state(CID), keys[-1])
    assert outbox_events(tmp_path / "state.db") == sorted(f"{oid}:shipped" for _, oid in keys)


async def test_an_empty_window_never_moves_the_cursor_back(tmp_path: Path) -> None:
    """A cursor already stored, then a walk over a window (from an overlap before it) with nothing new. Result: the
    cursor is where it was, with one slice or four: not at the window's start, nor at a slice's bound."""
    async with reading(tmp_path) as r:
        seed(r.fake, 3, start=SINCE - timedelta(days=5), span=timedelta(days=1))
        stored = (datetime(2026, 11, 10, tzinfo=UTC), 42)
        await r.store.ensure_customer(CID)
        await r.store.move_cursor(CID, stored)
        await r.sync(lane=Lane.LIVE)
        assert (await r.store.customer_state(CID)).cursor == stored
        await r.sync(lane=Lane.BACKGROUND)  # four even slices, all empty: their bounds never become the cursor
        assert (await r.store.customer_state(CID)).cursor == stored
