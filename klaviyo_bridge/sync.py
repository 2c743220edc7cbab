"""Walk Whiplash's changes over a window and commit them page by page: the path every order read takes.

Shared by the daemon's poller (``move_cursor=True``) and ``klaviyo-bridge resync`` (``move_cursor=False``).
Invariants:
- each page is mapped by ``core.plan_page`` against the order memory and names committed so far, and its
  memory, outbox rows and cursor are committed in ONE store transaction (``Store.commit_page``);
- re-reading a window never doubles an event: the order memory says which milestones were announced, and
  the outbox refuses a second row with the same ``unique_id`` even if two readers race;
- the cursor moves only with ``move_cursor``, and never past a malformed order: from the first one on it is
  held for the rest of the walk, so the order is read again next cycle;
- with ``move_cursor=False`` the customer's cursor is left exactly as it was;
- the reconcile sweep (``reconcile_shipped``) re-reads orders remembered as shipped by id and commits them
  through the same plan/commit path, never touching the cursor; a status change it finds behind the cursor
  did not bump ``updated_at``, so its time is taken as when the sweep noticed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from . import core, failpoints
from .clock import WallClock
from .orders import Order, order_key
from .store import Store
from .whiplash import Key, Page, build_page

log = logging.getLogger(__name__)

PageHook = Callable[[Page, int], None]  # (committed page, rows it queued)


class ChangeSource(Protocol):
    """What a sync reads from: Whiplash's changed orders in (updated_at, id) order."""

    def walk_changes(self, customer_id: int, since: datetime) -> AsyncGenerator[Page, None]:
        """Yield pages of orders changed at or after ``since``."""
        ...

    async def fetch_by_ids(self, customer_id: int, ids: Sequence[int]) -> list[object]:
        """Return the raw orders with these ids."""
        ...


@dataclass(slots=True)
class SyncStats:
    """What one walk over a window found and queued."""

    fetched: int = 0
    queued: int = 0  # outbox rows that became pending (events and profiles)
    already_announced: int = 0  # orders whose current milestone had been announced before
    skipped_no_email: int = 0
    invalid_email: list[int] = field(default_factory=list)  # ids of changed orders whose email is not one
    malformed: int = 0
    lag_s: float = 0.0  # age of the newest change that produced an event, at commit time
    pages: int = 0

    def add(self, page: Page, plan: core.Plan, queued: int, already: int, now: datetime) -> None:
        """Count one committed page."""
        self.pages += 1
        self.fetched += len(page.orders) + len(page.malformed)
        self.queued += queued
        self.already_announced += already
        self.skipped_no_email += plan.skipped_no_email
        self.invalid_email += plan.invalid_email
        self.malformed += len(page.malformed)
        if plan.events:
            newest = max(o.updated_at for o in page.orders)
            self.lag_s = max(self.lag_s, (now - newest).total_seconds())


def next_cursor(page: Page, held: bool) -> tuple[Key | None, bool]:
    """Return the cursor to store after a page (None: leave it) and whether it is held from now on."""
    if held:
        return None, True
    if page.malformed:
        return page.safe_key, True
    return page.last_key, False


def already_announced(rules: core.Rules, orders: Iterable[Order], known: Mapping[int, core.OrderMemory]) -> int:
    """Count orders whose current status maps to a milestone the memory says was announced."""
    count = 0
    for order in orders:
        kind = core.event_for(order, rules)
        memory = known.get(order.id)
        count += kind is not None and memory is not None and kind in memory.announced
    return count


async def commit_page(
    store: Store, rules: core.Rules, page: Page, cursor: Key | None, now: datetime
) -> tuple[core.Plan, int, int]:
    """Map one page and commit it; return (plan, rows queued, orders already announced)."""
    cid = rules.customer_id
    known = await store.load_memory(cid, [o.id for o in page.orders])
    names = await store.load_names(cid, {o.email for o in page.orders if o.email})
    plan = core.plan_page(rules, page.orders, known, names, now)
    status_at = {o.id: o.updated_at for o in page.orders}
    invalid = {o.id: o.email_invalid for o in page.orders}
    queued = await store.commit_page(cid, plan, cursor, page.malformed, now, status_at=status_at,
                                     email_invalid=invalid)
    return plan, queued, already_announced(rules, page.orders, known)


