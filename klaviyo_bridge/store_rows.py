"""The store's row types and the mappers between them and SQL rows, in both directions.

Writers run inside a transaction the caller holds; readers turn selected rows into frozen dataclasses.
Invariants:
- datetimes are stored as UTC ISO-8601 text with microseconds, so text order is time order; a naive datetime is
  refused, never guessed;
- payloads are canonical JSON (sorted keys, no spaces), written once and never re-rendered, so a retry sends
  the same bytes;
- announced events are stored as explicit bits (not enum order), OR-ed in: memory never forgets an announcement;
- an event ``unique_id`` enters a customer's outbox at most once (``ON CONFLICT DO NOTHING`` on the key only, so
  a NOT NULL or CHECK failure is never swallowed); a profile row replaced while pending gets a new ``version``;
- error texts and response bodies are clipped, so one noisy error cannot bloat the database.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final, Literal, TypeVar, cast

import aiosqlite

from .core import EventKind, EventRow, NameSource, OrderMemory, ProfileChange, ProfileName
from .errors import MalformedOrder
from .store_schema import fetch_all, fetch_one, run, run_many

RowKind = Literal["profile", "event"]

@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One queued delivery."""

    id: int
    customer_id: int
    kind: RowKind
    key: str  # unique_id for events, email for profiles
    payload: str  # JSON text, sent byte-for-byte on every attempt
    version: int  # bumped when a queued profile row is replaced; mark_sent only matches this version
    attempts: int
    history: bool = False  # backfill: goes out in full bulk requests, not one by one

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

@dataclass(frozen=True, slots=True)
class Counts:
    """Outbox and malformed-order counts of one customer."""

    queued: int
    sent: int
    sent_since: int
    dead: int
    malformed: int
    invalid_email: int = 0  # orders whose email is not an address: no profile, no event
    oldest_queued_at: datetime | None = None  # when the oldest row still waiting was queued

@dataclass(frozen=True, slots=True)
class DeadRow:
    """One dead-lettered outbox row, for inspection and replay."""

    id: int
    customer_id: int
    kind: RowKind
    key: str
    status: int | None
    response: str
    dead_at: datetime
    attempts: int

@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered outbox row with everything ops need to decide on a replay."""

    id: int
    customer_id: int
    kind: RowKind
    key: str
    payload: str  # JSON text exactly as sent
    version: int
    attempts: int
    created_at: datetime
    dead_at: datetime
    status: int | None
    last_error: str | None  # the last transient failure before it died, if any
    response: str  # Klaviyo's answer that killed it (clipped)

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

PENDING: Final = "sent_at IS NULL AND dead_at IS NULL"

def _json(obj: object) -> str:
    """Render ``obj`` as canonical JSON, byte-stable across runs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

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

def _opt_int(value: object) -> int | None:
    """Return a stored INTEGER that may be NULL."""
    return None if value is None else int(cast(int, value))

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

def _profile_payload(change: ProfileChange) -> str:
    """Return the profile row payload: the Klaviyo profile attributes the mapping core chose."""
    return _json(change.attributes())

def _event_payload(event: EventRow) -> str:
    """Return the event row payload, refusing one whose ``unique_id`` disagrees with the row key."""
    if event.payload.get("unique_id", event.unique_id) != event.unique_id:
        raise ValueError(f"event payload unique_id differs from row key {event.unique_id!r}")
    return _json(event.payload)

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

_INSERT_PROFILE: Final = """INSERT INTO outbox (customer_id, kind, key, payload, created_at, next_attempt_at, history)
    VALUES (?, 'profile', ?, ?, ?, ?, ?)"""

# A new version keeps an in-flight send of the old payload from marking the replaced row sent. Live wins: a
# pending row that something live needs stays live.
_REPLACE_PENDING_PROFILE: Final = """UPDATE outbox SET payload = ?, version = version + 1, next_attempt_at = ?,
      history = MIN(history, ?)
    WHERE customer_id = ? AND kind = 'profile' AND key = ?"""

