"""The one HTTP boundary of both upstreams: a reply, its classification, its wait hint, its one-line reason.

Whiplash and Klaviyo clients send through ``exchange`` and turn a non-2xx reply into the error tree with
``error_for``; each keeps only what is specific to its API (how it reads an error body's detail, Klaviyo's
"available in N seconds", Whiplash's token endpoint). Invariants:
- one table decides what a status means (``classify``): 2xx ok; 401/403 the credentials are refused; 408, 429
  and 5xx (but 501 and 505, which say "never") may pass if tried later; every other status refuses the request
  for what it is;
- a network failure or a timeout is transient, never anything else, and its text holds no secret (callers
  pass what to scrub);
- ``Retry-After`` is read as delta-seconds or as an HTTP date; anything else is no hint;
- what may be said of a body is one line: an HTML page is named by its <title>, else its first <h1>, else its
  first words; a body that looks like JSON but does not parse (a truncated page of orders) is described by its
  size only: its first bytes would be shoppers' names and emails.
"""

from __future__ import annotations

import email.utils
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from enum import Enum
from typing import Any

import aiohttp

from .errors import AuthFailed, PermanentUpstream, RateLimited, TransientUpstream, UpstreamError

REASON_CHARS = 200
_PAGE_NAME_CHARS = 80
_TITLE = re.compile(r"<(title|h1)[^>]*>(.*?)</\1>", re.IGNORECASE | re.DOTALL)
_SCRIPT = re.compile(r"<(script|style)[^>]*>.*?</\1>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole HTTP response: status, headers and the body as text."""

    status: int
    headers: Mapping[str, str]
    text: str


class Outcome(Enum):
    """What a status says about the request that got it."""

    OK = "ok"
    TRANSIENT = "transient"  # the same request may pass later: retry, reschedule
    AUTH = "auth"  # the credentials are refused: pause whatever uses them
    PERMANENT = "permanent"  # the request itself is refused: retrying it cannot help


def classify(status: int) -> Outcome:
    """Return what ``status`` means for the request (the one table both upstreams use)."""
    if 200 <= status < 300:
        return Outcome.OK
    if status in (401, 403):
        return Outcome.AUTH
    if status in (408, 429) or (status >= 500 and status not in (501, 505)):
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def retry_after(value: str | None, now: float) -> float | None:
    """Return the wait a Retry-After header asks for (delta-seconds or HTTP date) from ``now``, or None."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        return _until_date(value, now)
    return seconds if seconds >= 0 else None


def _until_date(value: str, now: float) -> float | None:
    """Return seconds from ``now`` until an HTTP date (0 when it is past), or None when it is not one."""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def error_for(service: str, reply: Reply, detail: str, *, wait: float | None = None,
              body: str | None = None) -> UpstreamError | None:
    """Map a reply to the error tree (None for 2xx): ``detail`` says why, ``wait`` is the server's hint,
    ``body`` what a refused request keeps for ops (default: the detail)."""
    outcome = classify(reply.status)
    if outcome is Outcome.OK:
        return None
    if outcome is Outcome.AUTH:
        return AuthFailed(service, reply.status, detail)
    if outcome is Outcome.TRANSIENT:
        cls = RateLimited if reply.status == 429 else TransientUpstream
        return cls(service, reply.status, detail, retry_after=wait)
    return PermanentUpstream(service, reply.status, detail, body=detail if body is None else body)


def transport_error(service: str, exc: BaseException, secrets: Sequence[str] = ()) -> TransientUpstream:
    """Map a network failure or a timeout (no HTTP status) to a retryable error whose text holds no secret."""
    if isinstance(exc, TimeoutError):
        return TransientUpstream(service, None, "request timed out")
    return TransientUpstream(service, None, scrub(one_line(f"{type(exc).__name__}: {exc}".rstrip(": ")), secrets))


async def exchange(
    session: aiohttp.ClientSession, service: str, method: str, url: str, *, secrets: Sequence[str] = (),
    **kwargs: Any,
) -> Reply:
    """Send one request and read the whole body; network failures and timeouts raise TransientUpstream."""
    try:
        async with session.request(method, url, **kwargs) as response:
            raw = await response.read()
            return Reply(response.status, response.headers, raw.decode("utf-8", "replace"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise transport_error(service, exc, secrets) from exc


# --- what may be said of a body ------------------------------------------------------------------------


def scrub(text: str, secrets: Sequence[str]) -> str:
    """Return ``text`` with every known secret replaced, so echoed credentials cannot leak."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


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
