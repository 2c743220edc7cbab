"""The optional Prometheus endpoint: what a scrape of the served /metrics shows after the daemon reports."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from klaviyo_bridge.config import BridgeSettings
from klaviyo_bridge.metrics import Metrics, NoMetrics, metrics_for, start_metrics_server


async def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    """GET the endpoint; return (content type, body)."""
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], await resp.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    """Return the value of one sample in exposition text, or None when it is absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)\{([^}]*)\} (\S+)", line)
        if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == wanted:
            return float(m.group(3))
    return None


async def test_counters_and_gauges_appear_in_the_scrape() -> None:
    """1. Customer 7: two ok polls (lag 12.5 s) and one failed, 5 sent, 2 dead, 3 retried, one 429, 40 queued,
    2 dead letters; customer 8: one sent. 2. Scrape the served endpoint.
    Result: each value under its customer label; the last-success timestamp is set for 7 only."""
    m = Metrics()
    m.poll_done(7, True, 12.5)
    m.poll_done(7, True)
    m.poll_done(7, False)
    m.sent(7, 5)
    m.dead(7, 2)
    m.retried(7, 3)
    m.throttled(7)
    m.set_queued(7, 40)
    m.set_dead_letters(7, 2)
    m.sent(8)
    m.sent(8, 0)  # nothing happened: ignored, not an error
    server = await start_metrics_server(m, ("127.0.0.1", 0))
    try:
        content_type, text = await scrape(server.url)
    finally:
        await server.close()

    assert content_type.startswith("text/plain")
    assert sample(text, "klaviyo_bridge_polls_total", customer="7", outcome="ok") == 2
    assert sample(text, "klaviyo_bridge_polls_total", customer="7", outcome="error") == 1
    assert sample(text, "klaviyo_bridge_sent_rows_total", customer="7") == 5
    assert sample(text, "klaviyo_bridge_sent_rows_total", customer="8") == 1
    assert sample(text, "klaviyo_bridge_dead_rows_total", customer="7") == 2
    assert sample(text, "klaviyo_bridge_retries_total", customer="7") == 3
    assert sample(text, "klaviyo_bridge_klaviyo_throttled_total", customer="7") == 1
    assert sample(text, "klaviyo_bridge_queued_rows", customer="7") == 40
    assert sample(text, "klaviyo_bridge_dead_letters", customer="7") == 2
    assert sample(text, "klaviyo_bridge_poll_lag_seconds", customer="7") == 12.5
    assert (sample(text, "klaviyo_bridge_last_successful_poll_timestamp_seconds", customer="7") or 0) > 1e9
    assert sample(text, "klaviyo_bridge_last_successful_poll_timestamp_seconds", customer="8") is None


async def test_registries_are_separate_and_forget_drops_a_customer() -> None:
    """1. Two Metrics; the first counts customer 7 and 9, then forgets 9. 2. Scrape both (OpenMetrics asked).
    Result: the second shows no samples of the first; 9 is gone from the first; OpenMetrics is negotiated."""
    first, second = Metrics(), Metrics()
    first.sent(7, 4)
    first.sent(9, 1)
    first.poll_done(9, False)
    first.forget(9)
    first.forget(12345)  # never seen: nothing to drop, no error
    a = await start_metrics_server(first, ("127.0.0.1", 0))
    b = await start_metrics_server(second, ("127.0.0.1", 0))
    try:
        content_type, text_a = await scrape(a.url, "application/openmetrics-text; version=1.0.0")
        _, text_b = await scrape(b.url)
    finally:
        await a.close()
        await b.close()
    assert content_type.startswith("application/openmetrics-text")
    assert sample(text_a, "klaviyo_bridge_sent_rows_total", customer="7") == 4
    assert 'customer="9"' not in text_a
    assert 'customer="' not in text_b


async def test_a_taken_port_raises_and_closing_frees_it(unused_tcp_port: int) -> None:
    """1. Serve on a port, then try to serve a second endpoint on it. Result: OSError; after close, it binds."""
    first = await start_metrics_server(Metrics(), ("127.0.0.1", unused_tcp_port))
    try:
        with pytest.raises(OSError, match=r"."):
            await start_metrics_server(Metrics(), ("127.0.0.1", unused_tcp_port))
    finally:
        await first.close()
    again = await start_metrics_server(Metrics(), ("127.0.0.1", unused_tcp_port))
    await again.close()
    assert again.url == f"http://127.0.0.1:{unused_tcp_port}/metrics"


def test_metrics_are_off_unless_configured(tmp_path: Path) -> None:
    """1. [bridge] without and with metrics_listen. Result: the no-op sink, then a live Metrics."""
    off = metrics_for(BridgeSettings(state_path=tmp_path / "s.db"))
    on = metrics_for(BridgeSettings(state_path=tmp_path / "s.db", metrics_listen="127.0.0.1:9464"))
    assert isinstance(off, NoMetrics)
    assert isinstance(on, Metrics)
    off.poll_done(1, True, 3.0)  # every call is accepted and does nothing
    off.sent(1, 3)
    off.forget(1)
