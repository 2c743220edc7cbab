"""KlaviyoClient against aioresponses: exact requests, error mapping, retries and pacing.

The limiter is a real AccountLimiter on a fake clock (its sleeps advance the clock and are recorded),
and backoff's own waits are scaled down with ``backoff_base`` so nothing here really waits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from kit.fakeclock import FakeClock
from pydantic import SecretStr
from yarl import URL

from klaviyo_bridge.errors import (
    AuthFailed,
    MalformedPayload,
    PermanentUpstream,
    RateLimited,
    TransientUpstream,
    UpstreamError,
)
from klaviyo_bridge.klaviyo import (
    KlaviyoClient,
    encode,
    event_body,
    list_body,
    list_members_body,
    parse_import_job,
    profile_body,
    response_error,
)
from klaviyo_bridge.ratelimit import AccountLimiter

BASE = "https://a.klaviyo.com"
KEY = "pk_live_DO_NOT_LEAK_0123456789abcdef"
REVISION = "2026-07-15"
EVENTS = f"{BASE}/api/events"
PROFILE_IMPORT = f"{BASE}/api/profile-import"
LISTS = f"{BASE}/api/lists"
SPEC = Path("/work/shared/klaviyo-openapi/stable.json")

PAYLOAD: dict[str, Any] = {
    "email": "ana@example.com",
    "metric": "Order shipped",
    "time": "2026-08-01T12:30:00+00:00",
    "value": 42.5,
    "value_currency": "USD",
    "unique_id": "1001:shipped",
    "backfill": False,
    "properties": {"order_id": 1001, "tracking_url": "https://t.example/1Z"},
}


@pytest.fixture
def fake() -> FakeClock:
    return FakeClock()




@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def client(session: aiohttp.ClientSession, fake: FakeClock) -> KlaviyoClient:
    return make_client(session, fake)


def make_client(session: aiohttp.ClientSession, fake: FakeClock, **overrides: Any) -> KlaviyoClient:
    options: dict[str, Any] = {"max_tries": 4, "max_time": 60, "backoff_base": 0.001} | overrides
    limiter = AccountLimiter(1.0, clock=fake.clock, sleep=fake.sleep)
    return KlaviyoClient(
        session, base_url=BASE, revision=REVISION, api_key=SecretStr(KEY), limiter=limiter, **options
    )


def sent(m: aioresponses, method: str, url: str | URL) -> list[dict[str, Any]]:
    """Return the kwargs of every request the mock received for ``method url``."""
    return [call.kwargs for call in m.requests.get((method, URL(url)), [])]


def sent_json(m: aioresponses, method: str, url: str | URL) -> list[Any]:
    return [json.loads(kwargs["data"]) for kwargs in sent(m, method, url)]


def errors_body(status: int, code: str, detail: str, **extra: Any) -> str:
    error = {"id": "e1", "status": status, "code": code, "title": code, "detail": detail} | extra
    return json.dumps({"errors": [error]})


def assert_no_key(*texts: object) -> None:
    for text in texts:
        assert KEY not in str(text)
        assert KEY not in repr(text)


def assert_headers(kwargs: dict[str, Any], *, write: bool) -> None:
    headers = kwargs["headers"]
    assert headers["Authorization"] == f"Klaviyo-API-Key {KEY}"
    assert headers["revision"] == REVISION
    assert headers["Accept"] == "application/vnd.api+json"
    assert headers.get("Content-Type") == ("application/vnd.api+json" if write else None)


# --- pure builders ------------------------------------------------------------------------------------


def test_event_body_with_value_carries_every_attribute() -> None:
    assert event_body(PAYLOAD) == {
        "data": {
            "type": "event",
            "attributes": {
                "properties": {"order_id": 1001, "tracking_url": "https://t.example/1Z"},
                "time": "2026-08-01T12:30:00+00:00",
                "value": 42.5,
                "value_currency": "USD",
                "unique_id": "1001:shipped",
                "backfill": False,
                "metric": {"data": {"type": "metric", "attributes": {"name": "Order shipped"}}},
                "profile": {"data": {"type": "profile", "attributes": {"email": "ana@example.com"}}},
            },
        }
    }


def test_event_body_without_value_omits_value_keys() -> None:
    payload = {k: v for k, v in PAYLOAD.items() if k not in ("value", "value_currency")}

    attributes = event_body(payload)["data"]["attributes"]

    assert "value" not in attributes
    assert "value_currency" not in attributes
    assert attributes["unique_id"] == "1001:shipped"


def test_encode_is_deterministic_and_compact() -> None:
    reordered = dict(reversed(list(PAYLOAD.items())))

    assert encode(event_body(PAYLOAD)) == encode(event_body(reordered))
    assert b" " not in encode({"b": 1, "a": [1, 2]})
    assert encode({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


@pytest.mark.parametrize(
    ("detail", "headers", "expected"),
    [
        ("Request was throttled. Expected available in 1 second.", {}, 1.0),
        ("Request was throttled. Expected available in 3 seconds.", {}, 3.0),
        ("Request was throttled. Expected available in 3 seconds.", {"Retry-After": "7"}, 7.0),
        ("Request was throttled.", {}, None),
        ("Request was throttled.", {"Retry-After": "Wed, 21 Oct 2026 07:28:30 GMT"}, 30.0),  # an HTTP date
        ("Request was throttled. Expected available in 3 seconds.", {"Retry-After": "soon"}, 3.0),
    ],
)
def test_429_retry_after_comes_from_header_then_body(
    detail: str, headers: dict[str, str], expected: float | None
) -> None:
    now = datetime(2026, 10, 21, 7, 28, tzinfo=UTC).timestamp()
    error = response_error(429, headers, errors_body(429, "throttled", detail), now=now)

    assert isinstance(error, RateLimited)
    assert error.retry_after == expected


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, None), (202, None), (204, None),
        (429, RateLimited), (500, TransientUpstream), (502, TransientUpstream), (503, TransientUpstream),
        (504, TransientUpstream), (524, TransientUpstream),
        (401, AuthFailed), (403, AuthFailed),
        (400, PermanentUpstream), (404, PermanentUpstream), (405, PermanentUpstream),
        (409, PermanentUpstream), (410, PermanentUpstream), (413, PermanentUpstream),
        (415, PermanentUpstream), (422, PermanentUpstream), (418, PermanentUpstream),
        (501, PermanentUpstream), (505, PermanentUpstream), (408, TransientUpstream), (520, TransientUpstream),
    ],
)
def test_status_mapping(status: int, kind: type[UpstreamError] | None) -> None:
    error = response_error(status, {}, errors_body(status, "x", "y"))

    if kind is None:
        assert error is None
    else:
        assert type(error) is kind
        assert error is not None
        assert error.status == status
        assert error.service == "klaviyo"


def test_permanent_error_keeps_body_up_to_4000_chars() -> None:
    text = errors_body(400, "invalid", "bad") + " " * 5000

    error = response_error(400, {}, text)

    assert isinstance(error, PermanentUpstream)
    assert error.body == text[:4000]
    assert error.detail == "invalid: bad"


def test_non_json_error_detail_names_the_page_without_echoing_it() -> None:
    error = response_error(502, {}, "<html>\n<h1>Bad   gateway</h1></html>")

    assert error is not None
    assert error.detail == 'HTML page "Bad gateway" (36 bytes)'


def test_unreadable_2xx_body_is_described_not_quoted() -> None:
    """A cut-off 2xx body starts with a shopper's profile: the error says what it is, never what it holds."""
    with pytest.raises(MalformedPayload) as info:
        parse_import_job(200, '{"data":{"type":"profile","attributes":{"email":"ann@example.com"')
    assert "ann" not in str(info.value)
    assert "invalid or truncated JSON" in str(info.value)


