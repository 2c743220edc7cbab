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
- with ``parallel`` > 1 the window is read as time slices side by side (``SlicedWalk``): pages are still
  committed one at a time, each in its own transaction, and the cursor moves only to the end of the committed
  prefix (``slices.contiguous_cursor``), so a crash at any point resumes without a gap;
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

from . import core, failpoints, slices
from .budget import Lane
from .clock import WallClock
from .errors import BridgeError
from .orders import Order, order_key
from .store import Store
from .whiplash import Key, Keyset, Page, Step, build_page, keyset_from

log = logging.getLogger(__name__)

PageHook = Callable[[Page, int], None]  # (committed page, rows it queued)


class ChangeSource(Protocol):
    """What a sync reads from: Whiplash's changed orders in (updated_at, id) order."""

    page_size: int

    def walk_changes(
        self, customer_id: int, since: datetime, *, until: datetime | None = None, lane: Lane = Lane.LIVE
    ) -> AsyncGenerator[Page, None]:
        """Yield pages of orders changed at or after ``since`` (and before ``until``)."""
        ...

    async def step(
        self, customer_id: int, at: Keyset, *, until: datetime | None = None, lane: Lane = Lane.LIVE
    ) -> Step:
        """Read the page after ``at``."""
        ...

    async def fetch_by_ids(self, customer_id: int, ids: Sequence[int], *, lane: Lane = Lane.BACKGROUND) -> list[object]:
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
    cursor: Key | None = None  # where the walk moved the customer's cursor (None: it did not move it)

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
    lane: Lane = Lane.LIVE,
    parallel: int = 1,
    stored: Key | None = None,
) -> SyncStats:
    """Read every change of ``rules.customer_id`` since ``since`` and commit it page by page.

    ``on_page`` runs after each commit (the daemon logs malformed orders and wakes its sender there).
    A set ``stop`` ends the walk after the current page: every page is committed with its cursor, so the
    next walk resumes exactly there. ``parallel`` > 1 reads a long window as that many slices at once;
    ``stored`` (the customer's cursor, when the caller has read it) is never moved back.
    """
    await store.ensure_customer(rules.customer_id)
    if parallel > 1:
        walk = SlicedWalk(whiplash, store, rules, move_cursor=move_cursor, clock=clock, on_page=on_page, stop=stop,
                          lane=lane, parallel=parallel)
        return await walk.run(since, stored)
    stats = SyncStats()
    held = not move_cursor
    # aclosing: a walk left early (stop) must cancel the page it is already fetching ahead.
    async with contextlib.aclosing(whiplash.walk_changes(rules.customer_id, since, lane=lane)) as pages:
        async for page in pages:
            failpoints.hit("after_fetch")
            cursor, held = next_cursor(page, held)
            now = clock()
            plan, queued, already = await commit_page(store, rules, page, cursor, now)
            failpoints.hit("after_outbox_commit")
            stats.add(page, plan, queued, already, now)
            stats.cursor = cursor or stats.cursor
            log.debug("page committed customer=%s orders=%d malformed=%d queued=%d cursor=%s", rules.customer_id,
                      len(page.orders), len(page.malformed), queued, "held" if cursor is None else cursor[0])
            if on_page is not None:
                on_page(page, queued)
            if stop is not None and stop.is_set():
                break
    return stats


@dataclass(slots=True)
class _Reading:
    """One slice and where its keyset walk stands."""

    slice: slices.Slice
    at: Keyset


