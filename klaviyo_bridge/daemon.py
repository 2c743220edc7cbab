"""Daemon lifecycle and per-customer work: poll Whiplash, map, commit, deliver.

Each enabled customer gets two tasks: a poller (drift-free ticks; one transaction per fetched page) and a
sender (drains the outbox whenever the poller queued rows or a retry comes due). Every cycle of either
task catches its own errors, so one customer's bad key, bad data or outage never stalls another.

Lifecycle invariants:
- ``startup`` → ``main_loop`` → ``shutdown``; signal handlers only set events, the main loop acts on them.
- READY=1 is sent only once the state DB is open, the sessions exist and the workers are started;
  WATCHDOG=1 only while every running customer's poller has made progress (a committed page or a finished
  cycle, successful or not) within ``stall_window``, so a hung poll or a blocked loop stops the pings.
- A reload is validated in full before anything changes; an invalid file changes nothing. At most one
  worker per customer runs at a time: a restarted customer's new worker waits for the old one to finish.
- Stopping a worker (removed, disabled, SIGTERM) lets in-flight work finish within
  ``shutdown_grace_seconds`` and then cancels it; queued rows stay in the DB, and a row cancelled mid-send
  is sent again later under the same unique_id, which Klaviyo de-duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
from pydantic import BaseModel

from . import logs, whiplash
from .aio import guarded, sleep_unless, wait_any
from .clock import WallClock, utcnow
from .config import CustomerSettings, LoadedConfig, Settings, load_config
from .errors import ConfigError
from .health import UpstreamHealth
from .klaviyo import KlaviyoClient
from .metrics import Metrics, MetricsServer, MetricsSink, metrics_for, start_metrics_server
from .ratelimit import AccountLimiter
from .store import Store
from .systemd import Notifier, watchdog_interval
from .webhooks import Targets, WebhookServer, serve_webhooks
from .whiplash import WhiplashClient
from .worker import CustomerWorker

log = logging.getLogger(__name__)



# --- lifecycle: workers, watchdog, reload ----------------------------------------------------------------

SENT_WINDOW = timedelta(minutes=1)
BUDGET_SNAPSHOT_S = 10.0  # how often the Whiplash budget's use is saved for `status` (another process)
# How often the outbox is checked for rows no worker was told of (a replay or a resync by another process): idle
# senders sleep until woken, and this one query for every customer wakes them.
OUTBOX_WATCH_S = 60.0
# Sent rows older than this keep their unique_id key (the never-twice guard) but lose their payload.
RETENTION = timedelta(days=30)
RETENTION_EVERY = timedelta(days=1)


def stall_window(settings: Settings) -> float:
    """Return how long a poller may go without progress before the watchdog stops vouching for the process."""
    # A poll that fails the slow way (every try timing out) still ends within the retry budget plus a
    # request, a token exchange and the retry after a 401; only a hang outlasts this, and a restart may cure it.
    slowest_failure = whiplash.RETRY_BUDGET_S + 3 * settings.whiplash.timeout_seconds
    # A budget too small for every customer once per interval lengthens every round by this much: waiting
    # one's turn for the shared budget is not a stall.
    round_s = len(settings.enabled_customers()) / settings.whiplash.max_requests_per_second
    return 2 * (settings.bridge.poll_interval_seconds + round_s) + slowest_failure


@dataclass(eq=False, slots=True)
class RunningWorker:
    """A started worker, its own stop event and the task running its poller and sender."""

    worker: CustomerWorker
    stop: asyncio.Event
    task: asyncio.Task[None]


class WorkerPool:
    """Start, retire and drain customer workers; a customer's new worker waits for its old one to finish."""

    def __init__(self, on_crash: Callable[[CustomerWorker, BaseException], None]) -> None:
        self.running: dict[int, RunningWorker] = {}
        self._retiring: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_crash = on_crash

    def workers(self) -> list[CustomerWorker]:
        """Return the workers currently running."""
        return [r.worker for r in self.running.values()]

    def start(self, worker: CustomerWorker, *, burst: bool = False) -> None:
        """Run ``worker`` once any retiring worker of the same customer has finished (a burst: one pass)."""
        stop = asyncio.Event()
        before = self._retiring.get(worker.cid)
        task = asyncio.create_task(self._run(worker, stop, before, burst), name=f"customer-{worker.cid}")
        task.add_done_callback(lambda t: self._crashed(worker, t))
        self.running[worker.cid] = RunningWorker(worker, stop, task)
        self._track(task)

    def retire(self, cid: int, grace: float) -> None:
        """Stop a customer's worker after its in-flight work, cancelling it when ``grace`` runs out."""
        running = self.running.pop(cid)
        running.stop.set()
        task = self._track(asyncio.create_task(_finish(running, grace), name=f"retire-{cid}"))
        self._retiring[cid] = task
        task.add_done_callback(lambda t: self._retiring.pop(cid) if self._retiring.get(cid) is t else None)

    async def drain(self, grace: float, force: asyncio.Event) -> int:
        """Stop every worker, wait up to ``grace`` (or until ``force``), cancel the rest; return how many."""
        for running in self.running.values():
            running.stop.set()
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            await wait_any(force, _all_done_event(pending), grace)
        left = [t for t in pending if not t.done()]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        return len(left)

    async def join(self) -> None:
        """Wait until every running worker has ended (burst workers end by themselves)."""
        await asyncio.gather(*(r.task for r in self.running.values()), return_exceptions=True)

    @staticmethod
    async def _run(
        worker: CustomerWorker, stop: asyncio.Event, before: asyncio.Task[None] | None, burst: bool
    ) -> None:
        """Wait for the predecessor, then run the worker's poller and sender."""
        if before is not None:
            await asyncio.wait({before})  # asyncio.wait: being cancelled here must not cancel ``before``
            worker.progress = time.monotonic()
        await worker.run(stop, burst=burst)

    def _crashed(self, worker: CustomerWorker, task: asyncio.Task[None]) -> None:
        """Report a worker that ended with an exception (its loops catch everything, so this is a bug)."""
        if not task.cancelled() and task.exception() is not None:
            self._on_crash(worker, task.exception() or RuntimeError("worker failed"))

    def _track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """Remember a task until it is done."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _finish(running: RunningWorker, grace: float) -> None:
    """Wait for a stopped worker's in-flight work, cancelling it after ``grace`` seconds."""
    done, _ = await asyncio.wait({running.task}, timeout=grace)
    if not done:
        log.warning("customer worker cancelled customer=%s after grace_s=%.0f; its queued rows stay queued",
                    running.worker.cid, grace)
        running.task.cancel()
        await asyncio.wait({running.task})
    log.info("customer stopped customer=%s", running.worker.cid)


