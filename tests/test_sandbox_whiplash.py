"""Tests of the simulated Whiplash API, driven over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from kit.fakeclock import FakeClock

from klaviyo_bridge.sandbox.whiplash import (
    STATUS_NAMES,
    FakeWhiplash,
    ItemSpec,
    ManualClock,
    OrderScript,
    build_from_args,
    fingerprint,
    serve_whiplash,
)
from klaviyo_bridge.sandbox.whiplash import parse_args as parse_sim_args

CLIENT_ID = "test-client"
CLIENT_SECRET = "test-secret"  # a fake's credential, not a real secret
FIRST_REFRESH = "refresh-0"
MARCH = datetime(2026, 3, 13, 15, 39, 21, tzinfo=UTC)  # after the US switch to EDT (-04:00)
JANUARY = datetime(2026, 1, 13, 15, 0, 0, tzinfo=UTC)  # EST (-05:00)


WALL_START = 1_800_000_000.0  # the epoch clock (time.time's stand-in, for token expiry) when a test begins


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
        self.token: str | None = None

    async def call(self, method: str, path: str, **kwargs: Any) -> Reply:
        async with self.http.request(method, self.base_url + path, **kwargs) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.text())

    async def token_request(self, **params: str) -> Reply:
        body = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **params}
        return await self.call("POST", "/oauth/token", json=body)

    async def login(self) -> None:
        reply = await self.token_request(grant_type="client_credentials", scope="app_read")
        self.token = reply.json()["access_token"]

    async def orders(self, customer: int | None = None, *, search: Mapping[str, Any] | str | None = None,
                     **params: str) -> Reply:
        headers = {"Authorization": f"Bearer {self.token}"}
        if customer is not None:
            headers["X-CUSTOMER-ID"] = str(customer)
        if search is not None:
            params["search"] = search if isinstance(search, str) else json.dumps(search)
        return await self.call("GET", "/api/v2/orders", params=params, headers=headers)

    async def order_ids(self, customer: int | None = None, *, search: Mapping[str, Any] | None = None,
                        **params: str) -> list[int]:
        reply = await self.orders(customer, search=search, **params)
        assert reply.status == 200, reply.text
        return [order["id"] for order in reply.json()]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(MARCH)


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(WALL_START)


@pytest.fixture
def fake(clock: ManualClock, wall: FakeClock) -> FakeWhiplash:
    return FakeWhiplash(CLIENT_ID, CLIENT_SECRET, refresh_token=FIRST_REFRESH, token_ttl=60, clock=clock,
                        wall=wall)


@pytest.fixture
async def client(fake: FakeWhiplash) -> AsyncIterator[Client]:
    async with serve_whiplash(fake) as base_url, aiohttp.ClientSession() as http:
        yield Client(http, base_url)


@pytest.fixture
async def authed(client: Client) -> Client:
    await client.login()
    return client


# ------------------------------------------------------------------------------------------- oauth


async def test_client_credentials_grant_returns_bearer_token_with_echoed_scope(
    client: Client, fake: FakeWhiplash
) -> None:
    reply = await client.token_request(grant_type="client_credentials", scope="app_read")

    body = reply.json()
    assert reply.status == 200
    assert body["token_type"] == "bearer"
    assert body["scope"] == "app_read"
    assert body["expires_in"] == 60
    assert body["created_at"] == 1_800_000_000
    assert "refresh_token" not in body  # Doorkeeper never issues one for client_credentials
    assert fake.token_requests["client_credentials"] == 1


async def test_token_endpoint_accepts_form_body_and_basic_auth(client: Client) -> None:
    form = await client.call("POST", "/oauth/token", data={
        "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    basic = await client.call("POST", "/oauth/token", data={"grant_type": "client_credentials"},
                              headers={"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET)})

    assert (form.status, basic.status) == (200, 200)
    assert form.json()["access_token"] != basic.json()["access_token"]


async def test_wrong_client_secret_is_invalid_client(client: Client, fake: FakeWhiplash) -> None:
    reply = await client.call("POST", "/oauth/token", json={
        "grant_type": "refresh_token", "refresh_token": FIRST_REFRESH, "client_id": CLIENT_ID,
        "client_secret": "nope"})

    assert reply.status == 401
    assert reply.json()["error"] == "invalid_client"
    assert fake.current_refresh_token == FIRST_REFRESH  # nothing rotated


async def test_refresh_rotates_and_revokes_the_presented_token(client: Client, fake: FakeWhiplash) -> None:
    first = await client.token_request(grant_type="refresh_token", refresh_token=FIRST_REFRESH)
    second_refresh = first.json()["refresh_token"]
    reused = await client.token_request(grant_type="refresh_token", refresh_token=FIRST_REFRESH)
    second = await client.token_request(grant_type="refresh_token", refresh_token=second_refresh)

    assert first.status == 200
    assert second_refresh != FIRST_REFRESH
    assert reused.status == 401
    assert reused.json()["error"] == "invalid_grant"
    assert reused.json()["error_description"]
    assert second.status == 200
    assert fake.current_refresh_token == second.json()["refresh_token"]
    assert fake.token_requests["refresh_token"] == 3
    assert fake.state()["refresh_token_fingerprint"] == fingerprint(fake.current_refresh_token)


async def test_refresh_revokes_the_access_token_issued_with_the_old_row(client: Client) -> None:
    first = (await client.token_request(grant_type="refresh_token", refresh_token=FIRST_REFRESH)).json()
    await client.token_request(grant_type="refresh_token", refresh_token=first["refresh_token"])
    client.token = first["access_token"]

    reply = await client.orders()

    assert reply.status == 401


async def test_unknown_refresh_token_and_grant_type_are_refused(client: Client) -> None:
    unknown = await client.token_request(grant_type="refresh_token", refresh_token="never-issued")
    unsupported = await client.token_request(grant_type="password")

    assert (unknown.status, unknown.json()["error"]) == (401, "invalid_grant")
    assert (unsupported.status, unsupported.json()["error"]) == (400, "unsupported_grant_type")


async def test_invalid_grant_status_is_configurable(clock: ManualClock) -> None:
    fake = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, clock=clock, invalid_grant_status=400)
    async with serve_whiplash(fake) as base_url, aiohttp.ClientSession() as http:
        reply = await Client(http, base_url).token_request(grant_type="refresh_token", refresh_token="x")

    assert reply.status == 400


async def test_every_issued_token_is_remembered_in_order(client: Client, fake: FakeWhiplash) -> None:
    """Result: each grant's access token, then its refresh token; refused grants issue nothing."""
    plain = (await client.token_request(grant_type="client_credentials")).json()
    first = (await client.token_request(grant_type="refresh_token", refresh_token=FIRST_REFRESH)).json()
    await client.token_request(grant_type="refresh_token", refresh_token=FIRST_REFRESH)  # revoked by now
    second = (await client.token_request(grant_type="refresh_token", refresh_token=first["refresh_token"])).json()
    served = await client.call("GET", "/__sim/tokens")

    expected = [plain["access_token"], first["access_token"], first["refresh_token"], second["access_token"],
                second["refresh_token"]]
    assert fake.issued_tokens() == expected
    assert served.json() == {"issued": expected, "initial_refresh_token": FIRST_REFRESH}
    assert served.headers["Cache-Control"] == "no-store"


