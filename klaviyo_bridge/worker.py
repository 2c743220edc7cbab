"""One customer's work: poll Whiplash into the store, and deliver the store's outbox to Klaviyo.

A worker runs two tasks: a poller (drift-free ticks; each fetched page committed in one transaction by
``sync.sync_window``) and a sender (drains the outbox whenever the poller queued rows or a retry comes
due). Every cycle of either task catches its own errors, so one customer's bad key, bad data or outage
never stalls another.

Scheduling across customers: each customer polls at its own phase of the interval (``poll_phase``, stable per
customer id and wall-clock aligned), so a thousand customers never poll in the same second and a restart is no
thundering herd. Every request waits for the process's one Whiplash budget: a live poll in the live lane, a
long window (the first backfill, a catch-up after an outage) in the background lane and read as parallel
slices. When the budget cannot serve every customer once per interval, each poll simply waits its turn
(first come, first served within a lane), so rounds lengthen evenly and ``status`` shows the interval achieved.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import datetime, timedelta

from . import core
from .aio import guarded, relay, sleep_unless, wait_any, wait_set
from .budget import Lane, round_seconds
from .clock import WallClock, utcnow
from .config import CustomerSettings, Settings
from .core import midnight_utc
from .delivery import Deliverer
from .errors import AuthFailed, BridgeError, MalformedOrder, StoreError, UpstreamError
from .health import UpstreamHealth
from .klaviyo import KlaviyoClient
from .metrics import MetricsSink, NoMetrics
from .store import Store
from .sync import ChangeSource, SyncStats, reconcile_shipped, sync_window
from .whiplash import Key, Page

log = logging.getLogger(__name__)

INVALID_EMAILS_NAMED = 20  # order ids named per cycle line about invalid emails; the rest are counted
# No successful poll for this many intervals means a long window (an outage, a stopped daemon) to catch up on,
# read in the background lane (as a first backfill is) so that other customers' live polls go first.
CATCH_UP_INTERVALS = 3


def poll_phase(customer_id: int, interval: float, now_epoch: float) -> float:
    """Return the seconds from ``now_epoch`` to this customer's next poll slot.

    The slot is a fixed offset into each interval, taken from a hash of the customer id: spread evenly over
    the interval, the same after every restart, on every machine.
    """
    digest = hashlib.sha256(str(customer_id).encode()).digest()
    offset = int.from_bytes(digest[:8], "big") / 2**64 * interval
    return (offset - now_epoch) % interval


class CustomerWorker:
    """Everything the bridge does for one customer."""

    def __init__(
        self,
        settings: Settings,
        customer: CustomerSettings,
        store: Store,
        whiplash: ChangeSource,
        klaviyo: KlaviyoClient,
        clock: WallClock = utcnow,
        metrics: MetricsSink | None = None,
        whiplash_health: UpstreamHealth | None = None,
    ) -> None:
        self.settings = settings
        self.customer = customer
        self.cid = customer.whiplash_customer_id
        self.rules = settings.rules_for(customer)
        self.store = store
        self.whiplash = whiplash
        self.klaviyo = klaviyo
        self.clock = clock
        self.metrics: MetricsSink = metrics if metrics is not None else NoMetrics()
        # One Whiplash health for the whole process (one OAuth application serves every customer).
        self.whiplash_health = whiplash_health if whiplash_health is not None else UpstreamHealth(
            "whiplash", metrics=self.metrics)
        self.deliverer = Deliverer(
            self.cid, store, klaviyo, clock=clock, health=UpstreamHealth("klaviyo", metrics=self.metrics),
            key_probe_seconds=settings.klaviyo.key_probe_seconds, events=self.rules.enabled,
        )
        for upstream in ("whiplash", "klaviyo"):  # a series from the start: dashboards show 0, not "no data"
            self.metrics.set_error_streak(upstream, self.cid, 0.0)
        self.wake = asyncio.Event()
        # Set by a webhook (``request_poll``), cleared when a poll cycle starts: any number of requests while idle
        # or during a poll give one poll (after the running one), never a queue of them.
        self.poll_requested = asyncio.Event()
        self.setup_done = False
        self.disabled_dropped = False
        self._logged_malformed: set[tuple[int | None, str]] = set()
        # Monotonic time of the last committed page or completed poll cycle: what the watchdog checks.
        self.progress = time.monotonic()
        self.last_cycle_at: datetime | None = None
        self._stop: asyncio.Event | None = None
        self.reading = False  # a poll is reading: history rows wait for full bulk requests until it ends
        self._reconciled_at: datetime | None = None  # when the last reconcile sweep ran (read from the store once)
        self._last_poll_started: datetime | None = None
        # The cursor and the last successful poll, read from the store once (None: not yet, or a failed walk may
        # have moved the cursor): this worker's walks and polls are their only writers, so an idle poll reads nothing.
        self._polled_from: tuple[Key | None, datetime | None] | None = None
        self._launch_at = midnight_utc(customer.launch_date)  # asked on every poll: worked out once
        self._round_s = round_seconds(len(settings.enabled_customers()), settings.whiplash.max_requests_per_second,
                                      settings.bridge.poll_interval_seconds)

    def is_launched(self, now: datetime) -> bool:
        """Tell whether the customer's launch date has come (polling starts then)."""
        return now >= self._launch_at

    def window_start(self) -> datetime:
        """Return where a new customer's cursor starts: launch date minus the backfill days."""
        return self._launch_at - timedelta(days=self.customer.backfill_days)

    async def ensure_setup(self) -> None:
        """Ensure the list exists and, once per customer, queue the default profile and sample events.

        Every worker start (a reload that changed the customer's events restarts it) also queues the sample of
        a newly enabled metric and drops the unsent rows of events the customer no longer gets.
        """
        if self.setup_done:
            return
        await self.store.ensure_customer(self.cid)
        if not self.disabled_dropped:  # before any Klaviyo call: a disabled event stops even while Klaviyo is down
            await self._drop_disabled()
            self.disabled_dropped = True
        state = await self.store.customer_state(self.cid)
        if not (state.setup_done and state.list_id):
            list_id = await self.klaviyo.ensure_list(self.customer.list_name)
            await self._queue_setup(list_id)
        else:
            await self.store.queue_samples(self.cid, self._samples(), self.clock())
        self.setup_done = True
        self.wake.set()

    def _samples(self) -> list[core.EventRow]:
        """Return the sample events of the metrics this customer gets."""
        return core.sample_events(self.rules, self.settings.klaviyo.default_profile_email, self.clock())

    async def _drop_disabled(self) -> None:
        """Drop queued rows of events this customer no longer gets; they are never sent."""
        disabled = set(core.EventKind) - self.rules.enabled
        dropped = await self.store.drop_pending_events(self.cid, disabled)
        if dropped:
            log.info("queued events dropped customer=%s events=%s rows=%d reason=disabled_for_customer", self.cid,
                     ",".join(sorted(kind.value for kind in disabled)), dropped)

    async def _queue_setup(self, list_id: str) -> None:
        """Queue the default profile and one sample event per metric, once (idempotent)."""
        email = self.settings.klaviyo.default_profile_email
        await self.store.queue_setup(self.cid, list_id, core.setup_profile(email), self._samples(), self.clock())
        log.info("customer set up customer=%s list=%r list_id=%s", self.cid, self.customer.list_name, list_id)

    async def poll_once(self) -> SyncStats:
        """Walk Whiplash's changes since the cursor (minus the overlap), committing page by page."""
        await self.store.ensure_customer(self.cid)
        cursor, last_ok = await self._polled_state()
        since = self.window_start()
        overlap = timedelta(seconds=self.settings.whiplash.overlap_seconds)
        if cursor is not None:
            since = max(since, cursor[0] - overlap)
        self._polled_from = None  # until the walk ends well: a failed one may have moved the cursor
        stats = await sync_window(
            self.whiplash, self.store, self.rules, since, move_cursor=True, clock=self.clock,
            on_page=self._on_page, stop=self._stop, lane=self._lane(last_ok),
            parallel=self.settings.whiplash.max_concurrent_requests, stored=cursor,
        )
        self._polled_from = (stats.cursor or cursor, last_ok)
        return stats

    async def _polled_state(self) -> tuple[Key | None, datetime | None]:
        """Return the customer's cursor and last successful poll (the store is read when they are not known)."""
        if self._polled_from is None:
            state = await self.store.customer_state(self.cid)
            self._polled_from = (state.cursor, state.last_poll_ok_at)
        return self._polled_from

    def _lane(self, last_ok: datetime | None) -> Lane:
        """Return the lane of this poll: background for the first walk (the backfill) and a catch-up after an outage
        or a stopped daemon (no successful poll for CATCH_UP_INTERVALS rounds), live otherwise.

        Decided by when the customer was last read, not by its cursor: a quiet merchant's old cursor is no backlog.
        """
        # A round, not the interval: when the budget cannot poll everyone each interval, every poll is late, and
        # counting lateness from the interval would push the unlucky into the background lane, where they starve.
        interval = timedelta(seconds=self._round_s)
        # A poll before launch read nothing: the first one after it walks the whole backfill window.
        read_since_launch = last_ok is not None and last_ok >= self._launch_at
        recent = last_ok is not None and self.clock() - last_ok <= CATCH_UP_INTERVALS * interval
        return Lane.LIVE if read_since_launch and recent else Lane.BACKGROUND

    def _on_page(self, page: Page, queued: int) -> None:
        """Log unreadable orders, record progress for the watchdog, and wake the sender."""
        for bad in page.malformed:
            self._log_malformed(bad)
        self.progress = time.monotonic()
        if queued:
            self.wake.set()

    def _log_malformed(self, bad: MalformedOrder) -> None:
        """Log an unreadable order once per process, with what ops need to chase it."""
        if (bad.order_id, bad.why) in self._logged_malformed:
            return
        self._logged_malformed.add((bad.order_id, bad.why))
        log.error(
            "malformed order customer=%s order=%s why=%s excerpt=%s action=%s",
            self.cid,
            bad.order_id,
            bad.why,
            bad.excerpt,
            "the cursor waits before this order; ask Whiplash to fix it or re-save the order",
        )

    async def poll_cycle(self, *, scheduled: bool = True) -> SyncStats:
        """Poll once if launched and record the outcome; failures are logged, not raised.

        Only scheduled polls measure the interval achieved: a poll a webhook asked for early says nothing about
        how long the budget makes a round.
        """
        now = self.clock()
        interval_s = None
        if scheduled:
            last, self._last_poll_started = self._last_poll_started, now
            interval_s = None if last is None else (now - last).total_seconds()
        if not self.is_launched(now):
            await self._record_poll(True, None, interval_s)
            return SyncStats()
        self.reading = True
        try:
            stats = await self.poll_once()
        except BridgeError as exc:
            self.metrics.poll_done(self.cid, False)
            self._poll_failed(exc)
            await self._record_poll(False, str(exc), interval_s)
            return SyncStats()
        finally:
            self.reading = False
            if self.deliverer.holding:  # the window is read: the sender may now send the rest of its history
                self.wake.set()
        self.whiplash_health.succeeded(self.cid)
        self.metrics.poll_done(self.cid, True, stats.lag_s)
        await self._record_poll(True, None, interval_s)
        swept = await self.reconcile_if_due()
        await self._update_gauges()
        return _combined(stats, swept)

    def _poll_failed(self, exc: BaseException) -> None:
        """Report a failed poll: Whiplash failures as part of an outage (one line when it starts), others loudly."""
        if isinstance(exc, UpstreamError):
            self.whiplash_health.failed(self.cid, exc)
        else:
            log.error("poll failed customer=%s error=%s action=%s", self.cid, exc, _poll_advice(exc))

    async def reconcile_if_due(self) -> SyncStats:
        """Re-read the orders last seen shipped when the sweep is due; failures are logged, not raised."""
        # The sweep looks for "delivered" behind the cursor: pointless for a customer that does not get it.
        if self.settings.whiplash.reconcile_days == 0 or core.EventKind.DELIVERED not in self.rules.enabled:
            return SyncStats()
        try:
            return await self._reconcile(self.clock())
        except UpstreamError as exc:
            self.whiplash_health.failed(self.cid, exc)
            return SyncStats()
        except BridgeError as exc:
            log.error("reconcile failed customer=%s error=%s action=%s", self.cid, exc, _poll_advice(exc))
            return SyncStats()

    async def _reconcile(self, now: datetime) -> SyncStats:
        """Sweep if ``reconcile_interval_minutes`` passed since the last sweep, and record when it ran."""
        w = self.settings.whiplash
        if self._reconciled_at is None:  # read once; this worker is the only one that sweeps this customer
            self._reconciled_at = (await self.store.customer_state(self.cid)).reconciled_at
        last = self._reconciled_at
        if last is not None and now - last < timedelta(minutes=w.reconcile_interval_minutes):
            return SyncStats()
        stats = SyncStats()
        # Never swept: a first walk has just read every recent order, so only start the interval.
        if last is not None:
            since = now - timedelta(days=w.reconcile_days)
            stats = await reconcile_shipped(self.whiplash, self.store, self.rules, since, clock=self.clock,
                                            on_page=self._on_page)
        await self.store.record_reconcile(self.cid, now)
        self._reconciled_at = now
        if stats.fetched:
            log.info("reconciled customer=%s checked=%d queued=%d", self.cid, stats.fetched, stats.queued)
        return stats

    async def _record_poll(self, ok: bool, error: str | None, interval_s: float | None) -> None:
        """Record a poll's outcome; a state DB that cannot take the write (locked, full) is logged, not raised."""
        if interval_s is not None:
            self.metrics.set_poll_interval_achieved(self.cid, interval_s)
        now = self.clock()
        if ok and self._polled_from is not None:
            self._polled_from = (self._polled_from[0], now)
        try:
            await self.store.record_poll(self.cid, now, ok, error, interval_s=interval_s)
        except StoreError as exc:
            log.error("poll outcome not recorded customer=%s error=%s action=%s", self.cid, exc, _poll_advice(exc))

    async def _update_gauges(self) -> None:
        """Refresh the queued and dead-letter gauges (only when metrics are served: it costs a count)."""
        if not self.metrics.enabled:
            return
        now = self.clock()
        counts = await self.store.counts(self.cid, now)
        self.metrics.set_queued(self.cid, counts.queued)
        self.metrics.set_dead_letters(self.cid, counts.dead)
        oldest = counts.oldest_queued_at
        self.metrics.set_oldest_queued(self.cid, 0.0 if oldest is None else (now - oldest).total_seconds())
        self.metrics.set_key_refused(self.cid, not (await self.store.customer_state(self.cid)).key_healthy)

    def summarise(self, stats: SyncStats) -> None:
        """Log the per-cycle summary line when something was queued, sent or refused (not for re-reads)."""
        sent = self.deliverer.stats.take()
        self.metrics.sent(self.cid, sent.sent)
        self.metrics.dead(self.cid, sent.dead)
        self.metrics.retried(self.cid, sent.retried)
        if stats.invalid_email:
            self._log_invalid_emails(stats.invalid_email)
        if stats.queued or sent.sent or sent.dead or stats.invalid_email:
            log.info(
                "cycle customer=%s orders_read=%d newly_queued=%d sent=%d dead_lettered=%d retried=%d "
                "no_email=%d invalid_email=%d malformed=%d lag_s=%.1f",
                self.cid, stats.fetched, stats.queued, sent.sent, sent.dead, sent.retried,
                stats.skipped_no_email, len(stats.invalid_email), stats.malformed, stats.lag_s,
            )

    def _log_invalid_emails(self, order_ids: list[int]) -> None:
        """Name the orders whose email is not an address (nothing is sent for them)."""
        shown = ",".join(str(oid) for oid in order_ids[:INVALID_EMAILS_NAMED])
        more = len(order_ids) - INVALID_EMAILS_NAMED
        log.warning(
            "invalid email customer=%s orders=%s%s action=%s", self.cid, shown, f" (+{more} more)" if more > 0 else "",
            "no profile and no event are sent for these orders; ask the merchant to correct the shopper's email "
            "in Whiplash (the next change of the order is then sent)",
        )

    async def deliver_cycle(self) -> None:
        """Set up if needed and send everything due; errors pause this customer only."""
        try:
            await self.ensure_setup()
            await self.deliverer.deliver_due(final=not self.reading)
            await self.deliverer.flush_list_members()
        except AuthFailed as exc:
            await self.deliverer.on_key_refused(exc)
        except UpstreamError as exc:
            # Set-up (finding or creating the list) failed the way a send can: part of an outage, if any.
            await self.deliverer.record_failure(exc)
        except StoreError as exc:
            log.error("delivery paused customer=%s error=%s action=%s", self.cid, exc,
                      "retried next cycle; check the state DB's disk (space, permissions, other processes "
                      "holding it); a row sent but not marked goes out again under its unique_id")

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Poll and deliver until ``stop`` is set; in a burst (``run --once``), one poll, then what is due now.

        One loop, two modes (arq's burst): the burst runs the same poller cycle and the same sender, which delivers
        each committed page's rows while the poll walks and stops after one last delivery once the poll is done.
        """
        if not burst:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.run_poller(stop), name=f"poll-{self.cid}")
                group.create_task(self.run_sender(stop), name=f"send-{self.cid}")
            return
        polled = asyncio.Event()
        sender = asyncio.create_task(self.run_sender(stop, burst=polled), name=f"send-{self.cid}")
        try:
            stats = await guarded(self.poll_cycle(), f"poll customer={self.cid}")
        finally:
            polled.set()
            await sender
        self.progress, self.last_cycle_at = time.monotonic(), self.clock()
        self.summarise(stats or SyncStats())

    async def run_once(self) -> None:
        """Run one burst: poll once and deliver everything deliverable now."""
        await self.run(asyncio.Event(), burst=True)

    def request_poll(self) -> bool:
        """Ask the poller to poll now (a webhook's wake-up); return False when a poll was already asked for."""
        if self.poll_requested.is_set():
            return False
        self.poll_requested.set()
        return True

    async def run_poller(self, stop: asyncio.Event) -> None:
        """Poll on a drift-free schedule, and whenever a poll is requested, until ``stop`` is set."""
        interval = self.settings.bridge.poll_interval_seconds
        self._stop = stop
        next_tick = time.monotonic() + poll_phase(self.cid, interval, time.time())
        async with relay(stop, self.poll_requested):
            ticked = await wait_set(self.poll_requested, next_tick - time.monotonic())  # a webhook need not wait
            while not stop.is_set():
                self.poll_requested.clear()  # this poll reads what every request so far was about
                scheduled = ticked or time.monotonic() >= next_tick
                stats = await guarded(self.poll_cycle(scheduled=scheduled), f"poll customer={self.cid}")
                self.progress, self.last_cycle_at = time.monotonic(), self.clock()
                self.summarise(stats or SyncStats())
                # A requested poll before the tick leaves the tick where it was; a cycle longer than the interval
                # starts the next one at once instead of bursting to catch up.
                if scheduled or time.monotonic() >= next_tick:
                    next_tick = max(next_tick + interval, time.monotonic())
                ticked = await wait_set(self.poll_requested, next_tick - time.monotonic())

    async def run_sender(self, stop: asyncio.Event, *, burst: asyncio.Event | None = None) -> None:
        """Deliver whenever rows are queued or come due, until ``stop`` is set.

        With ``burst`` (set when the burst's poll is done) it delivers each committed page as it comes, makes one
        last delivery once the poll is done and returns; it neither waits for later retries nor probes a refused key.
        """
        async with relay(stop, self.wake):
            while not stop.is_set():
                last = burst is not None and burst.is_set()
                self.wake.clear()
                await guarded(self.deliver_cycle(), f"deliver customer={self.cid}")
                if last:
                    return
                if burst is not None and self.deliverer.key_refused:
                    await burst.wait()
                elif burst is not None:
                    await wait_any(burst, self.wake, None)
                elif self.deliverer.key_refused:
                    await sleep_unless(stop, self.settings.klaviyo.key_probe_seconds)
                    self.deliverer.key_refused = False
                else:
                    await wait_set(self.wake, await self._until_next_due())

    async def _until_next_due(self) -> float | None:
        """Return seconds until the earliest rescheduled row is due (at most a minute), or None when nothing is
        pending: then only a wake brings more (the poller's pages, or the daemon's outbox watch for rows another
        process queued), so a thousand idle senders cost nothing between polls."""
        nxt = await self.store.next_due_at(self.cid)
        if nxt is None:
            return None
        return min(60.0, max(0.05, (nxt - self.clock()).total_seconds()))


def _combined(walk: SyncStats, sweep: SyncStats) -> SyncStats:
    """Add a reconcile sweep's counts to the poll's, for the one summary line of the cycle."""
    return SyncStats(
        fetched=walk.fetched + sweep.fetched,
        queued=walk.queued + sweep.queued,
        already_announced=walk.already_announced + sweep.already_announced,
        skipped_no_email=walk.skipped_no_email + sweep.skipped_no_email,
        invalid_email=walk.invalid_email + sweep.invalid_email,
        malformed=walk.malformed + sweep.malformed,
        lag_s=max(walk.lag_s, sweep.lag_s),
        pages=walk.pages + sweep.pages,
        cursor=walk.cursor,
    )


def _poll_advice(exc: BaseException) -> str:
    """Tell ops what to do about a failed poll."""
    if isinstance(exc, AuthFailed):
        return "check the Whiplash client credentials / refresh token and the customer id"
    if isinstance(exc, StoreError):
        return ("check the state DB (disk space, permissions, another process holding a lock); nothing was "
                "committed for the failed page and it is read again next cycle")
    return "will retry next cycle; if it persists check Whiplash status and network"
