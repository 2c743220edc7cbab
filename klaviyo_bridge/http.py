"""What the bridge may say about an HTTP response body it could not use: one short line, nothing more.

Invariants:
- a reason is one line of at most ``REASON_CHARS`` characters;
- an HTML page is named by its <title>, else its first <h1>, else its first words (a proxy's "502 Bad
  Gateway"), never echoed whole;
- a body that looks like JSON but does not parse (a truncated page of orders) is described by its size only:
  its first bytes would be shoppers' names and emails.
"""

from __future__ import annotations

import html
import re

REASON_CHARS = 200
_PAGE_NAME_CHARS = 80
_TITLE = re.compile(r"<(title|h1)[^>]*>(.*?)</\1>", re.IGNORECASE | re.DOTALL)
_SCRIPT = re.compile(r"<(script|style)[^>]*>.*?</\1>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    """Collapse whitespace and cut ``text`` to ``limit`` characters (with an ellipsis when cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def body_reason(text: str) -> str:
    """Return a one-line description of an unusable body that never quotes its data."""
    stripped = text.lstrip()
    if not stripped:
        return "empty body"
    if stripped[:1] in "[{":
        return f"invalid or truncated JSON ({len(text.encode())} bytes)"
    if stripped[:1] == "<":
        return f"HTML page{_page_name(stripped)} ({len(text.encode())} bytes)"
    return one_line(stripped)


def _page_name(page: str) -> str:
    """Return ' "<title or first heading or first words>"' of an HTML page (a proxy's error page), or ''."""
    found = _TITLE.search(page)
    source = found.group(2) if found else _SCRIPT.sub(" ", page)
    name = one_line(html.unescape(_TAG.sub(" ", source)), _PAGE_NAME_CHARS)
    return f' "{name}"' if name else ""