async def test_a_token_ttl_of_a_few_seconds_is_honoured(clock: ManualClock, wall: FakeClock) -> None:
    fake = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, token_ttl=3, clock=clock, wall=wall)
    async with serve_whiplash(fake) as base_url, aiohttp.ClientSession() as http:
        client = Client(http, base_url)
        login = await client.token_request(grant_type="client_credentials")
        client.token = login.json()["access_token"]
        wall.advance(2.9)
        live = await client.orders()
        wall.advance(0.1)
        expired = await client.orders()

    assert login.json()["expires_in"] == 3
    assert (live.status, expired.status) == (200, 401)


async def test_command_line_token_ttl_reaches_the_token_endpoint() -> None:
    args = parse_sim_args(["--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET, "--token-ttl", "3"])
    async with serve_whiplash(build_from_args(args)) as base_url, aiohttp.ClientSession() as http:
        login = await Client(http, base_url).token_request(grant_type="client_credentials")

    assert login.json()["expires_in"] == 3


async def test_the_simulator_never_logs_a_token_value(
    caplog: pytest.LogCaptureFixture, fake: FakeWhiplash
) -> None:
    """1. Log everything, access log included. 2. Issue, rotate (parameters in the query string too), refuse,
    use and expire tokens. Result: no token value in any log line, only fingerprints."""
    caplog.set_level(logging.DEBUG)
    async with serve_whiplash(fake, access_log=True) as base_url, aiohttp.ClientSession() as http:
        client = Client(http, base_url)
        await client.login()
        await client.orders()
        query = {"grant_type": "refresh_token", "refresh_token": FIRST_REFRESH, "client_id": CLIENT_ID,
                 "client_secret": CLIENT_SECRET}
        rotated = await client.call("POST", "/oauth/token", params=query)
        refused = await client.call("POST", "/oauth/token", params=query)
        client.token = rotated.json()["access_token"]
        await client.orders()
        await client.call("POST", "/__sim/tokens/expire")
        await client.orders()

    assert (rotated.status, refused.status) == (200, 401)
    assert any(r.name == "aiohttp.access" and "/oauth/token" in r.getMessage() for r in caplog.records)
    assert fingerprint(FIRST_REFRESH) in caplog.text  # the refusal is logged by fingerprint
    secrets = [*fake.issued_tokens(), FIRST_REFRESH, CLIENT_SECRET]
    assert len(secrets) == 5
    assert [secret for secret in secrets if secret in caplog.text] == []


# -------------------------------------------------------------------------------------------- auth


async def test_api_without_or_with_unknown_token_is_401(client: Client, fake: FakeWhiplash) -> None:
    missing = await client.call("GET", "/api/v2/orders")
    client.token = "made-up"
    bogus = await client.orders()

    assert (missing.status, bogus.status) == (401, 401)
    assert bogus.json() == {"message": "The access token is invalid"}
    assert fake.counters.unauthorized == 2


async def test_expired_access_token_is_401(authed: Client, wall: FakeClock) -> None:
    fresh = await authed.orders()
    wall.advance(61)
    expired = await authed.orders()

    assert fresh.status == 200
    assert expired.status == 401
    assert expired.json() == {"message": "The access token expired"}
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]


async def test_expire_access_tokens_forces_401(authed: Client, fake: FakeWhiplash) -> None:
    fake.expire_access_tokens()

    assert (await authed.orders()).status == 401


# ------------------------------------------------------------------------------------------ search


def _seed_two_customers(fake: FakeWhiplash, clock: ManualClock) -> dict[str, int]:
    """Create three orders for customer 1 and one for customer 2, one second apart."""
    ids = {}
    for name, customer in (("a", 1), ("b", 1), ("other", 2), ("c", 1)):
        ids[name] = fake.create_order(customer)["id"]
        clock.advance(1)
    return ids


async def test_customer_id_eq_and_x_customer_id_filter_by_merchant(
    authed: Client, fake: FakeWhiplash, clock: ManualClock
) -> None:
    ids = _seed_two_customers(fake, clock)

    by_search = await authed.order_ids(search={"customer_id_eq": 2})
    by_header = await authed.order_ids(2)
    combined = await authed.order_ids(1, search={"customer_id_eq": 2})

    assert by_search == [ids["other"]]
    assert by_header == [ids["other"]]
    assert combined == []


async def test_x_customer_id_the_user_cannot_see_is_403(
    authed: Client, fake: FakeWhiplash, clock: ManualClock
) -> None:
    _seed_two_customers(fake, clock)
    fake.add_customer(3, visible=False)

    unknown = await authed.orders(99)
    hidden = await authed.orders(3)

    assert (unknown.status, hidden.status) == (403, 403)
    assert "99" in unknown.json()["message"]


async def test_updated_at_gteq_compares_instants_across_offsets(
    authed: Client, fake: FakeWhiplash, clock: ManualClock
) -> None:
    ids = _seed_two_customers(fake, clock)
    boundary = MARCH + timedelta(seconds=1)  # order "b"
    in_tokyo = boundary.astimezone(timezone(timedelta(hours=9))).isoformat()
    naive_eastern = (boundary - timedelta(hours=4)).replace(tzinfo=None).isoformat(sep=" ")

    tokyo = await authed.order_ids(search={"updated_at_gteq": in_tokyo})
    zulu = await authed.order_ids(search={"updated_at_gt": boundary.isoformat().replace("+00:00", "Z")})
    naive = await authed.order_ids(search={"updated_at_gteq": naive_eastern})

    assert in_tokyo.endswith("+09:00")
    assert tokyo == [ids["b"], ids["other"], ids["c"]]
    assert zulu == [ids["other"], ids["c"]]
    assert naive == tokyo  # no offset: read as US Eastern, like Rails Time.zone


async def test_id_in_status_in_and_lteq_filters(
    authed: Client, fake: FakeWhiplash, clock: ManualClock
) -> None:
    ids = _seed_two_customers(fake, clock)
    fake.set_status(ids["b"], 300)
    fake.set_status(ids["c"], 40)

    by_id = await authed.order_ids(search={"id_in": [ids["a"], ids["c"], 1]})
    by_status = await authed.order_ids(search={"status_in": [300, 40]})
    by_status_eq = await authed.order_ids(search={"status_eq": "300"})
    before = await authed.order_ids(search={"updated_at_lteq": MARCH.isoformat(),
                                            "updated_at_lt": "2027-01-01"})

    assert by_id == [ids["a"], ids["c"]]
    assert by_status == [ids["b"], ids["c"]]
    assert by_status_eq == [ids["b"]]
    assert before == [ids["a"]]


async def test_updated_at_eq_with_id_gt_walks_a_same_second_tie(
    authed: Client, fake: FakeWhiplash, clock: ManualClock
) -> None:
    same_second = [fake.create_order(5)["id"] for _ in range(3)]

    rest = await authed.order_ids(search={"updated_at_eq": MARCH.isoformat(), "id_gt": same_second[0]})

    assert rest == same_second[1:]


async def test_sort_updated_at_then_id(authed: Client, fake: FakeWhiplash, clock: ManualClock) -> None:
    ids = _seed_two_customers(fake, clock)
    clock.advance(10)
    fake.set_status(ids["a"], 120)  # a becomes the most recently updated
    fake.set_status(ids["other"], 120)  # same second as a, higher id

    ascending = await authed.order_ids(sort="updated_at asc,id asc")
    descending = await authed.order_ids(sort="updated_at desc,id desc")

    assert ascending == [ids["b"], ids["c"], ids["a"], ids["other"]]
    assert descending == list(reversed(ascending))


async def test_unparseable_search_is_400_and_unknown_keys_are_ignored(
    authed: Client, fake: FakeWhiplash, clock: ManualClock
) -> None:
    ids = _seed_two_customers(fake, clock)

    broken = await authed.orders(search="{not json")
    ignored = await authed.order_ids(search={"colour_eq": "red", "updated_at_gteq": "not a time"})

    assert broken.status == 400
    assert "message" in broken.json()
    assert ignored == sorted(ids.values())  # Ransack drops what it cannot use
    assert fake.counters.ignored_search_keys == {"colour_eq": 1, "updated_at_gteq": 1}


# -------------------------------------------------------------------------------------- pagination


async def test_page_and_per_page(authed: Client, fake: FakeWhiplash, clock: ManualClock) -> None:
    ids = [fake.create_order(1, at=MARCH + timedelta(seconds=n))["id"] for n in range(7)]

    pages = [await authed.order_ids(sort="id asc", page=str(p), per_page="3") for p in (1, 2, 3, 4)]
    default = await authed.order_ids()

    assert pages == [ids[0:3], ids[3:6], ids[6:7], []]
    assert default == ids  # default per_page (50) holds them all
    assert fake.counters.pages_served == 5


async def test_per_page_is_clamped_and_totals_are_on_request(
    authed: Client, fake: FakeWhiplash, clock: ManualClock
) -> None:
    fake.max_per_page = 2
    for _ in range(5):
        fake.create_order(1)

    reply = await authed.orders(per_page="100", page="2", page_total="true", page_links="true")
    plain = await authed.orders()

    assert len(reply.json()) == 2
    assert reply.headers["Total"] == "5"
    links = {rel.split('"')[1]: url.strip(" <>") for url, rel in
             (part.split(";") for part in reply.headers["Link"].split(","))}
    assert "page=3" in links["next"]
    assert "page=1" in links["prev"]
    assert "Total" not in plain.headers


async def test_bad_page_is_400(authed: Client) -> None:
    reply = await authed.orders(page="two")

    assert reply.status == 400


# ------------------------------------------------------------------------------------- order json


async def test_order_json_has_whiplash_shape_and_eastern_offsets(
    authed: Client, fake: FakeWhiplash, clock: ManualClock
) -> None:
    summer = fake.create_order(1, items=[ItemSpec("BOX", "Box Set", "72.99", quantity=2)], first_name="Zoë",
                               last_name="Müller")
    winter = fake.create_order(1, at=JANUARY)

    rows = {o["id"]: o for o in (await authed.orders()).json()}

    assert rows[summer["id"]]["updated_at"] == "2026-03-13T11:39:21.000-04:00"
    assert rows[winter["id"]]["created_at"] == "2026-01-13T10:00:00.000-05:00"
    order = rows[summer["id"]]
    assert order["status_name"] == "Processing"
    assert order["full_name"] == "Zoë Müller"
    assert order["shipping_name"] == "Zoë Müller"
    assert isinstance(order["humanize_id"], str)
    assert order["originator"]["originated_type"] == "Order"
    assert order["order_items"][0]["price"] == "72.99"
    assert order["order_items"][0]["quantity"] == 2
    assert order["shipping_method"]["carrier"] == "USPS"


async def test_single_order_and_count_endpoints(
    authed: Client, fake: FakeWhiplash, clock: ManualClock
) -> None:
    ids = _seed_two_customers(fake, clock)
    headers = {"Authorization": f"Bearer {authed.token}"}

    one = await authed.call("GET", f"/api/v2/orders/{ids['a']}", headers=headers)
    missing = await authed.call("GET", "/api/v2/orders/1", headers=headers)
    count = await authed.call("GET", "/api/v2/orders/count", params={"search": '{"customer_id_eq": 1}'},
                              headers=headers)
    me = await authed.call("GET", "/api/v2/me", headers=headers)

    assert one.json()["id"] == ids["a"]
    assert missing.status == 404
    assert count.json() == {"count": 3}
    assert me.json()["customer_ids"] == [1, 2]


# ---------------------------------------------------------------------------------- state changes


def test_set_status_records_previous_status_and_bumps_updated_at(
    fake: FakeWhiplash, clock: ManualClock
) -> None:
    order_id = fake.create_order(1)["id"]
    clock.advance(90)

    after = fake.set_status(order_id, 150)

    assert (after["status"], after["previous_status"], after["status_name"]) == (150, 100, "Picked")
    assert after["updated_at"] == "2026-03-13T11:40:51.000-04:00"


def test_status_change_without_bump_keeps_updated_at(fake: FakeWhiplash, clock: ManualClock) -> None:
    order_id = fake.create_order(1)["id"]
    shipped = fake.set_status(order_id, 300, at=MARCH + timedelta(hours=1))
    clock.advance(86_400)
    delivered = fake.set_status(order_id, 350, bump_updated_at=False)
    fake.bump_on_status_change = False
    returned = fake.set_status(order_id, 400)

    assert delivered["status"] == 350
    assert delivered["updated_at"] == shipped["updated_at"]
    assert returned["updated_at"] == shipped["updated_at"]


def test_shipping_creates_packages_with_tracking(fake: FakeWhiplash) -> None:
    order = fake.create_order(1, carrier="UPS", status=250)
    assert order["packages"] == []

    shipped = fake.set_status(order["id"], 300, at=MARCH + timedelta(hours=2))

    package = shipped["packages"][0]
    assert package["tracking"].startswith("1Z")
    assert package["tracking"] in package["tracking_link"]
    assert shipped["tracking"] == [package["tracking"]]
    assert shipped["shipped_on"] == "2026-03-13T13:39:21.000-04:00"
    assert shipped["approximate_delivery_date"] == "2026-03-18"


def test_update_order_and_unknown_status_are_checked(fake: FakeWhiplash, clock: ManualClock) -> None:
    order_id = fake.create_order(1)["id"]
    clock.advance(5)

    updated = fake.update_order(order_id, email="new@example.com")

    assert updated["email"] == "new@example.com"
    assert updated["updated_at"] == "2026-03-13T11:39:26.000-04:00"
    with pytest.raises(ValueError, match="not writable"):
        fake.update_order(order_id, status=300)
    with pytest.raises(ValueError, match="unknown Whiplash status"):
        fake.set_status(order_id, 301)


# ------------------------------------------------------------------------------------- generator


def _backfilled(seed: int, count: int = 40) -> FakeWhiplash:
    fake = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, clock=ManualClock(MARCH), seed=seed)
    OrderScript(fake, 7, seed=seed).backfill(count, days=20)
    return fake


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backfill_produces_the_promised_variety(seed: int) -> None:
    fake = _backfilled(seed)
    orders = [fake.order_json(i) for i in fake.orders]
    emails = [o["email"] for o in orders if o["email"]]
    folded = [e.casefold() for e in emails]

    assert any(o["first_name"] and not o["first_name"].isascii() for o in orders)
    assert any(o["shipping_name"] and not o["first_name"] for o in orders)
    assert any(o["shipping_company"] and not o["shipping_name"] for o in orders)
    assert any(not (o["shipping_name"] or o["shipping_company"] or o["first_name"]) for o in orders)
    assert any(o["email"] is None for o in orders)
    assert len(set(folded)) < len(folded)  # repeat shoppers
    assert len(set(emails)) > len(set(folded))  # the same address typed in another case
    assert {len(o["order_items"]) for o in orders} == {1, 2, 3}
    assert {100, 120, 150, 160, 250, 300, 350, 40, 45, 90} <= {o["status"] for o in orders}


