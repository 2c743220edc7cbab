"""Tests for the simulated Klaviyo API: behaviour over real loopback HTTP, asserted on recorded state."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kit.fakeclock import FakeClock

from klaviyo_bridge.sandbox.filters import FILTER_OPERATIONS
from klaviyo_bridge.sandbox.klaviyo import EventMatch, FakeKlaviyo, Limits, ProfileMatch, serve_klaviyo
from klaviyo_bridge.sandbox.openapi import HandChecker, SpecChecker, default_spec_path, load_spec_checker, make_checker

KEY = "pk_test_shop_0001"
OTHER_KEY = "pk_test_other_0002"
REVISION = "2026-07-15"
# 2026-09-21T14:13:20.25Z: 20.25 s into a minute, so the steady window resets in 39.75 s.
START = 1_790_000_000.25
START_DT = datetime.fromtimestamp(START, UTC)
SPEC = default_spec_path()
needs_spec = pytest.mark.skipif(
    SPEC is None, reason="Klaviyo OpenAPI spec (shared/klaviyo-openapi/stable.json) absent"
)


class Reply:
    """Status, headers and decoded JSON body (None when empty) of one response."""

    def __init__(self, status: int, headers: dict[str, str], body: Any) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def error(self) -> dict[str, Any]:
        first: dict[str, Any] = self.body["errors"][0]
        return first


class Api:
    """A tiny Klaviyo client for tests (deliberately not the bridge's client)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session, self.base_url = session, base_url

    def headers(self, key: str | None = KEY, **extra: str) -> dict[str, str]:
        base = {"revision": REVISION, "Accept": "application/vnd.api+json"}
        if key is not None:
            base["Authorization"] = f"Klaviyo-API-Key {key}"
        return {**base, **extra}

    async def post(self, path: str, body: Any, *, key: str | None = KEY, **headers: str) -> Reply:
        sent = self.headers(key, **{"Content-Type": "application/vnd.api+json", **headers})
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self._send("POST", path, data=data, headers=sent)

    async def get(self, path: str, *, key: str | None = KEY, params: dict[str, str] | None = None) -> Reply:
        return await self._send("GET", path, params=params, headers=self.headers(key))

    async def get_url(self, url: str) -> Reply:
        async with self.session.get(url, headers=self.headers()) as response:
            return Reply(response.status, dict(response.headers), await _decode(response))

    async def _send(self, method: str, path: str, **kwargs: Any) -> Reply:
        async with self.session.request(method, self.base_url + path, **kwargs) as response:
            return Reply(response.status, dict(response.headers), await _decode(response))


async def _decode(response: aiohttp.ClientResponse) -> Any:
    raw = await response.read()
    return json.loads(raw) if raw else None


def event_body(
    email: str = "Ann@Example.com",
    metric: str = "Order shipped",
    unique_id: str | None = "1001:shipped",
    when: str | None = "2026-09-01T10:00:00Z",
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "properties": {"order_id": 1001, "tracking_url": "https://track.example/1"},
        "value": 42.5,
        "value_currency": "USD",
        "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
        "profile": {"data": {"type": "profile", "attributes": {"email": email, "first_name": "Ann"}}},
    }
    if unique_id is not None:
        attributes["unique_id"] = unique_id
    if when is not None:
        attributes["time"] = when
    return {"data": {"type": "event", "attributes": attributes}}


def profile_body(**attributes: Any) -> dict[str, Any]:
    return {"data": {"type": "profile", "attributes": attributes}}


def list_body(name: str) -> dict[str, Any]:
    return {"data": {"type": "list", "attributes": {"name": name}}}


def bulk_event(metric: str, unique_id: str | None) -> dict[str, Any]:
    """Build one event entry of a bulk request (no profile: the group carries it)."""
    attributes = event_body(metric=metric, unique_id=unique_id)["data"]["attributes"]
    del attributes["profile"]
    return {"type": "event", "attributes": attributes}


def bulk_events_body(groups: list[tuple[str, list[tuple[str, str | None]]]]) -> dict[str, Any]:
    """Build an event-bulk-create-job from (email, [(metric, unique_id), ...]) groups."""
    data = []
    for email, events in groups:
        profile = {"data": {"type": "profile", "attributes": {"email": email}}}
        entries = [bulk_event(metric, uid) for metric, uid in events]
        attributes = {"profile": profile, "events": {"data": entries}}
        data.append({"type": "event-bulk-create", "attributes": attributes})
    return {"data": {"type": "event-bulk-create-job", "attributes": {"events-bulk-create": {"data": data}}}}


def import_job_body(emails: list[str | None], list_id: str | None = None) -> dict[str, Any]:
    rows = [{"type": "profile", "attributes": {} if email is None else {"email": email}} for email in emails]
    data: dict[str, Any] = {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": rows}}}
    if list_id is not None:
        data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id}]}}
    return {"data": data}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def fake(clock: FakeClock) -> FakeKlaviyo:
    simulator = FakeKlaviyo(clock=clock, seed=7)
    simulator.add_account(KEY, "shop")
    return simulator


