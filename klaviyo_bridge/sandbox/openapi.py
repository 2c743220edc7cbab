"""Check request bodies sent to the simulated Klaviyo against its OpenAPI 3.0 spec, or hand rules.

Invariants:
- A checker never raises on a bad body: it returns a ``Problem`` (JSON pointer + message) or None.
- The spec is parsed and its validators built at most once per (path, mtime) per process, and only the
  request schemas of the operations in ``BODY_OPERATIONS`` (looked up through ``paths``) are compiled.
- OAS 3.0 ``nullable: true`` beside ``$ref`` or without ``type`` is ignored by JSON Schema keywords, so those
  nodes are rewritten to also admit null; every other node is validated exactly as the spec states.
- Without the spec (or without openapi-schema-validator) ``HandChecker`` checks the fields the bridge sends:
  required keys, types and ``type`` literals, with messages worded like jsonschema's.
- A checker also carries the ``filter`` forms each operation in ``FILTER_OPERATIONS`` accepts: read from the
  spec's ``x-klaviyo-filters`` by ``SpecChecker``, the hand-written 2026-07-15 table in ``HandChecker``.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .filters import FILTER_OPERATIONS, HAND_FILTERS, FilterTable, declared_filters

log = logging.getLogger(__name__)

SPEC_ENV = "KLAVIYO_OPENAPI_SPEC"
_SPEC_URI = "urn:klaviyo-openapi:stable"
_SCHEMA_REF = re.compile(r"^#/components/schemas/([^/]+)$")

#: operationId -> (method, path) of every operation whose request body the simulator validates.
BODY_OPERATIONS: Mapping[str, tuple[str, str]] = {
    "create_event": ("post", "/api/events"),
    "bulk_create_events": ("post", "/api/event-bulk-create-jobs"),
    "create_or_update_profile": ("post", "/api/profile-import"),
    "bulk_import_profiles": ("post", "/api/profile-bulk-import-jobs"),
    "create_list": ("post", "/api/lists"),
    "add_profiles_to_list": ("post", "/api/lists/{id}/relationships/profiles"),
}


@dataclass(frozen=True)
class Problem:
    """Why a body was refused: where (JSON pointer) and what."""

    pointer: str
    message: str


class BodyChecker(Protocol):
    """Anything that can judge a request body of a named operation, and knows its declared filters."""

    @property
    def filters(self) -> Mapping[str, FilterTable]:
        """Return the accepted ``filter`` forms per operation id (an operation left out takes no filter)."""

    def check(self, operation_id: str, body: Any) -> Problem | None:
        """Return the first problem with ``body``, or None when it is acceptable."""


def default_spec_path() -> Path | None:
    """Return the spec named by $KLAVIYO_OPENAPI_SPEC or the copy beside the checkout, if it exists."""
    env = os.environ.get(SPEC_ENV)
    repo_root = Path(__file__).resolve().parents[2]
    candidate = Path(env) if env else repo_root.parent / "shared" / "klaviyo-openapi" / "stable.json"
    return candidate if candidate.is_file() else None


def make_checker(spec_path: Path | None) -> BodyChecker:
    """Return a spec-based checker for ``spec_path``, or the hand rules when it is None or unusable."""
    if spec_path is None:
        return HandChecker()
    try:
        return load_spec_checker(spec_path)
    except ImportError:
        log.warning("openapi validation unavailable, using hand rules reason=import_error")
        return HandChecker()


def load_spec_checker(spec_path: Path) -> SpecChecker:
    """Return the (cached) spec checker for ``spec_path``; raise OSError if the file cannot be read."""
    resolved = spec_path.resolve()
    return _cached_spec_checker(resolved, resolved.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_spec_checker(path: Path, mtime_ns: int) -> SpecChecker:
    """Build a checker once per file version; the mtime only keys the cache."""
    del mtime_ns
    return SpecChecker(json.loads(path.read_text(encoding="utf-8")))


class SpecChecker:
    """Validate bodies with OAS30Validator against the request schemas named in the spec's ``paths``."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        named = {op: _request_schema_name(spec, *where) for op, where in BODY_OPERATIONS.items()}
        wanted = {op: name for op, name in named.items() if name is not None}
        self.version: str = str(spec.get("info", {}).get("version", "?"))
        self._validators = _build_validators(spec, wanted)
        self._filters = declared_filters(spec, FILTER_OPERATIONS)

    @property
    def filters(self) -> Mapping[str, FilterTable]:
        """Return the filter forms the spec's ``x-klaviyo-filters`` declare per operation."""
        return self._filters

    @property
    def operations(self) -> frozenset[str]:
        """Return the operation ids this checker has a schema for."""
        return frozenset(self._validators)

    def check(self, operation_id: str, body: Any) -> Problem | None:
        """Return the most relevant schema violation in ``body``, or None."""
        validator = self._validators.get(operation_id)
        if validator is None:
            return None
        error = _best_match()(validator.iter_errors(body))
        if error is None:
            return None
        return Problem(_pointer(error.absolute_path), str(error.message))