def test_backfill_history_lies_in_the_window_and_is_deterministic() -> None:
    first, again, other = _backfilled(5), _backfilled(5), _backfilled(6)
    stamps = [o.updated_at for o in first.orders.values()]

    assert [first.order_json(i) for i in first.orders] == [again.order_json(i) for i in again.orders]
    assert [first.order_json(i) for i in first.orders] != [other.order_json(i) for i in other.orders]
    assert all(MARCH - timedelta(days=20) <= s <= MARCH for s in stamps)
    assert len(set(stamps)) > 30
    assert all(o.shipped_on is not None for o in first.orders.values() if o.status in (300, 350))


def test_tick_moves_orders_one_lifecycle_step_now(clock: ManualClock) -> None:
    fake = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, clock=clock)
    script = OrderScript(fake, 7, seed=3)
    script.backfill(20)
    clock.advance(3600)

    changes = script.advance(3, share=0.6)

    assert changes
    allowed = {(100, 120), (100, 40), (100, 90), (90, 100), (120, 150), (150, 160), (160, 250), (250, 300),
               (300, 350)}
    assert {(c.old, c.new) for c in changes} <= allowed
    assert all(fake.orders[c.order_id].updated_at == clock() for c in changes)


def test_spawn_creates_processing_orders_now(fake: FakeWhiplash, clock: ManualClock) -> None:
    ids = OrderScript(fake, 9, seed=1).spawn(3)

    assert [fake.orders[i].status for i in ids] == [100, 100, 100]
    assert all(fake.orders[i].created_at == clock() for i in ids)


