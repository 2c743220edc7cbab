"""Webhooks of the simulated Whiplash: catalogue, subscriptions, signed deliveries and their controls.

Every test serves the simulator and a receiver (a plain aiohttp app) on 127.0.0.1 and asserts what the receiver
got and what the simulator recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kit.bridgekit import eventually

from klaviyo_bridge.sandbox._server import serve_app
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, OrderScript, serve_whiplash
from klaviyo_bridge.sandbox.whiplash_webhooks import NOTIFICATION_EVENTS, status_events, whiplash_signature

CLIENT_ID = "hook-client"
CLIENT_SECRET = "hook-secret-0001"  # a fake's credential, not a real secret
SHOP = 7
OTHER_SHOP = 8
CONFIRMED = {"order.attention", "order.batched", "order.cancelled", "order.created", "order.delivered",
             "order.dropship.packed", "order.shipped"}


def signed(body: bytes) -> str:
    """Return the signature a receiver expects: hex HMAC-SHA256 of the raw body, keyed with the client secret."""
    return hmac.new(CLIENT_SECRET.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class Hook:
    """One request the receiver got."""

    at: float
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def event(self) -> str:
        return str(self.json()["event_name"])

    @property
    def order_id(self) -> int:
        return int(self.json()["order"]["id"])


@dataclass
class Receiver:
    """A webhook endpoint that records every request; ``gate`` (when set) holds each answer until it opens."""

    url: str = ""
    status: int = 202
    hooks: list[Hook] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hooks.append(Hook(time.monotonic(), dict(request.headers), await request.read()))
        if self.gate is not None:
            await self.gate.wait()
        return web.Response(status=self.status)

    async def got(self, n: int) -> list[Hook]:
        """Wait until ``n`` requests arrived; return them."""
        await eventually(lambda: len(self.hooks) >= n, limit_s=10, what=f"{n} webhooks")
        return self.hooks


class Client:
    """A tiny HTTP driver for the sim (not our production client)."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str) -> None:
        self.http = http
        self.base_url = base_url
        self.token = ""

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if path.startswith("/api/") else {}
        headers.update(kwargs.pop("headers", {}))
        async with self.http.request(method, self.base_url + path, headers=headers, **kwargs) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def login(self) -> None:
        body = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        _, token = await self.call("POST", "/oauth/token", json=body)
        self.token = token["access_token"]


@pytest.fixture
def fake() -> FakeWhiplash:
    fake = FakeWhiplash(CLIENT_ID, CLIENT_SECRET)
    fake.add_customer(SHOP)
    fake.add_customer(OTHER_SHOP)
    return fake


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    async with serve_app(app) as base_url:
        receiver.url = base_url + "/hook"
        yield receiver
        if receiver.gate is not None:
            receiver.gate.set()  # let a held answer finish so the runner cleans up at once


@pytest.fixture
async def client(fake: FakeWhiplash) -> AsyncIterator[Client]:
    async with serve_whiplash(fake) as base_url, aiohttp.ClientSession() as http:
        client = Client(http, base_url)
        await client.login()
        yield client


def event_id(name: str) -> int:
    return next(e.id for e in NOTIFICATION_EVENTS if e.name == name)


def subscription_body(url: str, **fields: Any) -> dict[str, Any]:
    return {"notification_event_id": event_id("order.shipped"), "notification_type": "webhook", "endpoint": url,
            "version": 2, **fields}


# ------------------------------------------------------------------------------------- catalogue, CRUD


async def test_catalogue_lists_the_order_events_with_their_fields(client: Client) -> None:
    status, events = await client.call("GET", "/api/v2/notification_events")
    client.token = "made-up"
    unauthorized, _ = await client.call("GET", "/api/v2/notification_events")

    assert status == 200
    assert {e["name"] for e in events} >= CONFIRMED | {"order.status_changed"}
    assert all(set(e) == {"id", "name", "humanized_name", "resource_type"} for e in events)
    assert len({e["id"] for e in events}) == len(events)
    assert unauthorized == 401


