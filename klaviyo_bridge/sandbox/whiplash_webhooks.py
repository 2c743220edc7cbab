"""Webhooks of the simulated Whiplash: the notification catalogue, subscriptions and signed deliveries.

Modelled on the Whiplash fact sheet (§6): ``GET /api/v2/notification_events`` lists the events,
``/api/v2/notification_subscriptions`` creates, lists, shows, updates and deletes subscriptions (fields
``notification_event_id``, ``notification_type``, ``endpoint``, ``customer_id``, ``user_id``, ``active``,
``version``), and a change of an order POSTs ``{"event_name": ..., "order": {...}}`` to every matching
subscription's endpoint, signed ``X-WHIPLASH-SIGNATURE: hex(HMAC-SHA256(client_secret, raw body))``.

Invariants:
- A write never waits for a delivery: ``publish`` renders the order once (a snapshot taken at the write, so a
  late delivery carries a stale order, as a queued job would) and queues; only the served app's background
  task (``sender``, an aiohttp cleanup context) sends, one delivery at a time in queue order (except a reorder
  group), each POST bounded by ``timeout_s``. Nothing queued is sent while no app is served, and one app at
  a time serves a hub.
- A subscription is for one event. A change raising several events (``order.status_changed`` and
  ``order.shipped``) gives one delivery per matching active subscription; ``customer_id`` None matches every
  customer the token's user can see.
- No retry: a delivery whose endpoint fails or answers non-2xx is lost. Whiplash's retry policy is unknown,
  and a receiver that copes with a lost webhook copes with any retry policy, so this is the pessimistic
  assumption.
- The one-shot controls bind when a delivery is queued: the drop, forge and reorder counts are taken by the
  next deliveries queued after the call, and ``delay_s`` fixes each delivery's earliest send time then. The
  standing modes act when sending: ``paused`` holds the queue, ``duplicate`` sends each delivery twice.
- Every attempt (each copy of a duplicated delivery) and every dropped delivery is recorded in
  ``deliveries`` (the last ``keep``) and counted in ``counts``.
- The client secret leaves this module only inside signatures; no body is logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Final, Literal

import aiohttp
from aiohttp import web
from yarl import URL

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]
SIGNATURE_HEADER: Final = "X-WHIPLASH-SIGNATURE"
SUBSCRIPTIONS_PATH: Final = "/api/v2/notification_subscriptions"
_dumps: Final = partial(json.dumps, ensure_ascii=False)  # Rails emits raw UTF-8, not \u escapes


# ------------------------------------------------------------------------------------------ catalogue


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    """One entry of ``GET /api/v2/notification_events``."""

    id: int
    name: str
    humanized_name: str
    resource_type: str = "Order"  # INFERRED: the Rails class name, as in originator.originated_type

    def as_json(self) -> JSONDict:
        """Return the entry as the API serves it."""
        return {"id": self.id, "name": self.name, "humanized_name": self.humanized_name,
                "resource_type": self.resource_type}


# The real ids are UNKNOWN; clients must look events up by name, so the sim's ids are arbitrary on purpose.
NOTIFICATION_EVENTS: Final[tuple[NotificationEvent, ...]] = (
    # CONFIRMED names: the order events the V2 Web Hooks page lists (its list was cut off in the corpus).
    NotificationEvent(101, "order.attention", "Order Needs Attention"),
    NotificationEvent(102, "order.batched", "Order Batched"),
    NotificationEvent(103, "order.cancelled", "Order Cancelled"),
    NotificationEvent(104, "order.created", "Order Created"),
    NotificationEvent(105, "order.delivered", "Order Delivered"),
    NotificationEvent(106, "order.dropship.packed", "Dropship Order Packed"),
    NotificationEvent(107, "order.shipped", "Order Shipped"),
    # INFERRED names for notifications the help centre describes only by their UI names.
    NotificationEvent(108, "order.status_changed", "Order Status Changed"),
    NotificationEvent(109, "order.packed", "Order Packed"),
    NotificationEvent(110, "order.paused", "Order Paused"),
    NotificationEvent(111, "order.insufficient_inventory", "Order Insufficient Inventory"),
    NotificationEvent(112, "order.picked_up", "Order Picked Up"),
    NotificationEvent(113, "order.returned_undeliverable", "Order Returned Undeliverable"),
    # INVENTED by the sim (no source names one), so a field change without a status change can wake a client.
    NotificationEvent(114, "order.updated", "Order Updated"),
)
EVENTS_BY_NAME: Final[Mapping[str, NotificationEvent]] = MappingProxyType({e.name: e for e in NOTIFICATION_EVENTS})
EVENTS_BY_ID: Final[Mapping[int, NotificationEvent]] = MappingProxyType({e.id: e for e in NOTIFICATION_EVENTS})
ORDER_CREATED: Final = ("order.created",)
ORDER_UPDATED: Final = ("order.updated",)

# Which specific event a new status raises besides order.status_changed. INFERRED from the event and
# status names: batched = pick list printed (120), attention = held for the merchant (80, 95).
_STATUS_EVENTS: Final[Mapping[int, tuple[str, ...]]] = MappingProxyType({
    40: ("order.cancelled",), 45: ("order.cancelled",), 80: ("order.attention",), 90: ("order.paused",),
    95: ("order.insufficient_inventory", "order.attention"), 120: ("order.batched",), 160: ("order.packed",),
    300: ("order.shipped",), 325: ("order.picked_up",), 350: ("order.delivered",),
    400: ("order.returned_undeliverable",),
})
_PACKED: Final = 160


def status_events(old: int, new: int, order_type: str) -> tuple[str, ...]:
    """Return the events a status change raises: none when the status stays, else status_changed first."""
    if old == new:
        return ()
    specific = _STATUS_EVENTS.get(new, ())
    if new == _PACKED and order_type == "dropship":
        specific += ("order.dropship.packed",)
    return ("order.status_changed", *specific)


def whiplash_signature(client_secret: str, body: bytes, client_id: str = "") -> str:
    """Return ``X-WHIPLASH-SIGNATURE`` for a body: hex HMAC-SHA256 keyed with the client secret.

    An empty body signs the client_id instead, as the official gem's signing helper does.
    """
    return hmac.new(client_secret.encode(), body or client_id.encode(), hashlib.sha256).hexdigest()


# -------------------------------------------------------------------------------------- subscriptions


class SubscriptionError(ValueError):
    """A refused subscription request: 400 for a missing or mistyped field (Grape), 422 for a bad value."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Subscription:
    """One notification subscription, as ``/api/v2/notification_subscriptions`` stores and renders it."""

    id: int
    notification_event_id: int
    notification_type: str
    endpoint: str
    customer_id: int | None
    user_id: int
    active: bool = True
    version: int = 2

    @property
    def event_name(self) -> str:
        """Return the name of the subscribed event."""
        return EVENTS_BY_ID[self.notification_event_id].name

    def covers(self, event_name: str, customer_id: int, visible: frozenset[int]) -> bool:
        """Return whether a change of ``customer_id`` raising ``event_name`` goes to this subscription."""
        if not self.active or self.event_name != event_name:
            return False
        return customer_id in visible if self.customer_id is None else customer_id == self.customer_id

    def as_json(self) -> JSONDict:
        """Return the subscription as the API renders it."""
        return dataclasses.asdict(self)


