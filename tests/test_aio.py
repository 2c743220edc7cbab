"""The waits the workers' loops are made of: ``wait_set`` (a future and a timer) and ``relay`` (stop reaches them)."""

from __future__ import annotations

import asyncio
import time

import pytest

from klaviyo_bridge.aio import relay, wait_set


async def test_wait_set_rings_when_the_time_runs_out() -> None:
    event = asyncio.Event()
    started = time.monotonic()
    assert await wait_set(event, 0.05) is True
    assert time.monotonic() - started >= 0.05
    assert event.is_set()  # the caller clears it when it acts


async def test_wait_set_returns_at_once_when_set_meanwhile_and_leaves_no_timer() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.02, event.set)
    started = time.monotonic()
    assert await wait_set(event, 5.0) is False
    assert time.monotonic() - started < 1.0
    event.clear()
    await asyncio.sleep(0.05)
    assert not event.is_set()  # the cancelled timer never rings later


async def test_wait_set_without_a_time_waits_for_the_event_alone() -> None:
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_set(event, None))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    event.set()
    assert await waiter is False


async def test_wait_set_already_set_or_out_of_time_does_not_wait() -> None:
    event = asyncio.Event()
    event.set()
    assert await asyncio.wait_for(wait_set(event, 5.0), 1.0) is False
    assert await asyncio.wait_for(wait_set(asyncio.Event(), -3.0), 1.0) is True


async def test_relay_sets_every_event_when_stop_is_set() -> None:
    stop, first, second = asyncio.Event(), asyncio.Event(), asyncio.Event()
    async with relay(stop, first, second):
        waiter = asyncio.create_task(wait_set(first, None))
        await asyncio.sleep(0.02)
        assert not waiter.done()
        stop.set()
        assert await asyncio.wait_for(waiter, 1.0) is False
        assert second.is_set()


async def test_relay_ends_with_its_block() -> None:
    stop, event = asyncio.Event(), asyncio.Event()
    async with relay(stop, event):
        pass
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "relay-stop"]
    stop.set()
    await asyncio.sleep(0.01)
    assert not event.is_set()  # after the block, stopping no longer reaches the event


async def test_relay_does_not_swallow_the_callers_cancellation() -> None:
    stop, event = asyncio.Event(), asyncio.Event()

    async def waits() -> None:
        async with relay(stop, event):
            await wait_set(event, None)

    task = asyncio.create_task(waits())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "relay-stop"]
