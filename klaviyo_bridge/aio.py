"""Small asyncio helpers shared by the daemon, the workers and delivery.

Invariants: none of them swallows cancellation; ``together`` never leaves a sibling running after one failed
(a row must never be in two requests at once); ``guarded`` turns a failed cycle into one logged line so a
loop survives; ``relay`` never outlives its block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


async def guarded(coro: Awaitable[T], what: str) -> T | None:
    """Run one cycle, logging (not raising) anything unexpected so the loop survives."""
    try:
        return await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error in %s; continuing next cycle", what)
        return None


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep up to ``seconds``, returning early when ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))


async def wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float | None) -> None:
    """Sleep until ``stop`` or ``wake`` is set, or ``seconds`` pass."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def wait_set(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait until ``event`` is set, setting it after ``seconds`` (None: never) if nothing else has; return True
    when the time ran out (the caller clears the event when it acts on it).

    One future and one timer per wait, where ``wait_any`` starts two tasks and cancels them again: what a
    thousand idle loops would pay on every tick. Pair it with ``relay`` so that stopping still ends the wait.
    """
    rang = False

    def ring() -> None:
        nonlocal rang
        rang = True
        event.set()

    timer = None if seconds is None else asyncio.get_running_loop().call_later(max(0.0, seconds), ring)
    try:
        await event.wait()
    finally:
        if timer is not None:
            timer.cancel()
    return rang


@contextlib.asynccontextmanager
async def relay(stop: asyncio.Event, *events: asyncio.Event) -> AsyncIterator[None]:
    """Set ``events`` once ``stop`` is set, for the duration of the block (one task for the block's whole life)."""

    async def forward() -> None:
        await stop.wait()
        for event in events:
            event.set()

    task = asyncio.create_task(forward(), name="relay-stop")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])  # raises nothing of the task's; the caller's own cancellation still does


async def together(*coros: Awaitable[T]) -> list[T]:
    """Await coroutines concurrently; if one fails, cancel and wait out the rest before raising its error.

    Plain ``asyncio.gather`` would leave the siblings running after the first failure (e.g. a disk-full mark),
    sending rows while the caller already retries them: a row could then be in two requests at once.
    """
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