async def test_subscription_crud_over_the_api(client: Client, receiver: Receiver) -> None:
    created_status, created = await client.call("POST", "/api/v2/notification_subscriptions",
                                                json=subscription_body(receiver.url, customer_id=SHOP))
    path = f"/api/v2/notification_subscriptions/{created['id']}"
    _, listed = await client.call("GET", "/api/v2/notification_subscriptions")
    _, shown = await client.call("GET", path)
    _, updated = await client.call("PUT", path, json={"active": False, "customer_id": None})
    deleted_status, deleted = await client.call("DELETE", path)
    gone, error = await client.call("GET", path)

    assert created_status == 201
    assert created == {"id": created["id"], "notification_event_id": event_id("order.shipped"),
                       "notification_type": "webhook", "endpoint": receiver.url, "customer_id": SHOP,
                       "user_id": 4242, "active": True, "version": 2}
    assert listed == [created]
    assert shown == created
    assert (updated["active"], updated["customer_id"], updated["endpoint"]) == (False, None, receiver.url)
    assert (deleted_status, deleted) == (200, updated)
    assert (gone, error) == (404, {"error": "record could not be found"})


async def test_subscription_form_body_is_accepted(client: Client, receiver: Receiver) -> None:
    form = {k: str(v) for k, v in subscription_body(receiver.url, active="false").items()}

    status, created = await client.call("POST", "/api/v2/notification_subscriptions", data=form)

    assert status == 201
    assert (created["notification_event_id"], created["active"]) == (event_id("order.shipped"), False)


@pytest.mark.parametrize(("change", "status", "says"), [
    ({"endpoint": None}, 400, "endpoint is missing"),
    ({"version": None}, 400, "version is missing"),
    ({"notification_event_id": "shipped"}, 400, "notification_event_id is invalid"),
    ({"notification_event_id": 99999}, 422, "is not a notification event"),
    ({"notification_type": "email"}, 422, "notification_type"),
    ({"notification_type": "Webhook"}, 422, "notification_type"),
    ({"version": 1}, 422, "version must be 2"),
    ({"endpoint": "ftp://127.0.0.1/hook"}, 422, "http(s) URL"),
    ({"endpoint": "/hook"}, 422, "http(s) URL"),
    ({"endpoint": 42}, 422, "http(s) URL"),
    ({"customer_id": 99}, 422, "not one of the token's customers"),
    ({"customer_id": True}, 400, "customer_id is invalid"),
    ({"active": "maybe"}, 400, "active is invalid"),
])
async def test_invalid_subscriptions_are_refused(
    client: Client, fake: FakeWhiplash, change: dict[str, Any], status: int, says: str
) -> None:
    body = subscription_body("http://127.0.0.1:9/hook")
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}

    got, error = await client.call("POST", "/api/v2/notification_subscriptions", json=body)

    assert (got, list(error)) == (status, ["message"])
    assert says in error["message"]
    assert fake.webhooks.subscriptions == ()


async def test_an_invisible_customer_cannot_be_subscribed_and_bad_updates_change_nothing(
    client: Client, fake: FakeWhiplash, receiver: Receiver
) -> None:
    fake.add_customer(9, visible=False)
    hidden, _ = await client.call("POST", "/api/v2/notification_subscriptions",
                                  json=subscription_body(receiver.url, customer_id=9))
    _, created = await client.call("POST", "/api/v2/notification_subscriptions", json=subscription_body(receiver.url))
    path = f"/api/v2/notification_subscriptions/{created['id']}"
    bad_update, _ = await client.call("PUT", path, json={"version": 1})
    not_json, _ = await client.call("PUT", path, data=b"{nope", headers={"Content-Type": "application/json"})
    missing, _ = await client.call("PUT", "/api/v2/notification_subscriptions/999", json={"active": False})

    assert (hidden, bad_update, not_json, missing) == (422, 422, 400, 404)
    assert fake.webhooks.get(created["id"]).version == 2


