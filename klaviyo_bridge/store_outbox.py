"""The outbox's rows: their types, their mappers from SQL rows, and the statements that queue, mark, count and
compact them.

Writers run inside a transaction the caller holds; readers turn selected rows into frozen dataclasses. The encodings
every row shares (times, clipped texts, chunks of parameters) live in ``store_rows``.
Invariants:
- a row is pending while ``PENDING`` holds (neither sent nor dead-lettered), and is marked sent only in the
  ``version`` that was sent: a send of a replaced payload leaves the new one pending;
- payloads are canonical JSON (sorted keys, no spaces), written once and never re-rendered, so a retry sends
  the same bytes;
- an event ``unique_id`` enters a customer's outbox at most once (``ON CONFLICT DO NOTHING`` on the key only, so
  a NOT NULL or CHECK failure is never swallowed); a profile row replaced while pending gets a new ``version``;
- a live event's shopper is named first: queueing it makes a pending history profile of that email live.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, cast

import aiosqlite

from .core import EventRow, ProfileChange
from .store_rows import chunks, iso, marks, opt_dt, opt_str, parse_dt
from .store_schema import fetch_all, fetch_one, run, run_many

RowKind = Literal["profile", "event"]

# A row still to send: neither sent nor dead-lettered (a WHERE fragment every pending-row statement uses).
PENDING: Final = "sent_at IS NULL AND dead_at IS NULL"


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


@dataclass(frozen=True, slots=True)
class Totals:
    """Counts over many customers at once (systemd's STATUS= line)."""

    queued: int
    sent_since: int
    dead: int
    key_refused: int


def _json(obj: object) -> str:
    """Render ``obj`` as canonical JSON, byte-stable across runs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _opt_int(value: object) -> int | None:
    """Return a stored INTEGER that may be NULL."""
    return None if value is None else int(cast(int, value))


def _profile_payload(change: ProfileChange) -> str:
    """Return the profile row payload: the Klaviyo profile attributes the mapping core chose."""
    return _json(change.attributes())


def _event_payload(event: EventRow) -> str:
    """Return the event row payload, refusing one whose ``unique_id`` disagrees with the row key."""
    if event.payload.get("unique_id", event.unique_id) != event.unique_id:
        raise ValueError(f"event payload unique_id differs from row key {event.unique_id!r}")
    return _json(event.payload)


def is_history_event(event: EventRow) -> bool:
    """Tell whether an event is history: recorded with ``backfill``, it fires no flow."""
    return event.payload.get("backfill") is True


def _identity(row: sqlite3.Row) -> tuple[int, int, RowKind, str]:
    """Return what every outbox row type starts with, in field order: id, customer id, kind and key."""
    return int(row["id"]), int(row["customer_id"]), cast(RowKind, row["kind"]), str(row["key"])


def outbox_row(row: sqlite3.Row) -> OutboxRow:
    """Build an OutboxRow from a selected row."""
    return OutboxRow(
        *_identity(row),
        payload=str(row["payload"]),
        version=int(row["version"]),
        attempts=int(row["attempts"]),
        history=bool(row["history"]),
    )


def dead_row(row: sqlite3.Row) -> DeadRow:
    """Build a DeadRow from a selected row."""
    return DeadRow(
        *_identity(row),
        status=_opt_int(row["last_status"]),
        response=str(row["response"] or ""),
        dead_at=parse_dt(row["dead_at"]),
        attempts=int(row["attempts"]),
    )


def dead_letter(row: sqlite3.Row) -> DeadLetter:
    """Build a DeadLetter from a selected row."""
    return DeadLetter(
        *_identity(row),
        payload=str(row["payload"]),
        version=int(row["version"]),
        attempts=int(row["attempts"]),
        created_at=parse_dt(row["created_at"]),
        dead_at=parse_dt(row["dead_at"]),
        status=_opt_int(row["last_status"]),
        last_error=opt_str(row["last_error"]),
        response=str(row["response"] or ""),
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


# --- statements that queue, mark, count and compact outbox rows ---------------------------------------


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


async def mark_rows_sent(db: aiosqlite.Connection, rows: Iterable[OutboxRow], now: datetime) -> int:
    """Mark rows sent, each only in the version that was sent (a replaced row stays pending); return how many."""
    stamp = iso(now)
    return await run_many(
        db, f"UPDATE outbox SET sent_at = ? WHERE id = ? AND version = ? AND {PENDING}",
        [(stamp, row.id, row.version) for row in rows],
    )


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
