"""Daemon lifecycle pieces: reload planning, settings a reload cannot apply, and the progress-based watchdog.

The watchdog tests run the real Daemon in-process against both simulators, with NOTIFY_SOCKET pointing at
a datagram socket, so a poll can be made to hang (a bug no timeout bounds) while the event loop stays alive.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from kit.bridgekit import eventually

from klaviyo_bridge import daemon as daemon_module
from klaviyo_bridge import whiplash as whiplash_module
from klaviyo_bridge.budget import Lane
from klaviyo_bridge.config import Settings, load_config
from klaviyo_bridge.daemon import CustomerWorker, Daemon, Watchdog, WorkerPool, effective_settings, plan_reload
from klaviyo_bridge.sandbox.klaviyo import FakeKlaviyo, serve_klaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash
from klaviyo_bridge.sync import SyncStats
from klaviyo_bridge.systemd import Notifier

CID, KEY = 101, "pk_lifecycle_0123456789ab"
WL_ID, WL_SECRET = "bridge-client", "whiplash-secret-value-1"
LAUNCH = date(2026, 1, 1)


def settings(**changes: Any) -> Settings:
    """Return valid settings with two customers; ``changes`` override sections or ``customers``."""
    raw: dict[str, Any] = {
        "bridge": {"state_path": "/tmp/unused.db", "poll_interval_seconds": 60.0},
        "whiplash": {"client_id": "c", "client_secret": "whiplash-secret"},
        "klaviyo": {"default_profile_email": "ops@example.com"},
        "customers": [
            customer(1, "pk_one_123456"),
            customer(2, "pk_two_123456"),
        ],
    }
    for key, value in changes.items():
        raw[key] = value if key == "customers" else {**raw.get(key, {}), **value}
    return Settings.model_validate(raw)


def workers_for(s: Settings) -> list[CustomerWorker]:
    """Return workers as the daemon would run them for ``s`` (no I/O happens in these tests)."""
    none = cast(Any, None)
    return [CustomerWorker(s, c, none, none, none) for c in s.enabled_customers()]


def customer(cid: int, key: str = "pk_default_123456", **extra: Any) -> dict[str, Any]:
    """Return one raw [[customers]] entry."""
    return {"whiplash_customer_id": cid, "name": f"Shop {cid}", "klaviyo_api_key": key, "launch_date": LAUNCH,
            **extra}


def test_plan_reload_starts_stops_and_restarts_the_right_customers() -> None:
    """1. Run customers 1, 2, 3. 2. New config: 1 unchanged, 2 with a new key, 3 disabled, 4 added.
    Result: start 4, stop 3, restart 2; 1 untouched."""
    old = settings(customers=[customer(1), customer(2), customer(3)])
    new = settings(customers=[customer(1), customer(2, key="pk_rotated_123456"), customer(3, enabled=False),
                              customer(4)])
    plan = plan_reload(workers_for(old), new)
    assert [c.whiplash_customer_id for c in plan.start] == [4]
    assert plan.stop == (3,)
    assert [c.whiplash_customer_id for c in plan.restart] == [2]


def test_plan_reload_restarts_everyone_when_shared_settings_change() -> None:
    """Result: a new poll interval (or metric names) restarts every worker; an identical file changes nothing."""
    old = settings()
    assert plan_reload(workers_for(old), settings()) == daemon_module.ReloadPlan((), (), ())
    for changed in (settings(bridge={"poll_interval_seconds": 30.0}), settings(events={"shipped": "Shipped!"})):
        plan = plan_reload(workers_for(old), changed)
        assert [c.whiplash_customer_id for c in plan.restart] == [1, 2]


def test_settings_only_a_restart_applies_keep_their_running_values() -> None:
    """1. Change the Whiplash secret, the state path, the poll interval and the log level.
    Result: the first two stay as running and are named (without values); the others apply."""
    old = settings()
    new = settings(whiplash={"client_secret": "rotated-secret"},
                   bridge={"state_path": "/elsewhere.db", "poll_interval_seconds": 5.0, "log_level": "debug"})
    effective, pending = effective_settings(old, new)
    assert pending == ["whiplash.client_secret", "bridge.state_path"]
    assert effective.whiplash == old.whiplash
    assert effective.bridge.state_path == old.bridge.state_path
    assert effective.bridge.poll_interval_seconds == 5.0
    assert effective.bridge.log_level == "debug"
    assert "rotated-secret" not in repr(pending)


def test_webhook_settings_need_a_restart() -> None:
    """1. Turn the receiver on and give it another path in a reload. Result: both keys are named as needing a
    restart (the receiver holds its socket and key from the start) and the running values stay."""
    old = settings()
    new = settings(webhooks={"listen": "127.0.0.1:8787", "path": "/other"})
    effective, pending = effective_settings(old, new)
    assert pending == ["webhooks.listen", "webhooks.path"]
    assert effective.webhooks == old.webhooks


class Recording(CustomerWorker):
    """A worker whose poller records when it runs and takes a moment to finish its in-flight work."""

    journal: list[str]

    async def run_poller(self, stop: asyncio.Event) -> None:
        """Record start and end around waiting for ``stop`` plus 50 ms of in-flight work."""
        self.journal.append(f"start {self.customer.klaviyo_api_key.get_secret_value()}")
        await stop.wait()
        await asyncio.sleep(0.05)
        self.journal.append(f"end {self.customer.klaviyo_api_key.get_secret_value()}")

    async def run_sender(self, stop: asyncio.Event) -> None:
        """Wait for ``stop``."""
        await stop.wait()


def recording(s: Settings, journal: list[str]) -> CustomerWorker:
    """Return a Recording worker for the first customer of ``s``."""
    worker = Recording(s, s.customers[0], cast(Any, None), cast(Any, None), cast(Any, None))
    worker.journal = journal
    return worker


async def test_a_restarted_customer_never_runs_two_workers_at_once() -> None:
    """1. Start customer 1 with key old. 2. Retire it and start it with key new at once. 3. Drain.
    Result: the new worker starts only after the old one ended; drain ends it; nothing is cancelled."""
    journal: list[str] = []
    pool = WorkerPool(lambda w, e: journal.append(f"crash {e}"))
    pool.start(recording(settings(customers=[customer(1, "pk_old_1234567")]), journal))
    await asyncio.sleep(0.01)
    pool.retire(1, grace=5)
    pool.start(recording(settings(customers=[customer(1, "pk_new_1234567")]), journal))
    await asyncio.sleep(0.2)
    assert journal == ["start pk_old_1234567", "end pk_old_1234567", "start pk_new_1234567"]
    assert await pool.drain(5, asyncio.Event()) == 0
    assert journal[-1] == "end pk_new_1234567"


async def test_a_crashed_worker_is_reported() -> None:
    """1. A worker whose poller raises. Result: on_crash gets the worker and the error."""
    crashes: list[tuple[int, str]] = []

    class Crashing(Recording):
        async def run_poller(self, stop: asyncio.Event) -> None:
            raise RuntimeError("bug")

    pool = WorkerPool(lambda w, e: crashes.append((w.cid, repr(e))))
    s = settings()
    pool.start(Crashing(s, s.customers[0], cast(Any, None), cast(Any, None), cast(Any, None)))
    await asyncio.sleep(0.05)
    assert crashes == [(1, crashes[0][1])]
    assert "bug" in crashes[0][1]
    assert await pool.drain(1, asyncio.Event()) == 0


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """Bind a datagram socket and point NOTIFY_SOCKET at it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"kb-lifecycle-{uuid.uuid4().hex}"
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    """Return every datagram waiting on ``sock``."""
    got: list[str] = []
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except BlockingIOError:
            return got


