"""Pure mapping core: (what we already announced, fetched orders, customer rules, now) → what to send.

No I/O and no clock reads: ``now`` is an argument. Invariants kept here:
- each (order, event) is announced at most once, ever, and its ``unique_id`` is ``"{order_id}:{event}"``;
- only statuses the bridge observes produce events, and never a milestone older than one already announced;
- a fallback name (company) never overwrites a real name already sent for that email;
- a change older than the launch day or ``stale_after`` goes out with ``backfill`` so no flow fires late;
- payloads are deterministic: equal inputs (including ``now``) give equal dicts;
- free text from orders is bounded (names, item names, item count), so an absurd order cannot make a payload
  Klaviyo refuses for its size: it is clipped, never dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Any, Literal, TypeVar

from .orders import STATUS_NAMES, Order, OrderItem, Package


class EventKind(StrEnum):
    """The four warehouse milestones the bridge announces."""

    PROCESSING = "processing"
    CANCELLED = "cancelled"
    SHIPPED = "shipped"
    DELIVERED = "delivered"


NameSource = Literal["real", "company", "none"]

DEFAULT_METRIC_NAMES: Mapping[EventKind, str] = {
    EventKind.PROCESSING: "Processing order",
    EventKind.CANCELLED: "Order cancelled",
    EventKind.SHIPPED: "Order shipped",
    EventKind.DELIVERED: "Order delivered",
}

# Whiplash codes 100-250 are "in the warehouse"; 45 (Closed by Originator) and holds such as 90 (Paused)
# are deliberately unmapped: the shop, not the warehouse, tells the shopper about those.
DEFAULT_STATUS_EVENTS: Mapping[int, EventKind] = {
    **{code: EventKind.PROCESSING for code in (100, 120, 140, 150, 155, 160, 200, 250)},
    40: EventKind.CANCELLED,
    300: EventKind.SHIPPED,
    350: EventKind.DELIVERED,
}

# Milestone order; CANCELLED has no rank: it can follow any milestone and is announced once when seen.
EVENT_RANKS: Mapping[EventKind, int] = {
    EventKind.PROCESSING: 1,
    EventKind.SHIPPED: 2,
    EventKind.DELIVERED: 3,
}

# Klaviyo documents no name length but refuses a profile over 100 KB and property strings over 100 KB, and
# arrays over 4000 items; real names and product titles are far shorter, so clipping only ever hits garbage.
MAX_NAME_CHARS = 255
MAX_TEXT_CHARS = 1000
MAX_ITEMS = 1000

# Klaviyo rejects event times before 2000 (older revisions); a garbage date must not block the outbox.
_EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
_CENT = Decimal("0.01")
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class Rules:
    """Everything about one customer that the mapping needs."""

    customer_id: int
    launch_date: date  # changes before 00:00 UTC that day are backfill
    metric_names: Mapping[EventKind, str]
    status_events: Mapping[int, EventKind]  # Whiplash status code → event
    stale_after: timedelta  # older changes are recorded as backfill so no flow sends a stale email
    # The milestones this customer gets as events; a status change to another one is remembered, not sent.
    enabled: frozenset[EventKind] = frozenset(EventKind)


@dataclass(frozen=True, slots=True)
class OrderMemory:
    """What the bridge remembers of one order."""

    status: int
    announced: frozenset[EventKind] = frozenset()


@dataclass(frozen=True, slots=True)
class ProfileName:
    """The name sent (or to send) for one email, and where it came from."""

    first_name: str | None
    last_name: str | None
    organization: str | None
    source: NameSource


NO_NAME = ProfileName(None, None, None, "none")


@dataclass(frozen=True, slots=True)
class ProfileChange:
    """A profile upsert to queue: new email, or a name that should replace the one sent.

    ``history`` when every order of the page with this email is history (backfill): nothing it names can fire
    a flow soon, so it may wait for a full bulk import instead of going out at once.
    """

    email: str
    name: ProfileName
    history: bool = False

    def attributes(self) -> dict[str, Any]:
        """Return Klaviyo profile attributes: unknown fields omitted, except a real name's missing part.

        Klaviyo keeps what an upsert omits and clears what it sends as null. A real name is the whole
        name, so its missing last name is sent as null: "Bob" after "Ann Lee" must not become "Bob Lee".
        """
        fields = {
            "first_name": self.name.first_name,
            "last_name": self.name.last_name,
            "organization": self.name.organization,
        }
        keep_null = {"first_name", "last_name"} if self.name.source == "real" else set()
        return {"email": self.email, **{k: v for k, v in fields.items() if v is not None or k in keep_null}}


@dataclass(frozen=True, slots=True)
class EventRow:
    """One event to queue. ``payload`` is JSON-ready and stored verbatim in the outbox."""

    unique_id: str
    order_id: int | None  # None for setup samples
    kind: EventKind
    payload: dict[str, Any]
    # payload keys: email, metric, time (ISO UTC with +00:00), value?, value_currency?,
    #               unique_id, backfill (bool), properties (dict)


@dataclass(slots=True)
class Plan:
    """The outcome of mapping one page of orders."""

    orders: dict[int, OrderMemory] = field(default_factory=dict)  # only orders whose memory changed
    profiles: list[ProfileChange] = field(default_factory=list)
    names: dict[str, ProfileName] = field(default_factory=dict)  # email → name now considered sent
    events: list[EventRow] = field(default_factory=list)
    skipped_no_email: int = 0
    invalid_email: list[int] = field(default_factory=list)  # ids of changed orders whose email is not one


# ---------------------------------------------------------------- names


def profile_name(order: Order) -> ProfileName:
    """Return the best name the order offers: first/last, else shipping name, else company."""
    first, last = _clean(order.first_name), _clean(order.last_name)
    if first or last:
        return ProfileName(first, last, None, "real")
    words = (order.shipping_name or "").split()
    if words:
        return ProfileName(_clip(words[0]), _clip(" ".join(words[1:])) or None, None, "real")
    company = _clean(order.shipping_company)
    if company:
        return ProfileName(company, None, company, "company")
    return NO_NAME


def should_send_name(new: ProfileName, sent: ProfileName | None) -> bool:
    """Tell whether ``new`` must be upserted given the name already sent for the email."""
    if sent is None:
        return True  # the profile must exist before its events, named or not
    if new.source == "none" or new == sent:
        return False
    # A fallback never overwrites a real name; the latest real name always wins.
    return new.source == "real" or sent.source != "real"


def setup_profile(email: str) -> ProfileChange:
    """Return the nameless profile upsert used by the setup command's sample events."""
    return ProfileChange(email, NO_NAME)