@pytest.fixture(params=["spec", "hand"])
def spec_or_hand(request: pytest.FixtureRequest) -> Path | None:
    """Run a test with the spec (schemas, x-klaviyo-filters) and with the hand-written rules."""
    if request.param == "spec" and SPEC is None:
        pytest.skip("Klaviyo OpenAPI spec (shared/klaviyo-openapi/stable.json) absent")
    return SPEC if request.param == "spec" else None


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@asynccontextmanager
async def served(simulator: FakeKlaviyo, session: aiohttp.ClientSession) -> AsyncIterator[Api]:
    async with serve_klaviyo(simulator) as base_url:
        yield Api(session, base_url)


@pytest.fixture
async def api(fake: FakeKlaviyo, session: aiohttp.ClientSession) -> AsyncIterator[Api]:
    async with served(fake, session) as client:
        yield client


# ---------------------------------------------------------------- events


async def test_valid_event_is_accepted_and_recorded(api: Api, fake: FakeKlaviyo) -> None:
    reply = await api.post("/api/events", event_body())

    assert (reply.status, reply.body) == (202, None)
    shop = fake.account("shop")
    [event] = shop.events
    assert (event.metric, event.email, event.unique_id, event.value) == (
        "Order shipped",
        "ann@example.com",
        "1001:shipped",
        42.5,
    )
    assert event.time.isoformat() == "2026-09-01T10:00:00+00:00"
    assert event.properties["order_id"] == 1001
    assert shop.profiles[event.profile_id].first_name == "Ann"
    assert list(shop.metrics) == ["Order shipped"]
    assert fake.rejections == []


@pytest.mark.parametrize(
    ("mutate", "pointer", "needle"),
    [
        (lambda a: a.pop("metric"), "/data/attributes", "'metric' is a required property"),
        (lambda a: a.update(time=1_788_000_000), "/data/attributes/time", "is not of type 'string'"),
        (
            lambda a: a["profile"]["data"].update(type="person"),
            "/data/attributes/profile/data/type",
            "'person'",
        ),
    ],
    ids=["missing-metric", "unix-time", "unknown-profile-type"],
)
async def test_event_violating_the_schema_is_rejected_and_recorded(
    api: Api, fake: FakeKlaviyo, mutate: Callable[[dict[str, Any]], object], pointer: str, needle: str
) -> None:
    body = event_body()
    mutate(body["data"]["attributes"])

    reply = await api.post("/api/events", body)

    assert reply.status == 400
    assert (reply.error["code"], reply.error["source"]["pointer"]) == ("invalid", pointer)
    assert needle in reply.error["detail"]
    [rejection] = fake.rejections
    assert (rejection.path, rejection.pointer) == ("/api/events", pointer)
    assert needle in rejection.message
    assert fake.account("shop").events == []


async def test_event_with_unknown_resource_type_is_rejected(api: Api, fake: FakeKlaviyo) -> None:
    body = event_body()
    body["data"]["type"] = "evnt"

    reply = await api.post("/api/events", body)

    assert reply.status == 400
    assert "'evnt' is not one of ['event']" in reply.error["detail"]
    assert len(fake.rejections) == 1


@pytest.mark.parametrize(
    ("when", "needle"),
    [
        ("2026-09-01T10:00:00", "date-time"),  # no offset
        ("1989-12-31T23:59:59Z", "1990"),
        ("2027-10-01T00:00:00+00:00", "1990"),  # more than a year after the clock
    ],
    ids=["no-offset", "before-1990", "too-far-ahead"],
)
async def test_event_time_must_be_rfc3339_with_offset_and_in_range(
    api: Api, fake: FakeKlaviyo, when: str, needle: str
) -> None:
    reply = await api.post("/api/events", event_body(when=when))

    assert reply.status == 400
    assert needle in reply.error["detail"]
    assert reply.error["source"]["pointer"] == "/data/attributes/time"
    assert fake.account("shop").events == []


async def test_metric_name_must_be_shorter_than_128_characters(api: Api, fake: FakeKlaviyo) -> None:
    assert (await api.post("/api/events", event_body(metric="m" * 127))).status == 202
    reply = await api.post("/api/events", event_body(metric="m" * 128, unique_id="other"))

    assert reply.status == 400
    assert reply.error["source"]["pointer"] == "/data/attributes/metric/data/attributes/name"
    assert len(fake.account("shop").events) == 1


async def test_same_unique_id_for_same_profile_and_metric_keeps_only_the_first(
    api: Api, fake: FakeKlaviyo
) -> None:
    first = await api.post("/api/events", event_body(email="ann@example.com"))
    repeat = await api.post("/api/events", event_body(email="ANN@example.com", when="2026-09-02T00:00:00Z"))
    other_metric = await api.post("/api/events", event_body(metric="Order delivered"))

    assert [first.status, repeat.status, other_metric.status] == [202, 202, 202]
    shop = fake.account("shop")
    assert [(e.metric, e.time.day) for e in shop.events] == [("Order shipped", 1), ("Order delivered", 1)]
    assert (shop.received_event_requests, shop.duplicate_events) == (3, 1)
    assert len(shop.profiles) == 1


