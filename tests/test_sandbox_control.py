"""What both simulators share, over real loopback HTTP: the ``/__sim/`` index and quiet client hang-ups."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kit.bridgekit import eventually
from yarl import URL

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


# ---------------------------------------------------------------- clients that hang up mid-request


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Fail on any ERROR record or any record carrying an exception (aiohttp's "Error handling request")."""
    bad = [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
    assert [f"{r.levelname} {r.name} {r.getMessage()}" for r in bad] == []


async def still_serving(http: aiohttp.ClientSession, base_url: str) -> None:
    async with http.get(base_url + "/__sim/state") as response:
        assert response.status == 200


async def send_half_and_hang_up(base_url: str, request_line: str, headers: str, *, reset: bool) -> None:
    """Send a request whose body is cut short of its Content-Length, then close (FIN) or reset (RST)."""
    url = URL(base_url)
    _, writer = await asyncio.open_connection(url.host, url.port)
    head = f"{request_line} HTTP/1.1\r\nHost: {url.host}\r\n{headers}Content-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: 100\r\n\r\n".encode() + b'{"data": ')
    await writer.drain()
    await asyncio.sleep(0.05)  # the handler is now waiting for the rest of the body
    if reset:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


KLAVIYO_HEADERS = f"Authorization: Klaviyo-API-Key {KEY}\r\nrevision: 2026-07-15\r\n"


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
@pytest.mark.parametrize("path", ["/api/events", "/__sim/accounts"])
async def test_klaviyo_client_hanging_up_mid_body_leaves_no_traceback(
    caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession, path: str, reset: bool
) -> None:
    """1. Send half a POST body, hang up. Result: one DEBUG line, no traceback; the simulator still serves."""
    caplog.set_level(logging.DEBUG)
    async with serve_app(klaviyo_app()) as base_url:
        await send_half_and_hang_up(base_url, f"POST {path}", KLAVIYO_HEADERS, reset=reset)
        await eventually(lambda: "sim client disconnected" in caplog.text, what="the hang-up")
        await still_serving(http, base_url)

    assert_no_traceback(caplog)


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
@pytest.mark.parametrize("path", ["/oauth/token", "/__sim/customers"])
async def test_whiplash_client_hanging_up_mid_body_leaves_no_traceback(
    caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession, path: str, reset: bool
) -> None:
    """1. Send half a POST body, hang up. Result: no traceback; a counted request is recorded as 499."""
    caplog.set_level(logging.DEBUG)
    fake = FakeWhiplash("client", "secret")
    async with serve_app(fake.make_app()) as base_url:
        await send_half_and_hang_up(base_url, f"POST {path}", "", reset=reset)
        await eventually(lambda: "sim client disconnected" in caplog.text, what="the hang-up")
        await still_serving(http, base_url)

    assert_no_traceback(caplog)
    assert fake.counters.statuses == ({499: 1} if path == "/oauth/token" else {})


async def test_klaviyo_request_held_by_a_delay_fault_then_abandoned_leaves_no_traceback(
    caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    """1. Delay every API request 0.3 s. 2. A client gives up after 0.05 s and closes the connection.
    Result: the simulator finishes the request, answers nobody, logs no traceback and keeps serving."""
    caplog.set_level(logging.DEBUG)
    fake = FakeKlaviyo(spec_path=None)
    shop = fake.add_account(KEY, "shop")
    fake.delay(0.3)
    headers = {"Authorization": f"Klaviyo-API-Key {KEY}", "revision": "2026-07-15"}
    async with serve_app(fake.make_app()) as base_url:
        with pytest.raises(TimeoutError):
            async with http.get(base_url + "/api/lists", headers=headers, timeout=aiohttp.ClientTimeout(total=0.05)):
                pass
        await eventually(lambda: shop.counters.statuses.total() == 1, what="the held request")
        await still_serving(http, base_url)

    assert_no_traceback(caplog)


async def test_whiplash_request_held_by_a_delay_fault_then_abandoned_leaves_no_traceback(
    caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    """1. Delay the next API request 0.3 s. 2. A client gives up after 0.05 s. Result: no traceback."""
    caplog.set_level(logging.DEBUG)
    fake = FakeWhiplash("client", "secret")
    fake.set_delay(0.3, n=1)
    async with serve_app(fake.make_app()) as base_url:
        with pytest.raises(TimeoutError):
            async with http.get(base_url + "/api/v2/orders", timeout=aiohttp.ClientTimeout(total=0.05)):
                pass
        await eventually(lambda: len(fake.counters.log) == 1, what="the held request")
        await still_serving(http, base_url)

    assert_no_traceback(caplog)