def _best_match() -> Any:
    """Return jsonschema's best_match; imported by name because jsonschema ships no type stubs."""
    return importlib.import_module("jsonschema.exceptions").best_match


def _request_schema_name(spec: Mapping[str, Any], method: str, path: str) -> str | None:
    """Return the components/schemas name of an operation's JSON:API request body, if declared."""
    operation = spec.get("paths", {}).get(path, {}).get(method, {})
    content = operation.get("requestBody", {}).get("content", {})
    for media in content.values():
        match = _SCHEMA_REF.match(str(media.get("schema", {}).get("$ref", "")))
        if match:
            return match.group(1)
    return None


def _build_validators(spec: Mapping[str, Any], roots: Mapping[str, str]) -> dict[str, Any]:
    """Compile one OAS30Validator per operation over a registry holding the reachable schemas."""
    from openapi_schema_validator import OAS30Validator, oas30_format_checker  # deferred: optional; hand rules if not
    from referencing import Registry, Resource  # deferred with it: openapi-schema-validator installs it
    from referencing.jsonschema import DRAFT4  # (the same)

    schemas = _reachable_schemas(spec.get("components", {}).get("schemas", {}), roots.values())
    document = {"components": {"schemas": schemas}}
    resource = Resource.from_contents(document, default_specification=DRAFT4)
    registry = Registry().with_resource(_SPEC_URI, resource)
    return {
        op: OAS30Validator(
            {"$ref": f"{_SPEC_URI}#/components/schemas/{name}"},
            registry=registry,
            format_checker=oas30_format_checker,
        )
        for op, name in roots.items()
    }


def _reachable_schemas(all_schemas: Mapping[str, Any], roots: Iterable[str]) -> dict[str, Any]:
    """Copy the named schemas and everything they reference, with OAS nullable made explicit."""
    out: dict[str, Any] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in out:
            continue
        refs: set[str] = set()
        out[name] = _patched(all_schemas[name], refs)
        pending.extend(refs - out.keys())
    return out