# ------------------------------------------------------------------------------------------- faults


async def test_fail_next_serves_503_with_retry_after_then_recovers(
    authed: Client, fake: FakeWhiplash
) -> None:
    fake.fail_next(2, 503, retry_after=7)

    replies = [await authed.orders() for _ in range(3)]

    assert [r.status for r in replies] == [503, 503, 200]
    assert replies[0].headers["Retry-After"] == "7"
    assert replies[0].headers["Content-Type"].startswith("text/html")
    assert fake.counters.statuses[503] == 2


async def test_rate_limit_fault_is_json_and_counted(authed: Client, fake: FakeWhiplash) -> None:
    fake.fail_next(1, 429, retry_after=2)

    reply = await authed.orders()

    assert (reply.status, reply.json()) == (429, {"message": "Rate limit exceeded"})
    assert fake.counters.rate_limited == 1


async def test_faults_only_hit_matching_paths(client: Client, fake: FakeWhiplash) -> None:
    fake.fail_next(1, 500)

    token = await client.token_request(grant_type="client_credentials")  # /oauth/ is not under /api/

    assert token.status == 200
    assert len(fake.pending_faults) == 1


async def test_html_200_once(authed: Client, fake: FakeWhiplash) -> None:
    fake.serve_html_next()

    html, good = await authed.orders(), await authed.orders()

    assert html.status == 200
    assert html.headers["Content-Type"].startswith("text/html")
    assert html.text.startswith("<!DOCTYPE html>")
    assert good.json() == []


