"""The one fake clock of the test suites: time moves when a test (or someone sleeping on it) moves it.

It reads as seconds (``clock()``/calling it: a monotonic or epoch clock) or as an aware UTC datetime (``utc()``:
a wall clock), so one object serves the limiter, the clients, the simulators and the in-process workers.
``real_time=True`` starts from the real time and keeps flowing with it (for tests beside real HTTP traffic),
offset by whatever ``advance`` added.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta


class FakeClock:
    """Seconds that move only when told (or flow with real time plus an offset); every sleep is recorded."""

    def __init__(self, start: float = 0.0, *, real_time: bool = False) -> None:
        self._start = start
        self._real_time = real_time
        self._offset = 0.0
        self.sleeps: list[float] = []

    @property
    def now(self) -> float:
        """Return the current fake time in seconds."""
        return (time.time() if self._real_time else self._start) + self._offset

    @now.setter
    def now(self, value: float) -> None:
        self._offset = value - (time.time() if self._real_time else self._start)

    def __call__(self) -> float:
        """Return the current fake time in seconds (so the clock itself is a ``Monotonic``/``Epoch``)."""
        return self.now

    def clock(self) -> float:
        """Return the current fake time in seconds."""
        return self.now

    def utc(self) -> datetime:
        """Return the current fake time as an aware UTC datetime (a ``WallClock``)."""
        return datetime.fromtimestamp(self.now, UTC)

    def advance(self, by: float | timedelta) -> None:
        """Move the clock forward."""
        self._offset += by.total_seconds() if isinstance(by, timedelta) else by

    async def sleep(self, seconds: float) -> None:
        """Advance the clock instead of waiting, and let other tasks run."""
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
