"""Pure mapping core: (what we already announced, fetched orders, customer rules, now) → what to send.

No I/O and no clock reads: ``now`` is an argument. Invariants kept here:
- each (order, event) is announced at most once, ever, and its ``unique_id`` is ``"{order_id}:{event}"``;
- only statuses the bridge observes produce events, and never a milestone older than one already announced;
- a fallback name (company) never overwrites a real name already sent for that email.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal


class EventKind(StrEnum):
    """The four warehouse milestones the bridge announces."""

    PROCESSING = "processing"
    CANCELLED = "cancelled"
    SHIPPED = "shipped"
    DELIVERED = "delivered"


NameSource = Literal["real", "company", "none"]


@dataclass(frozen=True, slots=True)
class Rules:
    """Everything about one customer that the mapping needs."""

    customer_id: int
    launch_date: date  # changes before 00:00 UTC that day are backfill
    metric_names: Mapping[EventKind, str]
    status_events: Mapping[int, EventKind]  # Whiplash status code → event
    stale_after: timedelta  # older changes are recorded as backfill so no flow sends a stale email


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


@dataclass(frozen=True, slots=True)
class ProfileChange:
    """A profile upsert to queue: new email, or a name that should replace the one sent."""

    email: str
    name: ProfileName

    def attributes(self) -> dict[str, Any]:
        """Return Klaviyo profile attributes; unknown fields are omitted, never sent as null."""
        raise NotImplementedError


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