# --- methods: exact requests --------------------------------------------------------------------------


def lists_page(*names: str, following: str | None = None) -> dict[str, Any]:
    """Return a get_lists reply with one list per name (ids L0, L1, ...) and an optional next link."""
    data = [{"type": "list", "id": f"L{index}", "attributes": {"name": name}} for index, name in enumerate(names)]
    return {"data": data, "links": {"self": LISTS, "next": following, "prev": None}}


def name_filter(name: str) -> URL:
    return URL(LISTS).with_query(filter=f"any(name,[{json.dumps(name, ensure_ascii=False)}])")


async def test_find_list_sends_the_spec_declared_any_filter_with_an_escaped_name(
    mocked: aioresponses, client: KlaviyoClient
) -> None:
    url = URL(LISTS).with_query(filter='any(name,["Whip\\"lash\\\\ café"])')
    mocked.get(url, payload=lists_page('Whip"lash\\ café', 'Whip"lash\\ café'))

    found = await client.find_list('Whip"lash\\ café')

    assert found == "L0"
    [kwargs] = sent(mocked, "GET", url)
    assert_headers(kwargs, write=False)
    assert kwargs["data"] is None


async def test_find_list_skips_returned_lists_with_another_name(mocked: aioresponses, client: KlaviyoClient) -> None:
    mocked.get(name_filter("Whiplash"), payload=lists_page("whiplash", "Newsletter", "Whiplash"))

    assert await client.find_list("Whiplash") == "L2"


