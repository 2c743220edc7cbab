"""What may be said of an unusable response body: one line, never the body itself."""

from __future__ import annotations

import pytest

from klaviyo_bridge.http import REASON_CHARS, body_reason, one_line


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
