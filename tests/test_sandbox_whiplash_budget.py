"""The simulated Whiplash's application budget (rate limit) and response time, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from kit.bridgekit import eventually

from klaviyo_bridge.cli import build_parser
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, build_from_args, serve_whiplash
from klaviyo_bridge.sandbox.whiplash import parse_args as parse_sim_args

CLIENT_ID = "budget-client"
CLIENT_SECRET = "budget-secret"  # a fake's credential, not a real secret
RATE_LIMITED = {"message": "Rate limit exceeded"}


class Monotonic:
    """A settable stand-in for the simulator's monotonic clock (the rate limit's windows)."""

    def __init__(self, now: float = 100.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    """One HTTP answer, read completely."""

    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class Client:
    """A tiny HTTP driver for the sim (not our production client)."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str) -> None:
        self.http = http
        self.base_url = base_url
        self.token = ""

    async def call(self, method: str, path: str, **kwargs: Any) -> Reply:
        async with self.http.request(method, self.base_url + path, **kwargs) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.text())

    async def login(self) -> Reply:
        body = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        reply = await self.call("POST", "/oauth/token", json=body)
        if reply.status == 200:
            self.token = reply.json()["access_token"]
        return reply

    async def get(self, path: str, customer: int | None = None, **params: str) -> Reply:
        headers = {"Authorization": f"Bearer {self.token}"}
        if customer is not None:
            headers["X-CUSTOMER-ID"] = str(customer)
        return await self.call("GET", path, headers=headers, params=params)


@pytest.fixture
def clock() -> Monotonic:
    return Monotonic()


@pytest.fixture
def fake(clock: Monotonic) -> FakeWhiplash:
    fake = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, rate_limit_per_s=3, monotonic=clock)
    for customer in (1, 2):
        fake.create_order(customer)
    return fake


@pytest.fixture
async def client(fake: FakeWhiplash) -> AsyncIterator[Client]:
    async with serve_whiplash(fake) as base_url, aiohttp.ClientSession() as http:
        yield Client(http, base_url)


# ------------------------------------------------------------------------------------------ rate limit


async def test_one_request_past_the_budget_gets_429_with_retry_after_then_the_next_window_admits(
    client: Client, fake: FakeWhiplash, clock: Monotonic
) -> None:
    """1. Budget 3/s; in one window: a token request, two orders pages, one more page. 2. The clock moves into
    the next second. Result: exactly the fourth request is refused (429, Retry-After 1, the JSON message),
    without serving a page; the next window admits again; the sim's own record shows 3 then 1."""
    login = await client.login()
    pages = [await client.get("/api/v2/orders") for _ in range(3)]
    clock.now = 101.0
    later = await client.get("/api/v2/orders")

    assert login.status == 200
    assert [p.status for p in pages] == [200, 200, 429]
    refused = pages[2]
    assert refused.json() == RATE_LIMITED
    assert refused.headers["Retry-After"] == "1"
    assert later.status == 200
    assert fake.window_counts() == {100: 3, 101: 1}
    assert fake.counters.throttled == 1
    assert fake.counters.rate_limited == 1
    assert fake.counters.pages_served == 3  # the refused request did no work


async def test_retry_after_is_the_rest_of_the_window_rounded_up(client: Client, fake: FakeWhiplash,
                                                                 clock: Monotonic) -> None:
    fake.rate_limit_per_s = 1
    clock.now = 7.999
    await client.login()

    refused = await client.get("/api/v2/orders")

    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1"  # 0.001 s left: rounded up, never 0


async def test_every_customer_and_route_spends_the_one_application_budget(
    client: Client, fake: FakeWhiplash
) -> None:
    """Result: the budget is the application's: token, orders of two customers, one order, count and the
    customer list all count against the same window."""
    fake.rate_limit_per_s = 5
    await client.login()
    order_id = next(iter(fake.orders))
    replies = [
        await client.get("/api/v2/orders", customer=1), await client.get("/api/v2/orders", customer=2),
        await client.get(f"/api/v2/orders/{order_id}"), await client.get("/api/v2/orders/count"),
        await client.get("/api/v2/customers"), await client.get("/api/v2/me"),
    ]

    assert [r.status for r in replies] == [200, 200, 200, 200, 429, 429]
    assert list(fake.window_counts().values()) == [5]


async def test_a_refused_request_takes_no_fault_and_is_refused_before_the_token_check(
    client: Client, fake: FakeWhiplash, clock: Monotonic
) -> None:
    """1. Budget 1/s, spent by the token request. 2. A 503 fault is queued. 3. Two more requests in that
    window, the second with a made-up token. 4. One request in the next window. Result: both refusals are
    429 (the limiter answers before the token is looked at) and leave the fault for the next window."""
    fake.rate_limit_per_s = 1
    await client.login()
    fake.fail_next(1, 503)

    refused = await client.get("/api/v2/orders")
    token, client.token = client.token, "never-issued"
    unauthenticated = await client.get("/api/v2/orders")
    client.token = token
    clock.now = 101.5
    faulted = await client.get("/api/v2/orders")

    assert (refused.status, unauthenticated.status, faulted.status) == (429, 429, 503)
    assert fake.pending_faults == ()
    assert fake.counters.unauthorized == 0


async def test_without_a_limit_nothing_is_refused_and_windows_are_still_counted(
    client: Client, fake: FakeWhiplash
) -> None:
    fake.rate_limit_per_s = None
    await client.login()
    replies = [await client.get("/api/v2/orders") for _ in range(6)]
    state = (await client.call("GET", "/__sim/state")).json()

    assert {r.status for r in replies} == {200}
    assert fake.window_counts() == {100: 7}
    assert state["busiest_window"] == 7
    assert state["rate_limit_per_s"] is None