async def test_find_list_without_an_exact_name_match_is_none(mocked: aioresponses, client: KlaviyoClient) -> None:
    nameless = {"type": "list", "id": "X"}
    mocked.get(name_filter("Whiplash"), payload={"data": [nameless, *lists_page("WHIPLASH")["data"]]})

    assert await client.find_list("Whiplash") is None


async def test_find_list_follows_the_cursor_until_a_name_matches(
    mocked: aioresponses, client: KlaviyoClient
) -> None:
    second = URL(LISTS).with_query({"filter": 'any(name,["Whiplash"])', "page[cursor]": "c2"})
    mocked.get(name_filter("Whiplash"), payload=lists_page("Whiplash (old)", following=str(second)))
    mocked.get(second, payload=lists_page("Other", "Whiplash"))

    assert await client.find_list("Whiplash") == "L1"
    assert len(sent(mocked, "GET", second)) == 1


async def test_create_list_posts_list_body(mocked: aioresponses, client: KlaviyoClient) -> None:
    mocked.post(LISTS, status=201, payload={"data": {"type": "list", "id": "NEW"}})

    assert await client.create_list("Whiplash") == "NEW"

    [kwargs] = sent(mocked, "POST", LISTS)
    assert_headers(kwargs, write=True)
    assert json.loads(kwargs["data"]) == {"data": {"type": "list", "attributes": {"name": "Whiplash"}}}


async def test_ensure_list_uses_the_existing_list(mocked: aioresponses, client: KlaviyoClient) -> None:
    mocked.get(name_filter("Whiplash"), payload=lists_page("Whiplash"))

    assert await client.ensure_list("Whiplash") == "L0"
    assert sent(mocked, "POST", LISTS) == []


async def test_ensure_list_creates_a_missing_list(mocked: aioresponses, client: KlaviyoClient) -> None:
    mocked.get(name_filter("Whiplash"), payload={"data": []})
    mocked.post(LISTS, status=201, payload={"data": {"type": "list", "id": "NEW"}})

    assert await client.ensure_list("Whiplash") == "NEW"
    assert sent_json(mocked, "POST", LISTS) == [list_body("Whiplash")]


@pytest.mark.parametrize("status", [200, 201])
async def test_import_profile_posts_attributes_and_returns_id(
    mocked: aioresponses, client: KlaviyoClient, status: int
) -> None:
    attributes = {"email": "ana@example.com", "first_name": "Ana", "last_name": "Núñez"}
    mocked.post(PROFILE_IMPORT, status=status, payload={"data": {"type": "profile", "id": "P1"}})

    assert await client.import_profile(attributes) == "P1"

    [kwargs] = sent(mocked, "POST", PROFILE_IMPORT)
    assert_headers(kwargs, write=True)
    assert json.loads(kwargs["data"]) == {"data": {"type": "profile", "attributes": attributes}}


async def test_add_to_list_chunks_2500_ids_into_three_calls(
    mocked: aioresponses, client: KlaviyoClient
) -> None:
    url = f"{LISTS}/L1/relationships/profiles"
    ids = [f"P{i}" for i in range(2500)]
    mocked.post(url, status=204, repeat=True)

    await client.add_to_list("L1", ids)

    bodies = sent_json(mocked, "POST", url)
    assert [len(body["data"]) for body in bodies] == [1000, 1000, 500]
    assert [item["id"] for body in bodies for item in body["data"]] == ids
    assert bodies[0]["data"][0] == {"type": "profile", "id": "P0"}
    assert_headers(sent(mocked, "POST", url)[0], write=True)


async def test_add_to_list_with_no_ids_sends_nothing(mocked: aioresponses, client: KlaviyoClient) -> None:
    await client.add_to_list("L1", [])

    assert mocked.requests == {}


