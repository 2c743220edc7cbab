"""The real daemon as a systemd service: notifications, SIGTERM, SIGHUP reloads, against both simulators.

Each test starts ``klaviyo-bridge run`` as a subprocess with NOTIFY_SOCKET pointing at a datagram socket
the test reads, exactly as systemd's ``Type=notify`` would.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kit.service_harness import CLIENT_ID, CLIENT_SECRET, Service, Shop

from klaviyo_bridge.sandbox.klaviyo import Account, FakeKlaviyo, serve_klaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash

A, B, C = 101, 202, 303
KEYS = {A: "pk_shop_a_0123456789abcdef", B: "pk_shop_b_0123456789abcdef", C: "pk_shop_c_0123456789abcdef"}
NEW_C_KEY = "pk_shop_c_rotated_0123456789"


@dataclass
class World:
    """Both simulators and the service under test."""

    whiplash: FakeWhiplash
    klaviyo: FakeKlaviyo
    service: Service

    def order(self, cid: int, *, status: int = 300, ago: timedelta = timedelta(minutes=5)) -> int:
        """Create an order for ``cid`` and return its id."""
        order = self.whiplash.create_order(cid, at=datetime.now(UTC) - ago, status=status,
                                           email=f"buyer-{cid}-{time.monotonic_ns()}@example.com")
        return int(order["id"])  # type: ignore[call-overload]

    def has_event(self, label: str, order_id: int, kind: str = "shipped") -> bool:
        """Tell whether the account labelled ``label`` received the order's event."""
        return any(e.unique_id == f"{order_id}:{kind}" for e in self.klaviyo.account(label).events)

    def polls_of(self, cid: int, since: float) -> int:
        """Count Whiplash order requests made for ``cid`` after monotonic time ``since``."""
        log = self.whiplash.counters.log
        return sum(1 for r in log if r.at > since and r.path.startswith("/api/v2/orders")
                   and r.headers.get("x-customer-id") == str(cid))