# ------------------------------------------------------------------------------------------ delivery


async def test_a_status_change_delivers_a_signed_wrapped_order_to_an_api_subscription(
    client: Client, fake: FakeWhiplash, receiver: Receiver
) -> None:
    """1. Subscribe to order.shipped for one customer through the API. 2. Ship an order of another customer,
    move one of ours to Packed, then ship it. Result: one POST, signed over its raw bytes, carrying
    event_name and the order exactly as GET /api/v2/orders/{id} renders it; recorded as delivered."""
    await client.call("POST", "/api/v2/notification_subscriptions",
                      json=subscription_body(receiver.url, customer_id=SHOP))
    ours, theirs = fake.create_order(SHOP)["id"], fake.create_order(OTHER_SHOP)["id"]
    fake.set_status(theirs, 300)
    fake.set_status(ours, 160)
    fake.set_status(ours, 300)

    [hook] = await receiver.got(1)
    _, rendered = await client.call("GET", f"/api/v2/orders/{ours}")

    assert hook.headers["X-WHIPLASH-SIGNATURE"] == signed(hook.body)
    assert hook.headers["Content-Type"] == "application/json"
    assert hook.json() == {"event_name": "order.shipped", "order": rendered}
    await eventually(lambda: len(fake.webhook_deliveries) == 1, what="the record")
    [record] = fake.webhook_deliveries
    assert (record.outcome, record.status, record.event_name, record.order_id) == ("delivered", 202,
                                                                                   "order.shipped", ours)
    assert record.body == hook.body
    assert record.sent_at is not None
    assert record.sent_at >= record.queued_at
    assert fake.counters.webhooks["delivered"] == 1


async def test_helper_subscription_gets_every_kind_of_write(
    client: Client, fake: FakeWhiplash, receiver: Receiver
) -> None:
    """Result: create, status change (status_changed, then the specific event), field update, and an
    OrderScript's spawn and tick each deliver; every write goes through the one publishing path."""
    fake.subscribe(receiver.url, customer_id=SHOP)
    order_id = fake.create_order(SHOP)["id"]
    fake.set_status(order_id, 300)
    fake.update_order(order_id, email="new@example.com")
    hooks = await receiver.got(4)

    assert [(h.event, h.order_id) for h in hooks] == [
        ("order.created", order_id), ("order.status_changed", order_id), ("order.shipped", order_id),
        ("order.updated", order_id)]
    assert hooks[-1].json()["order"]["email"] == "new@example.com"
    script = OrderScript(fake, SHOP, seed=2)
    [spawned] = script.spawn(1)
    [change] = script.tick(share=1.0)
    hooks = await receiver.got(4 + 1 + 2)
    assert [h.event for h in hooks[4:]] == ["order.created", *status_events(change.old, change.new, "")]
    assert {h.order_id for h in hooks[4:]} == {spawned, change.order_id}


async def test_customer_scope_events_filter_and_inactive_subscriptions(
    client: Client, fake: FakeWhiplash, receiver: Receiver
) -> None:
    """Result: a subscription without customer_id gets every visible customer's changes but not a hidden
    one's; events=[...] filters; an inactive subscription gets nothing."""
    fake.add_customer(9, visible=False)
    fake.subscribe(receiver.url, events=["order.cancelled"])
    [inactive] = fake.subscribe(receiver.url + "?inactive", events=["order.created"])
    fake.webhooks.update(inactive.id, {"active": False})
    orders = [fake.create_order(c)["id"] for c in (SHOP, OTHER_SHOP, 9)]
    for order_id in orders:
        fake.set_status(order_id, 40)

    hooks = await receiver.got(2)
    await asyncio.sleep(0.2)

    assert sorted(h.order_id for h in hooks) == orders[:2]
    assert {h.event for h in hooks} == {"order.cancelled"}


