"""Webhook latency: the real daemon polling every 120 s, woken by the simulated Whiplash's signed webhooks.

200 orders ship at random moments over a minute, each change followed by its ``order.shipped`` webhook; the
figure is, per change, the time from the webhook's arrival at the daemon's receiver to the event recorded in
the simulated Klaviyo (``klaviyo_bridge.demo.webhook_latencies``, the demo's own measure). The minute ends long
before the first backstop poll (120 s after the first one), so every event was fetched by a woken poll.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from common import CLIENT_SECRET, Bench, Customer, bench, klaviyo_sim, pct, seed_backfill
from scenarios import KEY, Row, until

from klaviyo_bridge.demo import webhook_latencies

PATH = "/whiplash/webhook"


def free_port() -> int:
    """Return a loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def hooked_daemon(b: Bench, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run the long-running daemon with its webhook receiver on ``port``; SIGTERM it on the way out."""
    b.write_config()
    with b.config.open("a") as config:
        config.write(f'\n[webhooks]\nlisten = "127.0.0.1:{port}"\n')
    proc = await asyncio.create_subprocess_exec(*b.command("run"), env=b.env(), cwd=str(b.tmp),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def webhook_latency(tmp: Path, changes: int = 200, spread_s: float = 60.0, poll: float = 120.0) -> list[Row]:
    """Ship ``changes`` orders (100 → 300) at random moments; time each webhook's arrival until its event."""
    customer = Customer(3004, KEY, datetime.now(UTC).date() - timedelta(days=1), backfill_days=0)
    async with bench(tmp, [customer], klaviyo=klaviyo_sim(seed=4)) as b:
        b.settings.poll_interval = poll
        now = datetime.now(UTC).replace(microsecond=0)
        ids = seed_backfill(b.whiplash, customer.cid, changes, start=now - timedelta(hours=1), end=now,
                            statuses=(100,))
        account = b.klaviyo.account(str(customer.cid))
        port = free_port()
        async with hooked_daemon(b, port):
            await wake_everyone(port)
            synced = await until(lambda: len(account.events) >= changes + 4, 60)
            b.whiplash.subscribe(f"http://127.0.0.1:{port}{PATH}", customer_id=customer.cid, events=["order.shipped"])
            started = time.monotonic()
            await ship_at_random_moments(b, ids, spread_s)
            done = await until(lambda: len(account.events) >= 2 * changes + 4, 30)
            within = time.monotonic() - started
        lags = webhook_latencies(b.whiplash, [account], since="arrival")
        from_change = webhook_latencies(b.whiplash, [account], since="change")
    missing = changes - len(lags)
    p50, p95, p99 = (pct(lags, q) for q in (0.5, 0.95, 0.99))
    ahead = sum(1 for lag in lags if lag == 0.0)
    note = (f"webhook arrival → event accepted by Klaviyo ({ahead} already there: a poll woken earlier read them); "
            f"from the change in Whiplash p95 {pct(from_change, 0.95):.2f} s; all within {within:.0f} s, before "
            "the first backstop poll")
    if missing or not (synced and done):
        note = f"{missing} changes without a timed event; start-up sync ok={synced}, all delivered={done}"
    return [
        Row(f"webhook latency, {poll:.0f} s poll ({len(lags)} changes): p50 / p95 / p99",
            f"{p50:.2f} / {p95:.2f} / {p99:.2f} s", "p95 ≤ 2 s", p95 <= 2.0 and not missing, note),
    ]


async def wake_everyone(port: int, limit_s: float = 20.0) -> None:
    """Once the receiver listens, POST one signed webhook naming no customer: the first sync starts now, whenever
    the first scheduled poll would come."""
    body = b"{}"
    signature = hmac.new(CLIENT_SECRET.encode(), body, hashlib.sha256).hexdigest()
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.post(f"http://127.0.0.1:{port}{PATH}", data=body,
                                     headers={"X-WHIPLASH-SIGNATURE": signature}) as resp:
                    if resp.status == 202:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.1)


async def ship_at_random_moments(b: Bench, ids: list[int], spread_s: float) -> None:
    """Ship each order at a random moment within ``spread_s`` (its webhook follows at once)."""
    rng = random.Random(11)
    moments = sorted(rng.uniform(0, spread_s) for _ in ids)
    start = time.monotonic()
    for order_id, moment in zip(ids, moments, strict=True):
        await asyncio.sleep(max(0.0, start + moment - time.monotonic()))
        b.whiplash.set_status(order_id, 300)