async def test_create_event_posts_the_built_body(mocked: aioresponses, client: KlaviyoClient) -> None:
    mocked.post(EVENTS, status=202)

    await client.create_event(PAYLOAD)

    [kwargs] = sent(mocked, "POST", EVENTS)
    assert_headers(kwargs, write=True)
    assert kwargs["data"] == encode(event_body(PAYLOAD))
    assert json.loads(kwargs["data"]) == event_body(PAYLOAD)


# --- retries, pacing, error mapping -------------------------------------------------------------------


async def test_429_with_retry_after_waits_then_succeeds(
    mocked: aioresponses, client: KlaviyoClient, fake: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="klaviyo_bridge")
    throttled = errors_body(429, "throttled", "Request was throttled.")
    mocked.post(EVENTS, status=429, headers={"Retry-After": "2"}, body=throttled)
    mocked.post(EVENTS, status=202)

    await client.create_event(PAYLOAD)

    assert len(sent(mocked, "POST", EVENTS)) == 2
    assert fake.now >= 2.0  # the retry's acquire() waited out the server's hint
    assert "klaviyo retry endpoint=EVENTS try=1" in caplog.text
    assert_no_key(caplog.text)


async def test_429_hint_in_body_is_used_when_header_missing(
    mocked: aioresponses, session: aiohttp.ClientSession, fake: FakeClock
) -> None:
    client = make_client(session, fake, max_tries=1)
    detail = "Request was throttled. Expected available in 3 seconds."
    mocked.post(EVENTS, status=429, body=errors_body(429, "throttled", detail))
    mocked.post(EVENTS, status=202)

    with pytest.raises(RateLimited) as caught:
        await client.create_event(PAYLOAD)
    assert caught.value.retry_after == 3.0
    assert_no_key(caught.value)

    await client.create_event(PAYLOAD)
    assert fake.now == pytest.approx(3.0)  # the penalty held the next call back


async def test_retry_after_beyond_the_budget_gives_up_at_once(
    mocked: aioresponses, client: KlaviyoClient, fake: FakeClock
) -> None:
    mocked.post(LISTS, status=429, headers={"Retry-After": "3600"}, body=errors_body(429, "throttled", "day"))

    with pytest.raises(RateLimited):
        await client.create_list("Whiplash")

    assert len(sent(mocked, "POST", LISTS)) == 1
    assert fake.now == 0.0


async def test_503_storm_exhausts_retries_and_raises_transient(
    mocked: aioresponses, client: KlaviyoClient
) -> None:
    mocked.post(EVENTS, status=503, body=errors_body(503, "unavailable", "try later"), repeat=True)

    with pytest.raises(TransientUpstream) as caught:
        await client.create_event(PAYLOAD)

    assert caught.value.status == 503
    assert caught.value.detail == "unavailable: try later"
    assert len(sent(mocked, "POST", EVENTS)) == 4
    assert_no_key(caught.value, caught.value.__cause__)


async def test_timeout_is_retried(mocked: aioresponses, client: KlaviyoClient) -> None:
    mocked.post(PROFILE_IMPORT, exception=TimeoutError())
    mocked.post(PROFILE_IMPORT, status=201, payload={"data": {"type": "profile", "id": "P9"}})

    assert await client.import_profile({"email": "ana@example.com"}) == "P9"
    assert len(sent(mocked, "POST", PROFILE_IMPORT)) == 2


async def test_timeouts_only_raise_transient_without_status(
    mocked: aioresponses, client: KlaviyoClient
) -> None:
    mocked.post(EVENTS, exception=TimeoutError(), repeat=True)

    with pytest.raises(TransientUpstream) as caught:
        await client.create_event(PAYLOAD)

    assert caught.value.status is None
    assert isinstance(caught.value.__cause__, TimeoutError)


async def test_connection_reset_is_retried_with_identical_bytes(
    mocked: aioresponses, client: KlaviyoClient
) -> None:
    mocked.post(EVENTS, exception=aiohttp.ClientConnectionResetError("Connection reset by peer"))
    mocked.post(EVENTS, exception=aiohttp.ServerDisconnectedError())
    mocked.post(EVENTS, status=202)

    await client.create_event(PAYLOAD)

    bodies = [kwargs["data"] for kwargs in sent(mocked, "POST", EVENTS)]
    assert len(bodies) == 3
    assert isinstance(bodies[0], bytes)
    assert bodies[0] == bodies[1] == bodies[2]


