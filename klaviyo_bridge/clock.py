"""The two clocks the bridge reads, named apart, and the one function that reads the wall clock.

Everything that needs time takes a clock as an argument (tests pass fake ones); these are the defaults.
- ``WallClock`` gives aware UTC datetimes: what is stored, sent and shown.
- ``Monotonic`` gives seconds that never go backwards: what waits, rate limits and watchdogs measure with.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

WallClock = Callable[[], datetime]
Monotonic = Callable[[], float]
Epoch = Callable[[], float]  # seconds since 1970 (time.time): compared with expiry times a server hands out


def utcnow() -> datetime:
    """Return the current time, aware, in UTC."""
    return datetime.now(UTC)
