"""State DB growth: feed orders through the daemon's own mapping and store calls, in process, and weigh the file.

Per page of 500 orders this does what ``CustomerWorker._commit`` and the bulk delivery path do:
``load_memory`` + ``load_names`` → ``core.plan_page`` → ``Store.commit_page``, then ``mark_listed_by_import``
and ``mark_sent_many`` for the rows Klaviyo would have accepted. Orders are simulator-rendered Whiplash JSON
(parsed by ``orders.parse_order``) from a pool of templates, each copy with its own id, shopper and email,
so payload sizes are those of real pages. HTTP is left out: the simulated Whiplash scans every stored order
per page request, which at 100,000 orders would time the simulator, not the bridge's database.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from klaviyo_bridge.core import DEFAULT_METRIC_NAMES, DEFAULT_STATUS_EVENTS, Rules, plan_page
from klaviyo_bridge.orders import Order, parse_order
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash
from klaviyo_bridge.store import Store

CID = 1
PAGE = 500
TEMPLATES = 400
STATUSES = (100, 300, 350, 300, 160, 40, 300, 350)


def templates(now: datetime) -> list[Order]:
    """Render and parse a pool of varied orders (items, packages, tracking) from the simulator."""
    whiplash = FakeWhiplash("id", "secret", seed=11)
    return [
        parse_order(whiplash.create_order(CID, status=STATUSES[i % len(STATUSES)], at=now - timedelta(minutes=i)))
        for i in range(TEMPLATES)
    ]


def page_of(pool: list[Order], start: int, size: int) -> list[Order]:
    """Return orders start..start+size-1: template copies with their own id, shopper and email."""
    return [
        replace(pool[i % len(pool)], id=8_000_000 + i, email=f"shopper{i}@example.com", first_name=f"Shopper{i}")
        for i in range(start, start + size)
    ]


async def feed(store: Store, pool: list[Order], orders: int, now: datetime) -> None:
    """Commit and 'send' ``orders`` orders page by page, as the daemon does."""
    rules = Rules(CID, now.date() - timedelta(days=1), DEFAULT_METRIC_NAMES, DEFAULT_STATUS_EVENTS,
                  timedelta(hours=72))
    for start in range(0, orders, PAGE):
        page = page_of(pool, start, min(PAGE, orders - start))
        known = await store.load_memory(CID, [o.id for o in page])
        names = await store.load_names(CID, {o.email for o in page if o.email})
        plan = plan_page(rules, page, known, names, now)
        last = page[-1]
        await store.commit_page(CID, plan, (last.updated_at, last.id), [], now)
        rows = await store.due_rows(CID, now, 10 * PAGE)
        await store.mark_listed_by_import(CID, [r.key for r in rows if r.kind == "profile"])
        await store.mark_sent_many(rows, now)


def weigh(path: Path, *, vacuum: bool = False) -> int:
    """Return the file size after folding the WAL in (and optionally VACUUM)."""
    with closing(sqlite3.connect(path)) as db:
        if vacuum:
            db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size


async def grow(path: Path, orders: int) -> dict[str, int]:
    """Return the DB size after ``orders`` orders, raw and after the retention step."""
    now = datetime.now(UTC).replace(microsecond=0)
    pool = templates(now)
    store = await Store.open(path)
    try:
        await feed(store, pool, orders, now)
    finally:
        await store.close()
    raw = weigh(path)
    store = await Store.open(path)
    try:
        await store.compact_sent(now + timedelta(seconds=1))
    finally:
        await store.close()
    return {"raw": raw, "compacted": weigh(path, vacuum=True)}
