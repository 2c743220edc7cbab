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


async def test_health_gauges_and_upstream_errors_appear_in_the_scrape() -> None:
    """1. Poll interval 60 s; customer 7: key refused, oldest queued row 930 s old, 3 then 2 failed Klaviyo
    requests failing for 640 s, Whiplash healthy; customer 8: key accepted, nothing queued. 2. Scrape.
    Result: each value under its labels; the interval has no customer label."""
    m = Metrics()
    m.set_poll_interval(60.0)
    m.set_key_refused(7, True)
    m.set_key_refused(8, False)
    m.set_oldest_queued(7, 930.0)
    m.set_oldest_queued(8, 0.0)
    m.upstream_error("klaviyo", 7, 3)
    m.upstream_error("klaviyo", 7, 2)
    m.upstream_error("whiplash", 7, 0)  # nothing failed: no series appears
    m.set_error_streak("klaviyo", 7, 640.0)
    m.set_error_streak("whiplash", 7, 0.0)
    text = m.render()[0].decode()

    assert re.search(r"^klaviyo_bridge_poll_interval_seconds 60\.0$", text, re.MULTILINE)
    assert sample(text, "klaviyo_bridge_klaviyo_key_refused", customer="7") == 1
    assert sample(text, "klaviyo_bridge_klaviyo_key_refused", customer="8") == 0
    assert sample(text, "klaviyo_bridge_oldest_queued_seconds", customer="7") == 930
    assert sample(text, "klaviyo_bridge_oldest_queued_seconds", customer="8") == 0
    assert sample(text, "klaviyo_bridge_upstream_errors_total", upstream="klaviyo", customer="7") == 5
    assert sample(text, "klaviyo_bridge_upstream_errors_total", upstream="whiplash", customer="7") is None
    assert sample(text, "klaviyo_bridge_upstream_error_streak_seconds", upstream="klaviyo", customer="7") == 640
    assert sample(text, "klaviyo_bridge_upstream_error_streak_seconds", upstream="whiplash", customer="7") == 0


def test_a_key_accepted_again_and_a_recovered_upstream_read_zero() -> None:
    """1. Customer 7's key refused, then accepted; Klaviyo failing for 900 s, then a success; a clock step back
    gives a negative age. Result: both gauges read 0 again; nothing negative is exported."""
    m = Metrics()
    m.set_key_refused(7, True)
    m.set_key_refused(7, False)
    m.set_error_streak("klaviyo", 7, 900.0)
    m.set_error_streak("klaviyo", 7, 0.0)
    m.set_oldest_queued(7, -3.0)
    m.set_poll_interval(-1.0)
    text = m.render()[0].decode()
    assert sample(text, "klaviyo_bridge_klaviyo_key_refused", customer="7") == 0
    assert sample(text, "klaviyo_bridge_upstream_error_streak_seconds", upstream="klaviyo", customer="7") == 0
    assert sample(text, "klaviyo_bridge_oldest_queued_seconds", customer="7") == 0
    assert re.search(r"^klaviyo_bridge_poll_interval_seconds 0\.0$", text, re.MULTILINE)


