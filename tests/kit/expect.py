"""What the simulated Klaviyo must hold, derived from the simulated Whiplash's orders and the README's rules.

Written from the documented behaviour (README "How events, names and backfill behave"), not from the
bridge's code, so a test comparing the two can catch the bridge drifting from its documentation.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from kit.harness import Customer
from klaviyo_bridge.sandbox.klaviyo import Account
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, SimOrder

SAMPLE_EMAIL = "bridge-samples@example.com"
STALE_AFTER = timedelta(hours=72)
METRICS = {"processing": "Processing order", "cancelled": "Order cancelled", "shipped": "Order shipped",
           "delivered": "Order delivered"}
KIND_OF_STATUS = {**dict.fromkeys((100, 120, 140, 150, 155, 160, 200, 250), "processing"), 40: "cancelled",
                  300: "shipped", 350: "delivered"}
EventKey = tuple[str, str, bool]  # (metric, unique_id, backfill)
Name = tuple[str | None, str | None, str | None]  # (first_name, last_name, organization)


def read_orders(w: FakeWhiplash, c: Customer) -> list[SimOrder]:
    """Return the customer's orders the bridge reads (changed since launch − backfill_days), in walk order."""
    rows = [o for o in w.orders.values() if o.customer_id == c.cid and o.updated_at >= c.window_start]
    return sorted(rows, key=lambda o: (o.updated_at, o.id))


def samples() -> set[EventKey]:
    """Return the four set-up sample events."""
    return {(metric, f"sample:{kind}", True) for kind, metric in METRICS.items()}


def current_unique_id(order: SimOrder) -> str | None:
    """Return the unique_id of the event the order's current status announces, if it maps to one."""
    kind = KIND_OF_STATUS.get(order.status)
    return None if kind is None else f"{order.id}:{kind}"


def event_time(order: SimOrder) -> datetime:
    """Return when the status changed: ship time for a shipped order, else updated_at."""
    if order.status == 300 and order.shipped_on is not None:
        return order.shipped_on
    return order.updated_at


def backfill_flags(order: SimOrder, c: Customer, nows: Iterable[datetime]) -> set[bool]:
    """Return the backfill flag(s) the event may carry for any of the instants ``nows`` the bridge ran at."""
    at = event_time(order)
    return {at < c.launch_at or at < now - STALE_AFTER for now in nows}


def first_sight_events(orders: Iterable[SimOrder], c: Customer, nows: Iterable[datetime]) -> dict[str, set[bool]]:
    """Return unique_id → allowed backfill flags for orders seen once, at their current status, with an email."""
    nows = list(nows)
    return {uid: backfill_flags(o, c, nows) for o in orders if o.email and (uid := current_unique_id(o))}


def order_name(o: SimOrder) -> tuple[dict[str, str], str]:
    """Return (attributes sent, source) for an order: first/last, else shipping name, else company, else none."""
    first, last = (" ".join(v.split()) if v else "" for v in (o.first_name, o.last_name))
    if first or last:
        return {k: v for k, v in (("first_name", first), ("last_name", last)) if v}, "real"
    words = (o.shipping_name or "").split()
    if words:
        rest = " ".join(words[1:])
        return {"first_name": words[0], **({"last_name": rest} if rest else {})}, "real"
    company = " ".join((o.shipping_company or "").split())
    if company:
        return {"first_name": company, "organization": company}, "company"
    return {}, "none"


def expected_names(orders: Iterable[SimOrder]) -> dict[str, Name]:
    """Return email → the name Klaviyo ends up with after the bridge's upserts, in walk order.

    The bridge upserts on first sight; later a real name replaces any different name, a company only a company;
    Klaviyo keeps attributes an upsert omits.
    """
    sent: dict[str, tuple[dict[str, str], str]] = {}
    stored: dict[str, dict[str, str]] = {}
    for o in orders:
        if not o.email:
            continue
        email = o.email.strip().lower()
        attrs, source = order_name(o)
        prev = sent.get(email)
        if prev is None or (source != "none" and (attrs, source) != prev and (source == "real" or prev[1] != "real")):
            sent[email] = (attrs, source)
            stored.setdefault(email, {}).update(attrs)
    return {e: (a.get("first_name"), a.get("last_name"), a.get("organization")) for e, a in stored.items()}


def recorded(acct: Account) -> dict[str, bool]:
    """Return unique_id → backfill flag of every event the account recorded."""
    return {e.unique_id or "": e.backfill for e in acct.events}


def profile_names(acct: Account) -> dict[str, Name]:
    """Return email → (first, last, organization) of every profile with an email."""
    return {p.email: (p.first_name, p.last_name, p.organization) for p in acct.profiles.values() if p.email}


def missing_current_events(w: FakeWhiplash, acct: Account, c: Customer) -> list[str]:
    """Return unique_ids of read orders whose current status's event Klaviyo has not recorded."""
    have = recorded(acct)
    return [uid for o in read_orders(w, c) if o.email and (uid := current_unique_id(o)) and uid not in have]