async def test_control_requests_are_never_rate_limited_or_counted(client: Client, fake: FakeWhiplash) -> None:
    fake.rate_limit_per_s = 1
    replies = [await client.call("GET", "/__sim/state") for _ in range(5)]

    assert {r.status for r in replies} == {200}
    assert fake.window_counts() == {}


async def test_windows_route_and_settings_switch_the_limit_over_http(client: Client, fake: FakeWhiplash,
                                                                     clock: Monotonic) -> None:
    set_one = await client.call("POST", "/__sim/settings", json={"rate_limit_per_s": 1, "response_ms": 5})
    await client.login()
    refused = await client.get("/api/v2/orders")
    windows = (await client.call("GET", "/__sim/windows")).json()
    set_off = await client.call("POST", "/__sim/settings", json={"rate_limit_per_s": None})
    admitted = await client.get("/api/v2/orders")

    assert set_one.json()["rate_limit_per_s"] == 1
    assert set_one.json()["response_ms"] == 5.0
    assert refused.status == 429
    assert windows == {"rate_limit_per_s": 1, "window_counts": {"100": 1}, "throttled": 1}
    assert set_off.json()["rate_limit_per_s"] is None
    assert admitted.status == 200
    assert set_off.json()["counters"]["throttled"] == 1


@pytest.mark.parametrize("body", [
    {"rate_limit_per_s": 0}, {"rate_limit_per_s": "ten"}, {"rate_limit_per_s": True}, {"rate_limit_per_s": 2.5},
    {"response_ms": -1}, {"response_ms": "slow"},
])
async def test_bad_settings_are_refused_and_change_nothing(client: Client, fake: FakeWhiplash,
                                                           body: dict[str, Any]) -> None:
    reply = await client.call("POST", "/__sim/settings", json=body)

    assert reply.status == 400
    assert next(iter(body)) in reply.json()["message"]
    assert (fake.rate_limit_per_s, fake.response_ms) == (3, 0.0)


def test_constructor_refuses_a_budget_below_one() -> None:
    with pytest.raises(ValueError, match="rate_limit_per_s"):
        FakeWhiplash(CLIENT_ID, CLIENT_SECRET, rate_limit_per_s=0)


# -------------------------------------------------------------------------------------- response time


async def test_concurrent_orders_requests_overlap_instead_of_queueing(client: Client, fake: FakeWhiplash) -> None:
    """1. Every orders request takes R = 250 ms. 2. k = 8 requests (list, one order, count) at once.
    Result: each took at least R, and all of them together far less than k × R: the server overlaps them."""
    fake.rate_limit_per_s = None
    fake.response_ms = 250
    await client.login()
    order_id = next(iter(fake.orders))
    paths = ["/api/v2/orders", f"/api/v2/orders/{order_id}", "/api/v2/orders/count"] * 3
    paths = paths[:8]

    started = time.monotonic()
    replies = await asyncio.gather(*(client.get(path) for path in paths))
    elapsed = time.monotonic() - started

    assert {r.status for r in replies} == {200}
    assert elapsed >= 0.25 * 0.95
    assert elapsed < 8 * 0.25 / 2


async def test_response_time_applies_to_orders_requests_only(client: Client, fake: FakeWhiplash) -> None:
    """Result: token, /me and the customer list answer at once; a refused (429) request is not slowed either."""
    fake.response_ms = 1500
    fake.rate_limit_per_s = 4

    started = time.monotonic()
    await client.login()
    fast = [await client.get("/api/v2/me"), await client.get("/api/v2/customers")]
    throttled = [await client.get("/api/v2/orders"), await client.get("/api/v2/orders")]
    elapsed = time.monotonic() - started

    assert [r.status for r in fast] == [200, 200]
    assert [r.status for r in throttled] == [200, 429]
    assert 1.5 * 0.95 <= elapsed < 2.9  # one slowed request, not two or more


async def test_an_orders_request_reads_the_state_on_arrival(client: Client, fake: FakeWhiplash) -> None:
    """1. Orders take 1 s. 2. An order is created while a request is being answered. Result: the answer is
    the state when the request arrived, without the new order; the next request has it."""
    fake.rate_limit_per_s = None
    fake.response_ms = 1000
    await client.login()
    before = set(fake.orders)

    pending = asyncio.create_task(client.get("/api/v2/orders"))
    await eventually(lambda: fake.counters.pages_served == 1, limit_s=5, what="the request to be read")
    new_id = fake.create_order(1)["id"]
    first = await pending
    second = await client.get("/api/v2/orders")

    assert {o["id"] for o in first.json()} == before
    assert new_id in {o["id"] for o in second.json()}


# ---------------------------------------------------------------------------------------------- CLIs


def test_standalone_simulator_takes_the_budget_and_response_time() -> None:
    args = parse_sim_args(["--rate-limit-per-s", "10", "--response-ms", "250"])

    fake = build_from_args(args)

    assert (fake.rate_limit_per_s, fake.response_ms) == (10, 250.0)
    assert build_from_args(parse_sim_args([])).rate_limit_per_s is None


def test_sandbox_command_takes_whiplash_budget_and_response_time() -> None:
    parser = build_parser()

    args = parser.parse_args(["sandbox", "--whiplash-rate-limit-per-s", "10", "--whiplash-response-ms", "250"])
    default = parser.parse_args(["sandbox"])

    assert (args.whiplash_rate_limit_per_s, args.whiplash_response_ms) == (10, 250.0)
    assert (default.whiplash_rate_limit_per_s, default.whiplash_response_ms) == (None, 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["sandbox", "--whiplash-rate-limit-per-s", "0"])
