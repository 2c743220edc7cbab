"""The process's one Whiplash budget: rate, concurrency, lanes, 429s, cancellation (klaviyo_bridge.budget).

These run on the real event loop clock with small limits: they check which requests start and when relative to
each other (counts per one-second interval), never how fast anything is.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from kit.fakeclock import FakeClock

from klaviyo_bridge import budget as budget_module
from klaviyo_bridge.budget import Lane, WhiplashBudget


def max_in_any_window(starts: list[float], window: float = 1.0) -> int:
    """Return the most start times found in any interval [t, t + window)."""
    ordered = sorted(starts)
    return max((sum(1 for u in ordered if t <= u < t + window) for t in ordered), default=0)


async def spend(budget: WhiplashBudget, lane: Lane, starts: list[float], hold: float = 0.0) -> None:
    """Take one slot, note when it started, hold it ``hold`` seconds."""
    async with budget.slot(lane):
        starts.append(time.monotonic())
        await asyncio.sleep(hold)


async def test_many_customers_share_one_limit() -> None:
    """1. One budget of 4/s; three "customers" each make 6 requests at once (18 in all).
    Result: every request runs, and no interval of one second holds more than 4 starts, whoever made them."""
    budget = WhiplashBudget(4, 4)
    starts: dict[int, list[float]] = {cid: [] for cid in (1, 2, 3)}
    await asyncio.gather(*(spend(budget, Lane.LIVE, starts[cid]) for cid in starts for _ in range(6)))
    everyone = [t for times in starts.values() for t in times]
    assert len(everyone) == 18
    assert max_in_any_window(everyone) == 4
    assert all(max_in_any_window(times) <= 4 for times in starts.values())


async def test_concurrency_is_bounded() -> None:
    """1. A budget of 100/s but 2 at a time; 8 requests that each take 50 ms. Result: never more than 2 in flight."""
    budget = WhiplashBudget(100, 2)
    in_flight = peak = 0

    async def one() -> None:
        nonlocal in_flight, peak
        async with budget.slot(Lane.LIVE):
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1

    await asyncio.gather(*(one() for _ in range(8)))
    assert peak == 2
    assert budget.usage().in_flight == 0


async def test_a_queue_under_the_rate_limit_starts_in_groups_at_the_same_rate() -> None:
    """1. Budget 4/s, 2 at a time; four requests start 0.1 s apart (the window fills). 2. Four more queue at once.
    Result: they start in two pairs (each pair together: one wake-up per pair, not per request), the last no later
    than one by one would have let it, and no interval of one second holds more than 4 starts."""
    budget = WhiplashBudget(4, 2)
    starts: list[float] = []
    for _ in range(4):
        await spend(budget, Lane.LIVE, starts)
        await asyncio.sleep(0.1)
    first = starts[0]
    queued: list[float] = []
    await asyncio.gather(*(spend(budget, Lane.LIVE, queued) for _ in range(4)))
    queued.sort()
    assert queued[1] - queued[0] < 0.02  # a pair
    assert queued[3] - queued[2] < 0.02
    assert queued[2] - queued[1] > 0.1  # the second pair waited for its own two slots
    one_by_one_last = first + 0.3 + budget_module.WINDOW_S + budget_module.JITTER_MARGIN_S
    assert queued[3] <= one_by_one_last + 0.05
    assert max_in_any_window(starts + queued) == 4


async def test_live_goes_before_background_and_tokens_before_both() -> None:
    """1. Budget 1 at a time; hold the slot. 2. Queue 3 background reads, then 2 live polls, then a token request.
    3. Release. Result: the token first, then the live polls, then the background reads, each lane in arrival order."""
    budget = WhiplashBudget(1000, 1)
    order: list[str] = []
    gate = asyncio.Event()

    async def holder() -> None:
        async with budget.slot(Lane.LIVE):
            await gate.wait()

    async def one(name: str, lane: Lane) -> None:
        async with budget.slot(lane):
            order.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(one(f"bg{i}", Lane.BACKGROUND)) for i in range(3)]
    tasks += [asyncio.create_task(one(f"live{i}", Lane.LIVE)) for i in range(2)]
    tasks.append(asyncio.create_task(one("token", Lane.TOKEN)))
    await asyncio.sleep(0.01)
    assert budget.usage().waiting == {Lane.TOKEN: 1, Lane.LIVE: 2, Lane.BACKGROUND: 3}
    gate.set()
    await asyncio.gather(first, *tasks)
    assert order == ["token", "live0", "live1", "bg0", "bg1", "bg2"]


async def test_background_still_moves_while_live_polls_queue() -> None:
    """1. Budget 1 at a time; 25 live polls and 2 background reads wait. Result: one start in BACKGROUND_EVERY goes
    to a background read (an onboarding never starves), the rest to live polls in order."""
    budget = WhiplashBudget(1000, 1)
    order: list[str] = []
    gate = asyncio.Event()

    async def holder() -> None:
        async with budget.slot(Lane.LIVE):
            await gate.wait()

    async def one(name: str, lane: Lane) -> None:
        async with budget.slot(lane):
            order.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(one("bg", Lane.BACKGROUND)) for _ in range(2)]
    tasks += [asyncio.create_task(one(f"live{i}", Lane.LIVE)) for i in range(25)]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(first, *tasks)
    every = budget_module.BACKGROUND_EVERY
    assert [i for i, name in enumerate(order) if name == "bg"] == [every - 1, 2 * every - 1]
    assert [name for name in order if name != "bg"] == [f"live{i}" for i in range(25)]


async def test_a_429_pauses_everyone_and_halves_the_rate() -> None:
    """1. Budget 8/s. 2. A 429 with Retry-After 0.4 s. 3. Requests of two lanes. Result: none starts before 0.4 s have
    passed; the effective rate is 4/s (no second holds more than 4 starts); usage counts the 429."""
    budget = WhiplashBudget(8, 8)
    throttled_at = time.monotonic()
    budget.throttled(0.4)
    usage = budget.usage()
    assert (usage.effective_per_s, usage.throttled) == (4, 1)
    assert 0.3 < usage.paused_s <= 0.4
    starts: list[float] = []
    await asyncio.gather(*(spend(budget, lane, starts) for lane in (Lane.LIVE, Lane.BACKGROUND) for _ in range(5)))
    assert min(starts) - throttled_at >= 0.4 - 0.01  # the loop's timer may fire a hair early
    assert max_in_any_window(starts) == 4


def test_the_rate_grows_back_one_step_per_quiet_period() -> None:
    """1. Budget 10/s, two 429s (10 → 5 → 2). 2. Time passes without a 429. Result: +1 per RECOVERY_S, up to 10.
    A Retry-After of an hour pauses no longer than MAX_PAUSE_S."""
    clock = FakeClock(1000.0)
    budget = WhiplashBudget(10, 4, clock=clock)
    budget.throttled(None)
    budget.throttled(3600.0)
    assert budget.usage().effective_per_s == 2
    assert budget.usage().paused_s == budget_module.MAX_PAUSE_S
    clock.advance(budget_module.RECOVERY_S * 3 + 1)
    assert budget.usage().effective_per_s == 5
    clock.advance(budget_module.RECOVERY_S * 100)
    assert budget.usage().effective_per_s == 10
    assert budget.usage().paused_s == 0.0


async def test_a_cancelled_waiter_never_leaks_a_slot() -> None:
    """1. Budget 1 at a time, held. 2. A waiter is cancelled while queued; another is granted and cancelled before
    it runs. Result: later requests still get the slot (nothing is left counted in flight)."""
    budget = WhiplashBudget(1000, 1)
    gate = asyncio.Event()

    async def holder() -> None:
        async with budget.slot(Lane.LIVE):
            await gate.wait()

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    queued = asyncio.create_task(spend(budget, Lane.LIVE, []))
    granted = asyncio.create_task(spend(budget, Lane.LIVE, []))
    await asyncio.sleep(0.01)
    queued.cancel()
    gate.set()
    await first
    granted.cancel()  # its future is already resolved: the slot it was handed must come back
    await asyncio.gather(queued, granted, return_exceptions=True)
    assert budget.usage().in_flight == 0
    starts: list[float] = []
    await asyncio.wait_for(asyncio.gather(*(spend(budget, Lane.LIVE, starts) for _ in range(3))), timeout=5)
    assert len(starts) == 3


def test_usage_reports_the_recent_rate() -> None:
    """Requests/s is the number of starts over the last USAGE_WINDOW_S divided by it."""
    clock = FakeClock(50.0)
    budget = WhiplashBudget(10, 4, clock=clock)
    assert budget.usage().requests_per_s == 0.0

    async def five() -> None:
        for _ in range(5):
            async with budget.slot(Lane.LIVE):
                pass

    asyncio.run(five())
    assert budget.usage().requests_per_s == pytest.approx(5 / budget_module.USAGE_WINDOW_S)
    clock.advance(budget_module.USAGE_WINDOW_S + 0.1)
    assert budget.usage().requests_per_s == 0.0


def test_limits_must_be_positive() -> None:
    """A budget of 0 requests/s or 0 in flight could never serve anything: refused."""
    with pytest.raises(ValueError, match="must be >= 1"):
        WhiplashBudget(0, 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        WhiplashBudget(4, 0)