def _all_done_event(tasks: set[asyncio.Task[None]]) -> asyncio.Event:
    """Return an event set once every task in ``tasks`` is done."""
    event = asyncio.Event()
    remaining = set(tasks)

    def one_done(task: asyncio.Task[None]) -> None:
        remaining.discard(task)
        if not remaining:
            event.set()

    for task in tasks:
        task.add_done_callback(one_done)
    return event


class Watchdog:
    """Ping systemd's watchdog only while every running customer's poller keeps making progress."""

    def __init__(self, notifier: Notifier, pool: WorkerPool, window: Callable[[], float]) -> None:
        self.notifier = notifier
        self.pool = pool
        self.window = window
        self._reported: set[int] = set()

    def stalled(self, now: float) -> list[CustomerWorker]:
        """Return the running workers with no progress within the window."""
        limit = self.window()
        return [w for w in self.pool.workers() if now - w.progress > limit]

    def check(self, now: float) -> bool:
        """Ping the watchdog if nothing is stalled; log each stall once; return whether it pinged."""
        stalled = self.stalled(now)
        for worker in stalled:
            if worker.cid not in self._reported:
                self._reported.add(worker.cid)
                log.error(
                    "poll stalled customer=%s idle_s=%.0f action=%s", worker.cid, now - worker.progress,
                    "not pinging the systemd watchdog, so systemd restarts the service after WatchdogSec; "
                    "if it recurs check Whiplash reachability and the state DB's disk",
                )
        self._reported &= {w.cid for w in stalled}
        return False if stalled else self.notifier.watchdog()

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        """Check every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            self.check(time.monotonic())
            await sleep_unless(stop, interval)


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a new configuration changes among the running customers."""

    start: tuple[CustomerSettings, ...]
    stop: tuple[int, ...]
    restart: tuple[CustomerSettings, ...]


