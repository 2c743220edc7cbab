"""The Whiplash request budget: one limit for every request the process makes, whoever makes it.

The 3PL runs one Whiplash OAuth application for all its merchants, so Whiplash limits the application, not
the merchant: every poll, backfill page, reconcile sweep, resync and token request of every customer spends
the same budget. ``WhiplashBudget`` is that budget, shared by the whole process:

- at most ``per_second`` requests start in any interval of one second (a log of the last start times, plus a
  small margin so that network jitter cannot crowd two seconds' worth into one of Whiplash's fixed windows),
  and at most ``concurrent`` are in flight;
- waiting requests are served by lane, then in arrival order: token requests first (everyone needs one), then
  live polls, then background reads (backfill, catch-up, reconcile sweeps, resync), so a big merchant's
  onboarding never delays another merchant's "Order shipped". Only when live polls alone would use the whole
  budget does one start in ``BACKGROUND_EVERY`` go to a background read, so an onboarding still ends;
- while the rate limit holds a queue back, its waiters go in groups (as many as wait, up to ``concurrent``) as
  their slots open: the same rate, but one wake-up of the process per group, not per request;
- a 429 slows everyone: nobody starts a request until its Retry-After (at most ``MAX_PAUSE_S``; without one,
  one whole window) has passed, and the
  per-second limit halves, growing back by one each ``RECOVERY_S`` without a 429 (additive increase,
  multiplicative decrease: what TCP does when the path is shared and its capacity unknown).

Invariants: a slot is granted only while both limits allow it; a waiter cancelled before or after its grant
never leaks a slot; time comes only from the injected clock and timers from the running loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from enum import IntEnum

from .clock import Monotonic

log = logging.getLogger(__name__)

WINDOW_S = 1.0
# Start times are ours, arrival times Whiplash's; this much slack per window absorbs the difference.
JITTER_MARGIN_S = 0.03
# Without a Retry-After, a 429 blocks one whole fixed window: the soonest a new window can open.
DEFAULT_PAUSE_S = 1.0
RECOVERY_S = 10.0
# A Retry-After beyond this (a bogus or hostile header) pauses the whole process no longer than this.
MAX_PAUSE_S = 120.0
BACKGROUND_EVERY = 10  # while live polls queue, every 10th start goes to a waiting background read
USAGE_WINDOW_S = 10.0  # requests/s is reported as an average over this many seconds
TIMER_SLACK_S = 0.001  # a grant timer this close to a new reckoning is kept, not re-armed


class Lane(IntEnum):
    """Who is waiting, in the order they are served."""

    TOKEN = 0
    LIVE = 1
    BACKGROUND = 2



def round_seconds(customers: int, per_second: float, interval: float) -> float:
    """Return how long one round of polls takes: the interval, or longer when the budget cannot poll every
    customer once per interval (then rounds lengthen evenly, to customers ÷ budget)."""
    return max(interval, customers / per_second)


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """What the budget is doing now, for ``status``, the metrics and systemd's STATUS= line."""

    limit_per_s: int  # the configured limit
    effective_per_s: int  # lower than the limit for a while after a 429
    requests_per_s: float  # started over the last USAGE_WINDOW_S, averaged
    in_flight: int
    waiting: dict[Lane, int]
    throttled: int  # 429s seen since start
    paused_s: float  # seconds until requests may start again after a 429 (0 when not paused)

    def as_json(self) -> dict[str, object]:
        """Return the usage as a JSON-ready dict (``status`` reads it from the state DB)."""
        return {
            "limit_per_s": self.limit_per_s,
            "effective_per_s": self.effective_per_s,
            "requests_per_s": round(self.requests_per_s, 2),
            "in_flight": self.in_flight,
            "waiting": {lane.name.lower(): n for lane, n in self.waiting.items()},
            "throttled": self.throttled,
            "paused_s": round(self.paused_s, 2),
        }

    def status_text(self) -> str:
        """Return the budget in a few words for systemd's STATUS= line."""
        waiting = sum(self.waiting.values())
        return f"whiplash={self.requests_per_s:.1f}/{self.effective_per_s}rps waiting={waiting}"


class Slot:
    """``async with budget.slot(lane)``: a plain class, not a generator-based context manager, because every
    Whiplash request of every customer makes one."""

    __slots__ = ("_budget", "_lane")

    def __init__(self, budget: WhiplashBudget, lane: Lane) -> None:
        self._budget = budget
        self._lane = lane

    async def __aenter__(self) -> None:
        await self._budget.acquire(self._lane)

    async def __aexit__(self, *exc: object) -> None:
        self._budget.release()


