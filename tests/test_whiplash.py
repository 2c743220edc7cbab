"""Narrow tests of the Whiplash client against aioresponses fakes (token endpoint, tiny orders server)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from kit.fakeclock import FakeClock
from pydantic import SecretStr
from yarl import URL

from klaviyo_bridge.errors import (
    AuthFailed,
    MalformedPayload,
    PermanentUpstream,
    RateLimited,
    TransientUpstream,
)
from klaviyo_bridge.whiplash import Page, WhiplashClient
from klaviyo_bridge.whiplash_auth import TokenManager, TokenRecord, WhiplashAuth, error_detail, fingerprint

BASE = "http://whiplash.test"
TOKEN_URL = f"{BASE}/oauth/token"
ORDERS_RE = re.compile(r"^http://whiplash\.test/api/v2/orders(\?.*)?$")
CLIENT_SECRET = "cs-SECRET-9f2c"
SEED_REFRESH = "rt-SEED-7a1b"
CUSTOMER = 42
T0 = datetime(2026, 3, 13, 15, 0, tzinfo=UTC)


# --- fakes -------------------------------------------------------------------------------------------


class MemoryVault:
    """In-memory TokenVault that keeps every saved record."""

    def __init__(self, rec: TokenRecord | None = None) -> None:
        self.saved: list[TokenRecord] = [rec] if rec else []

    async def load_whiplash_token(self) -> TokenRecord | None:
        return self.saved[-1] if self.saved else None

    async def save_whiplash_token(self, rec: TokenRecord) -> None:
        self.saved.append(rec)


@dataclass
class TokenServer:
    """Doorkeeper-like token endpoint: issues at-N/rt-N, or replays queued failures first."""

    clock: FakeClock
    bodies: list[dict[str, Any]] = field(default_factory=list)
    failures: list[CallbackResult] = field(default_factory=list)
    rotate: bool = True

    def __call__(self, url: URL, **kwargs: Any) -> CallbackResult:
        self.bodies.append(kwargs["json"])
        if self.failures:
            return self.failures.pop(0)
        n = len(self.bodies)
        payload: dict[str, Any] = {
            "access_token": f"at-{n}",
            "token_type": "bearer",
            "expires_in": 7200,
            "scope": "user_read",
            "created_at": int(self.clock.now),
        }
        if self.rotate:
            payload["refresh_token"] = f"rt-{n}"
        return CallbackResult(status=200, payload=payload)


@dataclass
class OrdersServer:
    """Applies the Ransack predicates the client sends to an in-memory order list, and logs requests."""

    orders: list[dict[str, Any]]
    requests: list[dict[str, Any]] = field(default_factory=list)
    ignore_search: bool = False

    def __call__(self, url: URL, **kwargs: Any) -> CallbackResult:
        params = kwargs["params"]
        self.requests.append({"params": dict(params), "headers": dict(kwargs["headers"])})
        search = json.loads(params["search"])
        rows = self.orders if self.ignore_search else [o for o in self.orders if _matches(o, search)]
        rows = sorted(rows, key=lambda o: (_ts(o["updated_at"]), o["id"]))
        if params["sort"] == "id asc":
            rows.sort(key=lambda o: o["id"])
        per_page, page = int(params["per_page"]), int(params["page"])
        return CallbackResult(status=200, payload=rows[(page - 1) * per_page : page * per_page])  # type: ignore[arg-type]


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _matches(order: dict[str, Any], search: dict[str, Any]) -> bool:
    updated = _ts(order["updated_at"])
    tests: dict[str, Callable[[Any], bool]] = {
        "customer_id_eq": lambda v: order["customer_id"] == v,
        "updated_at_gteq": lambda v: updated >= _ts(v),
        "updated_at_gt": lambda v: updated > _ts(v),
        "updated_at_eq": lambda v: updated == _ts(v),
        "id_gt": lambda v: order["id"] > v,
        "id_in": lambda v: order["id"] in v,
    }
    return all(tests[name](value) for name, value in search.items())


def order(oid: int, updated: datetime | str, **extra: Any) -> dict[str, Any]:
    """Return a minimal valid raw v2 order."""
    stamp = updated if isinstance(updated, str) else updated.isoformat(timespec="milliseconds")
    return {
        "id": oid,
        "customer_id": CUSTOMER,
        "status": 100,
        "status_name": "Processing",
        "updated_at": stamp,
        "email": f"c{oid}@example.com",
        **extra,
    }


def auth(grant: str = "client_credentials", refresh: str | None = SEED_REFRESH) -> WhiplashAuth:
    return WhiplashAuth(
        base_url=BASE,
        grant=grant,  # type: ignore[arg-type]
        client_id="app-1",
        client_secret=SecretStr(CLIENT_SECRET),
        refresh_token=SecretStr(refresh) if refresh else None,
        scope="user_read",
    )


def assert_secret_free(exc: BaseException, *extra: str) -> None:
    text = f"{exc} {exc!r} {getattr(exc, 'detail', '')} {getattr(exc, 'body', '')}"
    for secret in (CLIENT_SECRET, SEED_REFRESH, "at-1", "at-2", "rt-1", *extra):
        assert secret not in text


# --- fixtures ----------------------------------------------------------------------------------------




@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0.timestamp())


@pytest.fixture
def tokens_server(mocked: aioresponses, clock: FakeClock) -> TokenServer:
    server = TokenServer(clock)
    mocked.post(TOKEN_URL, callback=server, repeat=True)
    return server


Factory = Callable[..., tuple[WhiplashClient, MemoryVault]]


@pytest.fixture
def make_client(session: aiohttp.ClientSession, clock: FakeClock) -> Factory:
    def build(
        *,
        grant: str = "client_credentials",
        vault: MemoryVault | None = None,
        refresh: str | None = SEED_REFRESH,
        page_size: int = 50,
        **kw: Any,
    ) -> tuple[WhiplashClient, MemoryVault]:
        vault = vault or MemoryVault()
        tokens = TokenManager(session, auth(grant, refresh), vault, clock=clock)
        kw.setdefault("backoff_factor", 0.001)
        return WhiplashClient(session, tokens, base_url=BASE, page_size=page_size, **kw), vault

    return build


def serve_orders(mocked: aioresponses, orders: list[dict[str, Any]], **kw: Any) -> OrdersServer:
    server = OrdersServer(orders, **kw)
    mocked.get(ORDERS_RE, callback=server, repeat=True)
    return server


def bearer(server: OrdersServer) -> list[str]:
    return [r["headers"]["Authorization"] for r in server.requests]


async def collect(pages: AsyncIterator[Page]) -> list[Page]:
    return [p async for p in pages]


def ids(pages: list[Page]) -> list[int]:
    return [o.id for p in pages for o in p.orders]


# --- tokens ------------------------------------------------------------------------------------------


async def test_client_credentials_token_fetched_once_cached_and_persisted(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, vault = make_client()
    orders = serve_orders(mocked, [order(1, T0)])
    await client.fetch_page(CUSTOMER, {"customer_id_eq": CUSTOMER})
    await client.fetch_page(CUSTOMER, {"customer_id_eq": CUSTOMER})
    assert tokens_server.bodies == [
        {
            "grant_type": "client_credentials",
            "client_id": "app-1",
            "client_secret": CLIENT_SECRET,
            "scope": "user_read",
        }
    ]
    assert bearer(orders) == ["Bearer at-1", "Bearer at-1"]
    assert [r.access_token for r in vault.saved] == ["at-1"]
    assert vault.saved[0].expires_at == T0 + timedelta(seconds=7200)


async def test_persisted_token_reused_after_restart(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    first, vault = make_client()
    serve = serve_orders(mocked, [])
    await first.fetch_page(CUSTOMER, {})
    restarted, _ = make_client(vault=vault)
    await restarted.fetch_page(CUSTOMER, {})
    assert len(tokens_server.bodies) == 1
    assert bearer(serve) == ["Bearer at-1", "Bearer at-1"]


async def test_concurrent_callers_share_one_refresh(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client()
    serve = serve_orders(mocked, [])
    await asyncio.gather(*(client.fetch_page(CUSTOMER, {}) for _ in range(5)))
    assert len(tokens_server.bodies) == 1
    assert set(bearer(serve)) == {"Bearer at-1"}


def chain_record(refresh: str, seed: str, *, expired: bool = True) -> TokenRecord:
    expires = T0 - timedelta(hours=1) if expired else T0 + timedelta(hours=1)
    return TokenRecord("at-old", expires, refresh, fingerprint(seed))


async def test_refresh_grant_spends_vault_token_when_seed_matches(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, vault = make_client(
        grant="refresh_token", vault=MemoryVault(chain_record("rt-chain-5", SEED_REFRESH))
    )
    serve_orders(mocked, [])
    await client.fetch_page(CUSTOMER, {})
    assert tokens_server.bodies == [
        {
            "grant_type": "refresh_token",
            "refresh_token": "rt-chain-5",
            "client_id": "app-1",
            "client_secret": CLIENT_SECRET,
        }
    ]
    assert vault.saved[-1] == TokenRecord(
        "at-1", T0 + timedelta(seconds=7200), "rt-1", fingerprint(SEED_REFRESH)
    )


async def test_refresh_grant_spends_config_token_when_seed_changed(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    stale = chain_record("rt-chain-5", "rt-previous-seed", expired=False)
    client, vault = make_client(grant="refresh_token", vault=MemoryVault(stale))
    serve = serve_orders(mocked, [])
    await client.fetch_page(CUSTOMER, {})
    assert tokens_server.bodies[0]["refresh_token"] == SEED_REFRESH
    assert bearer(serve) == ["Bearer at-1"]  # the still-valid token of the old chain is not used either
    assert vault.saved[-1].seed_fingerprint == fingerprint(SEED_REFRESH)


async def test_refresh_grant_keeps_old_refresh_token_when_not_rotated(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    tokens_server.rotate = False
    client, vault = make_client(grant="refresh_token")
    serve_orders(mocked, [])
    await client.fetch_page(CUSTOMER, {})
    assert vault.saved[-1].refresh_token == SEED_REFRESH


async def test_rotated_refresh_token_saved_before_first_use(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, vault = make_client(grant="refresh_token")
    seen_at_use: list[tuple[str, str | None]] = []

    def orders(url: URL, **kwargs: Any) -> CallbackResult:
        rec = vault.saved[-1] if vault.saved else None
        seen_at_use.append((kwargs["headers"]["Authorization"], rec.refresh_token if rec else None))
        return CallbackResult(status=200, payload=[])  # type: ignore[arg-type]

    mocked.get(ORDERS_RE, callback=orders, repeat=True)
    await client.fetch_page(CUSTOMER, {})
    assert seen_at_use == [("Bearer at-1", "rt-1")]


async def test_token_refreshed_when_near_expiry(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer, clock: FakeClock
) -> None:
    client, _ = make_client(grant="refresh_token")
    serve = serve_orders(mocked, [])
    await client.fetch_page(CUSTOMER, {})
    clock.now += 7200 - 301  # 301 s left: still good
    await client.fetch_page(CUSTOMER, {})
    clock.now += 2  # 299 s left: inside the 5-minute margin
    await client.fetch_page(CUSTOMER, {})
    assert bearer(serve) == ["Bearer at-1", "Bearer at-1", "Bearer at-2"]
    assert tokens_server.bodies[1]["refresh_token"] == "rt-1"


async def test_401_refreshes_once_then_succeeds(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client()
    mocked.get(ORDERS_RE, status=401, payload={"message": "Invalid token"})
    serve = serve_orders(mocked, [order(1, T0)])
    assert len(await client.fetch_page(CUSTOMER, {})) == 1
    assert bearer(serve) == ["Bearer at-2"]
    assert len(tokens_server.bodies) == 2


async def test_401_twice_raises_auth_failed(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client()
    mocked.get(ORDERS_RE, status=401, payload={"message": "Invalid token"}, repeat=True)
    with pytest.raises(AuthFailed) as info:
        await client.fetch_page(CUSTOMER, {})
    assert info.value.status == 401
    assert "Invalid token" in str(info.value)
    assert len(tokens_server.bodies) == 2
    assert_secret_free(info.value)


async def test_403_is_auth_failed_without_retry(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client()
    mocked.get(ORDERS_RE, status=403, payload={"message": "Forbidden customer"})
    with pytest.raises(AuthFailed) as info:
        await client.fetch_page(CUSTOMER, {})
    assert info.value.status == 403
    assert len(tokens_server.bodies) == 1


async def test_token_endpoint_401_is_auth_failed_and_secret_free(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    echo = {"error": "invalid_client", "error_description": f"client secret {CLIENT_SECRET} is wrong"}
    tokens_server.failures.append(CallbackResult(status=401, payload=echo))
    client, vault = make_client()
    with pytest.raises(AuthFailed) as info:
        await client.fetch_page(CUSTOMER, {})
    assert info.value.status == 401
    assert "invalid_client" in str(info.value)
    assert vault.saved == []
    assert_secret_free(info.value)


async def test_token_endpoint_400_invalid_grant_names_the_error(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    body = {"error": "invalid_grant", "error_description": "The provided authorization grant is revoked."}
    tokens_server.failures.append(CallbackResult(status=400, payload=body))
    client, _ = make_client(grant="refresh_token")
    with pytest.raises(AuthFailed, match="invalid_grant: The provided authorization grant is revoked"):
        await client.fetch_page(CUSTOMER, {})


async def test_token_endpoint_503_is_retried(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    tokens_server.failures.append(CallbackResult(status=503, body="<html>busy</html>"))
    client, _ = make_client()
    serve = serve_orders(mocked, [])
    assert await client.fetch_page(CUSTOMER, {}) == []
    assert bearer(serve) == ["Bearer at-2"]


# --- retries -----------------------------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record backoff's sleeps instead of waiting them out."""
    recorded: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, *args: Any) -> None:
        recorded.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return recorded


