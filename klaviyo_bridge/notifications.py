"""Whiplash's notification API: the event catalogue and webhook subscriptions (for ``klaviyo-bridge webhooks``).

Endpoints and fields are the fact sheet's (whiplash-api.md §6, CONFIRMED from the OpenAPI document):
``GET /api/v2/notification_events`` (``id``, ``name``, ``humanized_name``, ``resource_type``) and
``GET``/``POST /api/v2/notification_subscriptions`` (``notification_event_id``, ``notification_type``,
``endpoint``, ``customer_id``, ``user_id``, ``active``, ``version``). Two values are UNCONFIRMED: the
``notification_type`` string of a webhook (``NOTIFICATION_TYPE``) and ``version`` 2 for v2-shaped payloads
(documented only as "whether the payload will match the v1 or v2 API").

Invariants: requests carry the token of the machinery the orders client uses too (``whiplash_auth.TokenManager``:
stored, renewed once under a lock, a 401 answered by one fresh token); failures leave as the ``errors`` tree with
the secret-free details ``whiplash_auth`` gives every Whiplash reply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from .budget import Lane
from .errors import MalformedPayload
from .http import Reply, body_reason, error_for, exchange, retry_after
from .whiplash_auth import SERVICE, TokenManager, error_detail, report_throttle

NOTIFICATION_TYPE = "webhook"  # UNCONFIRMED: the API's strings are not documented
PAYLOAD_VERSION = 2  # UNCONFIRMED: "whether the payload will match the v1 or v2 API"
T = TypeVar("T")
EVENTS_PATH = "/api/v2/notification_events"
SUBSCRIPTIONS_PATH = "/api/v2/notification_subscriptions"


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    """One entry of the catalogue."""

    id: int
    name: str
    humanized_name: str
    resource_type: str


@dataclass(frozen=True, slots=True)
class Subscription:
    """One notification subscription, as much of it as the bridge reads."""

    id: int
    event_id: int
    endpoint: str
    customer_id: int | None
    active: bool


def _event(raw: Mapping[str, Any]) -> NotificationEvent:
    """Read a catalogue entry."""
    return NotificationEvent(int(raw["id"]), str(raw["name"]), str(raw.get("humanized_name") or ""),
                             str(raw.get("resource_type") or ""))


def _subscription(raw: Mapping[str, Any]) -> Subscription:
    """Read a subscription."""
    customer = raw.get("customer_id")
    return Subscription(int(raw["id"]), int(raw["notification_event_id"]), str(raw.get("endpoint") or ""),
                        None if customer is None else int(customer), raw.get("active", True) is not False)


class NotificationClient:
    """List notification events and subscriptions, and subscribe an endpoint to an event."""

    def __init__(self, session: aiohttp.ClientSession, tokens: TokenManager, *, base_url: str,
                 timeout: float = 30) -> None:
        self._session = session
        self._tokens = tokens
        self._base = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def events(self) -> list[NotificationEvent]:
        """Return the catalogue of notification events."""
        return [_read(_event, item, EVENTS_PATH) for item in await self._list(EVENTS_PATH)]

    async def subscriptions(self) -> list[Subscription]:
        """Return the subscriptions the token's user has."""
        return [_read(_subscription, item, SUBSCRIPTIONS_PATH) for item in await self._list(SUBSCRIPTIONS_PATH)]

    async def subscribe(self, event_id: int, endpoint: str, customer_id: int) -> Subscription:
        """Create an active webhook subscription of ``endpoint`` to one event of one customer."""
        body = {"notification_event_id": event_id, "notification_type": NOTIFICATION_TYPE, "endpoint": endpoint,
                "customer_id": customer_id, "active": True, "version": PAYLOAD_VERSION}
        data = await self._call("POST", SUBSCRIPTIONS_PATH, customer_id=customer_id, json=body)
        if not isinstance(data, dict):
            raise MalformedPayload(SERVICE, 201, f"expected the new subscription, got a JSON {type(data).__name__}")
        return _read(_subscription, data, SUBSCRIPTIONS_PATH)

    async def _list(self, path: str) -> list[Mapping[str, Any]]:
        """GET a JSON array of objects."""
        data = await self._call("GET", path)
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise MalformedPayload(SERVICE, 200, f"{path}: expected a JSON array of objects")
        return data

    async def _call(self, method: str, path: str, *, customer_id: int | None = None, json: object = None) -> object:
        """Send one request with the application's token (a fresh one once after a 401); return its JSON."""
        token = await self._tokens.access_token()
        reply = await self._send(method, path, token, customer_id, json)
        if reply.status == 401:
            await self._tokens.invalidate(token)
            token = await self._tokens.access_token()
            reply = await self._send(method, path, token, customer_id, json)
        secrets = (token, *self._tokens.secrets())
        error = error_for(SERVICE, reply, error_detail(reply.text, secrets),
                          wait=retry_after(reply.headers.get("Retry-After"), time.time()))
        if error is not None:
            raise error
        return _decode(reply)

    async def _send(self, method: str, path: str, token: str, customer_id: int | None, body: object) -> Reply:
        """Send one request within the Whiplash budget (the notification API spends the same application limit)."""
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json", "Accept-Version": "v2"}
        if customer_id is not None:
            headers["X-CUSTOMER-ID"] = str(customer_id)
        async with self._tokens.budget.slot(Lane.LIVE):
            reply = await exchange(self._session, SERVICE, method, self._base + path, json=body, headers=headers,
                                   secrets=(token, *self._tokens.secrets()), timeout=self._timeout)
        report_throttle(self._tokens.budget, reply, time.time())
        return reply


def _read(parse: Callable[[Mapping[str, Any]], T], item: Mapping[str, Any], path: str) -> T:
    """Parse one object of a response; a missing or mistyped field raises MalformedPayload naming the path."""
    try:
        return parse(item)
    except (KeyError, TypeError, ValueError):
        raise MalformedPayload(SERVICE, 200, f"{path}: an entry lacks or mistypes a field") from None


def _decode(reply: Reply) -> object:
    """Decode a 2xx body; anything but JSON raises MalformedPayload (described, never quoted)."""
    try:
        return json.loads(reply.text)
    except ValueError:
        raise MalformedPayload(SERVICE, reply.status, f"not JSON: {body_reason(reply.text)}") from None