def _clean(text: str | None) -> str | None:
    return (_clip(" ".join(text.split())) or None) if text else None


def _clip(text: str, limit: int = MAX_NAME_CHARS) -> str:
    return text if len(text) <= limit else text[:limit].rstrip()


def _clip_opt(text: str | None) -> str | None:
    return None if text is None else _clip(text, MAX_TEXT_CHARS)


# ---------------------------------------------------------------- planning


def event_for(order: Order, rules: Rules) -> EventKind | None:
    """Return the event the order's status maps to, or None for unmapped statuses."""
    return rules.status_events.get(order.status)


def plan_page(
    rules: Rules,
    orders: Sequence[Order],
    known: Mapping[int, OrderMemory],
    names: Mapping[str, ProfileName],
    now: datetime,
) -> Plan:
    """Map one page of orders (in keyset order) to the memory, profiles and events to store."""
    plan = Plan()
    for order in orders:
        _plan_order(plan, rules, order, known, names, now)
    # An order that went A→B→A within one page leaves memory as it was: nothing to store.
    plan.orders = {oid: mem for oid, mem in plan.orders.items() if known.get(oid) != mem}
    live = {o.email for o in orders if o.email is not None and not is_backfill(o.updated_at, rules, now)}
    plan.profiles = [replace(p, history=p.email not in live) for p in plan.profiles]
    return plan


def _plan_order(
    plan: Plan,
    rules: Rules,
    order: Order,
    known: Mapping[int, OrderMemory],
    names: Mapping[str, ProfileName],
    now: datetime,
) -> None:
    prev = plan.orders[order.id] if order.id in plan.orders else known.get(order.id)
    changed = prev is None or prev.status != order.status
    if order.email is None:
        # No profile to attach events to; remember the status so a re-read is not counted again.
        if changed:
            if order.email_invalid:
                plan.invalid_email.append(order.id)
            else:
                plan.skipped_no_email += 1
            plan.orders[order.id] = _memory(order, prev, None)
        return
    _plan_profile(plan, order.email, profile_name(order), names)
    if not changed:
        return
    kind = _announceable(order, rules, prev)
    if kind is not None:
        plan.events.append(
            EventRow(event_unique_id(order.id, kind), order.id, kind, event_payload(order, kind, rules, now))
        )
    plan.orders[order.id] = _memory(order, prev, kind)


def _plan_profile(plan: Plan, email: str, name: ProfileName, names: Mapping[str, ProfileName]) -> None:
    sent = plan.names[email] if email in plan.names else names.get(email)
    if should_send_name(name, sent):
        plan.profiles.append(ProfileChange(email, name))
        plan.names[email] = name