async def test_truncated_json_once(authed: Client, fake: FakeWhiplash) -> None:
    fake.create_order(1)
    fake.truncate_next()

    cut = await authed.orders()

    assert cut.status == 200
    with pytest.raises(json.JSONDecodeError):
        cut.json()
    assert len((await authed.orders()).json()) == 1


async def test_dropped_connection_mid_body(authed: Client, fake: FakeWhiplash) -> None:
    fake.create_order(1)
    fake.drop_next()

    with pytest.raises(aiohttp.ClientPayloadError):
        await authed.orders()
    assert (await authed.orders()).status == 200


async def test_delay_stalls_responses(authed: Client, fake: FakeWhiplash) -> None:
    fake.set_delay(0.3, n=1)

    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.1):
            await authed.orders()
    assert (await authed.orders()).status == 200


# -------------------------------------------------------------------------------------- control API


async def test_control_api_drives_the_sim_over_http(authed: Client, fake: FakeWhiplash) -> None:
    created = await authed.call("POST", "/__sim/orders", json={
        "customer_id": 12, "email": "Ana@Example.com", "first_name": "José", "last_name": "Álvarez",
        "items": [{"sku": "LP", "description": "Vinyl", "price": "29.99", "quantity": 2}],
        "at": "2026-03-13T08:00:00-04:00"})
    order_id = created.json()["id"]
    moved = await authed.call("POST", f"/__sim/orders/{order_id}/status",
                              json={"status": 350, "bump_updated_at": False})
    patched = await authed.call("PATCH", f"/__sim/orders/{order_id}", json={"shipping_city": "Québec"})
    missing = await authed.call("POST", "/__sim/orders/1/status", json={"status": 300})

    assert created.status == 201
    assert created.json()["updated_at"] == "2026-03-13T08:00:00.000-04:00"
    assert moved.json()["status_name"] == "Delivered"
    assert moved.json()["updated_at"] == "2026-03-13T08:00:00.000-04:00"
    assert patched.json()["shipping_city"] == "Québec"
    assert missing.status == 404
    assert (await authed.order_ids(12)) == [order_id]


