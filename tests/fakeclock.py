"""A fake clock for limiter and client tests: time moves only when someone sleeps on it."""

from __future__ import annotations

import asyncio


class FakeTime:
    """A clock that only moves when someone sleeps on it; records every sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        """Return the current fake time."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Advance the clock instead of waiting, and let other tasks run."""
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)