class WhiplashBudget:
    """At most ``per_second`` request starts per second and ``concurrent`` in flight, for the whole process."""

    def __init__(self, per_second: int, concurrent: int, *, clock: Monotonic = time.monotonic) -> None:
        if per_second < 1 or concurrent < 1:
            raise ValueError(f"per_second and concurrent must be >= 1, got {per_second}, {concurrent}")
        self.limit = per_second
        self.concurrent = concurrent
        self._clock = clock
        self._effective = per_second
        self._starts: deque[float] = deque()  # start times inside the rate window, oldest first
        self._recent: deque[float] = deque()  # start times inside USAGE_WINDOW_S, for the reported rate
        self._queues: dict[Lane, deque[asyncio.Future[None]]] = {lane: deque() for lane in Lane}
        self._live_in_a_row = 0  # live starts since the last background one, while background reads waited
        self._in_flight = 0
        self._paused_until = -math.inf
        self._last_throttle = -math.inf
        self._throttled = 0
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"WhiplashBudget(per_second={self.limit}, concurrent={self.concurrent})"

    def slot(self, lane: Lane) -> Slot:
        """Hold one request slot of ``lane`` for the duration of an ``async with`` block."""
        return Slot(self, lane)

    def throttled(self, retry_after: float | None) -> None:
        """Record a 429: pause every lane until ``retry_after`` (or one window) and halve the rate."""
        now = self._clock()
        self._throttled += 1
        pause = DEFAULT_PAUSE_S if retry_after is None else min(retry_after, MAX_PAUSE_S)
        self._paused_until = max(self._paused_until, now + pause)
        self._last_throttle = now
        before, self._effective = self._effective, max(1, self._effective // 2)
        log.debug("whiplash budget throttled per_s=%d->%d pause_s=%.2f", before, self._effective,
                  self._paused_until - now)

    def usage(self) -> BudgetUsage:
        """Return the budget's current use."""
        now = self._clock()
        self._recover(now)
        self._forget_before(now)
        waiting = {lane: sum(not f.done() for f in queue) for lane, queue in self._queues.items()}
        return BudgetUsage(
            limit_per_s=self.limit,
            effective_per_s=self._effective,
            requests_per_s=len(self._recent) / USAGE_WINDOW_S,
            in_flight=self._in_flight,
            waiting=waiting,
            throttled=self._throttled,
            paused_s=max(0.0, self._paused_until - now),
        )

    # -- granting -------------------------------------------------------------------------------------------

    async def acquire(self, lane: Lane) -> None:
        """Wait for a slot (``slot`` pairs it with ``release``); a cancelled waiter gives back a slot it was granted
        meanwhile."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues[lane].append(future)
        self._grant()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted, then cancelled before it could use the slot
            raise

    def release(self) -> None:
        """Give back a slot ``acquire`` granted and let the next waiter go."""
        self._in_flight -= 1
        self._grant()

    def _grant(self) -> None:
        """Grant slots to waiters, in lane order, while both limits allow; else wake up when they will."""
        while self._in_flight < self.concurrent and self._someone_waits():
            now = self._clock()
            if self._wait(now) > 0.0:
                self._wake_in(self._wait(now, self._group()))
                return
            self._in_flight += 1
            self._starts.append(now)
            self._recent.append(now)
            self._next_queue().popleft().set_result(None)

    def _someone_waits(self) -> bool:
        """Drop waiters cancelled while queued; tell whether anyone is left."""
        for queue in self._queues.values():
            while queue and queue[0].done():
                queue.popleft()
        return any(self._queues.values())

    def _next_queue(self) -> deque[asyncio.Future[None]]:
        """Return the non-empty queue whose head starts next."""
        queues = self._queues  # by name, not by iterating the enum: this runs for every request
        token, live, background = queues[Lane.TOKEN], queues[Lane.LIVE], queues[Lane.BACKGROUND]
        if token:
            return token
        if live and background:
            self._live_in_a_row += 1
            if self._live_in_a_row >= BACKGROUND_EVERY:
                self._live_in_a_row = 0
                return background
        return live or background

    def _group(self) -> int:
        """Return how many waiters the rate limit should let go together: as many as wait, up to the concurrency.

        Granted one by one as each start leaves the window, a queue of polls costs the process one wake-up (and a
        cold start of the interpreter's caches) per request; granted together, the same starts cost one per group,
        at the same rate: the group's last slot opens no later than it would have one by one.
        """
        waiting = sum(len(queue) for queue in self._queues.values())
        return max(1, min(waiting, self.concurrent, self._effective))

    def _wait(self, now: float, starts: int = 1) -> float:
        """Return seconds until ``starts`` more requests may start (0: now)."""
        self._recover(now)
        self._forget_before(now)
        pause = self._paused_until - now
        starts = min(starts, self._effective)
        if len(self._starts) + starts <= self._effective:
            return max(0.0, pause)
        # The oldest starts that still count must leave the window (plus the margin) first.
        oldest = self._starts[len(self._starts) - self._effective + starts - 1]
        return max(pause, oldest + WINDOW_S + JITTER_MARGIN_S - now, 0.0)

    def _forget_before(self, now: float) -> None:
        """Drop start times that no longer count."""
        while self._starts and self._starts[0] <= now - WINDOW_S - JITTER_MARGIN_S:
            self._starts.popleft()
        while self._recent and self._recent[0] <= now - USAGE_WINDOW_S:
            self._recent.popleft()

    def _recover(self, now: float) -> None:
        """Grow the rate back by one per RECOVERY_S without a 429, up to the limit."""
        if self._effective >= self.limit:
            return
        steps = int((now - self._last_throttle) // RECOVERY_S)
        if steps > 0:
            self._effective = min(self.limit, self._effective + steps)
            self._last_throttle += steps * RECOVERY_S

    def _wake_in(self, seconds: float) -> None:
        """Run ``_grant`` again in ``seconds`` (one timer at a time, for the latest reckoning: the group it waits for
        may have grown since it was set)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds
        if self._timer is not None and not self._timer.cancelled() and abs(self._timer.when() - when) < TIMER_SLACK_S:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._grant()