async def test_a_slow_receiver_never_blocks_a_write(client: Client, fake: FakeWhiplash, receiver: Receiver) -> None:
    """1. The receiver holds its answer. 2. Two status changes over the control API. Result: both writes answer
    while the first delivery is still unanswered; the second goes once the first is answered."""
    receiver.gate = asyncio.Event()
    fake.subscribe(receiver.url, events=["order.shipped"])
    ids = [fake.create_order(SHOP)["id"] for _ in range(2)]

    first, _ = await client.call("POST", f"/__sim/orders/{ids[0]}/status", json={"status": 300})
    await receiver.got(1)
    second, _ = await client.call("POST", f"/__sim/orders/{ids[1]}/status", json={"status": 300})
    await asyncio.sleep(0.1)

    assert (first, second, len(receiver.hooks)) == (200, 200, 1)
    receiver.gate.set()
    assert [h.order_id for h in await receiver.got(2)] == ids


async def test_a_failed_delivery_is_recorded_and_never_retried(fake: FakeWhiplash, receiver: Receiver) -> None:
    """Result: a 500 answer and an unreachable endpoint each cost one attempt, recorded, not retried."""
    receiver.status = 500
    fake.subscribe(receiver.url, events=["order.created"])
    fake.subscribe("http://127.0.0.1:9/closed", events=["order.created"])  # port 9: nothing listens
    async with serve_whiplash(fake):
        fake.create_order(SHOP)
        await eventually(lambda: len(fake.webhook_deliveries) == 2, what="both attempts")
        await asyncio.sleep(0.2)

    refused, failed = fake.webhook_deliveries
    assert (refused.outcome, refused.status) == ("refused", 500)
    assert (failed.outcome, failed.status) == ("error", None)
    assert failed.error
    assert len(receiver.hooks) == 1
    assert (fake.counters.webhooks["refused"], fake.counters.webhooks["errors"]) == (1, 1)


# ------------------------------------------------------------------------------------------ controls


async def test_drop_never_sends_the_next_n_deliveries(fake: FakeWhiplash, receiver: Receiver) -> None:
    fake.subscribe(receiver.url, events=["order.created"])
    fake.webhooks.drop_next(2)
    async with serve_whiplash(fake):
        ids = [fake.create_order(SHOP)["id"] for _ in range(3)]
        hooks = await receiver.got(1)
        await asyncio.sleep(0.2)

    assert [h.order_id for h in hooks] == ids[2:]
    assert [(d.order_id, d.outcome, d.sent_at) for d in fake.webhook_deliveries[:2]] == [
        (ids[0], "dropped", None), (ids[1], "dropped", None)]
    assert fake.counters.webhooks["dropped"] == 2


async def test_delay_holds_each_delivery_for_its_seconds(fake: FakeWhiplash, receiver: Receiver) -> None:
    fake.subscribe(receiver.url, events=["order.created"])
    fake.webhooks.delay_s = 0.6
    async with serve_whiplash(fake):
        written = time.monotonic()
        fake.create_order(SHOP)
        fake.create_order(SHOP)
        await asyncio.sleep(0.2)
        early = len(receiver.hooks)
        hooks = await receiver.got(2)

    assert early == 0
    assert all(h.at - written >= 0.6 * 0.95 for h in hooks)
    assert hooks[1].at - written < 2 * 0.6  # each waits for its own due time, not the one before it too


async def test_duplicate_sends_each_delivery_twice(fake: FakeWhiplash, receiver: Receiver) -> None:
    fake.subscribe(receiver.url, events=["order.created"])
    fake.webhooks.duplicate = True
    async with serve_whiplash(fake):
        fake.create_order(SHOP)
        first, second = await receiver.got(2)

    assert first.body == second.body
    assert first.headers["X-WHIPLASH-SIGNATURE"] == second.headers["X-WHIPLASH-SIGNATURE"] == signed(first.body)
    assert [d.duplicate for d in fake.webhook_deliveries] == [False, True]
    assert len({d.delivery_id for d in fake.webhook_deliveries}) == 1


