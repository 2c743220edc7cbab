"""What may be said of an unusable response body: one line, never the body itself."""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp
import pytest

from klaviyo_bridge.errors import AuthFailed, PermanentUpstream, RateLimited, TransientUpstream
from klaviyo_bridge.http import (
    REASON_CHARS,
    Outcome,
    Reply,
    body_reason,
    classify,
    error_for,
    exchange,
    one_line,
    retry_after,
    transport_error,
)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("", "empty body"),
        ("   \n", "empty body"),
        ('[{"id":1,"email":"ann@example.com","first_name":"Ann"', "invalid or truncated JSON (53 bytes)"),
        ('{"orders": [', "invalid or truncated JSON (12 bytes)"),
        ("<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
         'HTML page "502 Bad Gateway" (74 bytes)'),
        ("<html><body><h1>Service\n Unavailable</h1><p>long text</p></body></html>",
         'HTML page "Service Unavailable" (71 bytes)'),
        ("<html><body><script>var x = 1;</script>Maintenance &amp; upgrades</body></html>",
         'HTML page "Maintenance & upgrades" (79 bytes)'),
        ("<!-- nothing -->", "HTML page (16 bytes)"),
        ("upstream connect error or disconnect/reset before headers", "upstream connect error or disconnect/reset "
                                                                       "before headers"),
    ],
)
def test_body_reason_describes_without_quoting(body: str, reason: str) -> None:
    assert body_reason(body) == reason


def test_plain_text_is_one_bounded_line() -> None:
    reason = body_reason("line one\nline two\t" + "x" * 500)
    assert "\n" not in reason
    assert len(reason) == REASON_CHARS
    assert reason.startswith("line one line two x")
    assert reason.endswith("…")
    assert one_line("a\n b", 10) == "a b"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, Outcome.OK), (202, Outcome.OK), (204, Outcome.OK), (299, Outcome.OK),
     (401, Outcome.AUTH), (403, Outcome.AUTH),
     (408, Outcome.TRANSIENT), (429, Outcome.TRANSIENT), (500, Outcome.TRANSIENT), (502, Outcome.TRANSIENT),
     (503, Outcome.TRANSIENT), (504, Outcome.TRANSIENT), (520, Outcome.TRANSIENT), (524, Outcome.TRANSIENT),
     (501, Outcome.PERMANENT), (505, Outcome.PERMANENT), (400, Outcome.PERMANENT), (404, Outcome.PERMANENT),
     (409, Outcome.PERMANENT), (410, Outcome.PERMANENT), (418, Outcome.PERMANENT), (422, Outcome.PERMANENT),
     (300, Outcome.PERMANENT), (199, Outcome.PERMANENT)],
)
def test_one_table_classifies_every_status(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


@pytest.mark.parametrize("service", ["whiplash", "klaviyo"])
def test_both_upstreams_map_a_reply_the_same_way(service: str) -> None:
    """Result: the same status gives the same error class, whichever upstream answered."""
    def error(status: int) -> object:
        return error_for(service, Reply(status, {}, ""), "why", wait=2.0, body="kept")

    assert error(204) is None
    assert type(error(429)) is RateLimited
    throttled = error(429)
    assert isinstance(throttled, RateLimited)
    assert (throttled.service, throttled.status, throttled.detail, throttled.retry_after) == (service, 429, "why", 2.0)
    assert type(error(408)) is TransientUpstream
    assert type(error(401)) is AuthFailed
    refused = error(422)
    assert isinstance(refused, PermanentUpstream)
    assert refused.body == "kept"
    plain = error_for(service, Reply(400, {}, ""), "why")
    assert isinstance(plain, PermanentUpstream)
    assert plain.body == "why"  # a refused request keeps its detail when no body is given


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC).timestamp()
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 30.0
    assert retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now) == 0.0  # already past
    assert retry_after(" 2.5 ", now) == 2.5
    assert retry_after("0", now) == 0.0
    assert retry_after("-3", now) is None
    assert retry_after("soon", now) is None
    assert retry_after(None, now) is None


async def test_exchange_maps_network_failures_and_timeouts_without_secrets() -> None:
    """1. A request to a closed port; one that times out. Result: TransientUpstream without status, one line,
    the secret in the URL scrubbed."""
    secret = "tok_SECRET_0123456789"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TransientUpstream) as refused:
            await exchange(session, "whiplash", "GET", f"http://127.0.0.1:9/x?t={secret}", secrets=[secret])
        assert refused.value.status is None
        assert secret not in str(refused.value)
        assert "\n" not in refused.value.detail
    error = transport_error("klaviyo", TimeoutError())
    assert (error.service, error.status, error.detail) == ("klaviyo", None, "request timed out")