async def test_control_api_faults_settings_and_state(authed: Client, fake: FakeWhiplash) -> None:
    fault = {"kind": "fail", "status": 429, "retry_after": 4}
    queued = await authed.call("POST", "/__sim/faults", json=fault)
    limited = await authed.orders()
    await authed.call("POST", "/__sim/settings", json={"bump_on_status_change": False})
    await authed.call("POST", "/__sim/tokens/expire")
    expired = await authed.orders()
    state = (await authed.call("GET", "/__sim/state")).json()

    assert queued.status == 201
    assert (limited.status, limited.headers["Retry-After"]) == (429, "4")
    assert expired.status == 401
    assert state["bump_on_status_change"] is False
    assert state["counters"]["rate_limited"] == 1
    assert state["counters"]["requests"] == {"/oauth/token": 1, "/api/v2/orders": 2}
    assert CLIENT_SECRET not in json.dumps(state)
    assert FIRST_REFRESH not in json.dumps(state)


async def test_control_api_script_and_tick(authed: Client, fake: FakeWhiplash, clock: ManualClock) -> None:
    started = await authed.call("POST", "/__sim/script", json={"customer_id": 30, "seed": 4, "count": 15})
    clock.advance(60)
    ticked = await authed.call("POST", "/__sim/tick", json={"steps": 2, "share": 1.0, "spawn": 1})
    bad = await authed.call("POST", "/__sim/faults", json={"kind": "explode"})

    assert len(started.json()["order_ids"]) == 15
    assert ticked.json()["changes"]
    assert len(fake.orders) == 16
    assert bad.status == 400


def test_standalone_builder_backfills_each_customer() -> None:
    args = parse_sim_args(["--customer", "101", "--customer", "102", "--orders", "12", "--seed", "3"])

    fake = build_from_args(args)

    assert fake.customers == {101, 102}
    assert len(fake.orders) == 24
    assert set(STATUS_NAMES) >= {o.status for o in fake.orders.values()}