async def sync_window(
    whiplash: ChangeSource,
    store: Store,
    rules: core.Rules,
    since: datetime,
    *,
    move_cursor: bool,
    clock: WallClock,
    on_page: PageHook | None = None,
    stop: asyncio.Event | None = None,
) -> SyncStats:
    """Read every change of ``rules.customer_id`` since ``since`` and commit it page by page.

    ``on_page`` runs after each commit (the daemon logs malformed orders and wakes its sender there).
    A set ``stop`` ends the walk after the current page: every page is committed with its cursor, so the
    next walk resumes exactly there.
    """
    stats = SyncStats()
    await store.ensure_customer(rules.customer_id)
    held = not move_cursor
    # aclosing: a walk left early (stop) must cancel the page it is already fetching ahead.
    async with contextlib.aclosing(whiplash.walk_changes(rules.customer_id, since)) as pages:
        async for page in pages:
            failpoints.hit("after_fetch")
            cursor, held = next_cursor(page, held)
            now = clock()
            plan, queued, already = await commit_page(store, rules, page, cursor, now)
            failpoints.hit("after_outbox_commit")
            stats.add(page, plan, queued, already, now)
            log.debug("page committed customer=%s orders=%d malformed=%d queued=%d cursor=%s", rules.customer_id,
                      len(page.orders), len(page.malformed), queued, "held" if cursor is None else cursor[0])
            if on_page is not None:
                on_page(page, queued)
            if stop is not None and stop.is_set():
                break
    return stats


_BEFORE_ALL: Key = (datetime.min.replace(tzinfo=UTC), 0)
_AFTER_ALL: Key = (datetime.max.replace(tzinfo=UTC), 0)


def shipped_statuses(rules: core.Rules) -> frozenset[int]:
    """Return the status codes that announce "shipped" for this customer."""
    return frozenset(code for code, kind in rules.status_events.items() if kind is core.EventKind.SHIPPED)


def noticed_now(page: Page, known: Mapping[int, core.OrderMemory], cursor: Key | None, now: datetime) -> Page:
    """Date status changes that did not move ``updated_at`` (behind the cursor) at ``now``, when seen."""
    if cursor is None:
        return page

    def dated(order: Order) -> Order:
        memory = known.get(order.id)
        unannounced = memory is not None and memory.status != order.status and order.key <= cursor
        return replace(order, updated_at=now) if unannounced else order

    return replace(page, orders=tuple(dated(o) for o in page.orders))


async def reconcile_shipped(
    whiplash: ChangeSource,
    store: Store,
    rules: core.Rules,
    since: datetime,
    *,
    clock: WallClock,
    on_page: PageHook | None = None,
) -> SyncStats:
    """Re-read by id the orders remembered as shipped since ``since`` and not yet delivered; commit changes."""
    cid = rules.customer_id
    stats = SyncStats()
    after = 0
    shipped = shipped_statuses(rules)
    cursor = (await store.customer_state(cid)).cursor
    while ids := await store.orders_to_reconcile(cid, shipped, core.EventKind.DELIVERED, since, after_id=after):
        after = ids[-1]
        raw = sorted(await whiplash.fetch_by_ids(cid, ids), key=lambda obj: order_key(obj) or _AFTER_ALL)
        page = build_page(raw, _BEFORE_ALL)
        if page is None:
            continue
        now = clock()
        known = await store.load_memory(cid, [o.id for o in page.orders])
        page = noticed_now(page, known, cursor, now)
        plan, queued, already = await commit_page(store, rules, page, None, now)
        stats.add(page, plan, queued, already, now)
        if on_page is not None:
            on_page(page, queued)
    return stats


