"""Every metric name the shipped alerting rules and Grafana dashboard use is one the running daemon exports."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from kit.bridgekit import toml_str
from kit.contribkit import SCRAPE_SERIES, exported_names, referenced_names
from kit.harness import CLIENT_ID, CLIENT_SECRET, Customer, Harness

from klaviyo_bridge.sandbox.klaviyo import FakeKlaviyo, serve_klaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash

CID = 405
KEY = "pk_contrib_0123456789abcdef"
# What Prometheus 2.x sends when it scrapes: OpenMetrics first. curl and browsers get the 0.0.4 text format.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def free_port() -> int:
    """Return a loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def scrape_after_first_poll(http: aiohttp.ClientSession, url: str, limit_s: float = 20.0) -> None:
    """Wait until the scrape shows the customer's first finished poll."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        async with http.get(url) as resp:
            if f'klaviyo_bridge_polls_total{{customer="{CID}"' in await resp.text():
                return
        assert asyncio.get_running_loop().time() < deadline, "the daemon never reported a poll"
        await asyncio.sleep(0.2)


async def test_rules_and_dashboard_use_only_exported_metric_names(tmp_path: Path) -> None:
    """1. The real daemon with metrics_listen, one live customer with a shipped order, against the simulators.
    2. After its first poll, scrape /metrics as Prometheus does (OpenMetrics) and as curl does (text 0.0.4).
    Result: every metric name in contrib/prometheus/klaviyo-bridge.rules.yml and contrib/grafana/klaviyo-bridge.json
    is exported in both formats (series Prometheus adds itself, like `up`, aside), counting families that have
    no sample yet by their TYPE line."""
    now = datetime.now(UTC)
    whiplash = FakeWhiplash(CLIENT_ID, CLIENT_SECRET)
    whiplash.create_order(CID, status=300, at=now - timedelta(minutes=10), email="names@example.com")
    klaviyo = FakeKlaviyo()
    klaviyo.add_account(KEY, label=str(CID))
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    async with serve_whiplash(whiplash) as w_url, serve_klaviyo(klaviyo) as k_url:
        h = Harness(tmp_path, w_url, k_url, [Customer(CID, "Names Shop", KEY, now.date() - timedelta(days=1))])
        h.overrides = {"bridge": {"metrics_listen": toml_str(f"127.0.0.1:{port}")}}
        h.write_config()
        async with h.running() as bridge, aiohttp.ClientSession() as http:
            await bridge.wait_for_line("metrics listening")
            await scrape_after_first_poll(http, url)
            async with http.get(url, headers={"Accept": PROMETHEUS_ACCEPT}) as resp:
                assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
                openmetrics = await resp.text()
            async with http.get(url) as resp:
                assert resp.headers["Content-Type"].startswith("text/plain")
                text = await resp.text()
            code, _ = await bridge.stop()
    assert code == 0

    used = referenced_names()
    assert used["rules"]
    assert used["dashboard"]
    for exposition in (openmetrics, text):
        exported = exported_names(exposition) | SCRAPE_SERIES
        for source, names in used.items():
            assert names - exported == set(), f"{source} use metric names /metrics does not export"