# Settings that live in objects built once at start-up (the store, the Whiplash token chain): a reload
# keeps the running values and asks for a restart. The Whiplash token chain must never have two owners.
_RESTART_ONLY_BRIDGE = ("state_path", "metrics_listen")


def _changed(old: BaseModel, new: BaseModel, section: str, names: Iterable[str] | None = None) -> list[str]:
    """Return ``section.key`` for every listed (default: every) field that differs; values are never shown."""
    fields = type(old).model_fields if names is None else names
    return [f"{section}.{name}" for name in fields if getattr(old, name) != getattr(new, name)]


def effective_settings(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """Return the settings to run after a reload and the changed keys that only a restart applies."""
    pending = _changed(old.whiplash, new.whiplash, "whiplash")
    pending += _changed(old.bridge, new.bridge, "bridge", _RESTART_ONLY_BRIDGE)
    pending += _changed(old.webhooks, new.webhooks, "webhooks")  # the receiver keeps its socket and secret
    bridge = new.bridge.model_copy(update={name: getattr(old.bridge, name) for name in _RESTART_ONLY_BRIDGE})
    return new.model_copy(update={"whiplash": old.whiplash, "bridge": bridge, "webhooks": old.webhooks}), pending


def _worker_inputs(settings: Settings) -> tuple[object, ...]:
    """Return the process-wide settings a worker is built from (a change restarts every worker)."""
    return (settings.bridge.poll_interval_seconds, settings.klaviyo, settings.events, settings.statuses)


def plan_reload(running: list[CustomerWorker], new: Settings) -> ReloadPlan:
    """Compare the running workers with a new configuration."""
    wanted = {c.whiplash_customer_id: c for c in new.enabled_customers()}
    current = {w.cid: w for w in running}
    inputs = _worker_inputs(new)
    restart = tuple(
        c for cid, c in wanted.items()
        if cid in current and (current[cid].customer != c or _worker_inputs(current[cid].settings) != inputs)
    )
    return ReloadPlan(
        start=tuple(c for cid, c in wanted.items() if cid not in current),
        stop=tuple(cid for cid in current if cid not in wanted),
        restart=restart,
    )


class Daemon:
    """The whole process: one store, one session per upstream, one worker per enabled customer."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        once: bool = False,
        clock: WallClock = utcnow,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = loaded.settings
        self.once = once
        self.clock = clock
        self.config_path = config_path
        self.notifier = notifier if notifier is not None else Notifier()
        self.stop = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.force = asyncio.Event()
        self.force_exit = False
        self.exit_code = 0
        self.pool = WorkerPool(self._worker_crashed)
        self._store: Store | None = None
        self._sessions: list[aiohttp.ClientSession] = []
        self._whiplash: WhiplashClient | None = None
        self._seen: set[int] = set()
        self._background: list[asyncio.Task[None]] = []
        self.metrics: MetricsSink = metrics_for(self.settings.bridge)
        # One for the process: every customer's polls spend the same Whiplash application.
        self.whiplash_health = UpstreamHealth("whiplash", metrics=self.metrics)
        self._metrics_server: MetricsServer | None = None
        self._webhooks: WebhookServer | None = None
        self._reload_note = ""

    async def run(self) -> int:
        """Start, work until stopped (or one pass with ``once``), shut down; return the exit code."""
        if not self.once:
            self._install_signal_handlers()
        try:
            await self.startup()
            await self.main_loop()
        except Exception as exc:
            self.notifier.status(f"fatal error: {type(exc).__name__}; see the journal")
            raise
        finally:
            await self.shutdown()
            self.notifier.close()
        return self.exit_code

    async def startup(self) -> None:
        """Open the state DB and the HTTP sessions."""
        s = self.settings
        self._store = await Store.open(s.bridge.state_path)
        whiplash_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.whiplash.timeout_seconds))
        klaviyo_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=s.klaviyo.timeout_seconds),
            connector=aiohttp.TCPConnector(limit=200, limit_per_host=0),
        )
        self._sessions = [whiplash_session, klaviyo_session]
        self._whiplash = WhiplashClient.from_settings(s.whiplash, whiplash_session, self._store)
        self.metrics.watch_budget(self._whiplash.budget.usage)
        await self._start_metrics()
        log.info("started customers=%d state=%s once=%s", len(s.enabled_customers()), s.bridge.state_path,
                 self.once)

    async def _start_metrics(self) -> None:
        """Serve Prometheus metrics when ``metrics_listen`` is set; a busy port costs the metrics, not the bridge."""
        address = self.settings.bridge.metrics_address()
        if address is None or not isinstance(self.metrics, Metrics):
            return
        try:
            self._metrics_server = await start_metrics_server(self.metrics, address)
        except OSError as exc:
            log.error("metrics endpoint not started listen=%s error=%s action=%s", self.settings.bridge.metrics_listen,
                      exc, "free the port or change [bridge] metrics_listen, then restart")
            return
        log.info("metrics listening url=%s", self._metrics_server.url)

    def _klaviyo_client(self, session: aiohttp.ClientSession, customer: CustomerSettings) -> KlaviyoClient:
        """Build one customer's Klaviyo client with its own account limiter."""
        k = self.settings.klaviyo
        cid = customer.whiplash_customer_id
        return KlaviyoClient(
            session,
            base_url=k.base_url,
            revision=k.revision,
            api_key=customer.klaviyo_api_key,
            limiter=AccountLimiter(k.rate_limit_share),
            timeout=k.timeout_seconds,
            on_throttled=lambda: self.metrics.throttled(cid),
        )

    def _build_worker(self, customer: CustomerSettings) -> CustomerWorker:
        """Build a worker for ``customer`` from the current settings."""
        assert self._store is not None, "startup() first"
        assert self._whiplash is not None, "startup() first"
        klaviyo = self._klaviyo_client(self._sessions[1], customer)
        self._seen.add(customer.whiplash_customer_id)
        return CustomerWorker(self.settings, customer, self._store, self._whiplash, klaviyo, self.clock, self.metrics,
                              self.whiplash_health)

    async def main_loop(self) -> None:
        """Run every worker until stopped, reloading on SIGHUP; with ``once``, one burst each (the same loop)."""
        for customer in self.settings.enabled_customers():
            self.pool.start(self._build_worker(customer), burst=self.once)
        if self.once:
            await self.pool.join()
            return
        # Before READY=1: "ready" includes receiving webhooks, and every wake-up finds its worker started.
        self._webhooks = await serve_webhooks(self.settings, self._webhook_targets(), self.metrics)
        self._start_background()
        self.notifier.ready(f"running customers={len(self.pool.running)}")
        while not self.stop.is_set():
            await wait_any(self.stop, self.reload_requested, None)
            if self.reload_requested.is_set() and not self.stop.is_set():
                self.reload_requested.clear()
                self.reload()
        self.notifier.stopping("stopping: finishing in-flight work")
        await self._close_webhooks()  # stop accepting first: no wake-up may reach a draining worker
        await self._drain()

    def _webhook_targets(self) -> Targets:
        """Let the receiver wake the live pool's workers (a reload's added customers too), no more."""
        assert self._store is not None, "startup() first"
        return Targets(
            wake=self._wake,
            running=self.pool.running.keys,
            disabled=lambda cid: any(c.whiplash_customer_id == cid for c in self.settings.customers if not c.enabled),
            customer_of_order=self._store.customer_of_order,
            status_of=self._store.remembered_status,
        )

    def _wake(self, cid: int) -> bool:
        """Ask a running customer's poller to poll now; False when the customer is not running."""
        running = self.pool.running.get(cid)
        if running is None:
            return False
        self.metrics.webhook_wakeup(cid, running.worker.request_poll())
        return True

    async def _close_webhooks(self) -> None:
        """Stop the webhook receiver, if it runs."""
        if self._webhooks is not None:
            await self._webhooks.close()
            self._webhooks = None

    def _start_background(self) -> None:
        """Start the watchdog (when systemd asked for one), the per-cycle STATUS= line, retention, the budget
        snapshot and the outbox watch."""
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            dog = Watchdog(self.notifier, self.pool, lambda: stall_window(self.settings))
            self._background.append(asyncio.create_task(dog.run(self.stop, interval / 2), name="watchdog"))
        if self.notifier.enabled:
            self._background.append(asyncio.create_task(self._report_status(), name="status"))
        self._background.append(asyncio.create_task(self._retain(), name="retention"))
        self._background.append(asyncio.create_task(self._save_budget(), name="budget"))
        self._background.append(asyncio.create_task(self._watch_outbox(), name="outbox-watch"))

    async def _save_budget(self) -> None:
        """Save the Whiplash budget's use every BUDGET_SNAPSHOT_S for `status` (one small write, shared by all)."""
        assert self._store is not None, "startup() first"
        assert self._whiplash is not None, "startup() first"
        while not self.stop.is_set():
            snapshot = {"at": self.clock().isoformat(), **self._whiplash.budget.usage().as_json()}
            await guarded(self._store.save_budget(snapshot), "budget snapshot")
            await sleep_unless(self.stop, BUDGET_SNAPSHOT_S)

    async def _watch_outbox(self) -> None:
        """Every OUTBOX_WATCH_S, wake the sender of each customer with rows due (one query for all customers)."""
        assert self._store is not None, "startup() first"
        while not self.stop.is_set():
            await sleep_unless(self.stop, OUTBOX_WATCH_S)
            due = await guarded(self._store.customers_due(self.clock()), "outbox watch")
            for worker in self.pool.workers():
                if due and worker.cid in due:
                    worker.wake.set()

    async def _retain(self) -> None:
        """Once a day, shrink rows sent more than RETENTION ago (keys stay, so nothing is ever re-sent)."""
        while not self.stop.is_set():
            assert self._store is not None, "startup() first"
            touched = await guarded(self._store.compact_sent(self.clock() - RETENTION), "retention")
            if touched:
                log.info("retention compacted rows=%d older_than_days=%d", touched, RETENTION.days)
            await sleep_unless(self.stop, RETENTION_EVERY.total_seconds())

    async def _report_status(self) -> None:
        """Send one STATUS= line per poll interval until stopped."""
        while not self.stop.is_set():
            await sleep_unless(self.stop, self.settings.bridge.poll_interval_seconds)
            if not self.stop.is_set():
                text = await guarded(self.status_text(), "status line")
                if text is not None:
                    self.notifier.status(text)

    async def status_text(self) -> str:
        """Return the one-line summary systemctl status shows."""
        assert self._store is not None
        now = self.clock()
        workers = self.pool.workers()
        # One query for every customer: a thousand customers must not cost two thousand queries a minute.
        totals = await self._store.totals([w.cid for w in workers], now - SENT_WINDOW)
        queued, sent, dead, refused = totals.queued, totals.sent_since, totals.dead, totals.key_refused
        prelaunch = sum(not w.is_launched(now) for w in workers)
        last = max((w.last_cycle_at for w in workers if w.last_cycle_at), default=None)
        stalled = sum(time.monotonic() - w.progress > stall_window(self.settings) for w in workers)
        budget = "" if self._whiplash is None else " " + self._whiplash.budget.usage().status_text()
        return (f"customers={len(workers)} prelaunch={prelaunch} key_refused={refused} stalled={stalled} "
                f"queued={queued} sent_1m={sent} dead={dead}{budget} "
                f"last_cycle={last.strftime('%H:%M:%SZ') if last else '-'}{self._reload_note}")

    # -- reload ---------------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config file; apply it when valid, else keep running the current one."""
        self.notifier.reloading("reloading config")
        loaded = self._load_for_reload()
        if loaded is not None:
            self._apply(loaded)
            self._reload_note = ""
        self.notifier.ready(f"running customers={len(self.pool.running)}{self._reload_note}")

    def _load_for_reload(self) -> LoadedConfig | None:
        """Load and validate the config file, logging one ERROR per problem when it is unusable."""
        if self.config_path is None:
            log.warning("reload ignored: the daemon was started without a config path")
            return None
        try:
            return load_config(self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config reload rejected path=%s problem=%s", self.config_path, problem)
            log.warning(
                "config reload failed path=%s problems=%d action=%s", self.config_path, len(exc.problems),
                "the previous config keeps running; fix the file (klaviyo-bridge check-config) and reload again",
            )
            self._reload_note = f" reload_failed={len(exc.problems)}_problems"
            return None

    def _apply(self, loaded: LoadedConfig) -> None:
        """Switch to a validated configuration: logging, settings, then the customers it changes."""
        for warning in loaded.warnings:
            log.warning("config warning: %s", warning)
        for secret in loaded.secret_values():
            logs.register_secret(secret)
        old = self.settings
        self.settings, pending = effective_settings(old, loaded.settings)
        if pending:
            log.warning("config reload: changes need a restart keys=%s action=%s", ",".join(pending),
                        "systemctl restart klaviyo-bridge; until then the previous values stay in effect")
        self.metrics.set_poll_interval(self.settings.bridge.poll_interval_seconds)
        if (old.bridge.log_level, old.bridge.log_format) != (self.settings.bridge.log_level,
                                                              self.settings.bridge.log_format):
            logs.setup_logging(self.settings.bridge.log_level, self.settings.bridge.log_format)
        self._apply_customers(plan_reload(self.pool.workers(), self.settings))

    def _apply_customers(self, plan: ReloadPlan) -> None:
        """Stop removed or disabled customers, restart changed ones, start added ones."""
        grace = self.settings.bridge.shutdown_grace_seconds
        for cid in plan.stop:
            log.info("customer stopping customer=%s reason=removed_or_disabled queued_rows=kept", cid)
            self.pool.retire(cid, grace)
            self.metrics.forget(cid)
        for customer in plan.restart:
            log.info("customer restarting customer=%s reason=settings_changed", customer.whiplash_customer_id)
            self.pool.retire(customer.whiplash_customer_id, grace)
            self.pool.start(self._build_worker(customer))
        for customer in plan.start:
            log.info("customer starting customer=%s name=%r", customer.whiplash_customer_id, customer.name)
            self.pool.start(self._build_worker(customer))
        log.info("config reloaded customers=%d started=%d stopped=%d restarted=%d", len(self.pool.running),
                 len(plan.start), len(plan.stop), len(plan.restart))

    # -- signals and shutdown -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        """Route SIGTERM/SIGINT to a graceful stop and SIGHUP to a reload; handlers only set flags."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        loop.add_signal_handler(signal.SIGHUP, self.handle_reload)

    def handle_reload(self) -> None:
        """Ask the main loop to reload the config."""
        self.reload_requested.set()

    def handle_exit(self, sig: signal.Signals) -> None:
        """Begin a graceful stop, or force it on the second signal."""
        if self.stop.is_set():
            log.warning("second %s: exiting now without waiting for in-flight work", sig.name)
            self.force_exit = True
            self.force.set()
            return
        log.info("%s received: finishing in-flight work (grace %.0fs)", sig.name,
                 self.settings.bridge.shutdown_grace_seconds)
        self.stop.set()

    def _worker_crashed(self, worker: CustomerWorker, exc: BaseException) -> None:
        """Treat a crashed worker as fatal: exit 1 so systemd restarts the whole process."""
        log.critical("customer worker crashed customer=%s error=%r action=%s", worker.cid, exc,
                     "exiting with status 1 so systemd restarts the bridge; please report this bug",
                     exc_info=exc)
        self.exit_code = 1
        self.stop.set()

    async def _drain(self) -> None:
        """Give in-flight work the grace period (cut short by a second signal), then cancel what is left."""
        grace = self.settings.bridge.shutdown_grace_seconds
        cancelled = await self.pool.drain(grace, self.force)
        if cancelled and not self.force_exit:
            log.warning("shutdown grace of %.0fs over: cancelled %d tasks; unsent rows stay queued for the next start",
                        grace, cancelled)

    async def shutdown(self) -> None:
        """Stop background tasks, close sessions and the store, logging what stays queued."""
        await self._close_webhooks()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for session in self._sessions:
            await session.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        if self._store is None:
            return
        queued = 0
        since = self.clock() - timedelta(days=1)
        for cid in sorted(self._seen):
            queued += (await self._store.counts(cid, since)).queued
        await self._store.close()
        log.info("stopped queued=%d", queued)