def _int_field(name: str, raw: Any) -> int:
    """Read an integer the way Grape coerces one (a numeric string is fine); 400 otherwise."""
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise SubscriptionError(400, f"{name} is invalid")
    try:
        return int(raw)
    except ValueError:
        raise SubscriptionError(400, f"{name} is invalid") from None


def _bool_field(name: str, raw: Any) -> bool:
    """Read a Grape boolean (true/false, or their string forms)."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in {"true", "false", "1", "0"}:
        return raw.lower() in {"true", "1"}
    raise SubscriptionError(400, f"{name} is invalid")


def _event_id(raw: Any) -> int:
    """Read notification_event_id; it must name an event of the catalogue."""
    event_id = _int_field("notification_event_id", raw)
    if event_id not in EVENTS_BY_ID:
        raise SubscriptionError(422, f"notification_event_id {event_id} is not a notification event")
    return event_id


def _notification_type(raw: Any) -> str:
    """Read notification_type; the sim delivers URL webhooks only."""
    # UNCONFIRMED: the UI offers Slack, email and webhook notifications, but the API's exact strings are
    # unknown; "webhook" is the sim's guess and the only type it delivers.
    if raw != "webhook":
        raise SubscriptionError(422, "notification_type must be \"webhook\" (the only type the simulator "
                                     "delivers; the real API's strings are unconfirmed)")
    return "webhook"


def _endpoint(raw: Any) -> str:
    """Read endpoint: an absolute http(s) URL with a host."""
    try:
        url = URL(raw) if isinstance(raw, str) else None
    except ValueError:
        url = None
    if url is None or url.scheme not in {"http", "https"} or not url.host:
        raise SubscriptionError(422, "endpoint must be an http(s) URL")
    return str(raw)


def _customer_id(raw: Any) -> int | None:
    """Read customer_id: null (every customer of the token's user) or an integer."""
    return None if raw is None else _int_field("customer_id", raw)


def _version(raw: Any) -> int:
    """Read version: 2 (payloads shaped like API v2); v1 payloads are not simulated."""
    version = _int_field("version", raw)
    if version != 2:
        raise SubscriptionError(422, "version must be 2 (the simulator renders v2 payloads only)")
    return version


_PARSERS: Final[Mapping[str, Callable[[Any], Any]]] = MappingProxyType({
    "notification_event_id": _event_id, "notification_type": _notification_type, "endpoint": _endpoint,
    "customer_id": _customer_id, "user_id": partial(_int_field, "user_id"),
    "active": partial(_bool_field, "active"), "version": _version,
})
# Required on create. version too: the real default is unknown and may be v1, so a client must say 2.
_REQUIRED: Final = ("notification_event_id", "notification_type", "endpoint", "version")


def subscription_fields(body: Mapping[str, Any], *, partial_update: bool, customers: frozenset[int]) -> JSONDict:
    """Validate a create body (required fields present) or an update body (any subset); return typed values.

    Unknown keys are ignored, as Grape does. ``customers`` are the ones the token's user can see.
    """
    missing = [name for name in _REQUIRED if name not in body]
    if missing and not partial_update:
        raise SubscriptionError(400, f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    values = {name: parse(body[name]) for name, parse in _PARSERS.items() if name in body}
    customer = values.get("customer_id")
    if customer is not None and customer not in customers:
        raise SubscriptionError(422, f"customer_id {customer} is not one of the token's customers")
    return values


# ----------------------------------------------------------------------------------------- deliveries


Outcome = Literal["delivered", "refused", "error", "dropped"]
_Control = Literal["drop", "forge", "reorder"]


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One recorded delivery attempt (or a dropped delivery, never sent)."""

    delivery_id: int  # shared by both copies of a duplicated delivery
    subscription_id: int
    endpoint: str
    event_name: str
    order_id: int
    customer_id: int
    queued_at: float  # the sim's monotonic clock when the change was written
    sent_at: float | None  # when the POST started; None when dropped
    outcome: Outcome  # delivered = 2xx, refused = another status, error = no answer
    status: int | None
    error: str | None
    forged: bool
    duplicate: bool  # the second copy of a duplicated delivery
    signature: str | None
    body: bytes

    def as_json(self) -> JSONDict:
        """Return the record without its body (its size instead), for the control API."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "body"}
        return {**fields, "body_bytes": len(self.body)}

    def payload(self) -> Any:
        """Return the decoded JSON body that was (or would have been) sent."""
        return json.loads(self.body)


@dataclass(slots=True)
class _Outgoing:
    """A queued delivery."""

    delivery_id: int
    subscription_id: int
    endpoint: str
    event_name: str
    order_id: int
    customer_id: int
    body: bytes
    queued_at: float
    due: float  # time.monotonic() before which it is not sent (the delay control)
    forged: bool

    def record(self, outcome: Outcome, **fields: Any) -> WebhookDelivery:
        """Return the record of one attempt (or the drop) of this delivery."""
        base: JSONDict = {"sent_at": None, "status": None, "error": None, "duplicate": False, "signature": None}
        return WebhookDelivery(
            self.delivery_id, self.subscription_id, self.endpoint, self.event_name, self.order_id,
            self.customer_id, self.queued_at, outcome=outcome, forged=self.forged, body=self.body,
            **(base | fields),
        )


class WebhookHub:
    """Subscriptions, the delivery queue with its controls, and the sender task of the served app."""

    def __init__(
        self, client_id: str, client_secret: str, *, customers: Callable[[], frozenset[int]],
        monotonic: Callable[[], float] = time.monotonic, counts: Counter[str] | None = None,
        user_id: int = 4242, timeout_s: float = 5.0, keep: int = 10_000,
    ) -> None:
        self._client_id = client_id
        self._secret = client_secret
        self._customers = customers
        self._monotonic = monotonic
        self.counts: Counter[str] = Counter() if counts is None else counts
        self.user_id = user_id
        self.timeout_s = timeout_s
        self._subscriptions: dict[int, Subscription] = {}
        self._subscription_ids = itertools.count(1)
        self._delivery_ids = itertools.count(1)
        self._pending: deque[_Outgoing] = deque()
        self._held: list[_Outgoing] = []
        self._in_flight: _Outgoing | None = None
        self._wake: asyncio.Event | None = None
        self.deliveries: deque[WebhookDelivery] = deque(maxlen=keep)
        self.delay_s = 0.0
        self.duplicate = False
        self.paused = False
        self._left: dict[_Control, int] = dict.fromkeys(("drop", "forge", "reorder"), 0)  # one-shot counts

    # -- subscriptions ------------------------------------------------------------------------

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """Return every subscription, oldest first."""
        return tuple(self._subscriptions.values())

    def subscribe(
        self, endpoint: str, *, customer_id: int | None = None, events: Iterable[str] | None = None,
    ) -> list[Subscription]:
        """Subscribe ``endpoint`` to ``events`` (default: every event of the catalogue), one subscription each.

        For tests: no token, and ``customer_id`` need not be visible. Unknown event names or a URL that is
        not http(s) raise ValueError.
        """
        names = list(EVENTS_BY_NAME if events is None else events)
        unknown = [name for name in names if name not in EVENTS_BY_NAME]
        if unknown:
            raise ValueError(f"unknown notification events: {', '.join(unknown)}")
        url = _endpoint(endpoint)
        return [self._add({"notification_event_id": EVENTS_BY_NAME[name].id, "notification_type": "webhook",
                           "endpoint": url, "customer_id": customer_id}) for name in names]

    def create(self, body: Mapping[str, Any]) -> Subscription:
        """Create a subscription from an API body; raise ``SubscriptionError`` when it is refused."""
        return self._add(subscription_fields(body, partial_update=False, customers=self._customers()))

    def update(self, subscription_id: int, body: Mapping[str, Any]) -> Subscription:
        """Change the given fields of a subscription (KeyError when there is none)."""
        subscription = self._subscriptions[subscription_id]
        values = subscription_fields(body, partial_update=True, customers=self._customers())
        for name, value in values.items():
            setattr(subscription, name, value)
        return subscription

    def delete(self, subscription_id: int) -> Subscription:
        """Remove a subscription and return it (KeyError when there is none); queued deliveries still go."""
        return self._subscriptions.pop(subscription_id)

    def get(self, subscription_id: int) -> Subscription:
        """Return one subscription (KeyError when there is none)."""
        return self._subscriptions[subscription_id]

    def _add(self, values: JSONDict) -> Subscription:
        """Store a validated subscription under the next id."""
        values.setdefault("user_id", self.user_id)
        values.setdefault("customer_id", None)
        subscription = Subscription(id=next(self._subscription_ids), **values)
        self._subscriptions[subscription.id] = subscription
        log.info("sim webhook subscription id=%s event=%s customer=%s", subscription.id,
                 subscription.event_name, subscription.customer_id)
        return subscription

    # -- publishing -----------------------------------------------------------------------------

    def publish(
        self, order_id: int, customer_id: int, events: Sequence[str], render: Callable[[], JSONDict],
    ) -> int:
        """Queue a delivery per matching subscription and event; return how many were queued or dropped.

        ``render`` is called at most once, and only when some subscription matches.
        """
        if not self._subscriptions:
            return 0  # the common case (backfills, benchmarks): no work per write
        visible = self._customers()
        targets = [(s, name) for name in events for s in self._subscriptions.values()
                   if s.covers(name, customer_id, visible)]
        if not targets:
            return 0
        order = render()
        for subscription, name in targets:
            body = _dumps({"event_name": name, "order": order}).encode()
            self._queue(subscription, name, order_id, customer_id, body)
        return len(targets)

    def _queue(self, subscription: Subscription, name: str, order_id: int, customer_id: int, body: bytes) -> None:
        """Apply the drop, forge and reorder counts to a new delivery and queue it."""
        self.counts["queued"] += 1
        outgoing = _Outgoing(next(self._delivery_ids), subscription.id, subscription.endpoint, name, order_id,
                             customer_id, body, self._monotonic(), time.monotonic() + self.delay_s, False)
        if self._take("drop"):
            self.counts["dropped"] += 1
            self.deliveries.append(outgoing.record("dropped"))
            log.info("sim webhook dropped delivery=%s event=%s order=%s", outgoing.delivery_id, name, order_id)
            return
        outgoing.forged = self._take("forge")
        if self._take("reorder"):
            self._held.append(outgoing)
            if self._left["reorder"] == 0:
                self._release_held()
        else:
            self._pending.append(outgoing)
        self._poke()

    def _take(self, control: _Control) -> bool:
        """Consume one unit of a one-shot control count, if any is left."""
        left = self._left[control]
        self._left[control] = max(0, left - 1)
        return left > 0

    def _release_held(self) -> None:
        """Queue the held reorder group, newest first."""
        self._pending.extend(reversed(self._held))
        self._held.clear()
        self._poke()

    def _poke(self) -> None:
        """Wake the sender task, if an app is being served."""
        if self._wake is not None:
            self._wake.set()

    # -- controls -------------------------------------------------------------------------------

    def drop_next(self, n: int) -> None:
        """Never send the next ``n`` deliveries (recorded as dropped); replaces any count left."""
        self._left["drop"] = _count(n)

    def forge_next(self, n: int) -> None:
        """Sign the next ``n`` deliveries with a wrong key; replaces any count left."""
        self._left["forge"] = _count(n)

    def reorder_next(self, n: int) -> None:
        """Hold the next ``n`` deliveries and send them newest first once all n are queued.

        A group still incomplete is released first (newest first), so ``reorder_next(0)`` flushes it.
        """
        self._release_held()
        self._left["reorder"] = _count(n)

    def pause(self) -> None:
        """Hold every delivery (they queue up) until ``resume``."""
        self.paused = True

    def resume(self) -> None:
        """Send the backlog and everything after it."""
        self.paused = False
        self._poke()

    @property
    def is_idle(self) -> bool:
        """Return whether nothing is queued, held for reordering or being sent."""
        return not (self._pending or self._held or self._in_flight)

    def summary(self) -> JSONDict:
        """Return the subscriptions, queue and controls as JSON (no bodies, no secret)."""
        return {
            "subscriptions": [s.as_json() for s in self._subscriptions.values()],
            "pending": len(self._pending) + (self._in_flight is not None), "held_for_reorder": len(self._held),
            "paused": self.paused, "delay_s": self.delay_s, "duplicate": self.duplicate,
            **{f"{control}_next": left for control, left in self._left.items()},
            "timeout_s": self.timeout_s, "counts": dict(self.counts),
        }

    # -- sending --------------------------------------------------------------------------------

    async def sender(self, app: web.Application) -> AsyncIterator[None]:
        """Run the sender task for as long as ``app`` is served (an aiohttp cleanup context)."""
        task = asyncio.create_task(self._run(), name="whiplash-sim-webhooks")
        yield
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        """Send queued deliveries one at a time until cancelled."""
        self._wake = asyncio.Event()
        try:
            async with aiohttp.ClientSession() as session:
                while True:
                    outgoing = self._next()
                    if outgoing is None:
                        self._wake.clear()
                        await self._wake.wait()
                    else:
                        await self._deliver(session, outgoing)
        finally:
            self._wake = None

    def _next(self) -> _Outgoing | None:
        """Take the next delivery to send, or None while paused or empty."""
        if self.paused or not self._pending:
            return None
        self._in_flight = self._pending.popleft()
        return self._in_flight

    async def _deliver(self, session: aiohttp.ClientSession, outgoing: _Outgoing) -> None:
        """Wait out the delay, then POST the delivery (twice when duplicating)."""
        try:
            await asyncio.sleep(max(0.0, outgoing.due - time.monotonic()))
            copies = 2 if self.duplicate else 1
            for copy in range(copies):
                self.deliveries.append(await self._post(session, outgoing, duplicate=copy > 0))
        finally:
            self._in_flight = None

    async def _post(self, session: aiohttp.ClientSession, outgoing: _Outgoing, *, duplicate: bool) -> WebhookDelivery:
        """POST one copy and return its record; a failure is recorded, never retried."""
        key = self._secret + "-forged" if outgoing.forged else self._secret
        signature = whiplash_signature(key, outgoing.body, self._client_id)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature,
                   "User-Agent": "whiplash-sim-webhooks"}
        sent_at = self._monotonic()
        self.counts["sent"] += 1
        self.counts["forged"] += outgoing.forged
        self.counts["duplicated"] += duplicate
        common: JSONDict = {"sent_at": sent_at, "signature": signature, "duplicate": duplicate}
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with session.post(outgoing.endpoint, data=outgoing.body, headers=headers, timeout=timeout,
                                    allow_redirects=False) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.counts["errors"] += 1
            log.info("sim webhook failed delivery=%s error=%s", outgoing.delivery_id, type(exc).__name__)
            return outgoing.record("error", error=f"{type(exc).__name__}: {exc}", **common)
        outcome: Outcome = "delivered" if 200 <= response.status < 300 else "refused"
        self.counts[outcome] += 1
        log.debug("sim webhook sent delivery=%s event=%s status=%s", outgoing.delivery_id, outgoing.event_name,
                  response.status)
        return outgoing.record(outcome, status=response.status, **common)


def _count(n: int) -> int:
    """Check a control count."""
    if n < 0:
        raise ValueError("a count must be 0 or more")
    return n


# ---------------------------------------------------------------------------------------- HTTP API


class NotificationApi:
    """Handlers of ``/api/v2/notification_events`` and ``/api/v2/notification_subscriptions`` (token-checked
    by the simulator's middleware like every ``/api/`` route)."""

    def __init__(self, hub: WebhookHub) -> None:
        self._hub = hub

    def mount(self, app: web.Application) -> None:
        """Add the routes to ``app``."""
        one = SUBSCRIPTIONS_PATH + r"/{subscription_id:\d+}"
        app.router.add_get("/api/v2/notification_events", self.events)
        app.router.add_get(SUBSCRIPTIONS_PATH, self.index)
        app.router.add_post(SUBSCRIPTIONS_PATH, self.create)
        app.router.add_get(one, self.show)
        app.router.add_put(one, self.update)
        app.router.add_delete(one, self.delete)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Serve the catalogue."""
        return _json([event.as_json() for event in NOTIFICATION_EVENTS])

    async def index(self, request: web.Request) -> web.StreamResponse:
        """Serve every subscription."""
        return _json([s.as_json() for s in self._hub.subscriptions])

    async def create(self, request: web.Request) -> web.StreamResponse:
        """Create a subscription (201)."""
        try:
            subscription = self._hub.create(await _params(request))
        except SubscriptionError as exc:
            return _error(exc.status, exc.message)
        return _json(subscription.as_json(), status=201)

    async def show(self, request: web.Request) -> web.StreamResponse:
        """Serve one subscription."""
        return await self._on_one(request, self._hub.get)

    async def update(self, request: web.Request) -> web.StreamResponse:
        """Change fields of one subscription."""
        try:
            body = await _params(request)
        except SubscriptionError as exc:
            return _error(exc.status, exc.message)
        return await self._on_one(request, lambda sub_id: self._hub.update(sub_id, body))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        """Delete one subscription, answering it."""
        return await self._on_one(request, self._hub.delete)

    async def _on_one(self, request: web.Request, action: Callable[[int], Subscription]) -> web.StreamResponse:
        """Run ``action`` on the path's subscription; 404 when there is none, the refusal when invalid."""
        try:
            subscription = action(int(request.match_info["subscription_id"]))
        except KeyError:
            return web.json_response({"error": "record could not be found"}, status=404)
        except SubscriptionError as exc:
            return _error(exc.status, exc.message)
        return _json(subscription.as_json())


async def _params(request: web.Request) -> JSONDict:
    """Read a JSON object or form body (an empty body is {})."""
    if not request.can_read_body:
        return {}
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise SubscriptionError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise SubscriptionError(400, "body must be a JSON object")
        return body
    return dict(await request.post())


def _json(body: Any, status: int = 200) -> web.Response:
    """Answer JSON like the app does."""
    return web.json_response(body, status=status, dumps=_dumps)


def _error(status: int, message: str) -> web.Response:
    """Answer the app's error shape."""
    return web.json_response({"message": message}, status=status, dumps=_dumps)
