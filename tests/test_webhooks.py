"""The webhook receiver on 127.0.0.1: what each request is answered, whom it wakes, what is counted and logged.

The daemon's side is a small stand-in (``Pool``: which customers run, which are disabled, who was woken); the
order lookup is a real state DB. Outcomes are read from a real ``Metrics`` registry and from the log records.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from kit.fakeclock import FakeClock

from klaviyo_bridge import webhooks
from klaviyo_bridge.core import OrderMemory, Plan
from klaviyo_bridge.errors import StoreError
from klaviyo_bridge.metrics import WEBHOOK_OUTCOMES, Metrics
from klaviyo_bridge.store import Store
from klaviyo_bridge.webhooks import (
    SIGNATURE_HEADER,
    Receiver,
    RejectLog,
    Targets,
    parse_notice,
    signature_ok,
    start_receiver,
)

SECRET = "whiplash-client-secret-for-hooks"
PATH = "/whiplash/webhook"
LIMIT = 4096
SHOP, OTHER, DISABLED = 11, 12, 13
EMAIL = "shopper.jane@example.com"


def sign(body: bytes, key: str = SECRET) -> str:
    """Return X-WHIPLASH-SIGNATURE for ``body``: hex HMAC-SHA256 keyed with ``key``."""
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def order_body(order_id: int = 7001, customer_id: int | str | None = SHOP, *, wrapped: bool = True,
               status: int = 300) -> bytes:
    """Return a webhook body for an order (with a shopper's email, which must never be logged)."""
    order: dict[str, object] = {"id": order_id, "status": status, "email": EMAIL, "shipping_name": "Jane Shopper"}
    if customer_id is not None:
        order["customer_id"] = customer_id
    doc = {"event_name": "order.shipped", "order": order} if wrapped else order
    return json.dumps(doc).encode()


@dataclass
class Pool:
    """The daemon's side: running and disabled customers, and every wake-up asked for."""

    running: set[int] = field(default_factory=lambda: {SHOP, OTHER})
    disabled: set[int] = field(default_factory=lambda: {DISABLED})
    woken: list[int] = field(default_factory=list)
    lookup: Callable[[int], Awaitable[int | None]] | None = None
    memory: dict[tuple[int, int], int] = field(default_factory=dict)  # (customer, order) → remembered status
    store: Store | None = None  # when set, the order memory is this real state DB, read as the daemon reads it

    def wake(self, cid: int) -> bool:
        if cid not in self.running:
            return False
        self.woken.append(cid)
        return True

    async def customer_of_order(self, order_id: int) -> int | None:
        if self.store is not None:
            return await self.store.customer_of_order(order_id)
        return None if self.lookup is None else await self.lookup(order_id)

    async def status_of(self, customer_id: int, order_id: int) -> int | None:
        if self.store is not None:
            return await self.store.remembered_status(customer_id, order_id)
        return self.memory.get((customer_id, order_id))

    def targets(self) -> Targets:
        return Targets(wake=self.wake, running=lambda: self.running, disabled=self.disabled.__contains__,
                       customer_of_order=self.customer_of_order, status_of=self.status_of)


@dataclass
class Served:
    """A receiver served on loopback, with its pool, metrics and URL."""

    pool: Pool
    metrics: Metrics
    url: str
    port: int
    http: aiohttp.ClientSession

    async def post(self, body: bytes, signature: str | None = "sign", **headers: str) -> int:
        """POST ``body`` (signed correctly unless told otherwise); return the status."""
        if signature == "sign":
            signature = sign(body)
        if signature is not None:
            headers[SIGNATURE_HEADER] = signature
        async with self.http.post(self.url, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    def count(self, outcome: str) -> float:
        """Return the webhook counter of one outcome."""
        return self.metrics.registry.get_sample_value("klaviyo_bridge_webhooks_total", {"outcome": outcome}) or 0.0

    def counts(self) -> dict[str, float]:
        """Return every non-zero outcome count."""
        return {o: n for o in WEBHOOK_OUTCOMES if (n := self.count(o))}


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """Serve a receiver for SHOP and OTHER (DISABLED configured but off) on a free loopback port."""
    pool, metrics = Pool(), Metrics()
    receiver = Receiver(SECRET, pool.targets(), metrics, max_body_bytes=LIMIT)
    server = await start_receiver(receiver, PATH, address=("127.0.0.1", 0))
    port = int(server.where.split(":")[2].split(" ")[0])
    try:
        async with aiohttp.ClientSession() as http:
            yield Served(pool, metrics, f"http://127.0.0.1:{port}{PATH}", port, http)
    finally:
        await server.close()


async def raw_request(port: int, head: bytes, body: bytes) -> bytes:
    """Send bytes as they are (a lying Content-Length, chunks) and return the first response line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return line


# ------------------------------------------------------------------------------------------ accepted


async def test_signed_wrapped_order_wakes_its_customer(served: Served) -> None:
    """1. POST {"event_name", "order": {...customer_id: SHOP}} signed with the client secret.
    Result: 202; SHOP woken once; counted as accepted."""
    assert await served.post(order_body()) == 202
    assert served.pool.woken == [SHOP]
    assert served.counts() == {"accepted": 1}


async def test_bare_order_and_string_ids_are_read_too(served: Served) -> None:
    """1. POST the order object itself (not wrapped), customer_id as a string of digits.
    Result: 202 and OTHER woken: the customer is read from a bare order as from a wrapped one."""
    assert await served.post(order_body(customer_id=str(OTHER), wrapped=False)) == 202
    assert served.pool.woken == [OTHER]


async def test_signature_in_upper_case_hex_is_accepted(served: Served) -> None:
    """Result: hex is compared case-blind (and surrounding blanks ignored)."""
    body = order_body()
    assert await served.post(body, signature=f" {sign(body).upper()} ") == 202


async def test_customer_found_by_order_id_in_the_state_db(served: Served, tmp_path: Path) -> None:
    """1. The order memory holds order 9001 for OTHER. 2. POST a signed order 9001 without customer_id.
    Result: 202 and only OTHER woken (the lookup is the store's own read)."""
    async with await Store.open(tmp_path / "state.db") as store:
        now = datetime.now(UTC)
        await store.commit_page(OTHER, Plan(orders={9001: OrderMemory(200)}), None, [], now)
        await store.commit_page(SHOP, Plan(orders={9002: OrderMemory(300)}), None, [], now)
        served.pool.store = store
        assert await store.customer_of_order(424242) is None
        assert await served.post(order_body(9001, customer_id=None)) == 202
    assert served.pool.woken == [OTHER]


async def test_unknown_order_without_customer_wakes_every_running_customer(served: Served) -> None:
    """1. POST a signed order the DB does not know, without customer_id; 2. a signed object without an order id.
    Result: 202 both times, and every running customer (not the disabled one) woken each time."""
    assert await served.post(order_body(424242, customer_id=None)) == 202
    assert await served.post(json.dumps({"event_name": "order.updated"}).encode()) == 202
    assert sorted(served.pool.woken) == [SHOP, SHOP, OTHER, OTHER]
    assert served.counts() == {"accepted": 2}


@pytest.mark.parametrize("failure", ["store error", "too slow"])
async def test_a_failing_lookup_wakes_everyone_rather_than_nobody(
    served: Served, failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. The order lookup raises StoreError, or takes longer than the lookup timeout.
    Result: still 202, every running customer woken (a missed wake-up would wait for the backstop poll)."""
    async def broken(order_id: int) -> int | None:
        if failure == "store error":
            raise StoreError("state database x: database is locked")
        await asyncio.sleep(10)
        return SHOP

    monkeypatch.setattr(webhooks, "LOOKUP_TIMEOUT_S", 0.2)
    served.pool.lookup = broken
    assert await served.post(order_body(5, customer_id=None)) == 202
    assert sorted(served.pool.woken) == [SHOP, OTHER]


async def test_news_the_bridge_already_has_wakes_nobody(served: Served) -> None:
    """1. The order memory holds order 7001 of SHOP at 300. 2. A webhook for it at 300; 3. one at 350; 4. one for
    an order never seen. Result: 202 each; the first is counted already_seen and wakes nobody (an earlier poll
    read that status); the other two wake SHOP."""
    served.pool.memory[(SHOP, 7001)] = 300
    assert await served.post(order_body(7001, status=300)) == 202
    assert served.pool.woken == []
    assert await served.post(order_body(7001, status=350)) == 202
    assert await served.post(order_body(7002, status=300)) == 202
    assert served.pool.woken == [SHOP, SHOP]
    assert served.counts() == {"already_seen": 1, "accepted": 2}


async def test_the_remembered_status_comes_from_the_state_db(served: Served, tmp_path: Path) -> None:
    """1. A real state DB remembers order 9001 of OTHER at 300; the daemon's own reader serves status_of.
    Result: a webhook at 300 is already_seen, one at 350 wakes OTHER."""
    async with await Store.open(tmp_path / "state.db") as store:
        await store.commit_page(OTHER, Plan(orders={9001: OrderMemory(300)}), None, [], datetime.now(UTC))
        served.pool.store = store
        assert await served.post(order_body(9001, customer_id=OTHER, status=300)) == 202
        assert served.pool.woken == []
        assert await served.post(order_body(9001, customer_id=SHOP, status=300)) == 202  # not SHOP's order
        assert await served.post(order_body(9001, customer_id=OTHER, status=350)) == 202
    assert served.pool.woken == [SHOP, OTHER]
    assert served.counts() == {"already_seen": 1, "accepted": 2}


async def test_unknown_and_disabled_customers_are_answered_202_and_counted(served: Served) -> None:
    """1. A signed webhook for a customer not in the config; 2. one for a configured but disabled customer.
    Result: 202 both (Whiplash must not retry them), nobody woken, counted as unknown_customer and
    ignored_disabled."""
    assert await served.post(order_body(customer_id=999)) == 202
    assert await served.post(order_body(customer_id=DISABLED)) == 202
    assert served.pool.woken == []
    assert served.counts() == {"unknown_customer": 1, "ignored_disabled": 1}


# ------------------------------------------------------------------------------------------ refused


async def test_missing_and_forged_signatures_are_401_and_wake_nobody(served: Served) -> None:
    """1. No signature header; 2. signed with another key; 3. the signature of another body; 4. not hex.
    Result: 401 each, nobody woken; unsigned 1, bad_signature 3."""
    body = order_body()
    assert await served.post(body, signature=None) == 401
    assert await served.post(body, signature=sign(body, "not-the-secret")) == 401
    assert await served.post(body, signature=sign(order_body(7002))) == 401
    assert await served.post(body, signature="zz-not-hex-ü") == 401
    assert served.pool.woken == []
    assert served.counts() == {"unsigned": 1, "bad_signature": 3}


async def test_oversized_bodies_are_413_whatever_the_length_header_says(served: Served) -> None:
    """1. A body over the limit with its true Content-Length; 2. the same sent chunked (no Content-Length);
    3. a small body whose Content-Length claims more than the limit.
    Result: 413 each (the chunked one is cut off while reading), nobody woken, too_large 3."""
    big = b'{"order": {"customer_id": 11, "pad": "' + b"x" * LIMIT + b'"}}'
    assert await served.post(big) == 413

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1000):
            yield big[start:start + 1000]

    async with served.http.post(served.url, data=chunks(), headers={SIGNATURE_HEADER: sign(big)}) as resp:
        assert resp.status == 413
        assert "Content-Length" not in resp.request_info.headers
    small = order_body()
    head = (f"POST {PATH} HTTP/1.1\r\nHost: x\r\n{SIGNATURE_HEADER}: {sign(small)}\r\n"
            f"Content-Length: {LIMIT + 1}\r\n\r\n").encode()
    assert (await raw_request(served.port, head, small)).startswith(b"HTTP/1.1 413")
    assert served.pool.woken == []
    assert served.counts() == {"too_large": 3}


async def test_a_length_header_shorter_than_the_body_gets_no_wake_up(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Content-Length covers only the first 10 bytes of a signed body, sent at once and then in two parts.
    Result: never a wake-up: at once, aiohttp's parser refuses the rest as a broken next request (400, before
    the handler runs); in two parts, the 10 bytes fail the signature (401). The parser's complaint, which quotes
    the bytes, is a DEBUG record of aiohttp's, a level the daemon never emits for libraries (logs.setup_logging)."""
    caplog.set_level(logging.DEBUG)
    body = order_body()
    head = (f"POST {PATH} HTTP/1.1\r\nHost: x\r\n{SIGNATURE_HEADER}: {sign(body)}\r\n"
            "Content-Length: 10\r\n\r\n").encode()
    assert (await raw_request(served.port, head, body)).startswith(b"HTTP/1.0 400")
    assert (await raw_request(served.port, head + body[:10], b"")).startswith(b"HTTP/1.1 401")
    assert served.pool.woken == []
    assert served.counts() == {"bad_signature": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and EMAIL in r.getMessage()]


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"order"', b"\xff\xfe{}", b"{" * 100_000])
async def test_signed_bodies_that_are_not_a_json_object_are_400(served: Served, body: bytes) -> None:
    """Result: a signed body that is not a JSON object (text, array, string, bad UTF-8, absurd nesting) is 400,
    counted malformed, and wakes nobody."""
    if len(body) > LIMIT:
        body = b"[" * (LIMIT - 1) + b"]"
    assert await served.post(body) == 400
    assert served.pool.woken == []
    assert served.counts() == {"malformed": 1}


async def test_only_post_on_the_path_is_served(served: Served) -> None:
    """Result: GET on the path is 405, another path 404, and neither is counted as a webhook."""
    async with served.http.get(served.url) as resp:
        assert resp.status == 405
    async with served.http.post(served.url.replace(PATH, "/metrics"), data=b"{}") as resp:
        assert resp.status == 404
    assert served.counts() == {}


# ------------------------------------------------------------------------------------------ logs


async def test_nothing_but_the_reason_is_logged(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """1. At DEBUG: accepted, forged, unsigned, oversized, malformed, unknown-customer requests, each twice.
    Result: no record holds the body, the email, a signature or the secret; each refusal reason has one WARNING
    line (the second within the minute is only counted); accepted requests log customer and order id at DEBUG."""
    caplog.set_level(logging.DEBUG)
    body = order_body()
    forged = sign(body, "forger")
    for _ in range(2):
        assert await served.post(body) == 202
        assert await served.post(body, signature=forged) == 401
        assert await served.post(body, signature=None) == 401
        assert await served.post(body + b" " * LIMIT) == 413
        assert await served.post(b"not json " + EMAIL.encode()) == 400
        assert await served.post(order_body(customer_id=999)) == 202
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for needle in (EMAIL, "Jane", "shipping_name", sign(body), forged, SECRET, '"order"'):
        assert needle not in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    reasons = sorted(m.split("reason=")[1].split()[0] for m in warnings)
    assert reasons == ["bad_signature", "malformed", "too_large", "unsigned"]
    assert all(m.startswith("webhook rejected reason=") and "\n" not in m for m in warnings)
    assert f"webhook accepted customer={SHOP} order=7001" in text
    assert served.counts() == {"accepted": 2, "bad_signature": 2, "unsigned": 2, "too_large": 2, "malformed": 2,
                               "unknown_customer": 2}


def test_reject_log_says_how_many_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    """1. Five forged requests in 30 s, then one 61 s after the first line. Result: two WARNING lines; the
    second says 4 were held back."""
    clock = FakeClock()
    reject = RejectLog(every_s=60.0, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            reject.rejected("bad_signature", 401)
            clock.advance(6)
        clock.advance(31)
        reject.rejected("bad_signature", 401)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "suppressed_since_last=0" in lines[0]
    assert "suppressed_since_last=4" in lines[1]


# ------------------------------------------------------------------------------------------ pieces


def test_signature_is_over_the_raw_bytes() -> None:
    """Result: the same JSON re-serialised (other spacing) no longer matches; an empty signature never does."""
    body = b'{"order": {"id": 1}}'
    assert signature_ok(SECRET.encode(), body, sign(body))
    assert not signature_ok(SECRET.encode(), b'{"order":{"id":1}}', sign(body))
    assert not signature_ok(SECRET.encode(), body, "")


@pytest.mark.parametrize(
    ("body", "customer", "order"),
    [
        (b'{"order": {"id": 5, "customer_id": 11}}', 11, 5),
        (b'{"id": 5, "customer_id": "11"}', 11, 5),
        (b'{"order": {"id": true, "customer_id": -3}}', None, None),
        (b'{"order": "x", "id": 8}', None, 8),
        (b"{}", None, None),
    ],
)
def test_notice_reads_wrapped_or_bare_orders(body: bytes, customer: int | None, order: int | None) -> None:
    """Result: ids are positive integers (or digit strings); anything else is unknown, never an error."""
    notice = parse_notice(body)
    assert notice is not None
    assert (notice.customer_id, notice.order_id) == (customer, order)