async def test_400_is_permanent_with_body_and_not_retried(
    mocked: aioresponses, client: KlaviyoClient
) -> None:
    body = errors_body(400, "invalid", "The payload provided in the request is invalid.")
    mocked.post(EVENTS, status=400, body=body, repeat=True)

    with pytest.raises(PermanentUpstream) as caught:
        await client.create_event(PAYLOAD)

    assert caught.value.status == 400
    assert caught.value.body == body
    assert caught.value.detail == "invalid: The payload provided in the request is invalid."
    assert len(sent(mocked, "POST", EVENTS)) == 1
    assert_no_key(caught.value)


async def test_409_duplicate_profile_is_permanent(mocked: aioresponses, client: KlaviyoClient) -> None:
    meta = {"duplicate_profile_id": "P7"}
    body = errors_body(409, "duplicate_profile", "A profile already exists.", meta=meta)
    mocked.post(PROFILE_IMPORT, status=409, body=body, repeat=True)

    with pytest.raises(PermanentUpstream) as caught:
        await client.import_profile({"email": "ana@example.com", "phone_number": "+15555550100"})

    assert caught.value.detail.startswith("duplicate_profile:")
    assert "P7" in caught.value.body
    assert len(sent(mocked, "POST", PROFILE_IMPORT)) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failures_are_not_retried(
    mocked: aioresponses, client: KlaviyoClient, status: int
) -> None:
    body = errors_body(status, "not_authenticated", "Missing or invalid authorization scheme.")
    mocked.post(EVENTS, status=status, body=body, repeat=True)

    with pytest.raises(AuthFailed) as caught:
        await client.create_event(PAYLOAD)

    assert caught.value.status == status
    assert len(sent(mocked, "POST", EVENTS)) == 1
    assert_no_key(caught.value, caught.value.args)


async def test_malformed_success_body_raises_malformed_payload(
    mocked: aioresponses, client: KlaviyoClient
) -> None:
    mocked.post(PROFILE_IMPORT, status=200, body="<html>maintenance</html>")

    with pytest.raises(MalformedPayload):
        await client.import_profile({"email": "ana@example.com"})


async def test_ratelimit_headers_slow_the_next_request(
    mocked: aioresponses, client: KlaviyoClient, fake: FakeClock
) -> None:
    mocked.post(EVENTS, status=202, headers={"RateLimit-Remaining": "0", "RateLimit-Reset": "30"})
    mocked.post(EVENTS, status=202)

    await client.create_event(PAYLOAD)
    assert fake.now == 0.0
    await client.create_event(PAYLOAD)

    assert fake.now >= 30.0


def test_repr_hides_the_key(client: KlaviyoClient) -> None:
    assert_no_key(client, vars(client).get("_api_key"))
    assert "a.klaviyo.com" in repr(client)


# --- bodies against Klaviyo's OpenAPI spec ------------------------------------------------------------


@pytest.fixture(scope="module")
def spec_validator() -> Any:
    if not SPEC.exists():
        pytest.skip(f"{SPEC} not present")
    from openapi_schema_validator import OAS30Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    spec = json.loads(SPEC.read_text())
    # The spec is one resource under its own URI, so the "#/components/..." refs inside it resolve against it.
    uri = "urn:klaviyo:openapi:stable"
    registry = Registry().with_resource(uri, Resource.from_contents(spec, default_specification=DRAFT4))

    def validate(schema_name: str, body: Any) -> None:
        schema = {"$ref": f"{uri}#/components/schemas/{schema_name}"}
        OAS30Validator(schema, registry=registry).validate(body)

    return validate


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        ("EventCreateQueryV2", event_body(PAYLOAD)),
        ("EventCreateQueryV2", event_body({k: v for k, v in PAYLOAD.items() if not k.startswith("value")})),
        ("ProfileUpsertQuery", profile_body({"email": "ana@example.com", "first_name": "Ana"})),
        ("ListMembersAddQuery", list_members_body(["P1", "P2"])),
        ("ListCreateQuery", list_body("Whiplash")),
    ],
)
def test_bodies_match_the_openapi_spec(spec_validator: Any, schema: str, body: Any) -> None:
    spec_validator(schema, body)


def test_spec_validator_rejects_a_broken_body(spec_validator: Any) -> None:
    broken = event_body(PAYLOAD)
    del broken["data"]["attributes"]["metric"]

    with pytest.raises(Exception, match="metric"):
        spec_validator("EventCreateQueryV2", broken)
