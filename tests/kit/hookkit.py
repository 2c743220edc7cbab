"""Webhooks in the suites that run the real daemon: its receiver's config, signed requests, what was polled.

The simulated Whiplash signs with its client secret, which is the bridge's configured one in every kit, so the
receiver's default key (the Whiplash client secret) verifies the simulator's deliveries.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import sqlite3
import time
from collections.abc import Iterable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp

from kit.bridgekit import toml_str
from kit.faultkit import CLIENT_SECRET
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash
from klaviyo_bridge.sandbox.whiplash_webhooks import WebhookDelivery

SIGNATURE_HEADER = "X-WHIPLASH-SIGNATURE"
PATH = "/whiplash/webhook"


def free_port() -> int:
    """Return a loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def receiver_url(port: int) -> str:
    """Return the URL the daemon's receiver serves on ``port``."""
    return f"http://127.0.0.1:{port}{PATH}"


def hook_sections(port: int, *, poll_s: float = 120.0, **more: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Return faultkit ``Bridge`` sections: the receiver on ``port``, polling every ``poll_s`` as the backstop."""
    sections: dict[str, dict[str, str]] = {
        "bridge": {"poll_interval_seconds": str(poll_s)},
        "webhooks": {"listen": toml_str(f"127.0.0.1:{port}")},
    }
    for name, keys in more.items():
        sections.setdefault(name, {}).update(keys)
    return sections


def sign(secret: str, body: bytes) -> str:
    """Return X-WHIPLASH-SIGNATURE for ``body``."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_body(whiplash: FakeWhiplash, order_id: int, event: str = "order.status_changed") -> bytes:
    """Return the body Whiplash would send for an order as it is now."""
    return json.dumps({"event_name": event, "order": whiplash.order_json(order_id)}).encode()


async def post(http: aiohttp.ClientSession, url: str, body: bytes, signature: str | None) -> int:
    """POST a body with the given signature (None: no header); return the status."""
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    async with http.post(url, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def wake_all(port: int) -> None:
    """POST one signed webhook naming no customer, so every running customer polls now, as any webhook would make
    it: tests that wait for a first sync then do not depend on when the first scheduled poll comes."""
    body = b"{}"
    async with aiohttp.ClientSession() as http:
        assert await post(http, receiver_url(port), body, sign(CLIENT_SECRET, body)) == 202


def last_polls(state_path: Path, cids: Iterable[int]) -> dict[int, str | None]:
    """Return when each customer's last poll ended, as the state DB says (None: never, or no DB yet)."""
    wanted = list(cids)
    if not state_path.exists():
        return dict.fromkeys(wanted)
    with closing(sqlite3.connect(f"{state_path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)) as db:
        try:
            rows = dict(db.execute("SELECT customer_id, last_poll_at FROM customers").fetchall())
        except sqlite3.Error:
            rows = {}
    return {cid: rows.get(cid) for cid in wanted}


def orders_requests(whiplash: FakeWhiplash, cid: int, since: float) -> int:
    """Count the orders requests Whiplash served for ``cid`` after its monotonic time ``since``."""
    return sum(1 for r in whiplash.counters.log if r.at > since and r.path.startswith("/api/v2/orders")
               and r.headers.get("x-customer-id") == str(cid))


async def polls_settled(whiplash: FakeWhiplash, cids: Iterable[int], quiet_s: float = 1.0,
                        limit_s: float = 30.0) -> None:
    """Wait until Whiplash has served no orders request for these customers for ``quiet_s``: no poll runs, and
    none is pending (a requested poll starts as soon as the one before it ends)."""
    wanted = {str(cid) for cid in cids}
    deadline = time.monotonic() + limit_s
    while True:
        last = max((r.at for r in whiplash.counters.log if r.path.startswith("/api/v2/orders")
                    and r.headers.get("x-customer-id") in wanted), default=0.0)
        if time.monotonic() - last >= quiet_s:
            return
        assert time.monotonic() < deadline, "the polls did not settle"
        await asyncio.sleep(0.1)


def outcomes(deliveries: list[WebhookDelivery]) -> dict[str, int]:
    """Count deliveries by outcome ("delivered:202", "refused:401", "dropped", "error")."""
    counts: dict[str, int] = {}
    for d in deliveries:
        key = f"{d.outcome}:{d.status}" if d.status is not None else d.outcome
        counts[key] = counts.get(key, 0) + 1
    return counts


def metric(text: str, name: str, **labels: Any) -> float:
    """Return one sample of a Prometheus exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        family, _, rest = head.partition("{")
        if family == name and ",".join(sorted(rest.rstrip("}").split(","))) == wanted:
            return float(value)
    return 0.0
