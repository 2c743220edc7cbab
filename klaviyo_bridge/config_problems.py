"""How a configuration problem is written: one line, a key path, the reason, never a secret.

Invariants: every line is ``<key path>: <why>`` (``customers[1].backfill_days: must be <= 14 (got 30)``) with no
control character (they are escaped, so "one line per problem" holds whatever the input was); a value is echoed
only when it cannot be a secret (numbers, enumerations, short quoted text), and a type mismatch names the type,
not the value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import date, datetime, time
from functools import partial
from typing import Any

from pydantic_core import ErrorDetails

Loc = tuple[int | str, ...]
MAX_ECHO = 60


def quote(text: str) -> str:
    """Quote user text for a problem line, shortened so a pasted blob cannot flood the output."""
    short = text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "…"
    return json.dumps(short, ensure_ascii=False)


def escape_controls(text: str) -> str:
    """Escape anything that would break "one line per problem" (newlines, control characters)."""
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


_SECTIONS = frozenset({"bridge", "whiplash", "klaviyo"})


_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: bool is an int subclass
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (dict, "table"),
    (list, "array"),
    (datetime, "date-time"),  # before date: datetime is a date subclass
    (date, "date"),
    (time, "time"),
)


def format_loc(loc: Loc) -> str:
    """Render a key path like ``customers[1].backfill_days``."""
    text = ""
    for item in loc:
        if isinstance(item, int):
            text += f"[{item}]"
        else:
            key = item if _BARE_KEY.fullmatch(item) else json.dumps(item, ensure_ascii=False)
            text += f".{key}" if text else key
    return text or "(top level)"


def _toml_type(value: Any) -> str:
    """Name the TOML type of a parsed value."""
    for kind, name in _TOML_TYPES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _number(value: Any) -> str:
    """Render a bound or an input number the way it would be written in TOML."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value) if isinstance(value, int | float) else _toml_type(value)


# The describers below are bound to their words with partial() in _MESSAGES rather than built by factories
# at import: code that runs only at import is out of reach of mutation testing (make mutate).


def _expects(what: str, error: ErrorDetails) -> str:
    """Describe a type mismatch; only the input's type is shown, never its value (it may be a secret)."""
    return f"must be {what} (got {_toml_type(error.get('input'))})"


def _bound(op: str, key: str, error: ErrorDetails) -> str:
    """Describe a range violation; only numbers ever reach range checks, so echoing the input is safe."""
    limit = _number(error.get("ctx", {}).get(key))
    return f"must be {op} {limit} (got {_number(error.get('input'))})"


def _one_of(error: ErrorDetails) -> str:
    """Describe a value outside an enumeration."""
    expected = str(error.get("ctx", {}).get("expected", "")).replace("'", '"')
    given = error.get("input")
    shown = quote(given) if isinstance(given, str) else _toml_type(given)
    return f"must be one of {expected} (got {shown})"


def _too_short(error: ErrorDetails) -> str:
    """Describe a value that is too short."""
    minimum = error.get("ctx", {}).get("min_length", 1)
    return "must not be empty" if minimum == 1 else f"must have at least {minimum} characters"


_MESSAGES: dict[str, Callable[[ErrorDetails], str]] = {
    "missing": lambda error: "missing required key",
    "extra_forbidden": lambda error: "unknown key",
    "int_type": partial(_expects, "an integer"),
    "float_type": partial(_expects, "a number"),
    "finite_number": lambda error: "must be a finite number",
    "string_type": partial(_expects, "a string"),
    "path_type": partial(_expects, "a string"),
    "bool_type": partial(_expects, "true or false"),
    "date_type": partial(_expects, "a date like 2026-08-01, unquoted"),
    "tuple_type": partial(_expects, "an array"),
    "list_type": partial(_expects, "an array"),
    "model_type": partial(_expects, "a table"),
    "model_attributes_type": partial(_expects, "a table"),
    "dict_type": partial(_expects, "a table"),
    "greater_than": partial(_bound, ">", "gt"),
    "greater_than_equal": partial(_bound, ">=", "ge"),
    "less_than": partial(_bound, "<", "lt"),
    "less_than_equal": partial(_bound, "<=", "le"),
    "literal_error": _one_of,
    "too_short": _too_short,
    "string_too_short": _too_short,
}


def problem_lines(error: ErrorDetails) -> list[str]:
    """Turn one pydantic error into "<key path>: <why>" lines (a cross-field error may hold several)."""
    loc: Loc = tuple(error.get("loc", ()))
    if error.get("type") == "cross_field":
        nested = error.get("ctx", {}).get("problems", ())
        return [f"{format_loc(loc + tuple(sub))}: {why}" for sub, why in nested]
    if error.get("type") == "missing" and len(loc) == 1 and loc[0] in _SECTIONS:
        return [f"{loc[0]}: missing required table [{loc[0]}]"]
    describe = _MESSAGES.get(error.get("type", ""))
    return [f"{format_loc(loc)}: {describe(error) if describe else error.get('msg', 'invalid value')}"]
