"""Daemon lifecycle and per-customer work: poll Whiplash, map, commit, deliver.

Each enabled customer gets two tasks: a poller (drift-free ticks; one transaction per fetched page) and a
sender (drains the outbox whenever the poller queued rows or a retry comes due). Every cycle of either
task catches its own errors, so one customer's bad key, bad data or outage never stalls another.
``startup`` → ``main_loop`` → ``shutdown``; signal handlers only set events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TypeVar

import aiohttp

from . import core
from .config import CustomerSettings, LoadedConfig, Settings
from .delivery import Deliverer
from .errors import AuthFailed, BridgeError, MalformedOrder, UpstreamError
from .klaviyo import KlaviyoClient
from .ratelimit import AccountLimiter
from .store import Store
from .whiplash import Page, TokenManager, WhiplashAuth, WhiplashClient

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
T = TypeVar("T")


def utcnow() -> datetime:
    """Return the current time, aware, in UTC."""
    return datetime.now(UTC)


def midnight_utc(day: date) -> datetime:
    """Return 00:00 UTC of a date."""
    return datetime.combine(day, datetime.min.time(), UTC)


@dataclass(slots=True)
class PollStats:
    """What one poll of one customer found."""

    fetched: int = 0
    queued: int = 0
    skipped_no_email: int = 0
    malformed: int = 0
    lag_s: float = 0.0

    def add(self, page: Page, plan: core.Plan, queued: int, now: datetime) -> None:
        """Count one committed page."""
        self.fetched += len(page.orders) + len(page.malformed)
        self.queued += queued
        self.skipped_no_email += plan.skipped_no_email
        self.malformed += len(page.malformed)
        if plan.events:
            newest = max(o.updated_at for o in page.orders)
            self.lag_s = max(self.lag_s, (now - newest).total_seconds())


class CustomerWorker:
    """Everything the bridge does for one customer."""

    def __init__(
        self,
        settings: Settings,
        customer: CustomerSettings,
        store: Store,
        whiplash: WhiplashClient,
        klaviyo: KlaviyoClient,
        clock: Clock = utcnow,
    ) -> None:
        self.settings = settings
        self.customer = customer
        self.cid = customer.whiplash_customer_id
        self.rules = settings.rules_for(customer)
        self.store = store
        self.whiplash = whiplash
        self.klaviyo = klaviyo
        self.clock = clock
        self.deliverer = Deliverer(self.cid, store, klaviyo, clock=clock)
        self.wake = asyncio.Event()
        self.setup_done = False
        self._logged_malformed: set[tuple[int | None, str]] = set()

    def is_launched(self, now: datetime) -> bool:
        """Tell whether the customer's launch date has come (polling starts then)."""
        return now >= midnight_utc(self.customer.launch_date)

    def window_start(self) -> datetime:
        """Return where a new customer's cursor starts: launch date minus the backfill days."""
        return midnight_utc(self.customer.launch_date) - timedelta(days=self.customer.backfill_days)

    async def ensure_setup(self) -> None:
        """Ensure the list exists and, once per customer, queue the default profile and sample events."""
        if self.setup_done:
            return
        await self.store.ensure_customer(self.cid)
        state = await self.store.customer_state(self.cid)
        if not (state.setup_done and state.list_id):
            list_id = await self.klaviyo.ensure_list(self.customer.list_name)
            await self._queue_setup(list_id)
        self.setup_done = True
        self.wake.set()

    async def _queue_setup(self, list_id: str) -> None:
        """Queue the default profile and one sample event per metric, once (idempotent)."""
        now = self.clock()
        email = self.settings.klaviyo.default_profile_email
        samples = core.sample_events(self.rules, email, now)
        await self.store.queue_setup(self.cid, list_id, core.setup_profile(email), samples, now)
        log.info("customer set up customer=%s list=%r list_id=%s", self.cid, self.customer.list_name, list_id)

    async def poll_once(self) -> PollStats:
        """Walk Whiplash's changes since the cursor and commit each page with its outbox rows."""
        stats = PollStats()
        await self.store.ensure_customer(self.cid)
        state = await self.store.customer_state(self.cid)
        since = self.window_start()
        if state.cursor is not None:
            since = max(since, state.cursor[0] - timedelta(seconds=self.settings.whiplash.overlap_seconds))
        held = False
        async for page in self.whiplash.walk_changes(self.cid, since):
            cursor, held = self._next_cursor(page, held)
            await self._commit(page, cursor, stats)
        return stats

    @staticmethod
    def _next_cursor(page: Page, held: bool) -> tuple[tuple[datetime, int] | None, bool]:
        """Return the cursor to store after a page; a malformed order holds it until the order is readable."""
        if held:
            return None, True
        if page.malformed:
            return page.safe_key, True
        return page.last_key, False

    async def _commit(self, page: Page, cursor: tuple[datetime, int] | None, stats: PollStats) -> None:
        """Map one page and commit its state, outbox rows and cursor in one transaction."""
        now = self.clock()
        known = await self.store.load_memory(self.cid, [o.id for o in page.orders])
        names = await self.store.load_names(self.cid, {o.email for o in page.orders if o.email})
        plan = core.plan_page(self.rules, page.orders, known, names, now)
        queued = await self.store.commit_page(self.cid, plan, cursor, page.malformed, now)
        for bad in page.malformed:
            self._log_malformed(bad)
        stats.add(page, plan, queued, now)
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

    async def poll_cycle(self) -> PollStats:
        """Poll once if launched and record the outcome; failures are logged, not raised."""
        now = self.clock()
        if not self.is_launched(now):
            await self.store.record_poll(self.cid, now, True, None)
            return PollStats()
        try:
            stats = await self.poll_once()
        except (BridgeError, sqlite3.Error) as exc:
            await self.store.record_poll(self.cid, self.clock(), False, str(exc))
            log.error("poll failed customer=%s error=%s action=%s", self.cid, exc, _poll_advice(exc))
            return PollStats()
        await self.store.record_poll(self.cid, self.clock(), True, None)
        return stats

    def summarise(self, stats: PollStats) -> None:
        """Log the per-cycle summary line if anything happened."""
        sent = self.deliverer.stats.take()
        if stats.fetched or stats.queued or sent.sent or sent.dead or sent.retried:
            log.info(
                "cycle customer=%s fetched=%d queued=%d sent=%d dead=%d retried=%d no_email=%d malformed=%d "
                "lag_s=%.1f",
                self.cid,
                stats.fetched,
                stats.queued,
                sent.sent,
                sent.dead,
                sent.retried,
                stats.skipped_no_email,
                stats.malformed,
                stats.lag_s,
            )

    async def deliver_cycle(self) -> None:
        """Set up if needed and send everything due; errors pause this customer only."""
        try:
            await self.ensure_setup()
            await self.deliverer.deliver_due()
            await self.deliverer.flush_list_members()
        except AuthFailed as exc:
            await self.deliverer.on_key_refused(exc)
        except UpstreamError as exc:
            log.warning("klaviyo set-up failed customer=%s error=%s; retrying later", self.cid, exc)

    async def run_once(self) -> None:
        """Poll once and deliver everything deliverable now (``run --once``)."""
        stats = await self.poll_cycle()
        await self.deliver_cycle()
        self.summarise(stats)

    async def run_poller(self, stop: asyncio.Event) -> None:
        """Poll on a drift-free schedule until ``stop`` is set."""
        interval = self.settings.bridge.poll_interval_seconds
        next_tick = time.monotonic()
        while not stop.is_set():
            stats = await _guard(self.poll_cycle(), f"poll customer={self.cid}")
            self.summarise(stats or PollStats())
            next_tick += interval
            # A cycle longer than the interval starts the next one at once instead of bursting to catch up.
            next_tick = max(next_tick, time.monotonic())
            await _wait(stop, next_tick - time.monotonic())

    async def run_sender(self, stop: asyncio.Event) -> None:
        """Deliver whenever rows are queued or come due, until ``stop`` is set."""
        probe = self.settings.klaviyo.key_probe_seconds
        while not stop.is_set():
            self.wake.clear()
            await _guard(self.deliver_cycle(), f"deliver customer={self.cid}")
            if self.deliverer.key_refused:
                await _wait(stop, probe)
                self.deliverer.key_refused = False
                continue
            await _wait_any(stop, self.wake, await self._until_next_due())

    async def _until_next_due(self) -> float:
        """Return seconds until the earliest rescheduled row is due (at most a minute, to stay responsive)."""
        nxt = await self.store.next_due_at(self.cid)
        if nxt is None:
            return 60.0
        return min(60.0, max(0.05, (nxt - self.clock()).total_seconds()))