def yesterday() -> datetime:
    """Return this time yesterday (launch dates before today make customers live)."""
    return datetime.now(UTC) - timedelta(days=1)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Serve the simulators with accounts for A, B and C; the service starts with A and C."""
    whiplash = FakeWhiplash(CLIENT_ID, CLIENT_SECRET)
    klaviyo = FakeKlaviyo()
    for cid, key in KEYS.items():
        whiplash.add_customer(cid)
        klaviyo.add_account(key, label=str(cid))
    launch = yesterday().date()
    async with serve_whiplash(whiplash) as w_url, serve_klaviyo(klaviyo) as k_url:
        service = Service(tmp_path, w_url, k_url, [Shop(A, KEYS[A], launch), Shop(C, KEYS[C], launch)])
        try:
            yield World(whiplash, klaviyo, service)
        finally:
            await service.close()


def no_secret_in(text: str) -> None:
    """Assert no key or client secret appears in ``text``."""
    for secret in (*KEYS.values(), NEW_C_KEY, CLIENT_SECRET):
        assert secret not in text


async def test_notifications_arrive_in_order_and_sigterm_exits_0(world: World) -> None:
    """1. Start with NOTIFY_SOCKET and WATCHDOG_USEC=1 s. 2. Let it sync. 3. SIGTERM.
    Result: READY=1 → STATUS=customers=… → WATCHDOG=1 → STOPPING=1, exit 0, "stopped queued=0"."""
    w, s = world, world.service
    order = w.order(A)
    await s.start(watchdog_usec=1_000_000)
    ready = await s.until_notified("READY=1")
    await s.until("A's event in Klaviyo", lambda: w.has_event(str(A), order))
    await s.until("a per-cycle STATUS", lambda: s.notify.first(lambda m: m.startswith("STATUS=customers=2 ")) >= 0)
    status = s.notify.first(lambda m: m.startswith("STATUS=customers=2 "))
    watchdog = await s.until_notified("WATCHDOG=1", after=status)
    s.send(signal.SIGTERM)
    assert await s.wait_exit(5) == 0
    stopping = s.notify.first(lambda m: "STOPPING=1" in m.splitlines())
    assert 0 <= ready < status < watchdog < stopping
    assert s.notify.count("READY=1") == 1
    assert "queued=0" in s.notify.messages[status]
    assert "SIGTERM received" in s.log
    assert "stopped queued=0" in s.log
    no_secret_in(s.log + "".join(s.notify.messages))


async def test_sigterm_lets_in_flight_sends_finish(world: World) -> None:
    """1. Klaviyo answers every request after 0.7 s. 2. SIGTERM while the first sends are in flight.
    Result: the in-flight work completes (A's event arrives), exit 0 within the grace, "stopped queued=0"."""
    w, s = world, world.service
    order = w.order(A)
    w.klaviyo.delay(0.7)
    await s.start()
    await s.until_notified("READY=1")
    # The poll queued A's rows; the sender is now inside its first (slow) Klaviyo calls.
    await s.until_logged(f"cycle customer={A} orders_read=1")
    assert not w.has_event(str(A), order)
    s.send(signal.SIGTERM)
    started = time.monotonic()
    assert await s.wait_exit(9) == 0
    assert time.monotonic() - started < 20  # shutdown_grace_seconds
    assert w.has_event(str(A), order)
    assert "stopped queued=0" in s.log


async def test_second_sigterm_exits_at_once(world: World) -> None:
    """1. Klaviyo stalls 30 s per request; grace 30 s. 2. SIGTERM, then SIGTERM again.
    Result: exit 0 within ~2 s of the second signal, rows left queued are counted in the log."""
    w, s = world, world.service
    w.order(A)
    w.klaviyo.delay(30)
    s.bridge["shutdown_grace_seconds"] = "30.0"
    await s.start()
    await s.until_notified("READY=1")
    await s.until_logged(f"cycle customer={A} orders_read=1")  # the sender is now stuck in Klaviyo
    s.send(signal.SIGTERM)
    await s.until_logged("SIGTERM received")
    s.send(signal.SIGTERM)
    started = time.monotonic()
    assert await s.wait_exit(5) == 0
    assert time.monotonic() - started < 3
    assert "second SIGTERM: exiting now" in s.log
    queued = int(s.log.split("stopped queued=")[1].split()[0])
    assert queued > 0


async def test_reload_starts_added_and_stops_removed_customers(world: World) -> None:
    """1. Run with A and C. 2. Rewrite the config with A and B (C removed), SIGHUP.
    Result: B's orders reach its Klaviyo account; C stops polling and its new orders are not sent;
    RELOADING=1 then READY=1 are notified; the process keeps running."""
    w, s = world, world.service
    launch = yesterday().date()
    c_before = w.order(C)
    await s.start()
    await s.until("C synced", lambda: w.has_event(str(C), c_before))
    b_order = w.order(B)
    s.write_config([Shop(A, KEYS[A], launch), Shop(B, KEYS[B], launch)])
    s.send(signal.SIGHUP)
    reloading = await s.until_notified("RELOADING=1")
    await s.until_notified("READY=1", after=reloading)
    await s.until("B synced", lambda: w.has_event(str(B), b_order))
    await s.until_logged(f"customer stopped customer={C}")
    stopped_at = time.monotonic()
    c_after = w.order(C)
    a_after = w.order(A)
    await s.until("A still syncing", lambda: w.has_event(str(A), a_after))
    assert w.polls_of(C, stopped_at) == 0
    assert w.polls_of(A, stopped_at) > 0
    assert not w.has_event(str(C), c_after)
    assert "config reloaded customers=2 started=1 stopped=1 restarted=0" in s.log
    assert s.running


async def test_reload_with_a_bad_file_keeps_the_old_config(world: World) -> None:
    """1. Run under journald (JOURNAL_STREAM set) with A and C. 2. Write a config with two problems, SIGHUP.
    Result: one ERROR line (priority <3>, no timestamp) per problem, READY=1 again, still running and syncing A."""
    w, s = world, world.service
    await s.start(journal=True)
    await s.until_notified("READY=1")
    good = s.config_path.read_text()
    s.config_path.write_text(good.replace("poll_interval_seconds = 1.0", "poll_interval_seconds = 0")
                             + "\n[bogus]\nx = 1\n")
    s.send(signal.SIGHUP)
    reloading = await s.until_notified("RELOADING=1")
    ready = await s.until_notified("READY=1", after=reloading)
    assert "reload_failed=2_problems" in s.notify.messages[ready]
    await s.until_logged("config reload failed")
    rejected = [line for line in s.log.splitlines() if "config reload rejected" in line]
    assert len(rejected) == 2
    assert all(line.startswith("<3>klaviyo_bridge.daemon: config reload rejected path=") for line in rejected)
    assert any(line.startswith("<4>klaviyo_bridge.daemon: config reload failed") for line in s.log.splitlines())
    assert any("bridge.poll_interval_seconds" in line for line in rejected)
    assert any("bogus" in line for line in rejected)
    order = w.order(A)
    await s.until("A still syncing", lambda: w.has_event(str(A), order))
    assert s.running


async def test_reload_with_a_new_key_sends_the_queued_rows(world: World) -> None:
    """1. C's key is refused, so its rows queue up. 2. Put a working key in C's key file, SIGHUP.
    Result: C's queued rows go out with the new key, without a restart; no key is ever logged."""
    w, s = world, world.service
    w.klaviyo.revoke(KEYS[C])
    rotated: Account = w.klaviyo.add_account(NEW_C_KEY, label="c-rotated")
    order = w.order(C)
    await s.start()
    await s.until_logged(f"klaviyo key refused customer={C}")
    s.key_file(C).write_text(NEW_C_KEY + "\n")
    s.send(signal.SIGHUP)
    await s.until_logged(f"customer restarting customer={C} reason=settings_changed")
    await s.until("C's queued rows sent with the new key", lambda: w.has_event(rotated.label, order))
    assert "restarted=1" in s.log
    assert s.running
    no_secret_in(s.log)


async def test_exit_codes_bad_config_78_unusable_state_db_1(world: World) -> None:
    """1. Start with an invalid config. 2. Start with a state DB that is not SQLite.
    Result: 78 (RestartPreventExitStatus: no restart loop), then 1 (fatal: systemd restarts), no traceback."""
    s = world.service
    s.config_path.write_text(s.config_text().replace("poll_interval_seconds = 1.0", "poll_interval_seconds = 0"))
    await s.start(write=False)
    assert await s.wait_exit(5) == 78
    assert "config error: bridge.poll_interval_seconds" in s.log
    (s.tmp / "state.db").write_bytes(b"this is not a database\n" * 200)
    await s.start()
    assert await s.wait_exit(5) == 1
    assert "state database unusable" in s.log
    assert "Traceback" not in s.log
    assert s.notify.first(lambda m: "READY=1" in m) == -1
