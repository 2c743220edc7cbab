"""Secret references in the configuration: ``env:NAME``, ``file:/abs/path``, ``credential:NAME``, or a literal.

Invariants: a secret's value never appears in a problem line or a warning (a problem says where and why, never
what); only references in use are resolved (the Whiplash application's and enabled customers'), and none when
the caller does not ask (``status`` needs no secret); a file is read only if it is a regular file of at most
64 KiB of UTF-8 (a FIFO would block, a device might never end).
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .config_problems import Loc, format_loc, quote

CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"


# A secret file larger than this is certainly not a key; the cap also keeps /dev/zero-like paths harmless.
_MAX_SECRET_BYTES = 64 * 1024


_LITERAL_SECRET = "literal secret in config file; use env:, file: or credential:"


class _Unresolvable(Exception):
    """A secret reference that cannot be turned into a value; ``why`` never contains the value."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _secret_slots(raw: dict[str, Any]) -> Iterator[tuple[Loc, dict[str, Any], str, bool]]:
    """Yield (key path, table, key, in use) for every place a secret may sit in the raw TOML.

    A disabled customer's key is not in use: the daemon never calls Klaviyo for it; nor is a webhook secret
    while ``[webhooks] listen`` is unset.
    """
    whiplash = raw.get("whiplash")
    if isinstance(whiplash, dict):
        for key in ("client_secret", "refresh_token"):
            yield ("whiplash", key), whiplash, key, True
    webhooks = raw.get("webhooks")
    if isinstance(webhooks, dict):  # in use only when the receiver is on
        yield ("webhooks", "secret"), webhooks, "secret", webhooks.get("listen") is not None
    customers = raw.get("customers")
    if isinstance(customers, list):
        for index, customer in enumerate(customers):
            if isinstance(customer, dict):
                in_use = customer.get("enabled", True) is not False
                yield ("customers", index, "klaviyo_api_key"), customer, "klaviyo_api_key", in_use


def resolve_references(
    raw: dict[str, Any], environ: Mapping[str, str], *, resolve: bool = True
) -> tuple[list[str], list[str]]:
    """Replace secret references in ``raw`` by their values; return (problems, warnings).

    Only references in use are resolved, and none unless ``resolve``; the others stay as they are.
    Non-string and empty values are left for validation to report; an unresolvable reference stays in place
    (validation accepts it, so each problem is reported once) and the whole load fails anyway.
    """
    problems: list[str] = []
    warnings: list[str] = []
    for loc, table, key, in_use in _secret_slots(raw):
        value = table.get(key)
        if not isinstance(value, str) or not value:
            continue
        if _is_literal(value):
            warnings.append(f"{format_loc(loc)}: {_LITERAL_SECRET}")
        if not (resolve and in_use):
            continue
        try:
            table[key] = _resolve(value, environ)
        except _Unresolvable as exc:
            problems.append(f"{format_loc(loc)}: {exc.why}")
    return problems, warnings


def _is_literal(value: str) -> bool:
    """Tell whether a configured secret is the value itself rather than a reference to it."""
    scheme, sep, _ = value.partition(":")
    return not (sep and scheme in _RESOLVERS)


def _resolve(value: str, environ: Mapping[str, str]) -> str:
    """Return the secret one configured secret string stands for."""
    scheme, _, rest = value.partition(":")
    if _is_literal(value):
        return _require_content(value, "the value")
    return _RESOLVERS[scheme](rest, environ)


def _require_content(value: str, what: str) -> str:
    """Reject a blank secret; ``what`` names its source."""
    if not value.strip():
        raise _Unresolvable(f"{what} is empty")
    return value


def _from_env(name: str, environ: Mapping[str, str]) -> str:
    """Resolve ``env:NAME``."""
    if not name:
        raise _Unresolvable('"env:" needs a variable name, e.g. "env:KLAVIYO_KEY"')
    value = environ.get(name)
    if value is None:
        raise _Unresolvable(f"environment variable {name} is not set")
    return _require_content(value, f"environment variable {name}")


def _from_file(name: str, environ: Mapping[str, str]) -> str:
    """Resolve ``file:/abs/path``."""
    path = Path(name)
    if not path.is_absolute():
        raise _Unresolvable(f'"file:" needs an absolute path (got {quote(name)})')
    return _read_secret_file(path)


def _from_credential(name: str, environ: Mapping[str, str]) -> str:
    """Resolve ``credential:NAME`` from systemd's $CREDENTIALS_DIRECTORY."""
    if not name or "/" in name or name in (".", ".."):
        raise _Unresolvable(f'"credential:" needs a credential name without "/" (got {quote(name)})')
    directory = environ.get(CREDENTIALS_DIRECTORY_ENV)
    if not directory:
        raise _Unresolvable(
            f"credential {name}: {CREDENTIALS_DIRECTORY_ENV} is not set "
            "(start the bridge with systemd LoadCredential=)"
        )
    return _read_secret_file(Path(directory) / name)


_RESOLVERS: dict[str, Callable[[str, Mapping[str, str]], str]] = {
    "env": _from_env,
    "file": _from_file,
    "credential": _from_credential,
}


def _read_secret_file(path: Path) -> str:
    """Return a secret file's text without its trailing newline."""
    try:
        # stat first: opening a FIFO would block and reading a device might never end.
        if not stat.S_ISREG(path.stat().st_mode):
            raise _Unresolvable(f"cannot read file {path} (not a regular file)")
        with path.open("rb") as handle:
            data = handle.read(_MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise _Unresolvable(f"cannot read file {path} ({os_reason(exc)})") from None
    except ValueError:  # an embedded NUL in the path
        raise _Unresolvable(f"cannot read file {path} (invalid path)") from None
    return _decode_secret(data, path)


def _decode_secret(data: bytes, path: Path) -> str:
    """Decode a secret file's bytes, rejecting oversized, non-UTF-8 and empty content."""
    if len(data) > _MAX_SECRET_BYTES:
        raise _Unresolvable(f"file {path} is larger than {_MAX_SECRET_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Unresolvable(f"file {path} is not UTF-8 text") from None
    return _require_content(text.rstrip("\r\n"), f"file {path}")


def os_reason(exc: OSError) -> str:
    """Return the OS's words for ``exc``, e.g. "No such file or directory"."""
    return exc.strerror or type(exc).__name__
