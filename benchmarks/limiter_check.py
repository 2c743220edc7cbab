"""Limiter utilisation: the bridge's client saturating one endpoint against FakeKlaviyo's fixed windows.

Server and limiter share one fake clock that only the limiter's sleeps advance, so three simulated minutes
take about a second, and one sequential caller makes each request reach the server at exactly the time the
limiter granted it. Reported per endpoint: the least-used whole server minute as a share of
``share × steady limit`` (target ≥ 95 %) and the 429s the server answered (target 0).
(tests/test_ratelimit.py asserts the same, plus the case of another integration spending the quota.)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

import aiohttp
from common import SHARE, klaviyo_sim
from pydantic import SecretStr

from klaviyo_bridge.klaviyo import KlaviyoClient
from klaviyo_bridge.ratelimit import LIMITS, STEADY_PERIOD, AccountLimiter, Endpoint
from klaviyo_bridge.sandbox.klaviyo import serve_klaviyo

KEY = "pk_limiter_0123456789abcdef"


class FakeClock:
    """Seconds since ``start`` for the limiter (small floats keep sub-token waits exact); epoch for the server."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.elapsed = 0.0

    def epoch(self) -> float:
        return self.start + self.elapsed

    def since_start(self) -> float:
        return self.elapsed

    async def sleep(self, seconds: float) -> None:
        self.elapsed += max(0.0, seconds)
        await asyncio.sleep(0)


async def saturate(endpoint: Endpoint, share: float, minutes: int = 3) -> tuple[list[int], int]:
    """Call ``endpoint`` back to back for ``minutes``; return the whole server minutes' counts and the 429s."""
    clock = FakeClock(math.floor(time.time() / STEADY_PERIOD) * STEADY_PERIOD + 17.3)
    fake = klaviyo_sim(clock=clock.epoch, seed=9)
    account = fake.add_account(KEY, label="limits")
    limiter = AccountLimiter(share, clock=clock.since_start, sleep=clock.sleep)
    stamps: list[float] = []
    async with serve_klaviyo(fake) as url, aiohttp.ClientSession() as session:
        client = KlaviyoClient(session, base_url=url, revision="2026-07-15", api_key=SecretStr(KEY),
                               limiter=limiter, max_tries=1)
        while clock.elapsed < minutes * STEADY_PERIOD:
            await call(client, endpoint, len(stamps))
            stamps.append(clock.epoch())
    per_minute = Counter(math.floor(t / STEADY_PERIOD) for t in stamps)
    whole = [per_minute[k] for k in range(min(per_minute) + 1, max(per_minute))]
    return whole, account.counters.throttled


async def call(client: KlaviyoClient, endpoint: Endpoint, n: int) -> None:
    """Make the n-th call: a profile upsert, or a one-event bulk request."""
    email = f"p{n}@example.com"
    if endpoint is Endpoint.PROFILE_IMPORT:
        await client.import_profile({"email": email})
        return
    event = {"email": email, "metric": "Order shipped", "unique_id": f"{n}:shipped", "backfill": True,
             "properties": {"OrderId": str(n)}}
    await client.create_events_bulk([event])


async def utilisation(share: float = SHARE) -> list[tuple[str, float, int]]:
    """Return (endpoint, least whole-minute utilisation of share × limit, 429s) for bulk events and profiles."""
    results = []
    for endpoint in (Endpoint.BULK_EVENTS, Endpoint.PROFILE_IMPORT):
        minutes, throttled = await saturate(endpoint, share)
        results.append((endpoint.value, min(minutes) / (share * LIMITS[endpoint].steady), throttled))
    return results
