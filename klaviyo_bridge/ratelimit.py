"""Client-side rate limiting for one Klaviyo account, per endpoint, below the published limits.

Klaviyo limits every account per endpoint with two *fixed* server windows: a burst window of 1 s and
a steady window of 60 s; crossing either returns 429. We mirror each window with a token bucket whose
refill rate is ``share`` × limit per window and whose capacity is the rest, ``(1 - share)`` × limit
(at least one token, at most limit - 1, so it always refills); tokens are fractional. Why this split:

- Fixed server windows: a bucket admits at most capacity + rate × W requests in *any* interval of
  length W, so in any server window at most (1 - share)·L + share·L = L. A full bucket after an idle
  spell therefore never crosses the line, while sustained throughput is exactly share × L.
- Shared quota: every private-key integration of the merchant draws on the same per-account quota, so
  we leave the rest for them; ``observe`` additionally shrinks our steady bucket when the server's
  ``RateLimit-Remaining`` says others have used more than we assumed.

Invariants:
- ``acquire`` returns only when both buckets of the endpoint hold a whole token and no 429 penalty is
  pending, and then takes one token from each; waiters of one endpoint queue FIFO behind a lock, so a
  refill wakes one waiter rather than a stampede.
- Endpoints and accounts are independent: each ``AccountLimiter`` owns its buckets, and each endpoint
  has its own pair.
- Time comes only from the injected ``clock`` and waiting only from the injected ``sleep``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from .clock import Monotonic

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

BURST_PERIOD = 1.0
STEADY_PERIOD = 60.0
# Float refill arithmetic can land a hair below 1.0 after sleeping exactly the computed wait.
_EPSILON = 1e-9


class Endpoint(StrEnum):
    """The Klaviyo endpoints the bridge calls, each with its own published limits."""

    EVENTS = "POST /api/events"
    PROFILE_IMPORT = "POST /api/profile-import"
    LISTS_READ = "GET /api/lists"
    LISTS_CREATE = "POST /api/lists"
    LIST_ADD = "POST /api/lists/{id}/relationships/profiles"
    BULK_EVENTS = "POST /api/event-bulk-create-jobs"
    BULK_PROFILES = "/api/profile-bulk-import-jobs"


class Limit(NamedTuple):
    """Published limits of one endpoint: requests per burst (1 s) and per steady (60 s) window."""

    burst: int
    steady: int


# x-klaviyo-ratelimit of the 2026-07-15 spec (LISTS_CREATE also has a 150/day cap we do not model).
LIMITS: Mapping[Endpoint, Limit] = {
    Endpoint.EVENTS: Limit(350, 3500),
    Endpoint.PROFILE_IMPORT: Limit(75, 750),
    Endpoint.LISTS_READ: Limit(75, 750),
    Endpoint.LISTS_CREATE: Limit(10, 150),
    Endpoint.LIST_ADD: Limit(10, 150),
    Endpoint.BULK_EVENTS: Limit(10, 150),
    Endpoint.BULK_PROFILES: Limit(10, 150),
}


@dataclass(slots=True)
class _Bucket:
    """A token bucket with fractional tokens and continuous refill."""

    capacity: float
    rate: float  # tokens gained per second
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        """Add the tokens accrued since the last refill, up to capacity."""
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.stamp = max(self.stamp, now)

    def wait(self) -> float:
        """Return seconds until a whole token is available (0 if one is)."""
        missing = 1.0 - self.tokens
        return 0.0 if missing <= _EPSILON else missing / self.rate


@dataclass(slots=True)
class _Lane:
    """Both buckets, the 429 penalty and the waiters' lock of one endpoint."""

    burst: _Bucket
    steady: _Bucket
    blocked_until: float = -math.inf
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def refill(self, now: float) -> None:
        """Bring both buckets up to ``now``."""
        self.burst.refill(now)
        self.steady.refill(now)

    def wait(self, now: float) -> float:
        """Return seconds until a request may go (0 if it may go now)."""
        return max(self.burst.wait(), self.steady.wait(), self.blocked_until - now, 0.0)

    def take(self) -> None:
        """Spend one token from each bucket."""
        self.burst.tokens -= 1.0
        self.steady.tokens -= 1.0


def _bucket(share: float, limit: int, period: float, now: float) -> _Bucket:
    """Build a full bucket that refills ``share`` of ``limit`` per period and holds the rest."""
    # At most limit - 1: a share too small to show in (1 - share) × limit would otherwise leave no refill at all.
    capacity = float(max(1, min(limit - 1, math.floor((1.0 - share) * limit + _EPSILON))))
    # At share ≈ 1 the one-token floor would allow L + 1 per window; trim the rate to keep C + rate·W ≤ L.
    rate = min(share * limit, limit - capacity) / period
    return _Bucket(capacity=capacity, rate=rate, tokens=capacity, stamp=now)


def _header(headers: Mapping[str, str], name: str) -> float | None:
    """Return a numeric header, looked up case-insensitively; None if absent or not a number."""
    raw = headers.get(name)
    if raw is None:
        lowered = name.lower()
        raw = next((v for k, v in headers.items() if k.lower() == lowered), None)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


class AccountLimiter:
    """Pace requests to one Klaviyo account (one merchant) at ``share`` of each endpoint's limits."""

    def __init__(self, share: float, *, clock: Monotonic = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self._share = share
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._lanes = {endpoint: self._new_lane(limit, now) for endpoint, limit in LIMITS.items()}

    def __repr__(self) -> str:
        return f"AccountLimiter(share={self._share})"

    def _new_lane(self, limit: Limit, now: float) -> _Lane:
        """Build a lane whose buckets start full."""
        return _Lane(
            burst=_bucket(self._share, limit.burst, BURST_PERIOD, now),
            steady=_bucket(self._share, limit.steady, STEADY_PERIOD, now),
        )

    async def acquire(self, endpoint: Endpoint) -> None:
        """Wait until ``endpoint`` may be called, then spend one token of each window."""
        lane = self._lanes[endpoint]
        async with lane.lock:
            while True:
                now = self._clock()
                lane.refill(now)
                delay = lane.wait(now)
                if delay <= 0.0:
                    lane.take()
                    return
                # Re-check after waking: observe() or penalize() may have changed the lane meanwhile.
                await self._sleep(delay)

    def observe(self, endpoint: Endpoint, headers: Mapping[str, str]) -> None:
        """Shrink the steady bucket when the server reports less quota left than we hold."""
        remaining = _header(headers, "RateLimit-Remaining")
        if remaining is None:
            return
        lane = self._lanes[endpoint]
        now = self._clock()
        lane.refill(now)
        reset = _header(headers, "RateLimit-Reset")
        # Until the server window resets only `remaining` more requests succeed, and our bucket keeps
        # refilling meanwhile; start it that much lower (possibly negative) so the two together grant
        # no more than `remaining` before the reset.
        allowed = remaining - (reset * lane.steady.rate if reset is not None else 0.0)
        if allowed < lane.steady.tokens:
            log.debug(
                "klaviyo quota lower than assumed endpoint=%s remaining=%s reset=%s tokens=%.1f",
                endpoint.name, remaining, reset, lane.steady.tokens,
            )
            lane.steady.tokens = allowed

    def penalize(self, endpoint: Endpoint, seconds: float) -> None:
        """Block ``endpoint`` for ``seconds`` from now (after a 429 with a retry hint)."""
        lane = self._lanes[endpoint]
        lane.blocked_until = max(lane.blocked_until, self._clock() + max(0.0, seconds))
        log.debug("klaviyo endpoint penalized endpoint=%s seconds=%.3f", endpoint.name, seconds)