_REQUEUE_PROFILE: Final = """UPDATE outbox SET payload = ?, version = version + 1, next_attempt_at = ?, history = ?,
      attempts = 0, sent_at = NULL, dead_at = NULL, last_status = NULL, last_error = NULL, response = NULL
    WHERE customer_id = ? AND kind = 'profile' AND key = ?"""

# A live event's shopper must be named before its flow's email goes: a pending history profile of that email
# becomes live (sent at once) instead of waiting for a full import.
_LIVEN_PROFILE: Final = f"""UPDATE outbox SET history = 0
    WHERE customer_id = ? AND kind = 'profile' AND key = ? AND history = 1 AND {PENDING}"""

async def _profile_rows(
    db: aiosqlite.Connection, customer_id: int, emails: Sequence[str]
) -> dict[str, tuple[str, bool]]:
    """Return email → (payload, still pending) of the customer's existing profile rows for those emails."""
    found: dict[str, tuple[str, bool]] = {}
    for chunk in chunks(emails):
        rows = await fetch_all(
            db,
            f"SELECT key, payload, {PENDING} FROM outbox "
            f"WHERE customer_id = ? AND kind = 'profile' AND key IN ({marks(len(chunk))})",
            (customer_id, *chunk),
        )
        found.update((str(r[0]), (str(r[1]), bool(r[2]))) for r in rows)
    return found

async def queue_profiles(
    db: aiosqlite.Connection, customer_id: int, changes: Iterable[ProfileChange], now: datetime
) -> int:
    """Queue profile upserts keyed by email; return how many rows became pending that were not.

    New emails get a row; a pending row with a different payload is replaced (version bumped); a sent or dead
    row is made pending again with the new payload. A pending row with the same payload is left alone.
    """
    last = {c.email: c for c in changes}  # the last change of an email wins
    payloads = {e: _profile_payload(c) for e, c in last.items()}
    history = {e: int(c.history) for e, c in last.items()}
    existing = await _profile_rows(db, customer_id, list(payloads))
    stamp = iso(now)
    fresh = [(customer_id, e, p, stamp, stamp, history[e]) for e, p in payloads.items() if e not in existing]
    changed = [e for e, (old, pending) in existing.items() if pending and old != payloads[e]]
    replaced = [(payloads[e], stamp, history[e], customer_id, e) for e in changed]
    requeued = [(payloads[e], stamp, history[e], customer_id, e) for e, (_, pending) in existing.items()
                if not pending]
    await run_many(db, _INSERT_PROFILE, fresh)
    await run_many(db, _REPLACE_PENDING_PROFILE, replaced)
    await run_many(db, _REQUEUE_PROFILE, requeued)
    return len(fresh) + len(requeued)

async def queue_events(
    db: aiosqlite.Connection, customer_id: int, events: Sequence[EventRow], now: datetime
) -> int:
    """Insert event rows whose unique_id this customer never had; return how many were new.

    A backfill event is a history row; a live one makes its shopper's pending history profile live.
    """
    stamp = iso(now)
    # DO NOTHING on the key only: unlike INSERT OR IGNORE it cannot swallow a NOT NULL or CHECK failure.
    inserted = await run_many(
        db,
        """INSERT INTO outbox (customer_id, kind, key, payload, created_at, next_attempt_at, history)
           VALUES (?, 'event', ?, ?, ?, ?, ?) ON CONFLICT (customer_id, kind, key) DO NOTHING""",
        [(customer_id, e.unique_id, _event_payload(e), stamp, stamp, int(is_history_event(e))) for e in events],
    )
    live_emails = {str(e.payload["email"]) for e in events if not is_history_event(e) and e.payload.get("email")}
    await run_many(db, _LIVEN_PROFILE, [(customer_id, email) for email in sorted(live_emails)])
    return inserted