async def test_without_unique_id_the_time_to_the_second_is_the_key(api: Api, fake: FakeKlaviyo) -> None:
    await api.post("/api/events", event_body(unique_id=None, when="2026-09-01T10:00:00.100Z"))
    await api.post("/api/events", event_body(unique_id=None, when="2026-09-01T10:00:00.900Z"))
    await api.post("/api/events", event_body(unique_id=None, when="2026-09-01T10:00:01Z"))

    shop = fake.account("shop")
    assert [e.time.second for e in shop.events] == [0, 1]
    assert shop.duplicate_events == 1


async def test_event_without_time_uses_the_receipt_time(api: Api, fake: FakeKlaviyo, clock: FakeClock) -> None:
    await api.post("/api/events", event_body(when=None))

    [event] = fake.account("shop").events
    assert event.time.timestamp() == int(clock.now)


# ---------------------------------------------------------------- profiles


async def test_profile_import_creates_then_updates_merging_and_clearing(api: Api, fake: FakeKlaviyo) -> None:
    first = profile_body(email="Bo@Example.com", first_name="Bo", last_name="Li", location={"city": "Oslo"})
    second = profile_body(email="bo@example.com", last_name=None, organization="Acme", location={"zip": "1"})
    created = await api.post("/api/profile-import", first)
    updated = await api.post("/api/profile-import", second)

    assert (created.status, updated.status) == (201, 200)
    assert created.body["data"]["id"] == updated.body["data"]["id"]
    attributes = updated.body["data"]["attributes"]
    assert (attributes["email"], attributes["first_name"], attributes["last_name"]) == (
        "bo@example.com",
        "Bo",
        None,
    )
    assert attributes["organization"] == "Acme"
    assert attributes["location"] == {"city": "Oslo", "zip": "1"}
    profile = fake.account("shop").profile_by_email("BO@example.com")
    assert profile is not None
    assert (profile.first_name, profile.last_name) == ("Bo", None)


async def test_profile_import_conflicting_identifiers_get_409(api: Api, fake: FakeKlaviyo) -> None:
    by_email = await api.post("/api/profile-import", profile_body(email="cy@example.com"))
    by_phone = await api.post("/api/profile-import", profile_body(phone_number="+15555550100"))

    reply = await api.post(
        "/api/profile-import", profile_body(email="cy@example.com", phone_number="+15555550100")
    )

    assert reply.status == 409
    assert reply.error["code"] == "duplicate_profile"
    assert reply.error["meta"]["duplicate_profile_id"] == by_phone.body["data"]["id"]
    profile = fake.account("shop").profiles[by_email.body["data"]["id"]]
    assert profile.phone_number is None


async def test_profile_import_requires_an_identifier(api: Api, fake: FakeKlaviyo) -> None:
    reply = await api.post("/api/profile-import", profile_body(first_name="Nobody"))

    assert reply.status == 400
    assert reply.error["detail"] == "One or more identifiers is required"
    assert fake.account("shop").profiles == {}