def test_forget_drops_the_health_series_of_that_customer_only() -> None:
    """1. Customers 7 and 9 each get every per-customer series (both upstreams); forget 9.
    Result: no series labelled customer 9 remains; 7's are untouched; the poll interval stays."""
    m = Metrics()
    m.set_poll_interval(30.0)
    for cid in (7, 9):
        m.poll_done(cid, True, 1.0)
        m.poll_done(cid, False)
        for record in (m.sent, m.dead, m.retried, m.throttled, m.set_queued, m.set_dead_letters):
            record(cid, 1)
        m.set_key_refused(cid, True)
        m.set_oldest_queued(cid, 5.0)
        for upstream in ("whiplash", "klaviyo"):
            m.upstream_error(upstream, cid)
            m.set_error_streak(upstream, cid, 12.0)
        m.webhook_wakeup(cid, True)
    m.forget(9)
    text = m.render()[0].decode()
    assert 'customer="9"' not in text
    assert sample(text, "klaviyo_bridge_upstream_errors_total", upstream="whiplash", customer="7") == 1
    assert sample(text, "klaviyo_bridge_upstream_error_streak_seconds", upstream="klaviyo", customer="7") == 12
    assert sample(text, "klaviyo_bridge_klaviyo_key_refused", customer="7") == 1
    assert sample(text, "klaviyo_bridge_oldest_queued_seconds", customer="7") == 5
    assert re.search(r"^klaviyo_bridge_poll_interval_seconds 30\.0$", text, re.MULTILINE)


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
    """1. [bridge] without and with metrics_listen (poll interval 45 s).
    Result: the no-op sink, then a live Metrics that already exports the poll interval."""
    off = metrics_for(BridgeSettings(state_path=tmp_path / "s.db"))
    on = metrics_for(BridgeSettings(state_path=tmp_path / "s.db", metrics_listen="127.0.0.1:9464",
                                    poll_interval_seconds=45))
    assert isinstance(off, NoMetrics)
    assert isinstance(on, Metrics)
    assert re.search(r"^klaviyo_bridge_poll_interval_seconds 45\.0$", on.render()[0].decode(), re.MULTILINE)
    off.poll_done(1, True, 3.0)  # every call is accepted and does nothing
    off.sent(1, 3)
    off.set_poll_interval(60.0)
    off.set_key_refused(1, True)
    off.set_oldest_queued(1, 10.0)
    off.upstream_error("klaviyo", 1)
    off.set_error_streak("whiplash", 1, 10.0)
    off.webhook("accepted")
    off.webhook_wakeup(1, True)
    off.forget(1)


def test_the_shared_budget_is_read_at_scrape_time() -> None:
    """1. Metrics watch a budget of 10/s. 2. A 429 halves it. 3. Scrape. Result: the configured and effective limits,
    the 429 counter and a waiting gauge per lane, without a customer label (the budget is the process's)."""
    from klaviyo_bridge.budget import WhiplashBudget

    metrics = Metrics()
    budget = WhiplashBudget(10, 4)
    metrics.watch_budget(budget.usage)
    budget.throttled(None)
    text = metrics.render()[0].decode()
    for line in ("klaviyo_bridge_whiplash_budget_limit_per_second 10.0",
                 "klaviyo_bridge_whiplash_budget_effective_per_second 5.0",
                 "klaviyo_bridge_whiplash_throttled_total 1.0",
                 "klaviyo_bridge_whiplash_requests_in_flight 0.0",
                 'klaviyo_bridge_whiplash_requests_waiting{lane="live"} 0.0',
                 'klaviyo_bridge_whiplash_requests_waiting{lane="background"} 0.0'):
        assert re.search(rf"^{re.escape(line)}$", text, re.MULTILINE), line
    metrics.set_poll_interval_achieved(7, 95.5)
    assert re.search(r'^klaviyo_bridge_poll_interval_achieved_seconds\{customer="7"\} 95\.5$', text + "\n" +
                     metrics.render()[0].decode(), re.MULTILINE)


def test_webhook_outcomes_and_wake_ups_appear_in_the_scrape() -> None:
    """1. Three accepted webhooks and one forged; customer 7 woken three times, two of them asking for a new poll
    (the third joined a poll already asked for). Result: every outcome is exported from the start (0 until
    seen), without a customer label; wake-ups and webhook polls per customer."""
    m = Metrics()
    for _ in range(3):
        m.webhook("accepted")
    m.webhook("bad_signature")
    m.webhook_wakeup(7, True)
    m.webhook_wakeup(7, False)
    m.webhook_wakeup(7, True)
    text = m.render()[0].decode()
    assert sample(text, "klaviyo_bridge_webhooks_total", outcome="accepted") == 3
    assert sample(text, "klaviyo_bridge_webhooks_total", outcome="bad_signature") == 1
    assert sample(text, "klaviyo_bridge_webhooks_total", outcome="too_large") == 0
    assert sample(text, "klaviyo_bridge_webhook_wakeups_total", customer="7") == 3
    assert sample(text, "klaviyo_bridge_webhook_polls_total", customer="7") == 2