def is_history_event(event: EventRow) -> bool:
    """Tell whether an event is history: recorded with ``backfill``, it fires no flow."""
    return event.payload.get("backfill") is True

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

async def mark_rows_sent(db: aiosqlite.Connection, rows: Iterable[OutboxRow], now: datetime) -> int:
    """Mark rows sent, each only in the version that was sent (a replaced row stays pending); return how many."""
    stamp = iso(now)
    return await run_many(
        db, f"UPDATE outbox SET sent_at = ? WHERE id = ? AND version = ? AND {PENDING}",
        [(stamp, row.id, row.version) for row in rows],
    )


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

def outbox_row(row: sqlite3.Row) -> OutboxRow:
    """Build an OutboxRow from a selected row."""
    return OutboxRow(
        id=int(row["id"]),
        customer_id=int(row["customer_id"]),
        kind=cast(RowKind, row["kind"]),
        key=str(row["key"]),
        payload=str(row["payload"]),
        version=int(row["version"]),
        attempts=int(row["attempts"]),
        history=bool(row["history"]),
    )

def dead_row(row: sqlite3.Row) -> DeadRow:
    """Build a DeadRow from a selected row."""
    return DeadRow(
        id=int(row["id"]),
        customer_id=int(row["customer_id"]),
        kind=cast(RowKind, row["kind"]),
        key=str(row["key"]),
        status=_opt_int(row["last_status"]),
        response=str(row["response"] or ""),
        dead_at=parse_dt(row["dead_at"]),
        attempts=int(row["attempts"]),
    )