def _memory(order: Order, prev: OrderMemory | None, sent: EventKind | None) -> OrderMemory:
    announced = prev.announced if prev is not None else frozenset()
    return OrderMemory(order.status, announced | {sent} if sent is not None else announced)


def _announceable(order: Order, rules: Rules, prev: OrderMemory | None) -> EventKind | None:
    kind = event_for(order, rules)
    if kind is None or kind not in rules.enabled or (prev is not None and kind in prev.announced):
        return None
    return None if _is_regression(kind, rules, prev) else kind


def _is_regression(kind: EventKind, rules: Rules, prev: OrderMemory | None) -> bool:
    """Tell whether a ranked milestone comes after a later one was announced or observed."""
    rank = EVENT_RANKS.get(kind)
    if rank is None or prev is None:
        return False
    # The previous status counts even when it was not announced (no email then): 300→100 is late news.
    seen = [*prev.announced, rules.status_events.get(prev.status)]
    return any(EVENT_RANKS.get(k, 0) > rank for k in seen if k is not None)


# ---------------------------------------------------------------- payloads


def event_unique_id(order_id: int, kind: EventKind) -> str:
    """Return the Klaviyo ``unique_id`` of one (order, event): Klaviyo keeps only the first."""
    return f"{order_id}:{kind.value}"


def event_payload(order: Order, kind: EventKind, rules: Rules, now: datetime) -> dict[str, Any]:
    """Build the JSON-ready event payload; equal inputs give an equal dict."""
    at = event_time(order, kind, now)
    payload: dict[str, Any] = {
        "email": order.email,
        "metric": rules.metric_names.get(kind, DEFAULT_METRIC_NAMES[kind]),
        "unique_id": event_unique_id(order.id, kind),
        "time": iso_utc(at),
        "backfill": is_backfill(at, rules, now),
    }
    payload.update(_value_fields(order.items))
    payload["properties"] = order_properties(order)
    return payload


def event_time(order: Order, kind: EventKind, now: datetime) -> datetime:
    """Return when the status changed: ship time for SHIPPED when known, else ``updated_at``."""
    at = order.updated_at
    if kind is EventKind.SHIPPED:
        at = shipped_at(order) or at
    # A warehouse clock ahead of ours must not post-date an event; Klaviyo rejects far-future times.
    return min(max(at, _EARLIEST_TIME), _utc(now))


def midnight_utc(day: date) -> datetime:
    """Return 00:00 UTC of ``day``: where launch dates, backfill windows and "today" begin."""
    return datetime.combine(day, time.min, tzinfo=UTC)


def is_backfill(at: datetime, rules: Rules, now: datetime) -> bool:
    """Tell whether an event at ``at`` is history (pre-launch or stale) that must not fire flows."""
    return at < midnight_utc(rules.launch_date) or at < _utc(now) - rules.stale_after


def shipped_at(order: Order) -> datetime | None:
    """Return the order's ship time, else its first package's, else None."""
    if order.shipped_on is not None:
        return order.shipped_on
    return min((p.shipped_on for p in order.packages if p.shipped_on is not None), default=None)


def iso_utc(at: datetime) -> str:
    """Format a time as UTC ISO-8601 with whole seconds and a ``+00:00`` offset."""
    return _utc(at).replace(microsecond=0).isoformat()


def order_properties(order: Order) -> dict[str, Any]:
    """Return the event properties (Klaviyo-recommended names), omitting empty values."""
    props: dict[str, Any] = {
        "OrderId": str(order.id),
        "OrderNumber": order.humanize_id,
        "ShopOrderId": order.shop_order_id,
        "Status": order.status_name or STATUS_NAMES.get(order.status),
        "StatusCode": order.status,
        "ItemNames": [_clip(item.name, MAX_TEXT_CHARS) for item in order.items[:MAX_ITEMS] if item.name],
        "Items": [_item_properties(item) for item in order.items[:MAX_ITEMS]],
        "TrackingNumbers": _unique([*order.tracking, *(p.tracking for p in order.packages)]),
        "TrackingURLs": _unique([*order.tracking_links, *(p.tracking_link for p in order.packages)]),
        "Carrier": order.carrier,
        "ShippingMethod": order.shipping_method,
        "ShippedAt": _optional(iso_utc, shipped_at(order)),
        "EstimatedDelivery": _optional(date.isoformat, order.estimated_delivery),
    }
    return {key: value for key, value in props.items() if value is not None and value != []}


