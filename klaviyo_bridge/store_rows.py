"""The store's customer, order and profile rows, and the encodings every row of the store shares.

Writers run inside a transaction the caller holds; readers turn selected rows into frozen dataclasses. The outbox's
rows and their statements are in ``store_outbox``.
Invariants:
- datetimes are stored as UTC ISO-8601 text with microseconds, so text order is time order; a naive datetime is
  refused, never guessed;
- announced events are stored as explicit bits (not enum order), OR-ed in: memory never forgets an announcement;
- error texts and response bodies are clipped, so one noisy error cannot bloat the database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final, TypeVar

import aiosqlite

from .core import EventKind, NameSource, OrderMemory, ProfileName
from .errors import MalformedOrder
from .store_schema import fetch_all, fetch_one, run_many


@dataclass(frozen=True, slots=True)
class CustomerState:
    """What the store knows about one customer (defaults for a customer never seen)."""

    customer_id: int
    cursor: tuple[datetime, int] | None = None  # (updated_at, order id) of the last committed order
    list_id: str | None = None
    setup_done: bool = False
    key_healthy: bool = True
    key_error: str | None = None
    last_poll_at: datetime | None = None
    last_poll_ok_at: datetime | None = None
    last_error: str | None = None
    reconciled_at: datetime | None = None  # when the last reconcile sweep completed
    klaviyo_error: str | None = None  # the last Klaviyo failure while it lasts (cleared by a success)
    klaviyo_error_at: datetime | None = None
    klaviyo_failing_since: datetime | None = None  # first failure of the current streak
    dropped_rows: int = 0  # queued rows dropped because their event was disabled for this customer
    poll_interval_s: float | None = None  # seconds between the last two polls: the interval really achieved


@dataclass(frozen=True, slots=True)
class PendingPoll:
    """Poll outcomes of one customer recorded since the last write, merged: what the row will say."""

    at: datetime
    ok_at: datetime | None  # the last successful poll among them (None: keep the stored one)
    error: str | None  # the last poll's error (None when it succeeded)
    interval_s: float | None  # None: keep the stored one

T = TypeVar("T")

CHUNK: Final = 500  # well under SQLite's bound-parameter limit, and keeps each statement short

_MAX_TEXT: Final = 8000  # error texts and response bodies are clipped: rows stay small

EVENT_BITS: Final[Mapping[EventKind, int]] = {
    # Explicit values, not enum order: the bits are on disk and must not move if the enum is reordered.
    EventKind.PROCESSING: 1,
    EventKind.CANCELLED: 2,
    EventKind.SHIPPED: 4,
    EventKind.DELIVERED: 8,
}

_NAME_SOURCES: Final[tuple[NameSource, ...]] = ("none", "company", "real")  # stored as the index

_NO_ORDER_ID: Final = 0  # malformed orders without a readable id share this key (Whiplash ids are > 0)


def iso(dt: datetime) -> str:
    """Render an aware datetime as the one UTC text format stored everywhere."""
    if dt.tzinfo is None:
        raise ValueError("naive datetime given to the store; pass an aware (UTC) datetime")
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def epoch(dt: datetime) -> int:
    """Return an aware datetime as whole epoch seconds (the compact form kept per order)."""
    if dt.tzinfo is None:
        raise ValueError("naive datetime given to the store; pass an aware (UTC) datetime")
    return int(dt.timestamp())


def parse_dt(text: object) -> datetime:
    """Parse a stored datetime."""
    return datetime.fromisoformat(str(text))


def opt_dt(text: object) -> datetime | None:
    """Parse a stored datetime that may be NULL."""
    return None if text is None else parse_dt(text)


def opt_str(value: object) -> str | None:
    """Return a stored TEXT that may be NULL."""
    return None if value is None else str(value)


def clip(text: str | None) -> str | None:
    """Bound a free-form text so one noisy error cannot bloat the database."""
    return None if text is None else text[:_MAX_TEXT]


def chunks(items: Iterable[T], size: int = CHUNK) -> Iterator[list[T]]:
    """Yield ``items`` in lists of at most ``size``."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def marks(n: int) -> str:
    """Return ``n`` comma-separated SQL placeholders."""
    return ",".join("?" * n)


def _bits(kinds: Iterable[EventKind]) -> int:
    """Encode announced events as a bitmask."""
    mask = 0
    for kind in kinds:
        mask |= EVENT_BITS[kind]
    return mask


def kinds(mask: int) -> frozenset[EventKind]:
    """Decode a bitmask of announced events."""
    return frozenset(kind for kind, bit in EVENT_BITS.items() if mask & bit)


async def ensure_customer(db: aiosqlite.Connection, customer_id: int) -> None:
    """Insert the customer row if it is missing."""
    await db.execute("INSERT INTO customers (customer_id) VALUES (?) ON CONFLICT DO NOTHING", (customer_id,))