def dead_letter(row: sqlite3.Row) -> DeadLetter:
    """Build a DeadLetter from a selected row."""
    return DeadLetter(
        id=int(row["id"]),
        customer_id=int(row["customer_id"]),
        kind=cast(RowKind, row["kind"]),
        key=str(row["key"]),
        payload=str(row["payload"]),
        version=int(row["version"]),
        attempts=int(row["attempts"]),
        created_at=parse_dt(row["created_at"]),
        dead_at=parse_dt(row["dead_at"]),
        status=_opt_int(row["last_status"]),
        last_error=opt_str(row["last_error"]),
        response=str(row["response"] or ""),
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

def dead_filter(customer_id: int | None, ids: Sequence[int] | None) -> tuple[str, list[object]]:
    """Return the WHERE clause (and its parameters) selecting dead rows of a customer and/or ids."""
    clauses, params = ["dead_at IS NOT NULL"], list[object]()
    if customer_id is not None:
        clauses.append("customer_id = ?")
        params.append(customer_id)
    if ids is not None:
        clauses.append(f"id IN ({marks(len(ids))})")
        params.extend(ids)
    return " AND ".join(clauses), params


# --- statements behind the Store's reads and housekeeping ---------------------------------------------


async def read_memory(db: aiosqlite.Connection, customer_id: int, order_ids: Iterable[int]) -> dict[int, OrderMemory]:
    """Return the remembered status and announced events of those orders the store knows."""
    found: dict[int, OrderMemory] = {}
    for chunk in chunks(dict.fromkeys(order_ids)):
        rows = await fetch_all(
            db,
            "SELECT order_id, status, announced FROM orders "
            f"WHERE customer_id = ? AND order_id IN ({marks(len(chunk))})",
            (customer_id, *chunk),
        )
        for r in rows:
            found[int(r["order_id"])] = OrderMemory(int(r["status"]), kinds(int(r["announced"])))
    return found


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
    found: dict[str, ProfileName] = {}
    for chunk in chunks(dict.fromkeys(emails)):
        rows = await fetch_all(
            db,
            "SELECT email, first_name, last_name, organization, name_source FROM profiles "
            f"WHERE customer_id = ? AND email IN ({marks(len(chunk))})",
            (customer_id, *chunk),
        )
        found.update((str(r["email"]), profile_name(r)) for r in rows)
    return found


async def delete_pending_events(db: aiosqlite.Connection, customer_id: int, kinds: Sequence[str]) -> int:
    """Delete the customer's unsent event rows announcing any of these milestones; return how many went."""
    # "{order}:{kind}", "sample:{kind}" and "sample:{kind}:{metric}" (a metric name may hold colons too).
    one = ("(key NOT GLOB 'sample:*' AND key GLOB '*:' || ?) OR key = 'sample:' || ? "
           "OR key GLOB 'sample:' || ? || ':*'")
    matches = " OR ".join(f"({one})" for _ in kinds)
    return await run(
        db, f"DELETE FROM outbox WHERE customer_id = ? AND kind = 'event' AND {PENDING} AND ({matches})",
        (customer_id, *(value for kind in kinds for value in (kind, kind, kind))),
    )


async def read_counts(db: aiosqlite.Connection, customer_id: int, since: datetime) -> Counts:
    """Count the customer's rows by state, its malformed and invalid-email orders, and its oldest waiting row."""
    row = await fetch_one(
        db,
        f"""SELECT coalesce(sum({PENDING}), 0), coalesce(sum(sent_at IS NOT NULL), 0),
              coalesce(sum(sent_at >= ?), 0), coalesce(sum(dead_at IS NOT NULL), 0),
              min(CASE WHEN {PENDING} THEN created_at END)
            FROM outbox WHERE customer_id = ?""",
        (iso(since), customer_id),
    )
    bad = await fetch_one(
        db,
        """SELECT (SELECT count(*) FROM malformed WHERE customer_id = ?),
                  (SELECT count(*) FROM invalid_emails WHERE customer_id = ?)""",
        (customer_id, customer_id),
    )
    q, s, ss, d = (0, 0, 0, 0) if row is None else (int(v or 0) for v in tuple(row)[:4])
    malformed, invalid = (0, 0) if bad is None else (int(bad[0]), int(bad[1]))
    oldest = None if row is None else opt_dt(row[4])
    return Counts(queued=q, sent=s, sent_since=ss, dead=d, malformed=malformed, invalid_email=invalid,
                  oldest_queued_at=oldest)


@dataclass(frozen=True, slots=True)
class Totals:
    """Counts over many customers at once (systemd's STATUS= line)."""

    queued: int
    sent_since: int
    dead: int
    key_refused: int


async def read_totals(db: aiosqlite.Connection, customer_ids: Iterable[int], since: datetime) -> Totals:
    """Count queued, recently sent and dead rows, and refused keys, of these customers in one statement."""
    ids = json.dumps(sorted(customer_ids))
    row = await fetch_one(
        db,
        f"""WITH chosen(id) AS (SELECT value FROM json_each(?))
            SELECT (SELECT count(*) FROM outbox WHERE customer_id IN chosen AND {PENDING}),
                   (SELECT count(*) FROM outbox WHERE customer_id IN chosen AND sent_at >= ?),
                   (SELECT count(*) FROM outbox WHERE customer_id IN chosen AND dead_at IS NOT NULL),
                   (SELECT count(*) FROM customers WHERE customer_id IN chosen AND key_healthy = 0)""",
        (ids, iso(since)),
    )
    values = (0, 0, 0, 0) if row is None else tuple(int(v) for v in tuple(row))
    return Totals(*values)


async def compact(db: aiosqlite.Connection, cutoff: str) -> int:
    """Blank the payloads of events sent before ``cutoff`` and delete profile rows sent before it."""
    blanked = await run(
        db,
        """UPDATE outbox SET payload = '', last_error = NULL, response = NULL
           WHERE kind = 'event' AND sent_at IS NOT NULL AND sent_at < ? AND payload != ''""",
        (cutoff,),
    )
    dropped = await run(
        db, "DELETE FROM outbox WHERE kind = 'profile' AND sent_at IS NOT NULL AND sent_at < ?", (cutoff,)
    )
    return blanked + dropped