async def test_a_refused_email_is_never_echoed_in_error_details(
    api: Api, fake: FakeKlaviyo, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Send an invalid email (no dot after the @) as a profile import, an event and a bulk import row.
    Result: Klaviyo-like details that do not quote the address, and no trace of it in the simulator's log."""
    caplog.set_level(logging.DEBUG)
    shopper = "Hana.Sato@example"
    imported = await api.post("/api/profile-import", profile_body(email=shopper))
    event = await api.post("/api/events", event_body(email=shopper))
    job = await api.post("/api/profile-bulk-import-jobs", import_job_body([shopper]))
    errors = await api.get(f"/api/profile-bulk-import-jobs/{job.body['data']['id']}/import-errors")

    [row] = errors.body["data"]
    details = [imported.error["detail"], event.error["detail"], row["attributes"]["detail"]]
    assert details == ["Invalid email address."] * 3
    assert row["attributes"]["source"] == {"pointer": "/data/attributes/profiles/data/0"}
    assert "hana" not in caplog.text.lower()
    assert [r.message for r in fake.rejections] == ["Invalid email address."] * 2


async def test_an_email_quoted_by_a_schema_message_is_masked(
    spec_or_hand: Path | None, session: aiohttp.ClientSession
) -> None:
    simulator = FakeKlaviyo(spec_path=spec_or_hand)
    simulator.add_account(KEY, "shop")
    async with served(simulator, session) as api:
        reply = await api.post("/api/profile-import", {"data": {"type": "profile", "attributes": ["hana@x.com"]}})

    assert reply.status == 400
    assert "<email>" in reply.error["detail"]
    assert "hana" not in json.dumps(reply.body)


async def test_profile_import_payload_over_100kb_is_refused(api: Api, fake: FakeKlaviyo) -> None:
    reply = await api.post("/api/profile-import", profile_body(email="big@example.com", title="x" * 110_000))

    assert reply.status == 400
    assert "maximum size" in reply.error["detail"]
    assert fake.account("shop").profiles == {}


# ---------------------------------------------------------------- lists


async def test_list_create_filter_and_add_members(api: Api, fake: FakeKlaviyo) -> None:
    created = await api.post("/api/lists", list_body("Whiplash"))
    await api.post("/api/lists", list_body("Newsletter"))
    profile = await api.post("/api/profile-import", profile_body(email="di@example.com"))
    list_id, profile_id = created.body["data"]["id"], profile.body["data"]["id"]

    found = await api.get("/api/lists", params={"filter": 'equals(name,["Whiplash"])'})
    added = await api.post(
        f"/api/lists/{list_id}/relationships/profiles", {"data": [{"type": "profile", "id": profile_id}]}
    )

    assert created.status == 201
    assert [item["id"] for item in found.body["data"]] == [list_id]
    assert found.body["data"][0]["attributes"]["name"] == "Whiplash"
    assert added.status == 204
    assert fake.account("shop").lists[list_id].member_ids == [profile_id]


async def test_list_paging_is_capped_at_ten_with_cursor_links(api: Api, fake: FakeKlaviyo) -> None:
    shop = fake.account("shop")
    for index in range(12):
        shop.create_list(f"list {index}", "single_opt_in", START_DT)

    first = await api.get("/api/lists")
    second = await api.get_url(first.body["links"]["next"])
    too_big = await api.get("/api/lists", params={"page[size]": "11"})

    assert len(first.body["data"]) == 10
    assert [item["attributes"]["name"] for item in second.body["data"]] == ["list 10", "list 11"]
    assert second.body["links"]["next"] is None
    assert (too_big.status, too_big.error["source"]) == (400, {"parameter": "page[size]"})


@pytest.fixture
async def lists_api(
    spec_or_hand: Path | None, clock: FakeClock, session: aiohttp.ClientSession
) -> AsyncIterator[tuple[Api, FakeKlaviyo, dict[str, str]]]:
    """Serve an account holding lists A, B and C, created ten seconds apart; yield (api, fake, ids by name)."""
    simulator = FakeKlaviyo(spec_path=spec_or_hand, clock=clock, seed=7)
    shop = simulator.add_account(KEY, "shop")
    ids = {}
    for name in ("A", "B", "C"):
        ids[name] = shop.create_list(name, "single_opt_in", datetime.fromtimestamp(clock(), UTC)).id
        clock.advance(10)
    async with served(simulator, session) as client:
        yield client, simulator, ids


async def listed(api: Api, filter_text: str) -> list[str]:
    """Return the names of the lists a filter selects (asserting it is accepted)."""
    reply = await api.get("/api/lists", params={"filter": filter_text})
    assert reply.status == 200, reply.body
    return [item["attributes"]["name"] for item in reply.body["data"]]


async def test_list_filter_accepts_the_forms_the_spec_declares(
    lists_api: tuple[Api, FakeKlaviyo, dict[str, str]],
) -> None:
    api, fake, ids = lists_api
    after_a = datetime.fromtimestamp(START + 5, UTC).isoformat().replace("+00:00", "Z")

    assert await listed(api, 'equals(name,["B"])') == ["B"]
    assert await listed(api, 'any(name,["A","C","Z"])') == ["A", "C"]
    assert await listed(api, "any(name,['B', 'it\\'s'])") == ["B"]
    assert await listed(api, f'equals(id,"{ids["C"]}")') == ["C"]
    assert await listed(api, f'any(id,["{ids["A"]}","{ids["B"]}"])') == ["A", "B"]
    assert await listed(api, f"greater-than(created,{after_a})") == ["B", "C"]
    assert await listed(api, f'and(greater-than(updated,{after_a}),any(name,["A","B"]))') == ["B"]
    assert await listed(api, f'greater-than(created,{after_a}),equals(name,["C"])') == ["C"]
    assert fake.rejections == []


@pytest.mark.parametrize(
    "filter_text",
    [
        'equals(name,"A")',  # name is declared with list-valued operators only
        'any(name,"A")',
        'contains(name,"A")',  # operator not declared for name
        'equals(title,["A"])',  # field not declared
        'any(id,[])',
        "any(name,[A])",  # strings are quoted
        'greater-than(created,"2026-09-21T14:13:20Z")',  # date-times are not
        "greater-than(created,[2026-09-21T14:13:20Z])",
        "greater-than(created,2026-09-21)",
        "equals(created,2026-09-21T14:13:20Z)",
        'or(equals(name,["A"]),equals(name,["B"]))',
        'equals(name,["A"]',
        'equals(name,["A\\q"])',  # not a JSON escape
    ],
)
async def test_list_filter_refuses_forms_the_spec_does_not_declare(
    lists_api: tuple[Api, FakeKlaviyo, dict[str, str]], filter_text: str
) -> None:
    api, fake, _ = lists_api

    reply = await api.get("/api/lists", params={"filter": filter_text})

    assert (reply.status, reply.error["code"], reply.error["source"]) == (400, "invalid", {"parameter": "filter"})
    assert set(reply.error) >= {"id", "status", "code", "title", "detail", "source"}
    assert [r.pointer for r in fake.rejections] == ["filter"]


async def test_list_filter_error_says_which_value_shape_the_operator_takes(
    lists_api: tuple[Api, FakeKlaviyo, dict[str, str]],
) -> None:
    api, _, _ = lists_api

    single = await api.get("/api/lists", params={"filter": 'equals(name,"A")'})
    unknown = await api.get("/api/lists", params={"filter": 'equals(nam,["A"])'})

    assert single.error["detail"] == "'equals' on filter field 'name' takes a list of values, e.g. equals(name,[...])"
    assert unknown.error["detail"] == "'nam' is not a valid field for filtering; use one of: created, id, name, updated"


@needs_spec
def test_hand_filter_table_equals_the_specs_declarations() -> None:
    assert SPEC is not None
    spec = make_checker(SPEC)

    assert isinstance(spec, SpecChecker)
    assert dict(HandChecker().filters) == dict(spec.filters)
    assert set(spec.filters) == set(FILTER_OPERATIONS)


async def test_add_members_to_unknown_list_or_with_unknown_profile(api: Api, fake: FakeKlaviyo) -> None:
    created = await api.post("/api/lists", list_body("Whiplash"))
    list_id = created.body["data"]["id"]
    members = {"data": [{"type": "profile", "id": "01NOSUCHPROFILE0000000000"}]}

    unknown_list = await api.post("/api/lists/XXXXXX/relationships/profiles", members)
    unknown_profile = await api.post(f"/api/lists/{list_id}/relationships/profiles", members)

    assert unknown_list.status == 404
    assert (unknown_profile.status, unknown_profile.error["source"]["pointer"]) == (400, "/data/0/id")
    assert fake.account("shop").lists[list_id].member_ids == []


async def test_add_members_refuses_more_than_1000_ids(api: Api) -> None:
    created = await api.post("/api/lists", list_body("Whiplash"))
    members = {"data": [{"type": "profile", "id": f"p{index}"} for index in range(1001)]}

    reply = await api.post(f"/api/lists/{created.body['data']['id']}/relationships/profiles", members)

    assert reply.status == 400
    assert "1000" in reply.error["detail"]


# ---------------------------------------------------------------- auth, revision, media type


async def test_unknown_or_missing_key_gets_klaviyos_401(api: Api, fake: FakeKlaviyo) -> None:
    unknown = await api.post("/api/events", event_body(), key="pk_not_a_real_key")
    missing = await api.post("/api/events", event_body(), key=None)

    for reply in (unknown, missing):
        assert reply.status == 401
        error = reply.error
        assert (error["status"], error["code"], error["source"]) == (
            401,
            "not_authenticated",
            {"pointer": "/data"},
        )
        assert error["title"] == "Authentication credentials were not provided."
        assert error["detail"] == "Missing or invalid authorization scheme. Please use Klaviyo-API-Key."
        assert len(error["id"]) == 36
    assert fake.unknown_key_requests == 2
    assert fake.account("shop").events == []


async def test_revoked_key_gets_401_until_restored(api: Api, fake: FakeKlaviyo) -> None:
    fake.revoke(KEY)
    refused = await api.post("/api/events", event_body())
    fake.restore(KEY)
    accepted = await api.post("/api/events", event_body())

    assert (refused.status, accepted.status) == (401, 202)
    assert fake.account("shop").counters.unauthorized == 1
    assert len(fake.account("shop").events) == 1


async def test_key_without_scope_gets_403(api: Api, fake: FakeKlaviyo) -> None:
    fake.add_account(OTHER_KEY, "readonly", scopes=["lists:read"])

    refused = await api.post("/api/events", event_body(), key=OTHER_KEY)
    allowed = await api.get("/api/lists", key=OTHER_KEY)

    assert (refused.status, refused.error["code"], allowed.status) == (403, "permission_denied", 200)


@pytest.mark.parametrize(
    ("revision", "status"), [(None, 400), ("15-07-2026", 400), ("2023-01-24", 410), ("2026-07-15.pre", 202)]
)
async def test_revision_header_is_required_valid_and_not_retired(
    api: Api, fake: FakeKlaviyo, revision: str | None, status: int
) -> None:
    headers = api.headers(**{"Content-Type": "application/vnd.api+json"})
    headers.pop("revision")
    if revision is not None:
        headers["revision"] = revision

    async with api.session.post(
        api.base_url + "/api/events", data=json.dumps(event_body()), headers=headers
    ) as response:
        assert response.status == status
    assert len(fake.account("shop").events) == (1 if status == 202 else 0)


async def test_wrong_content_type_gets_415(api: Api, fake: FakeKlaviyo) -> None:
    reply = await api.post("/api/events", event_body(), **{"Content-Type": "text/plain"})
    plain_json = await api.post("/api/events", event_body(), **{"Content-Type": "application/json"})

    assert (reply.status, reply.error["code"]) == (415, "unsupported_media_type")
    assert plain_json.status == 202
    assert len(fake.account("shop").events) == 1


async def test_unknown_path_gets_an_error_envelope(api: Api) -> None:
    reply = await api.get("/api/nothing-here")

    assert (reply.status, reply.error["code"]) == (404, "not_found")


# ---------------------------------------------------------------- rate limits


async def test_burst_window_throttles_then_resets(
    fake: FakeKlaviyo, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    fake.limiter.overrides["create_event"] = Limits(burst=2, steady=5)
    async with served(fake, session) as api:
        ok = [await api.post("/api/events", event_body(unique_id=f"u{n}")) for n in range(2)]
        refused = await api.post("/api/events", event_body(unique_id="u2"))
        clock.advance(1.0)
        after_reset = await api.post("/api/events", event_body(unique_id="u3"))

    assert [r.status for r in ok] == [202, 202]
    assert [r.headers["RateLimit-Remaining"] for r in ok] == ["4", "3"]
    assert {r.headers["RateLimit-Limit"] for r in ok} == {"5"}
    assert ok[0].headers["RateLimit-Reset"] == "40"
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1"
    assert "RateLimit-Limit" not in refused.headers
    assert (refused.error["code"], refused.error["detail"]) == (
        "throttled",
        "Request was throttled. Expected available in 1 second.",
    )
    assert after_reset.status == 202
    assert [e.unique_id for e in fake.account("shop").events] == ["u0", "u1", "u3"]
    assert fake.account("shop").counters.throttled == 1


async def test_steady_window_throttles_until_the_minute_ends(
    fake: FakeKlaviyo, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    fake.limiter.overrides["create_event"] = Limits(burst=100, steady=3)
    async with served(fake, session) as api:
        for n in range(3):
            await api.post("/api/events", event_body(unique_id=f"u{n}"))
        refused = await api.post("/api/events", event_body(unique_id="late"))
        clock.advance(40.0)
        accepted = await api.post("/api/events", event_body(unique_id="late"))

    assert refused.status == 429
    assert refused.headers["Retry-After"] == "40"
    assert refused.error["detail"] == "Request was throttled. Expected available in 40 seconds."
    assert (accepted.status, accepted.headers["RateLimit-Remaining"]) == (202, "2")


async def test_limits_scale_and_daily_cap_on_list_creation(
    clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    simulator = FakeKlaviyo(clock=clock, limits_scale=0.02)  # create_list: 1/s, 3/m, 3/d
    simulator.add_account(KEY, "shop")
    async with served(simulator, session) as api:
        statuses = []
        for minute in range(3):
            clock.advance(60.0 * (minute > 0))
            statuses += [(await api.post("/api/lists", list_body(f"L{minute}{n}"))).status for n in range(2)]
        clock.advance(3600.0)
        capped = await api.post("/api/lists", list_body("after an hour"))

    assert statuses == [201, 429, 201, 429, 201, 429]
    assert capped.status == 429
    assert int(capped.headers["Retry-After"]) > 3600
    assert len(simulator.account("shop").lists) == 3


async def test_limits_disabled_never_throttles_but_still_reports(
    clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    simulator = FakeKlaviyo(clock=clock, limits_enabled=False, limits_scale=0.001)
    simulator.add_account(KEY, "shop")
    async with served(simulator, session) as api:
        replies = [await api.post("/api/lists", list_body(f"L{n}")) for n in range(4)]

    assert [r.status for r in replies] == [201] * 4
    assert replies[-1].headers["RateLimit-Remaining"] == "0"


async def test_rate_limits_are_per_account(fake: FakeKlaviyo, session: aiohttp.ClientSession) -> None:
    fake.add_account(OTHER_KEY, "other")
    fake.limiter.overrides["create_event"] = Limits(burst=1, steady=10)
    async with served(fake, session) as api:
        mine = await api.post("/api/events", event_body())
        theirs = await api.post("/api/events", event_body(), key=OTHER_KEY)

    assert (mine.status, theirs.status) == (202, 202)


# ---------------------------------------------------------------- fault injection


async def test_fail_next_then_success(api: Api, fake: FakeKlaviyo) -> None:
    fake.fail_next(2, status=503, path_prefix="/api/events")

    lists = await api.get("/api/lists")
    failures = [await api.post("/api/events", event_body()) for _ in range(2)]
    success = await api.post("/api/events", event_body())

    assert lists.status == 200
    assert [(r.status, r.error["code"]) for r in failures] == [(503, "service_unavailable")] * 2
    assert success.status == 202
    assert len(fake.account("shop").events) == 1


async def test_injected_429_carries_retry_after(api: Api, fake: FakeKlaviyo) -> None:
    fake.fail_next(1, status=429, retry_after=7)

    reply = await api.post("/api/events", event_body())

    assert (reply.status, reply.headers["Retry-After"]) == (429, "7")
    assert reply.error["detail"] == "Request was throttled. Expected available in 7 seconds."


async def test_connection_reset_before_processing_loses_the_request(api: Api, fake: FakeKlaviyo) -> None:
    fake.reset_connections(1)

    with pytest.raises(aiohttp.ClientConnectionError):
        await api.post("/api/events", event_body())
    retry = await api.post("/api/events", event_body())

    assert retry.status == 202
    assert fake.account("shop").received_event_requests == 1


async def test_connection_reset_after_processing_keeps_the_event_and_retry_dedups(
    api: Api, fake: FakeKlaviyo
) -> None:
    fake.reset_connections(1, after_processing=True)

    with pytest.raises(aiohttp.ClientConnectionError):
        await api.post("/api/events", event_body())
    retry = await api.post("/api/events", event_body())

    shop = fake.account("shop")
    assert retry.status == 202
    assert (len(shop.events), shop.received_event_requests, shop.duplicate_events) == (1, 2, 1)


async def test_delay_stalls_requests(api: Api, fake: FakeKlaviyo) -> None:
    fake.delay(0.2)
    started = time.monotonic()
    await api.get("/api/lists")
    fake.delay(0)

    assert time.monotonic() - started >= 0.2


async def test_rejection_rule_refuses_matching_events_without_counting_as_client_error(
    api: Api, fake: FakeKlaviyo
) -> None:
    fake.reject_event_if(EventMatch(unique_id_prefix="bad:"))

    refused = await api.post("/api/events", event_body(unique_id="bad:1"))
    accepted = await api.post("/api/events", event_body(unique_id="good:1"))

    shop = fake.account("shop")
    assert (refused.status, accepted.status) == (400, 202)
    assert [e.unique_id for e in shop.events] == ["good:1"]
    assert (shop.counters.injected_rejections, fake.rejections) == (1, [])


# ---------------------------------------------------------------- bulk endpoints


async def test_bulk_events_are_recorded_per_profile(api: Api, fake: FakeKlaviyo) -> None:
    body = bulk_events_body(
        [
            ("a@example.com", [("Order shipped", "1:s"), ("Order delivered", "1:s")]),
            ("b@example.com", [("Order shipped", "2:s")]),
        ]
    )

    reply = await api.post("/api/event-bulk-create-jobs", body)

    shop = fake.account("shop")
    assert (reply.status, reply.body) == (202, None)
    assert sorted((e.email, e.metric) for e in shop.events) == [
        ("a@example.com", "Order delivered"),
        ("a@example.com", "Order shipped"),
        ("b@example.com", "Order shipped"),
    ]
    assert shop.event_jobs[0].event_count == 3


async def test_bulk_events_with_repeated_unique_id_fail_whole(api: Api, fake: FakeKlaviyo) -> None:
    body = bulk_events_body(
        [
            ("a@example.com", [("Order shipped", "1:s"), ("Order shipped", "1:s")]),
            ("b@example.com", [("Order shipped", "2:s")]),
        ]
    )

    reply = await api.post("/api/event-bulk-create-jobs", body)

    assert reply.status == 400
    assert "Duplicate unique_id '1:s'" in reply.error["detail"]
    shop = fake.account("shop")
    assert (shop.events, shop.profiles, shop.received_event_requests) == ([], {}, 0)


async def test_bulk_events_over_1000_are_refused(api: Api, fake: FakeKlaviyo) -> None:
    body = bulk_events_body([("a@example.com", [("Order shipped", f"u{n}") for n in range(1001)])])

    reply = await api.post("/api/event-bulk-create-jobs", body)

    assert reply.status == 400
    assert "1000" in reply.error["detail"]
    assert fake.account("shop").events == []


async def test_profile_bulk_import_completes_after_delay_and_fills_the_list(
    clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    simulator = FakeKlaviyo(clock=clock, job_delay=5.0)
    shop = simulator.add_account(KEY, "shop")
    async with served(simulator, session) as api:
        list_id = (await api.post("/api/lists", list_body("Whiplash"))).body["data"]["id"]
        created = await api.post(
            "/api/profile-bulk-import-jobs",
            import_job_body(["e@example.com", None, "F@example.com"], list_id),
        )
        job_path = f"/api/profile-bulk-import-jobs/{created.body['data']['id']}"
        queued = await api.get(job_path)
        clock.advance(5.0)
        done = await api.get(job_path)
        errors = await api.get(f"{job_path}/import-errors")

    assert created.status == 202
    assert (created.body["data"]["attributes"]["status"], queued.body["data"]["attributes"]["status"]) == (
        "queued",
        "queued",
    )
    attributes = done.body["data"]["attributes"]
    assert (
        attributes["status"],
        attributes["total_count"],
        attributes["completed_count"],
        attributes["failed_count"],
    ) == (
        "complete",
        3,
        2,
        1,
    )
    [row_error] = errors.body["data"]
    assert row_error["attributes"]["source"]["pointer"] == "/data/attributes/profiles/data/1"
    members = [shop.profiles[pid].email for pid in shop.lists[list_id].member_ids]
    assert members == ["e@example.com", "f@example.com"]


async def test_profile_bulk_import_unknown_job_and_unknown_list(api: Api) -> None:
    missing_job = await api.get("/api/profile-bulk-import-jobs/01NOSUCHJOB")
    unknown_list = await api.post(
        "/api/profile-bulk-import-jobs", import_job_body(["g@example.com"], "XXXXXX")
    )

    assert missing_job.status == 404
    assert (unknown_list.status, unknown_list.error["source"]["pointer"]) == (
        400,
        "/data/relationships/lists/data/0/id",
    )


# ---------------------------------------------------------------- validation without the spec


async def test_hand_checks_reject_event_without_email_or_metric(
    clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    simulator = FakeKlaviyo(spec_path=None, clock=clock)
    simulator.add_account(KEY, "shop")
    no_email = event_body()
    no_email["data"]["attributes"]["profile"]["data"]["attributes"].pop("email")
    no_metric = event_body()
    no_metric["data"]["attributes"].pop("metric")
    async with served(simulator, session) as api:
        replies = [await api.post("/api/events", body) for body in (no_email, no_metric, event_body())]

    assert simulator.spec_validation is False
    assert [r.status for r in replies] == [400, 400, 202]
    assert replies[0].error["detail"] == "One or more identifiers is required"
    assert replies[1].error["detail"] == "'metric' is a required property"
    assert [r.pointer for r in simulator.rejections] == [
        "/data/attributes/profile/data/attributes",
        "/data/attributes",
    ]


# ---------------------------------------------------------------- spec-based validation


@needs_spec
def test_spec_checker_loads_fast_and_is_cached() -> None:
    assert SPEC is not None
    from klaviyo_bridge.sandbox import openapi

    openapi._cached_spec_checker.cache_clear()
    started = time.monotonic()
    checker = load_spec_checker(SPEC)
    elapsed = time.monotonic() - started

    assert elapsed < 2.0
    assert load_spec_checker(SPEC) is checker
    assert checker.operations == frozenset(openapi.BODY_OPERATIONS)
    assert FakeKlaviyo().spec_validation is True


@needs_spec
async def test_spec_rejects_bad_date_time_and_accepts_nullable_refs(
    clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    assert SPEC is not None
    simulator = FakeKlaviyo(spec_path=SPEC, clock=clock)
    simulator.add_account(KEY, "shop")
    nullable_location = event_body()
    nullable_location["data"]["attributes"]["profile"]["data"]["attributes"]["location"] = None
    async with served(simulator, session) as api:
        bad_time = await api.post("/api/events", event_body(when="2026-09-31T10:00:00Z"))
        accepted = await api.post("/api/events", nullable_location)

    assert bad_time.status == 400
    assert "is not a 'date-time'" in bad_time.error["detail"]
    assert accepted.status == 202


@needs_spec
@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b["data"]["attributes"].pop("properties"),
        lambda b: b["data"]["attributes"].update(value="12.00"),
        lambda b: b["data"]["attributes"]["metric"]["data"]["attributes"].update(name=5),
        lambda b: b["data"]["attributes"]["profile"]["data"].update(type="profiles"),
        lambda b: b.update(data=[]),
        lambda b: None,
    ],
)
def test_hand_rules_agree_with_the_spec(mutate: Callable[[dict[str, Any]], object]) -> None:
    assert SPEC is not None
    body = event_body()
    mutate(body)

    assert HandChecker().check("create_event", copy.deepcopy(body)) == make_checker(SPEC).check(
        "create_event", body
    )


# ---------------------------------------------------------------- control API and command line


async def test_control_api_adds_accounts_injects_faults_and_dumps_state(api: Api, fake: FakeKlaviyo) -> None:
    sim = api.session
    async with sim.post(
        api.base_url + "/__sim/accounts", json={"api_key": OTHER_KEY, "label": "other"}
    ) as added:
        assert added.status == 201
    async with sim.post(api.base_url + "/__sim/fail_next", json={"n": 1, "status": 500}) as armed:
        assert armed.status == 200
    failed = await api.post("/api/events", event_body(), key=OTHER_KEY)
    accepted = await api.post("/api/events", event_body(), key=OTHER_KEY)
    async with sim.get(api.base_url + "/__sim/state") as response:
        raw = await response.text()

    state = json.loads(raw)
    assert (failed.status, accepted.status) == (500, 202)
    assert set(state["accounts"]) == {"shop", "other"}
    assert state["accounts"]["other"]["events"][0]["metric"] == "Order shipped"
    assert state["accounts"]["other"]["counters"]["requests"] == {"create_event": 1}
    assert OTHER_KEY not in raw
    assert KEY not in raw


async def test_control_api_revokes_and_sets_rejection_rules(api: Api, fake: FakeKlaviyo) -> None:
    async with api.session.post(
        api.base_url + "/__sim/reject_profiles", json={"email": "no@example.com"}
    ) as armed:
        assert armed.status == 200
    async with api.session.post(api.base_url + "/__sim/revoke", json={"api_key": KEY}) as revoked:
        assert revoked.status == 200
    refused = await api.post("/api/profile-import", profile_body(email="ok@example.com"))
    fake.restore(KEY)
    rejected = await api.post("/api/profile-import", profile_body(email="NO@example.com"))
    accepted = await api.post("/api/profile-import", profile_body(email="ok@example.com"))

    assert [refused.status, rejected.status, accepted.status] == [401, 400, 201]
    assert [p.email for p in fake.account("shop").profiles.values()] == ["ok@example.com"]


def test_profile_match_compares_lower_cased_email() -> None:
    assert ProfileMatch(email="A@B.com")({"email": "a@b.COM"}) is True
    assert ProfileMatch(email="A@B.com")({"email": "c@b.com"}) is False


async def test_command_line_serves_until_terminated(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "klaviyo_bridge.sandbox.klaviyo",
        "--no-spec",
        "--account",
        f"{KEY}=shop",
        stdout=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        base_url = (await asyncio.wait_for(process.stdout.readline(), timeout=10)).decode().strip()
        async with aiohttp.ClientSession() as client, client.get(base_url + "/__sim/state") as response:
            state = await response.json()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=10)

    assert base_url.startswith("http://127.0.0.1:")
    assert list(state["accounts"]) == ["shop"]
    assert state["spec_validation"] is False