class SlicedWalk:
    """Read one customer's window as up to ``parallel`` time slices at once, committing page by page.

    It starts as one reader over the whole window. After each page it commits, a reader starts more readers, up to
    ``parallel``, each on the second half of the busy slice with the most pages left (``slices.best_split``, which
    knows the density from the pages read); a reader done with its slice takes such a half itself before it ends.
    So a short or empty window costs one request and no task (its one page is read and committed by the caller's
    task: a thousand idle customers must not pay for readers they do not need) and a long one keeps ``parallel``
    requests busy from its second page on.
    Commits are one at a time (one lock): each page's memory, outbox rows and the cursor of the committed prefix
    go in one transaction, and the plan of a page sees every page committed before it, so an order read by two
    slices (it changed mid-walk) is announced once.
    """

    def __init__(
        self,
        whiplash: ChangeSource,
        store: Store,
        rules: core.Rules,
        *,
        move_cursor: bool,
        clock: WallClock,
        on_page: PageHook | None,
        stop: asyncio.Event | None,
        lane: Lane,
        parallel: int,
    ) -> None:
        self.whiplash = whiplash
        self.store = store
        self.rules = rules
        self.cid = rules.customer_id
        self.move_cursor = move_cursor
        self.clock = clock
        self.on_page = on_page
        self.stop = stop
        self.lane = lane
        self.parallel = parallel
        self.stats = SyncStats()
        self.slices: list[slices.Slice] = []
        self.busy: list[_Reading] = []
        self.end = clock()
        self.written: Key | None = None  # the cursor this walk last committed
        self._commit_lock = asyncio.Lock()
        self._readers: set[asyncio.Task[None]] = set()

    async def run(self, since: datetime, stored: Key | None = None) -> SyncStats:
        """Read the window from ``since``; the first error stops every reader and is raised.

        ``stored`` is the customer's cursor: the walk starts an overlap before it and never moves it back.
        """
        first = slices.first_slice(since.astimezone(UTC))
        self.slices.append(first)
        self.written = stored if self.move_cursor else None
        reading = _Reading(first, keyset_from(self.cid, since))
        self.busy.append(reading)
        try:
            # The first page is read in this task: an idle window is one short page, and a thousand idle customers
            # must not pay for reader tasks they do not need. A window with more to read gets its readers now.
            step = await self.whiplash.step(self.cid, reading.at, until=first.until, lane=self.lane)
            if step.next.done:
                await self._reader(reading, step)
            else:
                self._readers.add(asyncio.ensure_future(self._reader(reading, step)))
            while self._readers:
                done, _ = await asyncio.wait(self._readers, return_when=asyncio.FIRST_EXCEPTION)
                self._readers -= done
                for task in done:
                    task.result()  # the first failure ends the walk (the finally below stops the others)
        finally:
            for task in self._readers:
                task.cancel()
            await asyncio.gather(*self._readers, return_exceptions=True)
        return self.stats

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _start(self, reading: _Reading) -> None:
        """Start a reader on ``reading``."""
        self.busy.append(reading)
        self._readers.add(asyncio.ensure_future(self._reader(reading)))

    def _offer(self) -> None:
        """Start readers on the halves worth splitting off, while fewer than ``parallel`` read."""
        while not self._stopping() and len(self.busy) < self.parallel and (reading := self._split()) is not None:
            self._start(reading)

    async def _reader(self, reading: _Reading | None, first: Step | None = None) -> None:
        """Walk a slice (from its ``first`` step, when already read), then take the half of a busy one worth
        splitting, until none is left."""
        while reading is not None:
            try:
                await self._walk(reading, first)
            finally:
                self.busy.remove(reading)
            first = None
            reading = None if self._stopping() else self._split()
            if reading is not None:
                self.busy.append(reading)

    def _split(self) -> _Reading | None:
        """Return the second half of the busy slice with the most pages left, or None when none is worth it."""
        found = slices.best_split([r.slice for r in self.busy], self.end, self.whiplash.page_size)
        if found is None:
            return None
        victim, at = found
        taken = slices.split(self.slices, victim, at)
        log.debug("slice split customer=%s at=%s slices=%d", self.cid, at.isoformat(), len(self.slices))
        return _Reading(taken, keyset_from(self.cid, at))

    async def _walk(self, reading: _Reading, first: Step | None = None) -> None:
        """Walk one slice page by page until its range is read (its end may move closer when it is split).

        The next page is fetched while this one is committed, as in the plain walk: a slice then waits for
        Whiplash or for the commit lock, whichever is slower, not for both in turn.
        """
        s = reading.slice
        ahead = self._fetch(reading) if first is None else _ready(first)
        try:
            while ahead is not None:
                step = await ahead
                failpoints.hit("after_fetch")
                reading.at = step.next
                stalled = step.stalled is not None
                ahead = None if stalled or self._stopping() else self._fetch(reading)
                if step.page is not None:
                    await self._commit(s, step.page)
                    self._offer()  # the page shows how dense the window is: more readers may now pay off
                if step.stalled is not None:
                    raise step.stalled
                if self._stopping():
                    return
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, BridgeError):
                    await ahead
        async with self._commit_lock:
            slices.finished(s)
            cursor = self._cursor()
            if cursor is not None:
                await self.store.move_cursor(self.cid, cursor)
                self.written = self.stats.cursor = cursor

    def _fetch(self, reading: _Reading) -> asyncio.Future[Step] | None:
        """Start reading the slice's next page (None: its range is read, possibly cut short by a split)."""
        s, at = reading.slice, reading.at
        if at.done or (s.until is not None and at.key[0] >= s.until):
            return None
        return asyncio.ensure_future(self.whiplash.step(self.cid, at, until=s.until, lane=self.lane))

    async def _commit(self, s: slices.Slice, page: Page) -> None:
        """Commit one page with the cursor of the committed prefix it completes, in one transaction."""
        async with self._commit_lock:
            before = (s.reached, s.read, s.held)
            slices.committed(s, page.last_key, page.safe_key, len(page.orders) + len(page.malformed),
                             bool(page.malformed))
            cursor = self._cursor()
            now = self.clock()
            try:
                plan, queued, already = await commit_page(self.store, self.rules, page, cursor, now)
            except BaseException:
                s.reached, s.read, s.held = before  # not committed: the slice has not got that far
                raise
            failpoints.hit("after_outbox_commit")
            if cursor is not None:
                self.written = self.stats.cursor = cursor
        self.stats.add(page, plan, queued, already, now)
        log.debug("page committed customer=%s orders=%d malformed=%d queued=%d cursor=%s", self.cid,
                  len(page.orders), len(page.malformed), queued, "held" if cursor is None else cursor[0])
        if self.on_page is not None:
            self.on_page(page, queued)

    def _cursor(self) -> Key | None:
        """Return the cursor to write now: the committed prefix's end, when it moved (None: leave it)."""
        if not self.move_cursor:
            return None
        cursor = slices.contiguous_cursor(self.slices)
        if cursor is None or (self.written is not None and cursor <= self.written):
            return None
        return cursor


def _ready(step: Step) -> asyncio.Future[Step]:
    """Return a future already holding ``step``: a page read before its reader began is awaited like the others."""
    future: asyncio.Future[Step] = asyncio.get_running_loop().create_future()
    future.set_result(step)
    return future


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