def _poll_advice(exc: BaseException) -> str:
    """Tell ops what to do about a failed poll."""
    if isinstance(exc, AuthFailed):
        return "check the Whiplash client credentials / refresh token and the customer id"
    if isinstance(exc, sqlite3.Error):
        return "check the state DB's disk (space, permissions); nothing was committed for the failed page"
    return "will retry next cycle; if it persists check Whiplash status and network"


async def _guard(coro: Awaitable[T], what: str) -> T | None:
    """Run one cycle, logging (not raising) anything unexpected so the loop survives."""
    try:
        return await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error in %s; continuing next cycle", what)
        return None


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep up to ``seconds``, returning early when ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Sleep until ``stop`` or ``wake`` is set, or ``seconds`` pass."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class Daemon:
    """The whole process: one store, one session per upstream, one worker per enabled customer."""

    def __init__(self, loaded: LoadedConfig, *, once: bool = False, clock: Clock = utcnow) -> None:
        self.settings = loaded.settings
        self.once = once
        self.clock = clock
        self.stop = asyncio.Event()
        self.force_exit = False
        self.workers: list[CustomerWorker] = []
        self._store: Store | None = None
        self._sessions: list[aiohttp.ClientSession] = []

    async def run(self) -> int:
        """Start, work until stopped (or one pass with ``once``), shut down; return the exit code."""
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()
        return 0

    async def startup(self) -> None:
        """Open the state DB and HTTP sessions and build the workers."""
        s = self.settings
        self._store = await Store.open(s.bridge.state_path)
        whiplash_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.whiplash.timeout_seconds))
        klaviyo_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=s.klaviyo.timeout_seconds),
            connector=aiohttp.TCPConnector(limit=200, limit_per_host=0),
        )
        self._sessions = [whiplash_session, klaviyo_session]
        whiplash = self._whiplash_client(whiplash_session, self._store)
        for customer in s.enabled_customers():
            klaviyo = self._klaviyo_client(klaviyo_session, customer)
            self.workers.append(CustomerWorker(s, customer, self._store, whiplash, klaviyo, self.clock))
        log.info("started customers=%d state=%s once=%s", len(self.workers), s.bridge.state_path, self.once)

    def _whiplash_client(self, session: aiohttp.ClientSession, store: Store) -> WhiplashClient:
        """Build the Whiplash client from settings."""
        w = self.settings.whiplash
        auth = WhiplashAuth(w.base_url, w.grant, w.client_id, w.client_secret, w.refresh_token, w.scope)
        tokens = TokenManager(session, auth, store)
        return WhiplashClient(session, tokens, base_url=w.base_url, page_size=w.page_size, timeout=w.timeout_seconds)

    def _klaviyo_client(self, session: aiohttp.ClientSession, customer: CustomerSettings) -> KlaviyoClient:
        """Build one customer's Klaviyo client with its own account limiter."""
        k = self.settings.klaviyo
        return KlaviyoClient(
            session,
            base_url=k.base_url,
            revision=k.revision,
            api_key=customer.klaviyo_api_key,
            limiter=AccountLimiter(k.rate_limit_share),
            timeout=k.timeout_seconds,
        )

    async def main_loop(self) -> None:
        """Run every worker; in ``once`` mode a single pass each."""
        if self.once:
            await asyncio.gather(*(w.run_once() for w in self.workers))
            return
        self._install_signal_handlers()
        tasks = [asyncio.create_task(coro) for w in self.workers for coro in (w.run_poller(self.stop),
                                                                               w.run_sender(self.stop))]
        await self.stop.wait()
        await self._drain(tasks)

    async def _drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """Give in-flight work the grace period, then cancel what is left."""
        grace = self.settings.bridge.shutdown_grace_seconds
        _, pending = await asyncio.wait(tasks, timeout=grace) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning("shutdown grace of %.0fs over: cancelled %d tasks", grace, len(pending))

    def _install_signal_handlers(self) -> None:
        """Route SIGTERM/SIGINT to a graceful stop; a second signal stops at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)

    def handle_exit(self, sig: signal.Signals) -> None:
        """Begin a graceful stop, or force it on the second signal."""
        if self.stop.is_set():
            log.warning("second %s: exiting now", sig.name)
            self.force_exit = True
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            return
        log.info("%s received: finishing in-flight work (grace %.0fs)", sig.name,
                 self.settings.bridge.shutdown_grace_seconds)
        self.stop.set()

    async def shutdown(self) -> None:
        """Close sessions and the store, logging what stays queued."""
        for session in self._sessions:
            await session.close()
        if self._store is None:
            return
        queued = 0
        since = self.clock() - timedelta(days=1)
        for w in self.workers:
            queued += (await self._store.counts(w.cid, since)).queued
        await self._store.close()
        log.info("stopped queued=%d", queued)