async def test_reorder_sends_a_held_group_newest_first(fake: FakeWhiplash, receiver: Receiver) -> None:
    """1. Reorder the next 3. 2. Four writes. 3. Reorder the next 2, one write, then flush with 0. Result: the
    receiver gets 3, 2, 1, 4, then the partial group (5) once flushed."""
    fake.subscribe(receiver.url, events=["order.created"])
    fake.webhooks.reorder_next(3)
    async with serve_whiplash(fake):
        ids = [fake.create_order(SHOP)["id"] for _ in range(4)]
        first = [h.order_id for h in await receiver.got(4)]
        fake.webhooks.reorder_next(2)
        ids.append(fake.create_order(SHOP)["id"])
        await asyncio.sleep(0.2)
        held = fake.webhooks.summary()["held_for_reorder"]
        fake.webhooks.reorder_next(0)
        hooks = await receiver.got(5)

    assert first == [ids[2], ids[1], ids[0], ids[3]]
    assert held == 1
    assert hooks[4].order_id == ids[4]


async def test_forge_signs_the_next_n_with_a_wrong_key(fake: FakeWhiplash, receiver: Receiver) -> None:
    fake.subscribe(receiver.url, events=["order.created"])
    fake.webhooks.forge_next(1)
    async with serve_whiplash(fake):
        fake.create_order(SHOP)
        fake.create_order(SHOP)
        forged, genuine = await receiver.got(2)

    assert forged.headers["X-WHIPLASH-SIGNATURE"] != signed(forged.body)
    assert len(forged.headers["X-WHIPLASH-SIGNATURE"]) == 64  # still looks like a signature
    assert genuine.headers["X-WHIPLASH-SIGNATURE"] == signed(genuine.body)
    assert [d.forged for d in fake.webhook_deliveries] == [True, False]


async def test_pause_holds_deliveries_and_resume_sends_them_as_they_were_written(
    fake: FakeWhiplash, receiver: Receiver
) -> None:
    """Result: nothing arrives while paused; after resume both arrive in order, each carrying the order as it
    was at its own write (a late webhook is stale, never a fresh read)."""
    fake.subscribe(receiver.url, events=["order.status_changed"])
    order_id = fake.create_order(SHOP)["id"]
    fake.webhooks.pause()
    async with serve_whiplash(fake):
        fake.set_status(order_id, 120)
        fake.set_status(order_id, 150)
        await asyncio.sleep(0.2)
        during = (len(receiver.hooks), fake.webhooks.summary()["pending"])
        fake.webhooks.resume()
        hooks = await receiver.got(2)

    assert during == (0, 2)
    assert [h.json()["order"]["status"] for h in hooks] == [120, 150]


async def test_nothing_is_sent_while_the_simulator_is_not_served(fake: FakeWhiplash, receiver: Receiver) -> None:
    fake.subscribe(receiver.url, events=["order.created"])
    fake.create_order(SHOP)
    await asyncio.sleep(0.1)

    assert receiver.hooks == []
    async with serve_whiplash(fake):
        assert len(await receiver.got(1)) == 1


# ---------------------------------------------------------------------------------------- control API