async def upsert_orders(
    db: aiosqlite.Connection, customer_id: int, orders: Mapping[int, OrderMemory], status_at: Mapping[int, int]
) -> None:
    """Store order memories; announced bits are OR-ed so an announcement is never forgotten.

    ``status_at`` (epoch seconds) is kept from the first time the current status was stored.
    """
    await run_many(
        db,
        """INSERT INTO orders (customer_id, order_id, status, announced, status_at) VALUES (?, ?, ?, ?, ?)
           ON CONFLICT (customer_id, order_id) DO UPDATE
           SET status_at = CASE WHEN status = excluded.status THEN status_at ELSE excluded.status_at END,
             status = excluded.status, announced = announced | excluded.announced""",
        [(customer_id, oid, mem.status, _bits(mem.announced), status_at[oid]) for oid, mem in orders.items()],
    )


async def upsert_names(db: aiosqlite.Connection, customer_id: int, names: Mapping[str, ProfileName]) -> None:
    """Store the names now considered sent, leaving profile ids and list membership alone."""
    await run_many(
        db,
        """INSERT INTO profiles (customer_id, email, first_name, last_name, organization, name_source)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (customer_id, email) DO UPDATE SET first_name = excluded.first_name,
             last_name = excluded.last_name, organization = excluded.organization,
             name_source = excluded.name_source""",
        [
            (customer_id, email, n.first_name, n.last_name, n.organization, _NAME_SOURCES.index(n.source))
            for email, n in names.items()
        ],
    )


async def clear_malformed(db: aiosqlite.Connection, customer_id: int, order_ids: Iterable[int]) -> None:
    """Forget malformed records of orders that have now been read successfully."""
    await run_many(
        db,
        "DELETE FROM malformed WHERE customer_id = ? AND order_id = ?",
        [(customer_id, oid) for oid in order_ids],
    )


async def record_malformed(
    db: aiosqlite.Connection, customer_id: int, malformed: Sequence[MalformedOrder], now: datetime
) -> None:
    """Upsert malformed orders, keeping when each was first seen."""
    stamp = iso(now)
    await run_many(
        db,
        """INSERT INTO malformed (customer_id, order_id, why, excerpt, first_seen, last_seen)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (customer_id, order_id) DO UPDATE
           SET why = excluded.why, excerpt = excluded.excerpt, last_seen = excluded.last_seen""",
        [
            (customer_id, m.order_id or _NO_ORDER_ID, m.why, clip(m.excerpt), stamp, stamp)
            for m in malformed
        ],
    )


async def record_invalid_emails(
    db: aiosqlite.Connection, customer_id: int, flags: Mapping[int, bool], now: datetime
) -> None:
    """List orders read with an invalid email; forget those read with a valid (or no) email since."""
    stamp = iso(now)
    await run_many(
        db,
        """INSERT INTO invalid_emails (customer_id, order_id, first_seen) VALUES (?, ?, ?)
           ON CONFLICT (customer_id, order_id) DO NOTHING""",
        [(customer_id, oid, stamp) for oid, bad in flags.items() if bad],
    )
    await run_many(
        db,
        "DELETE FROM invalid_emails WHERE customer_id = ? AND order_id = ?",
        [(customer_id, oid) for oid, bad in flags.items() if not bad],
    )


async def count_dropped(db: aiosqlite.Connection, customer_id: int, dropped: int) -> None:
    """Add ``dropped`` to the customer's count of rows dropped because their event was disabled."""
    if dropped:
        await ensure_customer(db, customer_id)
        await db.execute("UPDATE customers SET dropped_rows = dropped_rows + ? WHERE customer_id = ?",
                         (dropped, customer_id))


async def set_cursor(db: aiosqlite.Connection, customer_id: int, cursor: tuple[datetime, int]) -> None:
    """Move the customer's cursor."""
    await db.execute(
        "UPDATE customers SET cursor_ts = ?, cursor_id = ? WHERE customer_id = ?",
        (iso(cursor[0]), cursor[1], customer_id),
    )


async def record_profile_id(db: aiosqlite.Connection, customer_id: int, email: str, profile_id: str) -> None:
    """Remember Klaviyo's profile id; a new or changed id must (re)join the list."""
    await db.execute(
        """INSERT INTO profiles (customer_id, email, profile_id, on_list) VALUES (?, ?, ?, 0)
           ON CONFLICT (customer_id, email) DO UPDATE SET profile_id = excluded.profile_id,
             on_list = CASE WHEN profile_id IS excluded.profile_id THEN on_list ELSE 0 END""",
        (customer_id, email, profile_id),
    )


