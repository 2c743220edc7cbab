"""The checked field types the settings models in ``config`` are built from, and how a model reports problems.

Invariants kept here:
- every check fails with a one-line problem whose text is exactly what the user reads; it quotes a value only
  where that cannot be a secret (URLs, revisions, emails, addresses, paths; never a ``Secret``);
- strict types: a TOML string is never coerced into a number or a boolean, and no number is NaN or infinite;
- URLs that could carry a secret (credentials, query, fragment) are refused; ``split_host_port`` accepts only a
  port in 1..65535 and brackets around an IPv6 host.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, AllowInfNan, Field, SecretStr, Strict
from pydantic_core import PydanticCustomError

from .config_problems import Loc, format_loc, quote

_MAX_METRIC_NAME = 127
_MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1


# --- field checks -------------------------------------------------------------------------------------------


def _fail(message: str) -> PydanticCustomError:
    """Build a validation error whose text is exactly ``message``."""
    return PydanticCustomError("bridge_value", message)


def _non_blank(value: str) -> str:
    """Reject empty and whitespace-only text."""
    if not value.strip():
        raise _fail("must not be empty")
    return value


def _http_url(value: str) -> str:
    """Accept an absolute http(s) URL without credentials, query or fragment; drop trailing slashes."""
    if not _is_plain_http_url(value):
        raise _fail(f"must be an http(s) URL like https://host (got {quote(value)})")
    return value.rstrip("/")


def _is_plain_http_url(value: str) -> bool:
    """Tell whether ``value`` is http(s)://host[:port][/path] with nothing that could hide a secret."""
    try:
        parts = urlsplit(value)
        port_ok = parts.port != 0  # .port raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        return False
    return (
        port_ok
        and parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and "@" not in parts.netloc
        and not parts.query
        and not parts.fragment
        and not any(ch.isspace() for ch in value)
    )


_REVISION = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})(\.[A-Za-z0-9]+)?")


def _revision(value: str) -> str:
    """Accept a Klaviyo API revision: YYYY-MM-DD with an optional .suffix."""
    match = _REVISION.fullmatch(value)
    try:
        valid = match is not None and bool(date.fromisoformat(match.group(1)))
    except ValueError:
        valid = False
    if not valid:
        raise _fail(f"must be a revision date like 2026-07-15 or 2026-07-15.pre (got {quote(value)})")
    return value


def _email(value: str) -> str:
    """Accept an email address valid by syntax (the same check orders' emails get; no DNS)."""
    try:
        validate_email(value.strip(), check_deliverability=False)
    except EmailNotValidError:
        raise _fail(f"must be an email address (got {quote(value)})") from None
    return value.strip().lower()


def _metric_name(value: str) -> str:
    """Accept a Klaviyo metric name: not blank and shorter than 128 characters."""
    _non_blank(value)
    if len(value) > _MAX_METRIC_NAME:
        raise _fail(f"must be at most {_MAX_METRIC_NAME} characters (got {len(value)})")
    return value


def check_state_path(value: Any) -> Any:
    """Reject an empty or NUL-containing path before pathlib turns "" into the current directory."""
    if isinstance(value, str) and (not value.strip() or "\x00" in value):
        raise _fail("must be a file path")
    return value


def _listen_address(value: str) -> str:
    """Accept "host:port" (IPv6 hosts in brackets) with a port in 1..65535."""
    if split_host_port(value) is None:
        example = '"127.0.0.1:9464"'
        raise _fail(f'must be "host:port" with a port in 1..65535, e.g. {example} (got {quote(value)})')
    return value


def split_host_port(value: str) -> tuple[str, int] | None:
    """Split "host:port" into its parts, or return None when it is not one."""
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None  # an unbracketed IPv6 address is ambiguous
    if not host or any(ch.isspace() for ch in host) or not (port.isascii() and port.isdigit()):
        return None
    number = int(port)
    return (host, number) if 1 <= number <= 65535 else None


_WEBHOOK_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


def _webhook_path(value: str) -> str:
    """Accept an absolute URL path (no query, fragment or whitespace): where Whiplash POSTs its webhooks."""
    if not _WEBHOOK_PATH.fullmatch(value):
        raise _fail(f'must be a URL path starting with "/", e.g. "/whiplash/webhook" (got {quote(value)})')
    return value


# --- field types --------------------------------------------------------------------------------------------


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Str = Annotated[str, Strict()]
NonEmptyStr = Annotated[str, Strict(), AfterValidator(_non_blank)]
HttpUrlStr = Annotated[str, Strict(), AfterValidator(_http_url)]
MetricName = Annotated[str, Strict(), AfterValidator(_metric_name)]
StatusCode = Annotated[int, Strict(), Field(ge=0, le=_MAX_INT32)]
Secret = Annotated[SecretStr, Field(min_length=1)]
Revision = Annotated[str, Strict(), AfterValidator(_revision)]
Email = Annotated[str, Strict(), AfterValidator(_email)]
ListenAddress = Annotated[str, Strict(), AfterValidator(_listen_address)]
WebhookPath = Annotated[str, Strict(), AfterValidator(_webhook_path)]


# --- problems across fields ---------------------------------------------------------------------------------


def raise_cross(problems: list[tuple[Loc, str]]) -> None:
    """Raise one error carrying several (relative key path, why) problems, if there are any."""
    if problems:
        summary = "; ".join(f"{format_loc(loc)}: {why}" for loc, why in problems)
        context = {"summary": summary, "problems": tuple(problems)}
        raise PydanticCustomError("cross_field", "{summary}", context)