def _patched(node: Any, refs: set[str]) -> Any:
    """Return ``node`` with nullable-without-type nodes widened to accept null; collect schema refs."""
    if isinstance(node, list):
        return [_patched(item, refs) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and (match := _SCHEMA_REF.match(ref)):
        refs.add(match.group(1))
    copy = {key: _patched(value, refs) for key, value in node.items()}
    if copy.get("nullable") is True and "type" not in copy:
        del copy["nullable"]
        return {"anyOf": [copy, {"enum": [None]}]}
    return copy


def _pointer(path: Iterable[Any]) -> str:
    """Render a jsonschema path deque as a JSON pointer."""
    parts = [str(part).replace("~", "~0").replace("/", "~1") for part in path]
    return "/" + "/".join(parts) if parts else ""


# ---------------------------------------------------------------- hand rules (no spec available)

_MISSING = object()
_KINDS: Mapping[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "boolean": (bool,),
}
# A rule is (pointer, expectation); '*' in a pointer walks array items. An expectation is a kind from
# _KINDS or "=literal"; a trailing '?' means the field may be absent or null.
Rule = tuple[str, str]

_PROFILE_STRINGS = (
    "email", "phone_number", "external_id", "anonymous_id", "_kx", "first_name", "last_name",
    "organization", "locale", "title", "image",
)  # fmt: skip


def _resource(prefix: str, literal: str) -> list[Rule]:
    """Rules for a JSON:API resource object with a fixed ``type`` and an attributes object."""
    return [(prefix, "object"), (f"{prefix}/type", f"={literal}"), (f"{prefix}/attributes", "object")]


def _profile(prefix: str) -> list[Rule]:
    """Rules for a profile resource object as sent inside events and imports."""
    attrs = f"{prefix}/attributes"
    optional = [(f"{attrs}/{key}", "string?") for key in _PROFILE_STRINGS]
    return [
        *_resource(prefix, "profile"),
        (f"{prefix}/id", "string?"),
        *optional,
        (f"{attrs}/location", "object?"),
        (f"{attrs}/properties", "object?"),
    ]


def _event(prefix: str) -> list[Rule]:
    """Rules for the attributes of one event, without its profile."""
    attrs = f"{prefix}/attributes"
    metric = f"{attrs}/metric/data"
    return [
        *_resource(prefix, "event"),
        (f"{attrs}/properties", "object"),
        (f"{attrs}/time", "string?"),
        (f"{attrs}/value", "number?"),
        (f"{attrs}/value_currency", "string?"),
        (f"{attrs}/unique_id", "string?"),
        (f"{attrs}/backfill", "boolean?"),
        (f"{attrs}/metric", "object"),
        *_resource(metric, "metric"),
        (f"{metric}/attributes/name", "string"),
    ]


def _bulk_events() -> list[Rule]:
    """Rules for an event-bulk-create-job body."""
    group = "/data/attributes/events-bulk-create/data/*"
    return [
        *_resource("/data", "event-bulk-create-job"),
        ("/data/attributes/events-bulk-create", "object"),
        ("/data/attributes/events-bulk-create/data", "array"),
        *_resource(group, "event-bulk-create"),
        (f"{group}/attributes/profile", "object"),
        *_profile(f"{group}/attributes/profile/data"),
        (f"{group}/attributes/events", "object"),
        (f"{group}/attributes/events/data", "array"),
        *_event(f"{group}/attributes/events/data/*"),
    ]


def _profile_import_job() -> list[Rule]:
    """Rules for a profile-bulk-import-job body."""
    lists = "/data/relationships/lists/data"
    return [
        *_resource("/data", "profile-bulk-import-job"),
        ("/data/attributes/profiles", "object"),
        ("/data/attributes/profiles/data", "array"),
        *_profile("/data/attributes/profiles/data/*"),
        ("/data/relationships", "object?"),
        ("/data/relationships/lists", "object?"),
        (lists, "array?"),
        (f"{lists}/*", "object"),
        (f"{lists}/*/type", "=list"),
        (f"{lists}/*/id", "string"),
    ]


HAND_RULES: Mapping[str, Sequence[Rule]] = {
    "create_event": [
        *_event("/data"),
        ("/data/attributes/profile", "object"),
        *_profile("/data/attributes/profile/data"),
    ],
    "bulk_create_events": _bulk_events(),
    "create_or_update_profile": _profile("/data"),
    "bulk_import_profiles": _profile_import_job(),
    "create_list": [
        *_resource("/data", "list"),
        ("/data/attributes/name", "string"),
        ("/data/attributes/opt_in_process", "string?"),
    ],
    "add_profiles_to_list": [
        ("/data", "array"),
        ("/data/*", "object"),
        ("/data/*/type", "=profile"),
        ("/data/*/id", "string"),
    ],
}


class HandChecker:
    """Check the fields the bridge sends with hand-written rules, for runs without the spec."""

    @property
    def filters(self) -> Mapping[str, FilterTable]:
        """Return the hand-written copy of the 2026-07-15 spec's filter declarations."""
        return HAND_FILTERS

    def check(self, operation_id: str, body: Any) -> Problem | None:
        """Return the first rule ``body`` breaks, or None."""
        if not isinstance(body, dict):
            return Problem("", f"{body!r} is not of type 'object'")
        for pointer, expectation in HAND_RULES.get(operation_id, ()):
            for where, value in _resolve(body, pointer):
                problem = _judge(where, value, expectation)
                if problem is not None:
                    return problem
        return None


def _resolve(body: Any, pointer: str) -> Iterator[tuple[str, Any]]:
    """Yield (concrete pointer, value or _MISSING) for each match whose parent exists with the right type."""
    frontier: list[tuple[str, Any]] = [("", body)]
    for segment in pointer.strip("/").split("/"):
        frontier = [step for where, node in frontier for step in _step(where, node, segment)]
    yield from frontier


def _step(where: str, node: Any, segment: str) -> list[tuple[str, Any]]:
    """Descend one pointer segment; a missing or mistyped parent yields nothing (its own rule reports it)."""
    if node is _MISSING:
        return []
    if segment == "*":
        items = node if isinstance(node, list) else []
        return [(f"{where}/{index}", item) for index, item in enumerate(items)]
    if isinstance(node, dict):
        return [(f"{where}/{segment}", node.get(segment, _MISSING))]
    return []


def _judge(where: str, value: Any, expectation: str) -> Problem | None:
    """Compare one value with its expectation, wording the problem like jsonschema would."""
    optional = expectation.endswith("?")
    kind = expectation.rstrip("?")
    parent, _, name = where.rpartition("/")
    if value is _MISSING:
        return None if optional else Problem(parent, f"'{name}' is a required property")
    if value is None:
        return None if optional else Problem(where, "None for not nullable")
    if kind.startswith("="):
        literal = kind[1:]
        return None if value == literal else Problem(where, f"{value!r} is not one of [{literal!r}]")
    if isinstance(value, _KINDS[kind]) and not (kind == "number" and isinstance(value, bool)):
        return None
    return Problem(where, f"{value!r} is not of type {kind!r}")
