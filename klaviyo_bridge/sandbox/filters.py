"""Klaviyo's ``filter`` query parameter, accepted only in the forms an operation's spec declares.

Grammar (Klaviyo's filtering guide): conditions ``op(field,value)`` joined by commas or nested in
``and(...)``; a value is a quoted string (double quotes with JSON escapes, or single quotes with backslash
escapes), a bare word (RFC 3339 date-time, ``true``/``false``, a number) or a ``[...]`` list of those.

Invariants:
- A condition is accepted only if the operation declares its field in ``x-klaviyo-filters``, declares its
  operator for the value's shape (``single`` or ``list``), and every value has the declared type: a quoted
  string (inside the enum if there is one), a bare RFC 3339 date-time with an offset, a boolean or a number.
  Operators declared without a value (``has``) are not modelled, so they are refused.
- ``HAND_FILTERS`` equals what the 2026-07-15 spec declares for ``FILTER_OPERATIONS`` (a test compares
  them); it is used when the spec is not available.
- Parsing raises only ``FilterError``, whose message is the 400 detail.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: operationId -> (method, path) of every simulated operation that takes a ``filter`` parameter.
FILTER_OPERATIONS: Mapping[str, tuple[str, str]] = {"get_lists": ("get", "/api/lists")}

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_TOKEN = re.compile(
    r"""\s*(?:(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<punct>[(),\[\]])|(?P<word>[^\s(),\[\]"']+))"""
)
_ESCAPED = re.compile(r"\\(.)", re.S)


class FilterError(ValueError):
    """A filter Klaviyo would refuse with 400 on the ``filter`` parameter; the message is the detail."""


@dataclass(frozen=True, slots=True)
class FieldRule:
    """What one filterable field accepts: operators per value shape, and the value type."""

    single: frozenset[str]
    listed: frozenset[str]
    kind: str  # string | date-time | boolean | integer | number
    enum: frozenset[str] | None = None


FilterTable = Mapping[str, FieldRule]


def _rule(single: Sequence[str], listed: Sequence[str], kind: str = "string") -> FieldRule:
    return FieldRule(frozenset(single), frozenset(listed), kind)


#: x-klaviyo-filters of the 2026-07-15 spec for FILTER_OPERATIONS, for runs without the spec.
HAND_FILTERS: Mapping[str, FilterTable] = {
    "get_lists": {
        "name": _rule((), ("any", "equals")),
        "id": _rule(("equals",), ("any", "equals")),
        "created": _rule(("greater-than",), (), "date-time"),
        "updated": _rule(("greater-than",), (), "date-time"),
    },
}


def declared_filters(spec: Mapping[str, Any], operations: Mapping[str, tuple[str, str]]) -> dict[str, FilterTable]:
    """Return the field rules each operation declares in the spec's ``x-klaviyo-filters`` (none: empty)."""
    tables: dict[str, FilterTable] = {}
    for op_id, (method, path) in operations.items():
        declared = spec.get("paths", {}).get(path, {}).get(method, {}).get("x-klaviyo-filters") or {}
        tables[op_id] = {name: _declared_rule(raw) for name, raw in declared.items()}
    return tables


def _declared_rule(raw: Mapping[str, Any]) -> FieldRule:
    """Turn one field's ``{operators: {single, list, none}, value: {type, format, enum}}`` into a rule."""
    operators, value = raw.get("operators", {}), raw.get("value", {})
    kind = "date-time" if value.get("format") == "date-time" else str(value.get("type", ""))
    enum = frozenset(value["enum"]) if "enum" in value else None
    return FieldRule(frozenset(operators.get("single", ())), frozenset(operators.get("list", ())), kind, enum)


def parse_rfc3339(raw: Any) -> datetime | None:
    """Return the datetime ``raw`` denotes if it is an RFC 3339 string with an offset, else None."""
    if not isinstance(raw, str) or not _RFC3339.match(raw):
        return None
    try:
        return datetime.fromisoformat(raw.upper().replace("Z", "+00:00"))
    except ValueError:
        return None


# ---------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class _Value:
    """One value as written: a quoted string (unescaped) or a bare word."""

    quoted: bool
    text: str


@dataclass(frozen=True, slots=True)
class _Written:
    """One condition as written, before it is judged against the field rules."""

    operator: str
    field: str
    value: _Value | tuple[_Value, ...]


def _tokens(text: str) -> list[tuple[str, str]]:
    """Split a filter into (kind, text) tokens: string, punct or word."""
    tokens: list[tuple[str, str]] = []
    position, end = 0, len(text.rstrip())
    while position < end:
        match = _TOKEN.match(text, position)
        if match is None or match.lastgroup is None:
            raise FilterError(f"Invalid filter expression: {text}")
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        position = match.end()
    return tokens


def _unquoted(token: str) -> str:
    """Return a quoted string's text: JSON escapes inside double quotes, backslash escapes inside single."""
    if token.startswith('"'):
        try:
            return str(json.loads(token))
        except ValueError:
            raise FilterError(f"Invalid string in filter: {token}") from None
    return _ESCAPED.sub(r"\1", token[1:-1])


class _Parser:
    """Recursive descent over the tokens of one filter."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._tokens = _tokens(text)
        self._at = 0

    def parse(self) -> list[_Written]:
        """Return every condition of the whole filter."""
        found = self._conditions()
        if self._at != len(self._tokens):
            raise self._error()
        return found

    def _conditions(self) -> list[_Written]:
        found = self._condition()
        while self._next_is("punct", ","):
            self._take("punct")
            found += self._condition()
        return found

    def _condition(self) -> list[_Written]:
        name = self._take("word")
        self._take("punct", "(")
        if name == "and":
            found = self._conditions()
        else:
            field = self._take("word")
            self._take("punct", ",")
            found = [_Written(name, field, self._value())]
        self._take("punct", ")")
        return found

    def _value(self) -> _Value | tuple[_Value, ...]:
        if not self._next_is("punct", "["):
            return self._scalar()
        self._take("punct", "[")
        items = [self._scalar()]
        while self._next_is("punct", ","):
            self._take("punct")
            items.append(self._scalar())
        self._take("punct", "]")
        return tuple(items)

    def _scalar(self) -> _Value:
        if self._next_is("string"):
            return _Value(True, _unquoted(self._take("string")))
        return _Value(False, self._take("word"))

    def _next_is(self, kind: str, text: str | None = None) -> bool:
        if self._at >= len(self._tokens):
            return False
        found_kind, found_text = self._tokens[self._at]
        return found_kind == kind and text in (None, found_text)

    def _take(self, kind: str, text: str | None = None) -> str:
        if not self._next_is(kind, text):
            raise self._error()
        self._at += 1
        return self._tokens[self._at - 1][1]

    def _error(self) -> FilterError:
        return FilterError(f"Invalid filter expression: {self._text}")


# ---------------------------------------------------------------- judging and matching

_COMPARE: Mapping[str, Callable[[Any, Any], bool]] = {
    "equals": operator.eq,
    "greater-than": operator.gt,
    "greater-or-equal": operator.ge,
    "less-than": operator.lt,
    "less-or-equal": operator.le,
    "contains": lambda actual, wanted: wanted in actual,
    "starts-with": lambda actual, wanted: actual.startswith(wanted),
    "ends-with": lambda actual, wanted: actual.endswith(wanted),
}


@dataclass(frozen=True, slots=True)
class Condition:
    """One accepted condition with typed values; a list value means "one of these" (``any``, ``equals``)."""

    operator: str
    field: str
    value: Any

    def matches(self, actual: Any) -> bool:
        """Return whether a resource whose field holds ``actual`` passes this condition."""
        if actual is None:
            return False
        if isinstance(self.value, tuple):
            return actual in self.value
        try:
            return _COMPARE[self.operator](actual, self.value)
        except (KeyError, TypeError):
            return False


def parse_filter(text: str | None, table: FilterTable) -> list[Condition]:
    """Parse a ``filter`` parameter and accept it only in forms ``table`` declares; raise FilterError."""
    if not text:
        return []
    return [_judged(written, table) for written in _Parser(text).parse()]


def _judged(written: _Written, table: FilterTable) -> Condition:
    """Check one condition's field, operator, value shape and value types against the field rules."""
    rule = table.get(written.field)
    if rule is None:
        raise FilterError(f"'{written.field}' is not a valid field for filtering; use one of: {_names(table)}")
    listed = isinstance(written.value, tuple)
    if written.operator not in (rule.listed if listed else rule.single):
        raise FilterError(_operator_problem(written.operator, written.field, rule, listed=listed))
    if isinstance(written.value, tuple):
        return Condition(written.operator, written.field, tuple(_typed(item, rule, written) for item in written.value))
    return Condition(written.operator, written.field, _typed(written.value, rule, written))


def _operator_problem(op: str, field: str, rule: FieldRule, *, listed: bool) -> str:
    """Explain why ``op`` cannot be used on ``field`` with this value shape."""
    if listed and op in rule.single:
        return f"'{op}' on filter field '{field}' takes a single value, not a list"
    if not listed and op in rule.listed:
        return f"'{op}' on filter field '{field}' takes a list of values, e.g. {op}({field},[...])"
    return f"'{op}' is not a valid operator for filter field '{field}'; use one of: {_names(rule.single | rule.listed)}"


def _names(items: Mapping[str, object] | frozenset[str]) -> str:
    return ", ".join(sorted(items)) or "(none)"


def _typed(value: _Value, rule: FieldRule, written: _Written) -> Any:
    """Return the value as the field's type, or raise FilterError naming the field and the value."""
    typed = _as_kind(value, rule.kind)
    if typed is None or (rule.enum is not None and typed not in rule.enum):
        shown = json.dumps(value.text) if value.quoted else value.text
        raise FilterError(f"Invalid value {shown} for filter field '{written.field}': expected {_expected(rule)}")
    return typed


def _as_kind(value: _Value, kind: str) -> Any:
    """Convert a written value to ``kind``; None when it is not one."""
    if kind == "string":
        return value.text if value.quoted else None
    if value.quoted:
        return None
    if kind == "date-time":
        return parse_rfc3339(value.text)
    if kind == "boolean":
        return {"true": True, "false": False}.get(value.text)
    if kind in ("integer", "number"):
        return _number(value.text, integer=kind == "integer")
    return None


def _number(text: str, *, integer: bool) -> int | float | None:
    """Parse a bare number (an integer when asked for one)."""
    try:
        return int(text) if integer else float(text)
    except ValueError:
        return None


def _expected(rule: FieldRule) -> str:
    """Describe the values a field takes, for error details."""
    if rule.enum is not None:
        return "one of " + ", ".join(f'"{item}"' for item in sorted(rule.enum))
    return {
        "string": "a quoted string",
        "date-time": "an RFC 3339 date-time with an offset, unquoted",
    }.get(rule.kind, f"an unquoted {rule.kind}")