async def test_control_api_subscribes_and_sets_controls(client: Client, fake: FakeWhiplash,
                                                        receiver: Receiver) -> None:
    status, created = await client.call("POST", "/__sim/webhooks/subscriptions", json={
        "url": receiver.url, "customer_id": SHOP, "events": ["order.created", "order.shipped"]})
    _, summary = await client.call("POST", "/__sim/webhooks", json={
        "drop": 1, "forge": 2, "reorder": 0, "delay_s": 0, "duplicate": False, "paused": False, "timeout_s": 2})
    fake.create_order(SHOP)
    fake.create_order(SHOP)
    await receiver.got(1)
    await eventually(lambda: len(fake.webhook_deliveries) == 2, what="the records")
    _, listed = await client.call("GET", "/__sim/webhooks")
    _, state = await client.call("GET", "/__sim/state")

    assert status == 201
    assert [(s["customer_id"], s["notification_event_id"]) for s in created] == [
        (SHOP, event_id("order.created")), (SHOP, event_id("order.shipped"))]
    assert (summary["drop_next"], summary["forge_next"], summary["timeout_s"]) == (1, 2, 2.0)
    assert [(d["outcome"], d["forged"]) for d in listed["deliveries"]] == [("dropped", False), ("delivered", True)]
    assert "body" not in listed["deliveries"][0]
    assert listed["forge_next"] == 1
    assert state["webhooks"]["counts"] == state["counters"]["webhooks"]
    assert state["counters"]["webhooks"]["dropped"] == 1
    assert CLIENT_SECRET not in json.dumps(listed) + json.dumps(state)


@pytest.mark.parametrize(("path", "body"), [
    ("/__sim/webhooks", {"drop": -1}),
    ("/__sim/webhooks", {"paused": "yes"}),
    ("/__sim/webhooks", {"delay_s": -0.5}),
    ("/__sim/webhooks", {"duplicate": 1}),
    ("/__sim/webhooks/subscriptions", {"url": "ftp://example.com/hook"}),
    ("/__sim/webhooks/subscriptions", {}),
    ("/__sim/webhooks/subscriptions", {"url": "http://127.0.0.1:9/", "events": "order.shipped"}),
    ("/__sim/webhooks/subscriptions", {"url": "http://127.0.0.1:9/", "events": ["order.teleported"]}),
])
async def test_bad_control_requests_are_refused(client: Client, fake: FakeWhiplash, path: str,
                                                body: dict[str, Any]) -> None:
    status, error = await client.call("POST", path, json=body)

    assert status == 400
    assert error["message"]
    assert fake.webhooks.subscriptions == ()


async def test_deliveries_are_logged_without_bodies_or_the_secret(
    caplog: pytest.LogCaptureFixture, fake: FakeWhiplash, receiver: Receiver
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.subscribe(receiver.url, events=["order.created"])
    fake.webhooks.drop_next(1)
    async with serve_whiplash(fake):
        fake.create_order(SHOP, email="shopper@example.com")
        fake.create_order(SHOP, email="shopper@example.com")
        await receiver.got(1)
        await eventually(lambda: "sim webhook sent" in caplog.text, what="the log line")

    assert "shopper@example.com" not in caplog.text
    assert CLIENT_SECRET not in caplog.text


# ------------------------------------------------------------------------------------------- pure parts


def test_signature_is_hmac_sha256_of_the_body_and_of_the_client_id_when_empty() -> None:
    assert whiplash_signature(CLIENT_SECRET, b'{"a":1}') == signed(b'{"a":1}')
    assert whiplash_signature(CLIENT_SECRET, b"", CLIENT_ID) == signed(CLIENT_ID.encode())


@pytest.mark.parametrize(("old", "new", "order_type", "events"), [
    (100, 100, "direct_to_consumer", ()),
    (250, 300, "direct_to_consumer", ("order.status_changed", "order.shipped")),
    (300, 350, "direct_to_consumer", ("order.status_changed", "order.delivered")),
    (100, 40, "direct_to_consumer", ("order.status_changed", "order.cancelled")),
    (150, 160, "dropship", ("order.status_changed", "order.packed", "order.dropship.packed")),
    (100, 95, "retail", ("order.status_changed", "order.insufficient_inventory", "order.attention")),
    (90, 100, "retail", ("order.status_changed",)),
])
def test_status_events(old: int, new: int, order_type: str, events: tuple[str, ...]) -> None:
    assert status_events(old, new, order_type) == events
