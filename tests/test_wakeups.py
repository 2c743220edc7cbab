"""A worker's poller woken by webhooks: requests coalesce, and the interval's ticks stay where they were.

The poll cycle itself is replaced by one that records when it starts and takes a set time, so these tests
see the poller's schedule alone (the real poll path is covered end to end in tests/e2e/test_e2e_webhooks.py).
"""

from __future__ import annotations

import asyncio
import time
from datetime import date
from typing import Any, cast

import pytest

from klaviyo_bridge import worker as worker_module
from klaviyo_bridge.config import Settings
from klaviyo_bridge.sync import SyncStats
from klaviyo_bridge.worker import CustomerWorker


@pytest.fixture(autouse=True)
def no_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every poller at its first tick: these tests measure the schedule from there, not the stagger."""
    monkeypatch.setattr(worker_module, "poll_phase", lambda *_: 0.0)


class Timed(CustomerWorker):
    """A worker whose poll cycle records its start (seconds since the poller started) and lasts ``poll_s``."""

    starts: list[float]
    scheduled: list[bool]
    poll_s: float
    origin: float
    polled: asyncio.Event

    async def poll_cycle(self, *, scheduled: bool = True) -> SyncStats:
        """Record the start (and whether it was a scheduled tick), then take ``poll_s`` seconds."""
        self.starts.append(time.monotonic() - self.origin)
        self.scheduled.append(scheduled)
        self.polled.set()
        await asyncio.sleep(self.poll_s)
        return SyncStats()


def timed_worker(interval: float, poll_s: float) -> Timed:
    """Return a worker polling every ``interval`` seconds whose polls take ``poll_s``."""
    settings = Settings.model_validate({
        "bridge": {"state_path": "/tmp/unused.db", "poll_interval_seconds": interval},
        "whiplash": {"client_id": "c", "client_secret": "whiplash-secret"},
        "klaviyo": {"default_profile_email": "ops@example.com"},
        "customers": [{"whiplash_customer_id": 1, "name": "Shop", "klaviyo_api_key": "pk_one_123456",
                       "launch_date": date(2026, 1, 1)}],
    })
    none = cast(Any, None)
    worker = Timed(settings, settings.customers[0], none, none, none)
    worker.starts, worker.scheduled, worker.poll_s = [], [], poll_s
    worker.origin, worker.polled = time.monotonic(), asyncio.Event()
    return worker


async def run_poller(worker: Timed, stop: asyncio.Event) -> asyncio.Task[None]:
    """Start ``worker``'s poller now (its clock starts too) and wait for its first poll to begin."""
    worker.origin = time.monotonic()
    task = asyncio.create_task(worker.run_poller(stop))
    await worker.polled.wait()
    return task


async def test_any_number_of_requests_while_idle_give_one_poll() -> None:
    """1. Interval 60 s, polls of 50 ms; after the first poll, 50 requests at once while idle.
    Result: exactly one more poll; only the first request asked for it (the rest joined it)."""
    worker, stop = timed_worker(60.0, 0.05), asyncio.Event()
    task = await run_poller(worker, stop)
    await asyncio.sleep(0.1)
    asked = [worker.request_poll() for _ in range(50)]
    await asyncio.sleep(0.3)
    stop.set()
    await task
    assert len(worker.starts) == 2
    assert asked == [True] + [False] * 49


async def test_requests_during_a_poll_give_exactly_one_poll_after_it() -> None:
    """1. Polls of 300 ms; 20 requests spread over the first poll. Result: one more poll, right after it."""
    worker, stop = timed_worker(60.0, 0.3), asyncio.Event()
    task = await run_poller(worker, stop)
    for _ in range(20):
        worker.request_poll()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.8)
    stop.set()
    await task
    assert len(worker.starts) == 2
    assert 0.29 <= worker.starts[1] - worker.starts[0] < 0.45


async def test_a_requested_poll_keeps_the_interval_schedule() -> None:
    """1. Interval 1 s, polls of 20 ms. 2. A request at 0.3 s, another at 1.5 s. 3. Watch for 2.2 s.
    Result: polls at 0, 0.3, 1, 1.5 and 2 s: the requested polls are extra, the ticks stay on the 1 s grid
    (a request never pushes the backstop poll later), and only the ticks count as scheduled (the interval achieved
    is measured between them)."""
    worker, stop = timed_worker(1.0, 0.02), asyncio.Event()
    task = await run_poller(worker, stop)
    for at in (0.3, 1.5):
        await asyncio.sleep(max(0.0, at - (time.monotonic() - worker.origin)))
        worker.request_poll()
    await asyncio.sleep(max(0.0, 2.2 - (time.monotonic() - worker.origin)))
    stop.set()
    await task
    expected = [0.0, 0.3, 1.0, 1.5, 2.0]
    assert len(worker.starts) == len(expected), worker.starts
    assert all(abs(got - want) < 0.2 for got, want in zip(worker.starts, expected, strict=True)), worker.starts
    assert worker.scheduled == [True, False, True, False, True]


async def test_a_request_before_the_first_tick_polls_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """1. The customer's phase puts its first tick 30 s away. 2. A request. Result: a poll at once, not counted as
    scheduled (a webhook for a new customer need not wait for its slot of the interval)."""
    monkeypatch.setattr(worker_module, "poll_phase", lambda *_: 30.0)
    worker, stop = timed_worker(60.0, 0.01), asyncio.Event()
    task = asyncio.create_task(worker.run_poller(stop))
    await asyncio.sleep(0.05)
    assert worker.starts == []
    worker.request_poll()
    await asyncio.wait_for(worker.polled.wait(), 1.0)
    stop.set()
    await task
    assert worker.scheduled == [False]


async def test_stop_ends_the_wait_for_a_request() -> None:
    """Result: a poller waiting for its next tick (or a request) ends at once when stopped."""
    worker, stop = timed_worker(60.0, 0.01), asyncio.Event()
    task = await run_poller(worker, stop)
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 1.0)
    assert len(worker.starts) == 1
