"""Outage summaries: one line when an upstream starts failing, one when it recovers, the rest at DEBUG."""

from __future__ import annotations

import logging

import pytest
from kit.fakeclock import FakeClock

from klaviyo_bridge.errors import AuthFailed, TransientUpstream
from klaviyo_bridge.health import UpstreamHealth
from klaviyo_bridge.metrics import Metrics

START = 100.0  # the monotonic clock's reading when a test begins


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """Return (level, message) of what the health module logged."""
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "klaviyo_bridge.health"]


def test_an_outage_of_many_customers_is_one_warning_and_one_info(caplog: pytest.LogCaptureFixture) -> None:
    """1. Customer 1 fails, then 2, then 1 again (3 failures). 2. Customer 1 recovers, then 2, 42 s after the
    start. Result: one WARNING (first failure, with status and reason), DEBUG for the others, and one INFO
    only when the last failing customer recovers, with the outage's length and counts."""
    caplog.set_level(logging.DEBUG, logger="klaviyo_bridge.health")
    clock = FakeClock(START)
    health = UpstreamHealth("whiplash", clock=clock)
    health.failed(1, TransientUpstream("whiplash", 503, "HTML page \"Service Unavailable\" (120 bytes)"))
    clock.advance(2)
    health.failed(2, TransientUpstream("whiplash", 502, "bad gateway"))
    health.failed(1, TransientUpstream("whiplash", 503, "again"))
    assert health.is_failing(1)
    assert health.streak_s(1) == 2.0
    clock.advance(40)
    health.succeeded(1)
    assert not health.is_failing(1)
    assert health.streak_s(1) is None
    health.succeeded(2)
    health.succeeded(2)  # already healthy: nothing more
    logged = lines(caplog)
    assert [level for level, _ in logged] == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.INFO]
    assert logged[0][1].startswith('whiplash errors started customer=1 status=503 error=whiplash 503: HTML page '
                                   '"Service Unavailable" (120 bytes) action=')
    assert logged[3][1] == "whiplash recovered outage_s=42 failed_requests=3 customers=2"


def test_refused_credentials_start_an_outage_at_error(caplog: pytest.LogCaptureFixture) -> None:
    """1. The first failure is a 401. Result: the start line is an ERROR (retrying alone will not fix it)."""
    health = UpstreamHealth("whiplash", clock=FakeClock(START))
    health.failed(7, AuthFailed("whiplash", 401, "invalid_client"))
    [(level, message)] = lines(caplog)
    assert level == logging.ERROR
    assert "customer=7 status=401" in message


def test_metrics_count_errors_and_follow_the_streak() -> None:
    """1. Two failures 5 s apart, then a success. Result: the error counter says 2, the streak gauge 5 s while
    failing and 0 after the success; other customers' series are untouched."""
    metrics = Metrics()
    clock = FakeClock(START)
    health = UpstreamHealth("klaviyo", metrics=metrics, clock=clock)
    health.failed(3, TransientUpstream("klaviyo", 503, "x"))
    clock.advance(5)
    health.failed(3, TransientUpstream("klaviyo", 503, "x"))

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"upstream": "klaviyo", "customer": "3"})

    assert sample("klaviyo_bridge_upstream_errors_total") == 2
    assert sample("klaviyo_bridge_upstream_error_streak_seconds") == 5
    health.succeeded(3)
    assert sample("klaviyo_bridge_upstream_error_streak_seconds") == 0
    assert metrics.registry.get_sample_value("klaviyo_bridge_upstream_errors_total",
                                             {"upstream": "klaviyo", "customer": "4"}) is None
