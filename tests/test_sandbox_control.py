"""Both simulators' ``/__sim/`` control APIs, over real loopback HTTP: the self-describing index."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from klaviyo_bridge.sandbox._server import serve_app
from klaviyo_bridge.sandbox.klaviyo import FakeKlaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash

KEY = "pk_test_control_0001"


def klaviyo_app() -> web.Application:
    fake = FakeKlaviyo(spec_path=None)
    fake.add_account(KEY, "shop")
    return fake.make_app()


def whiplash_app() -> web.Application:
    return FakeWhiplash("client", "secret").make_app()


SIMULATORS = pytest.mark.parametrize("make_app", [klaviyo_app, whiplash_app], ids=["klaviyo", "whiplash"])


def registered_control_routes(app: web.Application) -> set[tuple[str, str]]:
    """Return (method, canonical path) of every /__sim/ route the app's router holds (HEAD twins left out)."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None and route.resource.canonical.startswith("/__sim/")
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_index(http: aiohttp.ClientSession, app: web.Application) -> dict[str, Any]:
    async with serve_app(app) as base_url, http.get(base_url + "/__sim/") as response:
        assert response.status == 200
        index: dict[str, Any] = await response.json()
    return index


@SIMULATORS
async def test_control_index_lists_every_registered_control_route(
    http: aiohttp.ClientSession, make_app: Callable[[], web.Application]
) -> None:
    """Result: GET /__sim/ names exactly the routes the router serves, so an undocumented route fails here."""
    app = make_app()

    index = await get_index(http, app)

    listed = [(route["method"], route["path"]) for route in index["routes"]]
    assert sorted(listed) == sorted(registered_control_routes(app))
    assert len(listed) == len(set(listed))
    assert ("GET", "/__sim/") in listed


@SIMULATORS
async def test_control_index_entries_say_what_they_do_and_what_body_they_read(
    http: aiohttp.ClientSession, make_app: Callable[[], web.Application]
) -> None:
    index = await get_index(http, make_app())

    for route in index["routes"]:
        assert set(route) == {"method", "path", "description", "body"}
        assert route["description"].strip(), route
        assert all(isinstance(name, str) and text.strip() for name, text in route["body"].items()), route


async def test_klaviyo_index_derives_body_fields_from_the_argument_models(http: aiohttp.ClientSession) -> None:
    index = await get_index(http, klaviyo_app())

    routes = {route["path"]: route for route in index["routes"]}
    assert index["simulator"] == "Klaviyo"
    assert routes["/__sim/fail_next"]["body"]["status"].startswith("int (default 503): ")
    assert routes["/__sim/delay"]["body"]["seconds"].startswith("float (required): ")
    assert routes["/__sim/accounts"]["body"]["scopes"].startswith("list[str] (optional): ")
    assert routes["/__sim/reset_connections"]["body"]["after_processing"].startswith("bool (default false): ")
    assert routes["/__sim/clear_faults"]["body"] == {}


async def test_klaviyo_unknown_control_route_answers_json_pointing_at_the_index(http: aiohttp.ClientSession) -> None:
    async with serve_app(klaviyo_app()) as base_url, http.post(base_url + "/__sim/explode", json={}) as response:
        body = await response.json()

    assert response.status == 404
    assert body == {"error": "no control route /__sim/explode; GET /__sim/ lists them"}
