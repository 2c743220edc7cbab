"""Self-description of a simulator's ``/__sim/`` control API, served at ``GET /__sim/``.

Invariants:
- Each simulator lists every control route it registers (method, path as aiohttp's canonical form, one
  line saying what it does, and the JSON body fields it reads); a test compares the list with the router.
- Body fields are described as ``type (required|optional|default X): meaning``, defaults written as JSON;
  for pydantic argument models they are derived from the model, so the index cannot drift from what the
  handler validates.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

CONTROL_PREFIX = "/__sim/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ControlRoute:
    """One documented control endpoint."""

    method: str
    path: str
    description: str
    body: Mapping[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """Return the entry as served in the index."""
        return {"method": self.method, "path": self.path, "description": self.description, "body": dict(self.body)}


def index_route(simulator: str) -> ControlRoute:
    """Return the entry documenting ``GET /__sim/`` itself."""
    return ControlRoute("GET", CONTROL_PREFIX, f"this index of the simulated {simulator}'s control routes")


def index_handler(simulator: str, routes: Callable[[], Sequence[ControlRoute]]) -> Handler:
    """Return a handler answering ``{"simulator": ..., "routes": [...]}``, sorted by path then method."""

    async def handle(request: web.Request) -> web.StreamResponse:
        entries = sorted(routes(), key=lambda route: (route.path, route.method))
        return web.json_response({"simulator": simulator, "routes": [route.as_json() for route in entries]})

    return handle


def model_fields(model: type[BaseModel]) -> dict[str, str]:
    """Describe the fields of a control argument model, from its annotations, defaults and descriptions."""
    fields = model.model_fields.items()
    return {name: _field_text(info.annotation, info.default, info.description) for name, info in fields}


def _field_text(annotation: Any, default: Any, description: str | None) -> str:
    """Render one field as ``type (required|optional|default X)[: description]``."""
    name = _type_name(annotation)
    if default is PydanticUndefined:
        presence = "required"
    elif default is None:
        presence, name = "optional", name.removesuffix(" | None")
    else:
        presence = f"default {json.dumps(default)}"  # as it is written in the JSON body: false, not False
    text = f"{name} ({presence})"
    return f"{text}: {description}" if description else text


def _type_name(annotation: Any) -> str:
    """Return a readable name for a field annotation (``int``, ``list[str] | None``)."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