def customer_state(customer_id: int, row: sqlite3.Row | None) -> CustomerState:
    """Build a CustomerState from the customers row, or defaults when there is none."""
    if row is None:
        return CustomerState(customer_id)
    cursor = None if row["cursor_ts"] is None else (parse_dt(row["cursor_ts"]), int(row["cursor_id"]))
    return CustomerState(
        customer_id=customer_id,
        cursor=cursor,
        list_id=opt_str(row["list_id"]),
        setup_done=bool(row["setup_done"]),
        key_healthy=bool(row["key_healthy"]),
        key_error=opt_str(row["key_error"]),
        last_poll_at=opt_dt(row["last_poll_at"]),
        last_poll_ok_at=opt_dt(row["last_poll_ok_at"]),
        last_error=opt_str(row["last_error"]),
        reconciled_at=opt_dt(row["reconciled_at"]),
        klaviyo_error=opt_str(row["klaviyo_error"]),
        klaviyo_error_at=opt_dt(row["klaviyo_error_at"]),
        klaviyo_failing_since=opt_dt(row["klaviyo_failing_since"]),
        dropped_rows=int(row["dropped_rows"]),
        poll_interval_s=None if row["poll_interval_s"] is None else float(row["poll_interval_s"]),
    )


def merge_poll(
    prev: PendingPoll | None, at: datetime, ok: bool, error: str | None, interval_s: float | None
) -> PendingPoll:
    """Add one poll outcome to those not yet written: a success clears the error, a failure keeps the last success."""
    ok_at = at if ok else (prev.ok_at if prev is not None else None)
    interval = interval_s if interval_s is not None else (prev.interval_s if prev is not None else None)
    return PendingPoll(at, ok_at, None if ok else error, interval)


def with_poll(state: CustomerState, poll: PendingPoll | None) -> CustomerState:
    """Return ``state`` as it will read once ``poll`` is written."""
    if poll is None:
        return state
    return replace(
        state,
        last_poll_at=poll.at,
        last_poll_ok_at=poll.ok_at or state.last_poll_ok_at,
        last_error=poll.error,
        poll_interval_s=poll.interval_s if poll.interval_s is not None else state.poll_interval_s,
    )


async def write_polls(db: aiosqlite.Connection, polls: Mapping[int, PendingPoll]) -> None:
    """Write merged poll outcomes of many customers (inside the caller's transaction)."""
    await run_many(db, "INSERT INTO customers (customer_id) VALUES (?) ON CONFLICT DO NOTHING",
                   [(cid,) for cid in polls])
    await run_many(
        db,
        """UPDATE customers SET last_poll_at = ?, last_poll_ok_at = COALESCE(?, last_poll_ok_at), last_error = ?,
             poll_interval_s = COALESCE(?, poll_interval_s)
           WHERE customer_id = ?""",
        [(iso(p.at), iso(p.ok_at) if p.ok_at else None, p.error, p.interval_s, cid) for cid, p in polls.items()],
    )


def profile_name(row: sqlite3.Row) -> ProfileName:
    """Build a ProfileName from a profiles row."""
    return ProfileName(
        first_name=opt_str(row["first_name"]),
        last_name=opt_str(row["last_name"]),
        organization=opt_str(row["organization"]),
        source=_NAME_SOURCES[int(row["name_source"])],
    )


# --- statements behind the Store's reads --------------------------------------------------------------


async def rows_in(
    db: aiosqlite.Connection, select: str, column: str, customer_id: int, values: Iterable[object]
) -> list[sqlite3.Row]:
    """Return the customer's rows of ``select`` (``SELECT … FROM table``) whose ``column`` is one of ``values``,
    asked in chunks so no statement passes SQLite's limit on parameters."""
    found: list[sqlite3.Row] = []
    for chunk in chunks(dict.fromkeys(values)):
        found += await fetch_all(db, f"{select} WHERE customer_id = ? AND {column} IN ({marks(len(chunk))})",
                                 (customer_id, *chunk))
    return found


async def read_memory(db: aiosqlite.Connection, customer_id: int, order_ids: Iterable[int]) -> dict[int, OrderMemory]:
    """Return the remembered status and announced events of those orders the store knows."""
    rows = await rows_in(db, "SELECT order_id, status, announced FROM orders", "order_id", customer_id, order_ids)
    return {int(r["order_id"]): OrderMemory(int(r["status"]), kinds(int(r["announced"]))) for r in rows}


async def read_customer_of_order(db: aiosqlite.Connection, order_id: int) -> int | None:
    """Return the customer whose order memory holds ``order_id`` (the lowest id, should two ever share it)."""
    # The IN over customers turns the lookup into one primary-key probe per customer: orders has no index on
    # order_id alone, and a full scan per webhook would grow with the history.
    row = await fetch_one(
        db,
        "SELECT min(customer_id) FROM orders WHERE order_id = ? AND customer_id IN (SELECT customer_id FROM customers)",
        (order_id,),
    )
    return None if row is None or row[0] is None else int(row[0])


async def read_names(db: aiosqlite.Connection, customer_id: int, emails: Iterable[str]) -> dict[str, ProfileName]:
    """Return the name last queued for each known email."""
    select = "SELECT email, first_name, last_name, organization, name_source FROM profiles"
    return {str(r["email"]): profile_name(r) for r in await rows_in(db, select, "email", customer_id, emails)}
