"""The running daemon serves Prometheus metrics that reflect what it actually did."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from kit.bridgekit import toml_str
from kit.harness import CLIENT_ID, CLIENT_SECRET, Customer, Harness

from klaviyo_bridge.sandbox.klaviyo import FakeKlaviyo, serve_klaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash

CID = 404
KEY = "pk_metrics_0123456789abcdef"


async def eventually_async(check: Callable[[], Awaitable[str | None]], limit_s: float = 20.0) -> str:
    """Await ``check()`` until it returns a value."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while (value := await check()) is None:
        assert asyncio.get_running_loop().time() < deadline, "metrics never showed the sent rows"
        await asyncio.sleep(0.2)
    return value


def free_port() -> int:
    """Return a loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sample(text: str, name: str, *labels: str) -> float:
    """Return the value of one sample in Prometheus text format (0 when absent)."""
    pattern = re.escape(name) + r"\{" + ".*".join(re.escape(label) for label in labels) + r"[^}]*\} ([0-9.e+]+)"
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


async def test_metrics_endpoint_counts_sent_rows_and_polls(tmp_path: Path) -> None:
    """1. A live customer with 3 shipped orders; the daemon runs with metrics_listen.
    2. Scrape /metrics until the rows are sent.
    Result: sent rows = 3 events + 4 samples + profiles, ok polls > 0, queued gauge back to 0."""
    now = datetime.now(UTC)
    whiplash = FakeWhiplash(CLIENT_ID, CLIENT_SECRET)
    for i in range(3):
        whiplash.create_order(CID, status=300, at=now - timedelta(minutes=10 + i), email=f"m{i}@example.com")
    klaviyo = FakeKlaviyo()
    klaviyo.add_account(KEY, label=str(CID))
    port = free_port()
    async with serve_whiplash(whiplash) as w_url, serve_klaviyo(klaviyo) as k_url:
        h = Harness(tmp_path, w_url, k_url, [Customer(CID, "Metrics Shop", KEY, now.date() - timedelta(days=1))])
        h.overrides = {"bridge": {"metrics_listen": toml_str(f"127.0.0.1:{port}")}}
        h.write_config()
        async with h.running() as bridge, aiohttp.ClientSession() as http:
            await bridge.wait_for_line("metrics listening")

            async def scrape() -> str | None:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                return text if sample(text, "klaviyo_bridge_sent_rows_total", f'customer="{CID}"') >= 11 else None

            text = await eventually_async(scrape)
            code, _ = await bridge.stop()
    assert code == 0
    assert sample(text, "klaviyo_bridge_sent_rows_total", f'customer="{CID}"') == 11  # 3 + 4 samples + 4 profiles
    assert sample(text, "klaviyo_bridge_polls_total", f'customer="{CID}"', 'outcome="ok"') >= 1
    assert len(klaviyo.account(str(CID)).events) == 7