class FakePool:
    """Stands in for WorkerPool: just the running workers."""

    def __init__(self, workers: list[CustomerWorker]) -> None:
        self._workers = workers

    def workers(self) -> list[CustomerWorker]:
        """Return the workers."""
        return self._workers


def test_watchdog_pings_only_while_every_poller_progresses(
    notify_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Two workers with fresh progress. 2. One stops progressing past the window. 3. It progresses again.
    Result: ping, then no ping and one ERROR naming the customer (logged once), then pings again."""
    workers = workers_for(settings())
    notifier = Notifier()
    dog = Watchdog(notifier, cast(WorkerPool, FakePool(workers)), lambda: 10.0)
    now = time.monotonic()
    for w in workers:
        w.progress = now
    assert dog.check(now + 5)
    assert drain(notify_socket) == ["WATCHDOG=1"]
    workers[1].progress = now - 20
    with caplog.at_level(logging.ERROR):
        assert not dog.check(now)
        assert not dog.check(now + 1)
    assert drain(notify_socket) == []
    stalls = [r.getMessage() for r in caplog.records if "poll stalled" in r.getMessage()]
    assert len(stalls) == 1
    assert "customer=2" in stalls[0]
    workers[1].progress = now
    assert dog.check(now + 1)
    assert drain(notify_socket) == ["WATCHDOG=1"]
    notifier.close()


@dataclass
class Live:
    """An in-process daemon running against both simulators."""

    daemon: Daemon
    task: asyncio.Task[int]
    whiplash: FakeWhiplash
    sock: socket.socket
    state: Path


CONFIG = """
[bridge]
state_path = "{state}"
poll_interval_seconds = 1.0
shutdown_grace_seconds = 0.5
[whiplash]
base_url = "{whiplash}"
client_id = "{wl_id}"
client_secret = "{wl_secret}"
timeout_seconds = 0.1
[klaviyo]
base_url = "{klaviyo}"
default_profile_email = "samples@example.com"
[[customers]]
whiplash_customer_id = {cid}
name = "Live"
klaviyo_api_key = "{key}"
launch_date = {launch}
"""


@pytest.fixture
async def live(
    tmp_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Live]:
    """Run the daemon with a 0.2 s watchdog and a stall window of 2 × 1 s + 3 × 0.1 s (no retry budget)."""
    monkeypatch.setattr(whiplash_module, "RETRY_BUDGET_S", 0.0)
    monkeypatch.setattr(daemon_module, "OUTBOX_WATCH_S", 0.3)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    whiplash = FakeWhiplash(WL_ID, WL_SECRET)
    whiplash.create_order(CID, status=300, at=datetime.now(UTC) - timedelta(minutes=5))
    klaviyo = FakeKlaviyo()
    klaviyo.add_account(KEY, label="live")
    async with serve_whiplash(whiplash) as w_url, serve_klaviyo(klaviyo) as k_url:
        path = tmp_path / "config.toml"
        launch = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
        path.write_text(CONFIG.format(state=tmp_path / "state.db", whiplash=w_url, klaviyo=k_url, wl_id=WL_ID,
                                      wl_secret=WL_SECRET, cid=CID, key=KEY, launch=launch))
        d = Daemon(load_config(path), config_path=path)
        task = asyncio.create_task(d.run())
        try:
            yield Live(d, task, whiplash, notify_socket, tmp_path / "state.db")
        finally:
            d.handle_exit(signal.SIGTERM)
            assert await asyncio.wait_for(task, 5) == 0


async def pings_during(sock: socket.socket, seconds: float) -> int:
    """Count WATCHDOG=1 datagrams arriving within ``seconds``."""
    drain(sock)
    await asyncio.sleep(seconds)
    return sum("WATCHDOG=1" in m.splitlines() for m in drain(sock))


async def test_a_hung_poll_stops_the_watchdog_pings(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """1. Polls complete: pings flow. 2. Every poll now hangs forever (while the event loop stays alive).
    Result: within the stall window (2.3 s) the pings stop and a "poll stalled" ERROR names the customer."""
    assert await pings_during(live.sock, 0.6) >= 3

    async def hang(self: CustomerWorker) -> SyncStats:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.ERROR):
        mp.setattr(CustomerWorker, "poll_once", hang)
        await asyncio.sleep(2.5)
        assert await pings_during(live.sock, 0.6) == 0
    assert any(f"poll stalled customer={CID}" in r.getMessage() for r in caplog.records)


async def test_rows_another_process_made_pending_are_sent_by_the_outbox_watch(live: Live) -> None:
    """1. The daemon has sent everything; its sender sleeps until woken (nothing pending, nothing rescheduled).
    2. Another process makes the sent event pending again, as ``dead-letters replay`` does (no signal to the
    daemon). Result: the outbox watch (every 0.3 s here, 60 s by default) wakes the sender and the row is sent."""
    state = live.state.resolve().as_uri()
    (order_id,) = live.whiplash.orders
    order_event = f"{order_id}:shipped"  # status 300

    def pending() -> int:
        with closing(sqlite3.connect(f"{state}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL AND dead_at IS NULL")
                       .fetchone()[0])

    def order_event_sent() -> bool:
        try:
            with closing(sqlite3.connect(f"{state}?mode=ro", uri=True)) as db:
                return db.execute("SELECT 1 FROM outbox WHERE kind = 'event' AND key = ? AND sent_at IS NOT NULL",
                                  (order_event,)).fetchone() is not None
        except sqlite3.OperationalError:  # the daemon is still creating the database
            return False

    await eventually(order_event_sent, limit_s=10, what="the order's event to be sent")
    await eventually(lambda: pending() == 0, limit_s=10, what="the outbox to drain")
    await asyncio.sleep(0.5)  # the sender's last cycle ends; it now sleeps until woken
    with closing(sqlite3.connect(live.state)) as db, db:
        db.execute("UPDATE outbox SET sent_at = NULL, next_attempt_at = ? WHERE kind = 'event' AND key = ?",
                   (datetime.now(UTC).isoformat(), order_event))
    assert pending() == 1
    await eventually(lambda: pending() == 0, limit_s=3, what="the outbox watch to send the replayed row")


async def test_a_whiplash_outage_is_not_a_hang(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """1. Whiplash answers 503 to everything for longer than the stall window.
    Result: polls fail the handled way, so pings keep coming (a restart would not fix Whiplash)."""
    assert await pings_during(live.sock, 0.4) >= 2
    live.whiplash.fail_next(10_000, status=503)
    with caplog.at_level(logging.WARNING):
        assert await pings_during(live.sock, 2.6) >= 10
    # One line for the whole outage, not one per failed poll.
    assert [r.getMessage().split(" status=")[0] for r in caplog.records if "errors started" in r.getMessage()] == [
        f"whiplash errors started customer={CID}"]
    assert not any("poll stalled" in r.getMessage() for r in caplog.records)


def fleet_worker(customers: int, now: datetime) -> CustomerWorker:
    """Return the first worker of ``customers`` customers (launched a week before ``now``), 60 s interval, 10/s."""
    launch = (now - timedelta(days=7)).date()
    settings = Settings.model_validate({
        "bridge": {"state_path": "/tmp/unused.db", "poll_interval_seconds": 60},
        "whiplash": {"client_id": "c", "client_secret": "whiplash-secret", "max_requests_per_second": 10},
        "klaviyo": {"default_profile_email": "ops@example.com"},
        "customers": [{"whiplash_customer_id": 1000 + i, "name": f"Shop {i}", "klaviyo_api_key": f"pk_shop_{i:06d}",
                       "launch_date": launch} for i in range(customers)],
    })
    none = cast(Any, None)
    return CustomerWorker(settings, settings.customers[0], none, none, none, clock=lambda: now)


@pytest.mark.parametrize(("customers", "ago_s", "lane"), [
    (10, None, Lane.BACKGROUND),  # never read: the first walk is the backfill
    (10, 8 * 86400, Lane.BACKGROUND),  # last read before launch: the first walk since launch
    (10, 170, Lane.LIVE),
    (10, 181, Lane.BACKGROUND),  # three intervals without a poll: a catch-up
    (1000, 181, Lane.LIVE),  # the budget makes a round 100 s: late by the round, not by the interval
    (1000, 299, Lane.LIVE),
    (1000, 301, Lane.BACKGROUND),  # three rounds without a poll: a catch-up
])
def test_the_lane_counts_lateness_in_rounds_of_the_budget(customers: int, ago_s: float | None, lane: Lane) -> None:
    """Result: a poll is background for a first walk or a catch-up (no poll for three rounds, a round being the
    interval or customers ÷ budget when longer); otherwise live. Counting in intervals would send every customer the
    budget delays past three intervals to the background lane, where live polls go first: it would starve."""
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    last_ok = None if ago_s is None else now - timedelta(seconds=ago_s)
    assert fleet_worker(customers, now)._lane(last_ok) is lane


def test_poll_phases_spread_a_thousand_customers_over_the_interval() -> None:
    """1,000 customer ids, a 60 s interval. Result: every phase is in [0, 60); no second of the interval holds more
    than 3 % of the customers (even spread: 1.7 % each on average); a restart any time later gives each customer the
    same slot (its phase moves with the clock, its offset into the interval does not)."""
    from klaviyo_bridge.worker import poll_phase

    now = 1_764_500_000.25
    delays = {cid: poll_phase(cid, 60.0, now) for cid in range(10_000, 11_000)}
    assert all(0.0 <= d < 60.0 for d in delays.values())
    per_second = Counter(int(d) for d in delays.values())
    assert len(per_second) == 60
    assert max(per_second.values()) <= 30
    later = now + 12_345.5
    for cid, delay in delays.items():
        slot, slot_later = (now + delay) % 60.0, (later + poll_phase(cid, 60.0, later)) % 60.0
        assert abs(slot - slot_later) < 1e-6 or abs(abs(slot - slot_later) - 60.0) < 1e-6
