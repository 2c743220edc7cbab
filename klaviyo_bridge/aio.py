"""Small asyncio helpers shared by the daemon, the workers and delivery.

Invariants: none of them swallows cancellation; ``together`` never leaves a sibling running after one failed
(a row must never be in two requests at once); ``guarded`` turns a failed cycle into one logged line so a
loop survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
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