def _item_properties(item: OrderItem) -> dict[str, Any]:
    row = _row_total(item)
    props = {
        "SKU": _clip_opt(item.sku),
        "ProductName": _clip_opt(item.name),
        "Quantity": item.quantity,
        "ItemPrice": None if item.price is None else float(item.price),
        "RowTotal": _optional(_money, row),
    }
    return {key: value for key, value in props.items() if value is not None}


def _value_fields(items: Iterable[OrderItem]) -> dict[str, Any]:
    priced = [(row, item.currency) for item in items if (row := _row_total(item)) is not None]
    if not priced:
        return {}
    fields: dict[str, Any] = {"value": _money(sum((row for row, _ in priced), Decimal(0)))}
    currencies = {currency for _, currency in priced}
    if len(currencies) == 1 and None not in currencies:
        fields["value_currency"] = currencies.pop()
    return fields


def _row_total(item: OrderItem) -> Decimal | None:
    return None if item.price is None else item.price * item.quantity


def _money(amount: Decimal) -> float:
    return float(amount.quantize(_CENT, rounding=ROUND_HALF_UP))


def _unique(values: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _optional(fn: Callable[[_T], _R], value: _T | None) -> _R | None:
    return None if value is None else fn(value)


def _utc(at: datetime) -> datetime:
    # A naive ``now`` from a caller is taken as UTC rather than crashing on comparison.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


# ---------------------------------------------------------------- setup samples

_SAMPLE_STATUS: Mapping[EventKind, int] = {
    EventKind.PROCESSING: 100,
    EventKind.CANCELLED: 40,
    EventKind.SHIPPED: 300,
    EventKind.DELIVERED: 350,
}
_SAMPLE_TRACKING = "1Z999AA10123456784"


def sample_events(rules: Rules, email: str, now: datetime) -> list[EventRow]:
    """Return one backfilled sample event per enabled kind so a merchant can build flows before launch."""
    return [_sample_event(rules, email, kind, now) for kind in EventKind if kind in rules.enabled]


def sample_unique_id(kind: EventKind, metric: str) -> str:
    """Return a sample event's ``unique_id``: one per kind and metric name, so a renamed metric gets its own."""
    default = DEFAULT_METRIC_NAMES[kind]
    return f"sample:{kind.value}" if metric == default else f"sample:{kind.value}:{metric}"


def order_of_key(key: str) -> str | None:
    """Return the Whiplash order id an event row's key (``"{order}:{kind}"``) names; None for samples, profiles."""
    head = key.split(":", 1)[0]
    return head if head.isdigit() else None


def event_kind_of_key(key: str) -> EventKind | None:
    """Return the milestone an event row's key (``"{order}:{kind}"`` or a sample's) announces, if it names one."""
    parts = key.split(":")
    try:
        return EventKind(parts[1]) if len(parts) > 1 else None
    except ValueError:
        return None


def _sample_event(rules: Rules, email: str, kind: EventKind, now: datetime) -> EventRow:
    payload = event_payload(_sample_order(rules, email, kind, now), kind, rules, now)
    payload.update(unique_id=sample_unique_id(kind, payload["metric"]), backfill=True)
    payload["properties"] = {**payload["properties"], "OrderId": "SAMPLE", "Sample": True}
    return EventRow(payload["unique_id"], None, kind, payload)


def _sample_order(rules: Rules, email: str, kind: EventKind, now: datetime) -> Order:
    at = _utc(now).replace(microsecond=0)
    codes = [code for code, mapped in rules.status_events.items() if mapped is kind]
    placed = Order(
        id=1,
        customer_id=rules.customer_id,
        status=min(codes, default=_SAMPLE_STATUS[kind]),
        status_name=None,
        updated_at=at,
        email=email,
        first_name=None,
        last_name=None,
        shipping_name=None,
        shipping_company=None,
        humanize_id="SAMPLE-1",
        shop_order_id=None,
        items=(OrderItem("SAMPLE-SKU", "Sample product", 1, Decimal("25.00"), "USD"),),
        tracking=(),
        tracking_links=(),
        packages=(),
        carrier=None,
        shipping_method=None,
        shipped_on=None,
        estimated_delivery=None,
    )
    return _shipped_sample(placed, at) if kind in (EventKind.SHIPPED, EventKind.DELIVERED) else placed


def _shipped_sample(order: Order, at: datetime) -> Order:
    link = f"https://www.ups.com/track?tracknum={_SAMPLE_TRACKING}"
    return replace(
        order,
        packages=(Package(_SAMPLE_TRACKING, link, at),),
        carrier="UPS",
        shipping_method="UPS Ground",
        shipped_on=at,
        estimated_delivery=(at + timedelta(days=3)).date(),
    )