async def test_503_503_200_succeeds(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client()
    mocked.get(ORDERS_RE, status=503, body="Service Unavailable")
    mocked.get(ORDERS_RE, status=503, body="Service Unavailable")
    serve = serve_orders(mocked, [order(1, T0)])
    assert [o["id"] for o in await client.fetch_page(CUSTOMER, {})] == [1]  # type: ignore[index]
    assert len(serve.requests) == 1


async def test_network_error_and_timeout_are_retried(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client()
    mocked.get(ORDERS_RE, exception=aiohttp.ClientConnectionError("connection reset"))
    mocked.get(ORDERS_RE, exception=TimeoutError())
    serve_orders(mocked, [order(1, T0)])
    assert len(await client.fetch_page(CUSTOMER, {})) == 1


async def test_429_retry_after_seconds_is_waited(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer, sleeps: list[float]
) -> None:
    client, _ = make_client(backoff_factor=0.001)
    mocked.get(
        ORDERS_RE, status=429, payload={"message": "Rate limit exceeded"}, headers={"Retry-After": "7"}
    )
    serve_orders(mocked, [])
    assert await client.fetch_page(CUSTOMER, {}) == []
    assert sleeps == [7.0]


async def test_retry_after_beyond_budget_gives_up_with_hint(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer, sleeps: list[float]
) -> None:
    client, _ = make_client(max_time=60)
    mocked.get(
        ORDERS_RE, status=429, payload={"message": "Rate limit exceeded"}, headers={"Retry-After": "3600"}
    )
    serve = serve_orders(mocked, [])
    with pytest.raises(RateLimited) as info:
        await client.fetch_page(CUSTOMER, {})
    assert info.value.retry_after == 3600
    assert sleeps == []
    assert serve.requests == []


async def test_exhausted_retries_raise_transient(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client(max_tries=3)
    served: list[int] = []

    def unavailable(url: URL, **kwargs: Any) -> CallbackResult:
        served.append(1)
        return CallbackResult(status=502, body="<html><body>Bad Gateway</body></html>")

    mocked.get(ORDERS_RE, callback=unavailable, repeat=True)
    with pytest.raises(TransientUpstream) as info:
        await client.fetch_page(CUSTOMER, {})
    assert info.value.status == 502
    assert "Bad Gateway" in info.value.detail
    assert len(served) == 3
    assert_secret_free(info.value)


# --- payloads and error bodies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("<!DOCTYPE html><html><body>" + "Maintenance " * 40 + "</body></html>", 'not JSON: HTML page "Maintenance'),
        # A cut-off page of orders is described, never quoted: its first bytes are shoppers' data.
        ('[{"id": 1, "email": "ann@example.com", "updated_at": "2026-03-', "not JSON: invalid or truncated JSON"),
        ('{"orders": [{"email": "ann@example.com"}]}', "expected a JSON array, got a JSON dict"),
        ("", "not JSON"),
    ],
)
async def test_unreadable_200_bodies_are_malformed_payload(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer, body: str, expected: str
) -> None:
    client, _ = make_client()
    mocked.get(ORDERS_RE, status=200, body=body, content_type="text/html")
    with pytest.raises(MalformedPayload) as info:
        await client.fetch_page(CUSTOMER, {})
    assert expected in info.value.detail
    assert len(info.value.detail) <= 200 + len("expected a JSON array: ")
    assert "ann" not in str(info.value)
    assert_secret_free(info.value)


@pytest.mark.parametrize(
    ("status", "body", "detail"),
    [
        (422, {"message": "search is invalid"}, "search is invalid"),
        (404, {"error": "record could not be found"}, "record could not be found"),
        (
            422,
            {"errors": {"email": ["is invalid", "is blank"], "base": ["nope"]}},
            "email: is invalid, is blank; base: nope",
        ),
        (422, {"errors": ["first", "second"]}, "first, second"),
        (409, {"errors": "conflict"}, "conflict"),
    ],
)
async def test_error_bodies_give_readable_detail(
    make_client: Factory,
    mocked: aioresponses,
    tokens_server: TokenServer,
    status: int,
    body: dict[str, Any],
    detail: str,
) -> None:
    client, _ = make_client()
    mocked.get(ORDERS_RE, status=status, payload=body)
    with pytest.raises(PermanentUpstream) as info:
        await client.fetch_page(CUSTOMER, {})
    assert info.value.status == status
    assert info.value.detail == detail


def test_error_detail_is_capped_and_redacted() -> None:
    text = json.dumps({"message": "token at-XYZ rejected " + "x" * 500})
    detail = error_detail(text, ["at-XYZ"])
    assert len(detail) <= 200
    assert "at-XYZ" not in detail
    assert detail.startswith("token [redacted] rejected")


async def test_echoed_bearer_token_is_redacted(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client(max_tries=1)
    mocked.get(ORDERS_RE, status=500, body="crash while handling Authorization: Bearer at-1")
    with pytest.raises(TransientUpstream) as info:
        await client.fetch_page(CUSTOMER, {})
    assert "[redacted]" in str(info.value)
    assert_secret_free(info.value)


async def test_request_shape_and_customer_header(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client(page_size=25)
    serve = serve_orders(mocked, [])
    await client.fetch_page(7, {"customer_id_eq": 7, "status_in": [300, 350]}, page=3)
    [request] = serve.requests
    assert request["params"] == {
        "search": '{"customer_id_eq":7,"status_in":[300,350]}',
        "sort": "updated_at asc,id asc",
        "page": "3",
        "per_page": "25",
    }
    headers = request["headers"]
    assert headers["X-CUSTOMER-ID"] == "7"
    assert headers["Accept"] == "application/json"
    assert headers["Accept-Version"] == "v2"
    [url] = [url for method, url in mocked.requests if method == "GET"]
    assert url.path == "/api/v2/orders"
    assert json.loads(url.query["search"]) == {"customer_id_eq": 7, "status_in": [300, 350]}


async def test_fetch_by_ids_batches_by_page_size(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client(page_size=2)
    serve = serve_orders(mocked, [order(i, T0) for i in range(1, 7)])
    found = await client.fetch_by_ids(CUSTOMER, [5, 1, 3, 9, 2])
    assert sorted(o["id"] for o in found) == [1, 2, 3, 5]  # type: ignore[index]
    assert [json.loads(r["params"]["search"])["id_in"] for r in serve.requests] == [[5, 1], [3, 9], [2]]


# --- keyset walk -------------------------------------------------------------------------------------


def searches(server: OrdersServer) -> list[dict[str, Any]]:
    return [json.loads(r["params"]["search"]) for r in server.requests]


async def test_walk_advances_updated_at_across_pages(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client(page_size=2)
    stamps = [T0 + timedelta(minutes=i) for i in range(1, 6)]
    serve = serve_orders(mocked, [order(10 + i, ts) for i, ts in enumerate(stamps)])
    pages = await collect(client.walk_changes(CUSTOMER, T0))
    assert ids(pages) == [10, 11, 12, 13, 14]
    assert [s["updated_at_gteq"] for s in searches(serve)] == [
        "2026-03-13T15:00:00.000+00:00",
        "2026-03-13T15:02:00.000+00:00",
        "2026-03-13T15:03:00.000+00:00",
        "2026-03-13T15:04:00.000+00:00",
        "2026-03-13T15:05:00.000+00:00",
    ]
    assert all(s["customer_id_eq"] == CUSTOMER for s in searches(serve))
    assert all(r["params"]["page"] == "1" for r in serve.requests)
    assert pages[-1].last_key == pages[-1].safe_key == (stamps[-1], 14)


async def test_walk_sends_utc_for_minus_four_hour_timestamps(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client(page_size=2)
    stamps = [
        "2026-03-13T11:39:21.000-04:00",
        "2026-03-13T11:40:00.250-04:00",
        "2026-03-13T11:41:00.000-04:00",
    ]
    serve = serve_orders(mocked, [order(i, ts) for i, ts in enumerate(stamps, 1)])
    since = datetime.fromisoformat("2026-03-13T11:00:00-04:00")
    pages = await collect(client.walk_changes(CUSTOMER, since))
    assert ids(pages) == [1, 2, 3]
    assert [s["updated_at_gteq"] for s in searches(serve)] == [
        "2026-03-13T15:00:00.000+00:00",
        "2026-03-13T15:40:00.250+00:00",
        "2026-03-13T15:41:00.000+00:00",
    ]
    assert pages[0].orders[0].updated_at == datetime(2026, 3, 13, 15, 39, 21, tzinfo=UTC)


async def test_walk_drops_objects_at_or_before_since(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client()
    old = [order(1, T0 - timedelta(seconds=5)), order(2, T0 - timedelta(seconds=1))]
    mocked.get(ORDERS_RE, payload=[*old, order(3, T0), order(4, T0 + timedelta(seconds=1))])
    pages = await collect(client.walk_changes(CUSTOMER, T0))
    assert ids(pages) == [3, 4]


async def test_walk_yields_nothing_when_all_seen(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client()
    mocked.get(ORDERS_RE, payload=[order(1, T0 - timedelta(seconds=5))])
    assert await collect(client.walk_changes(CUSTOMER, T0)) == []


async def test_walk_drains_ties_larger_than_a_page(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client(page_size=2)
    tie = T0 + timedelta(minutes=1)
    later = order(99, tie + timedelta(seconds=1))
    serve = serve_orders(mocked, [*(order(i, tie) for i in range(1, 6)), later])
    pages = await asyncio.wait_for(collect(client.walk_changes(CUSTOMER, T0)), timeout=5)
    assert ids(pages) == [1, 2, 3, 4, 5, 99]
    tie_iso = "2026-03-13T15:01:00.000+00:00"
    assert [(s.get("updated_at_eq"), s.get("id_gt"), s.get("updated_at_gt")) for s in searches(serve)] == [
        (None, None, None),
        (None, None, None),
        (tie_iso, 2, None),
        (tie_iso, 4, None),
        (None, None, tie_iso),
    ]
    assert [r["params"]["sort"] for r in serve.requests][2:4] == ["id asc", "id asc"]


async def test_walk_stops_loudly_when_server_ignores_the_search(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client(page_size=2)
    serve_orders(
        mocked, [order(1, T0 + timedelta(seconds=1)), order(2, T0 + timedelta(seconds=1))], ignore_search=True
    )
    with pytest.raises(MalformedPayload, match="keyset stalled"):
        await asyncio.wait_for(collect(client.walk_changes(CUSTOMER, T0)), timeout=5)


async def test_malformed_order_in_page(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client()
    t1, t2, t3 = (T0 + timedelta(seconds=s) for s in (1, 2, 3))
    bad = order(7, t2, status="shipped?")
    mocked.get(ORDERS_RE, payload=[order(1, t1), bad, order(3, t3)])
    [page] = await collect(client.walk_changes(CUSTOMER, T0))
    assert [o.id for o in page.orders] == [1, 3]
    assert [m.order_id for m in page.malformed] == [7]
    assert page.safe_key == (t1, 1)
    assert page.last_key == (t3, 3)


async def test_first_fresh_order_malformed_has_no_safe_key(
    make_client: Factory, mocked: aioresponses, tokens_server: TokenServer
) -> None:
    client, _ = make_client()
    t1, t2 = T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)
    mocked.get(
        ORDERS_RE, payload=[order(1, T0 - timedelta(seconds=1)), order(5, t1, status=None), order(6, t2)]
    )
    [page] = await collect(client.walk_changes(CUSTOMER, T0))
    assert page.safe_key is None
    assert page.last_key == (t2, 6)
    assert [m.order_id for m in page.malformed] == [5]


async def test_naive_since_is_rejected(make_client: Factory) -> None:
    client, _ = make_client()
    with pytest.raises(ValueError, match="timezone-aware"):
        await collect(client.walk_changes(CUSTOMER, datetime(2026, 1, 1)))


async def test_reprs_hold_no_secrets(session: aiohttp.ClientSession, clock: FakeClock) -> None:
    tokens = TokenManager(session, auth("refresh_token"), MemoryVault(), clock=clock)
    client = WhiplashClient(session, tokens, base_url=BASE)
    for obj in (tokens, client, auth("refresh_token")):
        assert CLIENT_SECRET not in repr(obj)
        assert SEED_REFRESH not in repr(obj)
