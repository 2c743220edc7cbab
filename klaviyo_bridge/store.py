"""SQLite state of the bridge: order memory, profile names, cursors, the outbox and the Whiplash token.

Delivery contract (transactional outbox; reliability guide §0-§4):
- **No loss.** A page's state change (order memory, profile names), its outbox rows and the customer's cursor
  are written in ONE ``BEGIN IMMEDIATE`` transaction, so the cursor never moves past a change whose rows are
  not durably queued; ``synchronous=FULL`` in WAL mode makes each commit survive power loss too.
- **At-least-once sends, effectively-once effects.** A row is marked sent only after Klaviyo answered 2xx, so
  a crash between the send and ``mark_sent`` re-sends it. Each event carries a deterministic ``unique_id``
  (``"{order_id}:{event}"``) stored in the row and sent byte for byte on every attempt, so Klaviyo keeps
  one event; profile imports are upserts and repeat harmlessly.
- **Bounded duplication.** Only rows in flight at a crash (at most one batch per customer) are sent twice.
- **Isolation.** Every row, cursor and key-health flag belongs to one customer; nothing here lets one
  customer's failures touch another's rows.
- **One kind of failure.** sqlite3's errors never leave this module: every read and write translates them into
  ``errors.StoreError`` naming the database, so callers handle one storage error and nothing else imports sqlite3.
- **Never from scratch.** A database that is unreadable, corrupt or from a newer version stops the daemon;
  an older schema is migrated in place, in one transaction per version.
The fault suite (tests/faults/) SIGKILLs the daemon at named failpoints (one inside ``commit_page``'s
transaction, before COMMIT) and under random load, and checks the above.

Invariants kept here:
- one writer connection; every write is one ``BEGIN IMMEDIATE`` transaction, and an ``asyncio.Lock``
  serialises all use of the connection, so concurrent customer tasks never interleave statements;
- an event ``unique_id`` enters a customer's outbox at most once, ever, whether its row was sent or not;
- order memory only gains announced events (bits are OR-ed in), it never forgets one; ``status_at`` (epoch
  seconds) is when the remembered status was set, kept until the status changes, and bounds the reconcile
  sweep (v1 rows count as set at the upgrade);
- a queued profile row replaced by a newer payload gets a new ``version``; ``mark_sent`` of an older version
  is refused, so the newer payload stays pending and is sent too;
- datetimes are stored as UTC ISO-8601 text with microseconds, so text order is time order;
- payloads are canonical JSON (sorted keys, no spaces), written once and never re-rendered;
- a file that is not SQLite, fails ``quick_check`` or has a newer schema is refused, never recreated:
  starting from an empty database would re-send every order's history; a missing file is created (one
  WARNING says what that implies), a missing folder never is: a mistyped path must not start from scratch;
- the database holds a random key (``meta.profile_ref_key``, made once by migration v3) under which log
  lines name profiles instead of emails (``logs.profile_ref``); it is registered with the logs when opened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, TypeVar, cast

import aiosqlite

from . import failpoints, logs
from .core import EventKind, EventRow, NameSource, OrderMemory, Plan, ProfileChange, ProfileName
from .errors import MalformedOrder, StoreError
from .whiplash import TokenRecord

log = logging.getLogger(__name__)

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


T = TypeVar("T")
Migration = Callable[[aiosqlite.Connection], Awaitable[None]]

BUSY_TIMEOUT_MS: Final = 5000
_CHUNK: Final = 500  # well under SQLite's bound-parameter limit, and keeps each statement short
_MAX_TEXT: Final = 8000  # error texts and response bodies are clipped: rows stay small
_EVENT_BITS: Final[Mapping[EventKind, int]] = {
    # Explicit values, not enum order: the bits are on disk and must not move if the enum is reordered.
    EventKind.PROCESSING: 1,
    EventKind.CANCELLED: 2,
    EventKind.SHIPPED: 4,
    EventKind.DELIVERED: 8,
}
_NAME_SOURCES: Final[tuple[NameSource, ...]] = ("none", "company", "real")  # stored as the index
_NO_ORDER_ID: Final = 0  # malformed orders without a readable id share this key (Whiplash ids are > 0)
_PENDING: Final = "sent_at IS NULL AND dead_at IS NULL"

_SCHEMA_V1: Final = (
    """CREATE TABLE customers (
        customer_id INTEGER PRIMARY KEY,
        cursor_ts TEXT,
        cursor_id INTEGER,
        list_id TEXT,
        setup_done INTEGER NOT NULL DEFAULT 0,
        last_poll_at TEXT,
        last_poll_ok_at TEXT,
        last_error TEXT,
        key_healthy INTEGER NOT NULL DEFAULT 1,
        key_error TEXT,
        key_checked_at TEXT
    )""",
    """CREATE TABLE orders (
        customer_id INTEGER NOT NULL REFERENCES customers (customer_id),
        order_id INTEGER NOT NULL,
        status INTEGER NOT NULL,
        announced INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (customer_id, order_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE profiles (
        customer_id INTEGER NOT NULL REFERENCES customers (customer_id),
        email TEXT NOT NULL,
        first_name TEXT,
        last_name TEXT,
        organization TEXT,
        name_source INTEGER NOT NULL DEFAULT 0,
        profile_id TEXT,
        on_list INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (customer_id, email)
    ) WITHOUT ROWID""",
    """CREATE INDEX profiles_off_list ON profiles (customer_id, profile_id)
        WHERE on_list = 0 AND profile_id IS NOT NULL""",
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        customer_id INTEGER NOT NULL REFERENCES customers (customer_id),
        kind TEXT NOT NULL CHECK (kind IN ('profile', 'event')),
        key TEXT NOT NULL,
        payload TEXT NOT NULL,
        version INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        sent_at TEXT,
        dead_at TEXT,
        last_status INTEGER,
        last_error TEXT,
        response TEXT,
        UNIQUE (customer_id, kind, key)
    )""",
    """CREATE INDEX outbox_due ON outbox (customer_id, next_attempt_at)
        WHERE sent_at IS NULL AND dead_at IS NULL""",
    "CREATE INDEX outbox_dead ON outbox (customer_id) WHERE dead_at IS NOT NULL",
    """CREATE TABLE whiplash_token (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        access_token TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        refresh_token TEXT,
        seed_fingerprint TEXT NOT NULL
    )""",
    """CREATE TABLE malformed (
        customer_id INTEGER NOT NULL REFERENCES customers (customer_id),
        order_id INTEGER NOT NULL,
        why TEXT NOT NULL,
        excerpt TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        PRIMARY KEY (customer_id, order_id)
    ) WITHOUT ROWID""",
)


async def _migrate_v1(db: aiosqlite.Connection) -> None:
    """Create the initial schema."""
    for statement in _SCHEMA_V1:
        await db.execute(statement)


async def _migrate_v2(db: aiosqlite.Connection) -> None:
    """Remember when each order's current status was set (epoch seconds), bounding the reconcile sweep."""
    await db.execute("ALTER TABLE orders ADD COLUMN status_at INTEGER NOT NULL DEFAULT 0")
    # v1 rows carry no time: count them as set now, so they are reconciled for reconcile_days from the upgrade.
    await db.execute("UPDATE orders SET status_at = CAST(strftime('%s', 'now') AS INTEGER)")
    await db.execute("CREATE INDEX orders_by_status ON orders (customer_id, status, status_at)")
    await db.execute("ALTER TABLE customers ADD COLUMN reconciled_at TEXT")


async def _migrate_v3(db: aiosqlite.Connection) -> None:
    """Add the profile-reference key, Klaviyo error streaks, dropped-row counts and invalid-email orders."""
    await db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
    await db.execute("INSERT INTO meta (name, value) VALUES ('profile_ref_key', randomblob(32))")
    for column in ("klaviyo_error TEXT", "klaviyo_error_at TEXT", "klaviyo_failing_since TEXT",
                   "dropped_rows INTEGER NOT NULL DEFAULT 0"):
        await db.execute(f"ALTER TABLE customers ADD COLUMN {column}")
    await db.execute(
        """CREATE TABLE invalid_emails (
            customer_id INTEGER NOT NULL REFERENCES customers (customer_id),
            order_id INTEGER NOT NULL,
            first_seen TEXT NOT NULL,
            PRIMARY KEY (customer_id, order_id)
        ) WITHOUT ROWID"""
    )


# Append-only: entry i migrates user_version i to i + 1. Never edit a released migration.
_MIGRATIONS: Final[tuple[Migration, ...]] = (_migrate_v1, _migrate_v2, _migrate_v3)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


# ---------------------------------------------------------------------------------------------------------
# Small pure helpers


def _json(obj: object) -> str:
    """Render ``obj`` as canonical JSON, byte-stable across runs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _iso(dt: datetime) -> str:
    """Render an aware datetime as the one UTC text format stored everywhere."""
    if dt.tzinfo is None:
        raise ValueError("naive datetime given to the store; pass an aware (UTC) datetime")
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def _epoch(dt: datetime) -> int:
    """Return an aware datetime as whole epoch seconds (the compact form kept per order)."""
    if dt.tzinfo is None:
        raise ValueError("naive datetime given to the store; pass an aware (UTC) datetime")
    return int(dt.timestamp())


def _dt(text: object) -> datetime:
    """Parse a stored datetime."""
    return datetime.fromisoformat(str(text))


def _opt_dt(text: object) -> datetime | None:
    """Parse a stored datetime that may be NULL."""
    return None if text is None else _dt(text)


def _opt_str(value: object) -> str | None:
    """Return a stored TEXT that may be NULL."""
    return None if value is None else str(value)


def _opt_int(value: object) -> int | None:
    """Return a stored INTEGER that may be NULL."""
    return None if value is None else int(cast(int, value))


def _clip(text: str | None) -> str | None:
    """Bound a free-form text so one noisy error cannot bloat the database."""
    return None if text is None else text[:_MAX_TEXT]


def _chunks(items: Iterable[T], size: int = _CHUNK) -> Iterator[list[T]]:
    """Yield ``items`` in lists of at most ``size``."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _marks(n: int) -> str:
    """Return ``n`` comma-separated SQL placeholders."""
    return ",".join("?" * n)


def _bits(kinds: Iterable[EventKind]) -> int:
    """Encode announced events as a bitmask."""
    mask = 0
    for kind in kinds:
        mask |= _EVENT_BITS[kind]
    return mask


def _kinds(mask: int) -> frozenset[EventKind]:
    """Decode a bitmask of announced events."""
    return frozenset(kind for kind, bit in _EVENT_BITS.items() if mask & bit)


def _profile_payload(change: ProfileChange) -> str:
    """Return the profile row payload: the Klaviyo profile attributes the mapping core chose."""
    return _json(change.attributes())


def _event_payload(event: EventRow) -> str:
    """Return the event row payload, refusing one whose ``unique_id`` disagrees with the row key."""
    if event.payload.get("unique_id", event.unique_id) != event.unique_id:
        raise ValueError(f"event payload unique_id differs from row key {event.unique_id!r}")
    return _json(event.payload)


def _corrupt_message(path: Path, detail: str) -> str:
    """Explain to ops what to do (and not do) with an unreadable state database."""
    return (
        f"state database {path} is corrupt or not a SQLite database ({detail}). Do NOT delete or replace it "
        "blindly: a fresh database would re-send every order's history to Klaviyo. Keep the daemon stopped "
        "and the file in place with its -wal/-shm companions, then restore a backup or salvage it with "
        f"`sqlite3 {path} .recover`."
    )


# ---------------------------------------------------------------------------------------------------------
# Statement helpers (the caller holds the store lock)


async def _all(db: aiosqlite.Connection, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
    """Run a query and return every row."""
    return list(await db.execute_fetchall(sql, params))


async def _one(db: aiosqlite.Connection, sql: str, params: Sequence[object] = ()) -> sqlite3.Row | None:
    """Run a query and return its first row, if any."""
    rows = await _all(db, sql, params)
    return rows[0] if rows else None


async def _run(db: aiosqlite.Connection, sql: str, params: Sequence[object] = ()) -> int:
    """Run a write statement and return how many rows it changed."""
    cursor = await db.execute(sql, params)
    try:
        return cursor.rowcount
    finally:
        await cursor.close()


async def _run_many(db: aiosqlite.Connection, sql: str, rows: Iterable[Sequence[object]]) -> int:
    """Run a write statement once per parameter row and return how many rows changed in total."""
    cursor = await db.executemany(sql, rows)
    try:
        return cursor.rowcount
    finally:
        await cursor.close()


async def _rollback_quietly(db: aiosqlite.Connection) -> None:
    """Roll back the open transaction, if there still is one."""
    # ROLLBACK fails harmlessly when BEGIN itself failed, or when a COMMIT whose await was cancelled
    # completed in aiosqlite's thread anyway; the original exception is what matters.
    with suppress(sqlite3.Error, ValueError):
        await db.execute("ROLLBACK")


@asynccontextmanager
async def _transaction(db: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
    """Run the body as one BEGIN IMMEDIATE transaction; roll back on any exception, cancellation included."""
    try:
        # IMMEDIATE takes the write lock up front: a deferred read-then-write can hit SQLITE_BUSY without
        # honouring busy_timeout.
        await db.execute("BEGIN IMMEDIATE")
        yield db
        await db.execute("COMMIT")
    except BaseException:
        await _rollback_quietly(db)
        raise


async def _profile_key(db: aiosqlite.Connection) -> bytes:
    """Return the key under which log lines name profiles (made once, by migration v3)."""
    row = await _one(db, "SELECT value FROM meta WHERE name = 'profile_ref_key'")
    if row is None:
        raise StoreError("state database lacks its profile reference key (meta.profile_ref_key)")
    return bytes(row[0])


async def _user_version(db: aiosqlite.Connection) -> int:
    """Return the schema version recorded in the database header."""
    row = await _one(db, "PRAGMA user_version")
    return 0 if row is None else int(row[0])


# ---------------------------------------------------------------------------------------------------------
# Opening: checks, pragmas, migrations


def _create_private_file(path: Path) -> bool:
    """Create an empty owner-only database file if there is none; return True if it was created.

    The folder must exist: a missing one means a mistyped path, and a fresh database there would re-send
    every order's history. (systemd's StateDirectory= creates the real one.)
    """
    if not path.parent.is_dir():
        raise StoreError(f"cannot open state database {path}: folder {path.parent} does not exist; the bridge never "
                         "creates it (check bridge.state_path; under systemd StateDirectory= creates it)")
    # The DB holds the Whiplash refresh token; SQLite gives -wal/-shm the same mode as this file.
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def _reserve_private_file(dest: Path) -> None:
    """Create ``dest`` empty and owner-only (VACUUM INTO fills an empty file); never overwrite one."""
    try:
        os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise StoreError(f"{dest} already exists; a backup never overwrites a file") from None
    except OSError as exc:
        raise StoreError(f"cannot write backup {dest}: {exc.strerror or exc}") from None


def _target(path: Path, readonly: bool) -> str:
    """Return what to hand sqlite3.connect: a read-only URI, or the path of a file that now exists."""
    if not readonly:
        if _create_private_file(path):
            log.warning(
                "new state database path=%s: nothing was sent before as far as the bridge knows, so every enabled "
                "customer starts from its backfill window (launch_date - backfill_days) action=%s", path,
                "none on a first start; otherwise stop the bridge and restore the state DB from its backup",
            )
        return str(path)
    if not path.is_file():
        raise StoreError(f"no state database at {path}")
    return path.resolve().as_uri() + "?mode=ro"


async def _connect(path: Path, readonly: bool) -> aiosqlite.Connection:
    """Open the connection (read-only through a URI), translating failures into StoreError."""
    try:
        target = _target(path, readonly)
    except OSError as exc:
        raise StoreError(f"cannot open state database {path}: {exc}") from exc
    connection = aiosqlite.connect(target, uri=readonly, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        db = await connection
    except sqlite3.Error as exc:
        await _reap_worker(connection)
        raise StoreError(f"cannot open state database {path}: {exc}") from exc
    db.row_factory = sqlite3.Row
    return db


async def _reap_worker(connection: aiosqlite.Connection) -> None:
    """Wait until the worker thread of a connection that failed to open has stopped.

    aiosqlite stops it by queueing a close whose result it posts to the event loop later; were the loop
    closed first (a daemon exiting on this very error), the thread would die printing "Event loop is closed".
    """
    worker = getattr(connection, "_thread", connection)  # aiosqlite < 0.21: the connection is the thread
    if isinstance(worker, threading.Thread) and worker.ident is not None:
        await asyncio.to_thread(worker.join, 5.0)


async def _check_health(db: aiosqlite.Connection, path: Path) -> None:
    """Refuse a file that is not SQLite or fails quick_check."""
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        rows = await _all(db, "PRAGMA quick_check")
    except sqlite3.OperationalError as exc:
        raise StoreError(f"cannot read state database {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreError(_corrupt_message(path, str(exc))) from exc
    verdict = [str(row[0]) for row in rows]
    if verdict != ["ok"]:
        raise StoreError(_corrupt_message(path, "quick_check: " + "; ".join(verdict[:5])))


async def _configure_writer(db: aiosqlite.Connection, path: Path) -> None:
    """Set the durability pragmas of the writer connection."""
    row = await _one(db, "PRAGMA journal_mode = WAL")
    mode = "?" if row is None else str(row[0]).lower()
    if mode != "wal":
        log.warning("state database not in WAL mode path=%s journal_mode=%s", path, mode)
    await db.execute("PRAGMA synchronous = FULL")
    await db.execute("PRAGMA foreign_keys = ON")


def _newer_schema_message(path: Path, version: int) -> str:
    """Explain a database written by a newer klaviyo-bridge."""
    return (
        f"state database {path} has schema v{version}, newer than this klaviyo-bridge (v{SCHEMA_VERSION}); "
        "upgrade klaviyo-bridge. Do not delete the database: that would re-send history."
    )


async def _has_foreign_objects(db: aiosqlite.Connection) -> bool:
    """Tell whether the database already holds tables it did not get from our migrations."""
    row = await _one(db, "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
    return row is not None and int(row[0]) > 0


async def _apply_migration(db: aiosqlite.Connection, path: Path, target: int) -> None:
    """Migrate to ``target`` in one transaction, re-checking the version under the write lock."""
    async with _transaction(db):
        current = await _user_version(db)
        if current >= target:
            return
        if current == 0 and await _has_foreign_objects(db):
            raise StoreError(f"{path} is a SQLite database but not klaviyo-bridge's; refusing to touch it")
        await _MIGRATIONS[target - 1](db)
        # user_version lives in the header page, so it commits (or rolls back) with the schema change.
        await db.execute(f"PRAGMA user_version = {int(target)}")
    log.info("state database migrated path=%s schema=v%d", path, target)


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Bring the schema up to SCHEMA_VERSION; refuse a newer one."""
    version = await _user_version(db)
    if version > SCHEMA_VERSION:
        raise StoreError(_newer_schema_message(path, version))
    for target in range(version + 1, SCHEMA_VERSION + 1):
        await _apply_migration(db, path, target)


async def _check_version_readonly(db: aiosqlite.Connection, path: Path) -> None:
    """Refuse to read a database whose schema differs from this program's."""
    version = await _user_version(db)
    if version > SCHEMA_VERSION:
        raise StoreError(_newer_schema_message(path, version))
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"state database {path} has schema v{version}, this klaviyo-bridge expects v{SCHEMA_VERSION}; "
            "start the daemon once so it migrates the database"
        )


# ---------------------------------------------------------------------------------------------------------
# Row writers used inside transactions


async def _ensure_customer(db: aiosqlite.Connection, customer_id: int) -> None:
    """Insert the customer row if it is missing."""
    await db.execute("INSERT INTO customers (customer_id) VALUES (?) ON CONFLICT DO NOTHING", (customer_id,))


async def _upsert_orders(
    db: aiosqlite.Connection, customer_id: int, orders: Mapping[int, OrderMemory], status_at: Mapping[int, int]
) -> None:
    """Store order memories; announced bits are OR-ed so an announcement is never forgotten.

    ``status_at`` (epoch seconds) is kept from the first time the current status was stored.
    """
    await _run_many(
        db,
        """INSERT INTO orders (customer_id, order_id, status, announced, status_at) VALUES (?, ?, ?, ?, ?)
           ON CONFLICT (customer_id, order_id) DO UPDATE
           SET status_at = CASE WHEN status = excluded.status THEN status_at ELSE excluded.status_at END,
             status = excluded.status, announced = announced | excluded.announced""",
        [(customer_id, oid, mem.status, _bits(mem.announced), status_at[oid]) for oid, mem in orders.items()],
    )


async def _upsert_names(db: aiosqlite.Connection, customer_id: int, names: Mapping[str, ProfileName]) -> None:
    """Store the names now considered sent, leaving profile ids and list membership alone."""
    await _run_many(
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


_INSERT_PROFILE: Final = """INSERT INTO outbox (customer_id, kind, key, payload, created_at, next_attempt_at)
    VALUES (?, 'profile', ?, ?, ?, ?)"""
# A new version keeps an in-flight send of the old payload from marking the replaced row sent.
_REPLACE_PENDING_PROFILE: Final = """UPDATE outbox SET payload = ?, version = version + 1, next_attempt_at = ?
    WHERE customer_id = ? AND kind = 'profile' AND key = ?"""
_REQUEUE_PROFILE: Final = """UPDATE outbox SET payload = ?, version = version + 1, next_attempt_at = ?,
      attempts = 0, sent_at = NULL, dead_at = NULL, last_status = NULL, last_error = NULL, response = NULL
    WHERE customer_id = ? AND kind = 'profile' AND key = ?"""


async def _profile_rows(
    db: aiosqlite.Connection, customer_id: int, emails: Sequence[str]
) -> dict[str, tuple[str, bool]]:
    """Return email → (payload, still pending) of the customer's existing profile rows for those emails."""
    found: dict[str, tuple[str, bool]] = {}
    for chunk in _chunks(emails):
        rows = await _all(
            db,
            f"SELECT key, payload, {_PENDING} FROM outbox "
            f"WHERE customer_id = ? AND kind = 'profile' AND key IN ({_marks(len(chunk))})",
            (customer_id, *chunk),
        )
        found.update((str(r[0]), (str(r[1]), bool(r[2]))) for r in rows)
    return found


async def _queue_profiles(
    db: aiosqlite.Connection, customer_id: int, changes: Iterable[ProfileChange], now: datetime
) -> int:
    """Queue profile upserts keyed by email; return how many rows became pending that were not.

    New emails get a row; a pending row with a different payload is replaced (version bumped); a sent or dead
    row is made pending again with the new payload. A pending row with the same payload is left alone.
    """
    payloads = {c.email: _profile_payload(c) for c in changes}  # the last change of an email wins
    existing = await _profile_rows(db, customer_id, list(payloads))
    stamp = _iso(now)
    fresh = [(customer_id, e, p, stamp, stamp) for e, p in payloads.items() if e not in existing]
    changed = [e for e, (old, pending) in existing.items() if pending and old != payloads[e]]
    replaced = [(payloads[e], stamp, customer_id, e) for e in changed]
    requeued = [(payloads[e], stamp, customer_id, e) for e, (_, pending) in existing.items() if not pending]
    await _run_many(db, _INSERT_PROFILE, fresh)
    await _run_many(db, _REPLACE_PENDING_PROFILE, replaced)
    await _run_many(db, _REQUEUE_PROFILE, requeued)
    return len(fresh) + len(requeued)


async def _queue_events(
    db: aiosqlite.Connection, customer_id: int, events: Sequence[EventRow], now: datetime
) -> int:
    """Insert event rows whose unique_id this customer never had; return how many were new."""
    stamp = _iso(now)
    # DO NOTHING on the key only: unlike INSERT OR IGNORE it cannot swallow a NOT NULL or CHECK failure.
    return await _run_many(
        db,
        """INSERT INTO outbox (customer_id, kind, key, payload, created_at, next_attempt_at)
           VALUES (?, 'event', ?, ?, ?, ?) ON CONFLICT (customer_id, kind, key) DO NOTHING""",
        [(customer_id, e.unique_id, _event_payload(e), stamp, stamp) for e in events],
    )


async def _clear_malformed(db: aiosqlite.Connection, customer_id: int, order_ids: Iterable[int]) -> None:
    """Forget malformed records of orders that have now been read successfully."""
    await _run_many(
        db,
        "DELETE FROM malformed WHERE customer_id = ? AND order_id = ?",
        [(customer_id, oid) for oid in order_ids],
    )


async def _record_malformed(
    db: aiosqlite.Connection, customer_id: int, malformed: Sequence[MalformedOrder], now: datetime
) -> None:
    """Upsert malformed orders, keeping when each was first seen."""
    stamp = _iso(now)
    await _run_many(
        db,
        """INSERT INTO malformed (customer_id, order_id, why, excerpt, first_seen, last_seen)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (customer_id, order_id) DO UPDATE
           SET why = excluded.why, excerpt = excluded.excerpt, last_seen = excluded.last_seen""",
        [
            (customer_id, m.order_id or _NO_ORDER_ID, m.why, _clip(m.excerpt), stamp, stamp)
            for m in malformed
        ],
    )


async def _record_invalid_emails(
    db: aiosqlite.Connection, customer_id: int, flags: Mapping[int, bool], now: datetime
) -> None:
    """List orders read with an invalid email; forget those read with a valid (or no) email since."""
    stamp = _iso(now)
    await _run_many(
        db,
        """INSERT INTO invalid_emails (customer_id, order_id, first_seen) VALUES (?, ?, ?)
           ON CONFLICT (customer_id, order_id) DO NOTHING""",
        [(customer_id, oid, stamp) for oid, bad in flags.items() if bad],
    )
    await _run_many(
        db,
        "DELETE FROM invalid_emails WHERE customer_id = ? AND order_id = ?",
        [(customer_id, oid) for oid, bad in flags.items() if not bad],
    )


async def _count_dropped(db: aiosqlite.Connection, customer_id: int, dropped: int) -> None:
    """Add ``dropped`` to the customer's count of rows dropped because their event was disabled."""
    if dropped:
        await _ensure_customer(db, customer_id)
        await db.execute("UPDATE customers SET dropped_rows = dropped_rows + ? WHERE customer_id = ?",
                         (dropped, customer_id))


async def _set_cursor(db: aiosqlite.Connection, customer_id: int, cursor: tuple[datetime, int]) -> None:
    """Move the customer's cursor."""
    await db.execute(
        "UPDATE customers SET cursor_ts = ?, cursor_id = ? WHERE customer_id = ?",
        (_iso(cursor[0]), cursor[1], customer_id),
    )


async def _record_profile_id(db: aiosqlite.Connection, customer_id: int, email: str, profile_id: str) -> None:
    """Remember Klaviyo's profile id; a new or changed id must (re)join the list."""
    await db.execute(
        """INSERT INTO profiles (customer_id, email, profile_id, on_list) VALUES (?, ?, ?, 0)
           ON CONFLICT (customer_id, email) DO UPDATE SET profile_id = excluded.profile_id,
             on_list = CASE WHEN profile_id IS excluded.profile_id THEN on_list ELSE 0 END""",
        (customer_id, email, profile_id),
    )


# ---------------------------------------------------------------------------------------------------------
# Row readers


def _outbox_row(row: sqlite3.Row) -> OutboxRow:
    """Build an OutboxRow from a selected row."""
    return OutboxRow(
        id=int(row["id"]),
        customer_id=int(row["customer_id"]),
        kind=cast(RowKind, row["kind"]),
        key=str(row["key"]),
        payload=str(row["payload"]),
        version=int(row["version"]),
        attempts=int(row["attempts"]),
    )


def _dead_row(row: sqlite3.Row) -> DeadRow:
    """Build a DeadRow from a selected row."""
    return DeadRow(
        id=int(row["id"]),
        customer_id=int(row["customer_id"]),
        kind=cast(RowKind, row["kind"]),
        key=str(row["key"]),
        status=_opt_int(row["last_status"]),
        response=str(row["response"] or ""),
        dead_at=_dt(row["dead_at"]),
        attempts=int(row["attempts"]),
    )


def _customer_state(customer_id: int, row: sqlite3.Row | None) -> CustomerState:
    """Build a CustomerState from the customers row, or defaults when there is none."""
    if row is None:
        return CustomerState(customer_id)
    cursor = None if row["cursor_ts"] is None else (_dt(row["cursor_ts"]), int(row["cursor_id"]))
    return CustomerState(
        customer_id=customer_id,
        cursor=cursor,
        list_id=_opt_str(row["list_id"]),
        setup_done=bool(row["setup_done"]),
        key_healthy=bool(row["key_healthy"]),
        key_error=_opt_str(row["key_error"]),
        last_poll_at=_opt_dt(row["last_poll_at"]),
        last_poll_ok_at=_opt_dt(row["last_poll_ok_at"]),
        last_error=_opt_str(row["last_error"]),
        reconciled_at=_opt_dt(row["reconciled_at"]),
        klaviyo_error=_opt_str(row["klaviyo_error"]),
        klaviyo_error_at=_opt_dt(row["klaviyo_error_at"]),
        klaviyo_failing_since=_opt_dt(row["klaviyo_failing_since"]),
        dropped_rows=int(row["dropped_rows"]),
    )


def _profile_name(row: sqlite3.Row) -> ProfileName:
    """Build a ProfileName from a profiles row."""
    return ProfileName(
        first_name=_opt_str(row["first_name"]),
        last_name=_opt_str(row["last_name"]),
        organization=_opt_str(row["organization"]),
        source=_NAME_SOURCES[int(row["name_source"])],
    )


def _dead_filter(customer_id: int | None, ids: Sequence[int] | None) -> tuple[str, list[object]]:
    """Return the WHERE clause (and its parameters) selecting dead rows of a customer and/or ids."""
    clauses, params = ["dead_at IS NOT NULL"], list[object]()
    if customer_id is not None:
        clauses.append("customer_id = ?")
        params.append(customer_id)
    if ids is not None:
        clauses.append(f"id IN ({_marks(len(ids))})")
        params.extend(ids)
    return " AND ".join(clauses), params


# ---------------------------------------------------------------------------------------------------------


class Store:
    """The bridge's SQLite state, behind one serialised writer connection."""

    def __init__(self, db: aiosqlite.Connection, path: Path, readonly: bool, profile_key: bytes) -> None:
        self._db = db
        self._path = path
        self._readonly = readonly
        self.profile_key = profile_key  # names profiles in logs (logs.profile_ref); never leaves the DB otherwise
        # aiosqlite serialises statements, not transactions: without this lock two customer tasks would
        # interleave statements inside each other's BEGIN ... COMMIT on the shared connection.
        self._lock = asyncio.Lock()
        # Customers are never deleted, so once inserted (or seen) a customer needs no further write transaction:
        # skipping it halves the cost of an idle poll.
        self._known_customers: set[int] = set()

    @classmethod
    async def open(cls, path: Path, *, readonly: bool = False) -> Store:
        """Open (creating and migrating unless ``readonly``) the state database at ``path``."""
        path = Path(path)
        db = await _connect(path, readonly)
        try:
            await _check_health(db, path)
            if readonly:
                await _check_version_readonly(db, path)
            else:
                await _configure_writer(db, path)
                await _migrate(db, path)
            key = await _profile_key(db)
        except BaseException:
            await db.close()
            raise
        logs.register_profile_key(key)
        return cls(db, path, readonly, key)

    @classmethod
    async def open_readonly(cls, path: Path) -> Store:
        """Open the database read-only, e.g. for ``status`` while the daemon runs."""
        return await cls.open(path, readonly=True)

    @property
    def path(self) -> Path:
        """Return the database path."""
        return self._path

    async def close(self) -> None:
        """Close the connection once any running transaction has finished."""
        async with self._lock:
            await self._db.close()

    async def __aenter__(self) -> Store:
        """Return the open store."""
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the store."""
        await self.close()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        """Hold the connection for a read; SQLite's failures leave as StoreError."""
        async with self._lock:
            with self._errors():
                yield self._db

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """Hold the connection for one write transaction; SQLite's failures leave as StoreError."""
        if self._readonly:
            raise StoreError(f"state database {self._path} is open read-only")
        async with self._lock:
            with self._errors():
                async with _transaction(self._db) as db:
                    yield db

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate sqlite3's errors (locked, disk full, I/O) into the package's own, naming the database."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"state database {self._path}: {exc}") from exc

    # -- customers -----------------------------------------------------------------------------------------

    async def ensure_customer(self, customer_id: int) -> None:
        """Insert the customer if it is missing."""
        if customer_id in self._known_customers:
            return
        async with self._write() as db:
            await _ensure_customer(db, customer_id)
        self._known_customers.add(customer_id)

    async def customer_state(self, customer_id: int) -> CustomerState:
        """Return what the store knows about a customer (defaults if never seen)."""
        async with self._read() as db:
            row = await _one(db, "SELECT * FROM customers WHERE customer_id = ?", (customer_id,))
        return _customer_state(customer_id, row)

    async def set_list_id(self, customer_id: int, list_id: str) -> None:
        """Record the id of the customer's Klaviyo list."""
        async with self._write() as db:
            await _ensure_customer(db, customer_id)
            await db.execute("UPDATE customers SET list_id = ? WHERE customer_id = ?", (list_id, customer_id))

    async def set_key_health(self, customer_id: int, healthy: bool, error: str | None, now: datetime) -> bool:
        """Record whether the customer's Klaviyo key works; return True if that changed."""
        async with self._write() as db:
            await _ensure_customer(db, customer_id)
            row = await _one(db, "SELECT key_healthy FROM customers WHERE customer_id = ?", (customer_id,))
            await db.execute(
                """UPDATE customers SET key_healthy = ?, key_error = ?, key_checked_at = ?
                   WHERE customer_id = ?""",
                (int(healthy), _clip(error), _iso(now), customer_id),
            )
        return row is None or bool(row["key_healthy"]) != healthy

    async def record_poll(self, customer_id: int, now: datetime, ok: bool, error: str | None) -> None:
        """Record a poll's outcome: success clears the last error, failure records it."""
        stamp = _iso(now)
        async with self._write() as db:
            await _ensure_customer(db, customer_id)
            await db.execute(
                """UPDATE customers SET last_poll_at = ?,
                     last_poll_ok_at = CASE WHEN ? THEN ? ELSE last_poll_ok_at END,
                     last_error = CASE WHEN ? THEN NULL ELSE ? END
                   WHERE customer_id = ?""",
                (stamp, ok, stamp, ok, _clip(error), customer_id),
            )

    async def record_klaviyo_error(self, customer_id: int, error: str, now: datetime) -> None:
        """Record a Klaviyo failure of the customer; the streak starts at the first one since a success."""
        stamp = _iso(now)
        async with self._write() as db:
            await _ensure_customer(db, customer_id)
            await db.execute(
                """UPDATE customers SET klaviyo_error = ?, klaviyo_error_at = ?,
                     klaviyo_failing_since = coalesce(klaviyo_failing_since, ?)
                   WHERE customer_id = ?""",
                (_clip(error), stamp, stamp, customer_id),
            )

    async def clear_klaviyo_streak(self, customer_id: int) -> None:
        """End the customer's Klaviyo failure streak (the last error stays on record for ``status``)."""
        async with self._write() as db:
            await db.execute("UPDATE customers SET klaviyo_failing_since = NULL WHERE customer_id = ?",
                             (customer_id,))

    async def record_reconcile(self, customer_id: int, now: datetime) -> None:
        """Record that a reconcile sweep of the customer completed at ``now``."""
        async with self._write() as db:
            await _ensure_customer(db, customer_id)
            await db.execute(
                "UPDATE customers SET reconciled_at = ? WHERE customer_id = ?", (_iso(now), customer_id)
            )

    # -- mapping memory ------------------------------------------------------------------------------------

    async def load_memory(self, customer_id: int, order_ids: Iterable[int]) -> dict[int, OrderMemory]:
        """Return the remembered status and announced events of those orders the store knows."""
        found: dict[int, OrderMemory] = {}
        async with self._read() as db:
            for chunk in _chunks(dict.fromkeys(order_ids)):
                rows = await _all(
                    db,
                    "SELECT order_id, status, announced FROM orders "
                    f"WHERE customer_id = ? AND order_id IN ({_marks(len(chunk))})",
                    (customer_id, *chunk),
                )
                for r in rows:
                    found[int(r["order_id"])] = OrderMemory(int(r["status"]), _kinds(int(r["announced"])))
        return found

    async def orders_to_reconcile(
        self,
        customer_id: int,
        statuses: Iterable[int],
        unannounced: EventKind,
        since: datetime,
        *,
        after_id: int = 0,
        limit: int = _CHUNK,
    ) -> list[int]:
        """Return ids (ascending, above ``after_id``) of orders whose status is one of ``statuses``, set at or
        after ``since``, and whose ``unannounced`` event has not been announced."""
        codes = sorted(set(statuses))
        if not codes:
            return []
        async with self._read() as db:
            rows = await _all(
                db,
                "SELECT order_id FROM orders WHERE customer_id = ? AND order_id > ? "
                f"AND status IN ({_marks(len(codes))}) AND status_at >= ? AND announced & ? = 0 "
                "ORDER BY order_id LIMIT ?",
                (customer_id, after_id, *codes, _epoch(since), _EVENT_BITS[unannounced], limit),
            )
        return [int(r[0]) for r in rows]

    async def load_names(self, customer_id: int, emails: Iterable[str]) -> dict[str, ProfileName]:
        """Return the name last queued for each known email."""
        found: dict[str, ProfileName] = {}
        async with self._read() as db:
            for chunk in _chunks(dict.fromkeys(emails)):
                rows = await _all(
                    db,
                    "SELECT email, first_name, last_name, organization, name_source FROM profiles "
                    f"WHERE customer_id = ? AND email IN ({_marks(len(chunk))})",
                    (customer_id, *chunk),
                )
                found.update((str(r["email"]), _profile_name(r)) for r in rows)
        return found

    # -- queueing ------------------------------------------------------------------------------------------

    async def commit_page(
        self,
        customer_id: int,
        plan: Plan,
        cursor: tuple[datetime, int] | None,
        malformed: Sequence[MalformedOrder],
        now: datetime,
        *,
        status_at: Mapping[int, datetime] | None = None,
        email_invalid: Mapping[int, bool] | None = None,
    ) -> int:
        """Commit one page's memory, names, outbox rows, malformed orders and cursor atomically.

        ``status_at`` gives when each order's status was set (its ``updated_at``); orders missing from it
        count as set ``now``. ``email_invalid`` says, per order read, whether its email is invalid (it is then
        listed for ``status`` until a later read finds a valid one). Returns how many outbox rows became pending
        that were not: new rows, plus sent or dead profile rows queued again. Replacing the payload of a
        still-pending profile row does not count.
        """
        # A queued profile's name counts as sent unless plan.names says otherwise.
        names = {p.email: p.name for p in plan.profiles} | plan.names
        times = status_at or {}
        stamps = {oid: _epoch(times.get(oid, now)) for oid in plan.orders}
        async with self._write() as db:
            await _ensure_customer(db, customer_id)
            await _upsert_orders(db, customer_id, plan.orders, stamps)
            await _upsert_names(db, customer_id, names)
            queued = await _queue_profiles(db, customer_id, plan.profiles, now)
            queued += await _queue_events(db, customer_id, plan.events, now)
            await _clear_malformed(db, customer_id, plan.orders)
            await _record_malformed(db, customer_id, malformed, now)
            await _record_invalid_emails(db, customer_id, email_invalid or {}, now)
            if cursor is not None:
                await _set_cursor(db, customer_id, cursor)
            failpoints.hit("during_cursor_update")
        return queued

    async def queue_setup(
        self,
        customer_id: int,
        list_id: str,
        profile: ProfileChange,
        events: Sequence[EventRow],
        now: datetime,
    ) -> None:
        """Queue a new customer's default profile and sample events, and mark its setup done, atomically."""
        async with self._write() as db:
            await _ensure_customer(db, customer_id)
            await _upsert_names(db, customer_id, {profile.email: profile.name})
            await _queue_profiles(db, customer_id, [profile], now)
            await _queue_events(db, customer_id, events, now)
            await db.execute(
                "UPDATE customers SET list_id = ?, setup_done = 1 WHERE customer_id = ?",
                (list_id, customer_id),
            )

    async def queue_samples(self, customer_id: int, events: Sequence[EventRow], now: datetime) -> int:
        """Queue sample events this customer never had (one per metric it gets); return how many were new."""
        async with self._write() as db:
            await _ensure_customer(db, customer_id)
            return await _queue_events(db, customer_id, events, now)

    async def drop_pending_events(self, customer_id: int, kinds: Iterable[EventKind]) -> int:
        """Delete the customer's unsent event rows announcing any of ``kinds`` (events it no longer gets).

        The order memory keeps those milestones announced, so the rows are never queued again; the customer's
        ``dropped_rows`` counts them for ``status``. Returns how many were dropped.
        """
        names = [kind.value for kind in kinds]
        if not names:
            return 0
        # "{order}:{kind}", "sample:{kind}" and "sample:{kind}:{metric}" (a metric name may hold colons too).
        one = ("(key NOT GLOB 'sample:*' AND key GLOB '*:' || ?) OR key = 'sample:' || ? "
               "OR key GLOB 'sample:' || ? || ':*'")
        matches = " OR ".join(f"({one})" for _ in names)
        async with self._write() as db:
            dropped = await _run(
                db, f"DELETE FROM outbox WHERE customer_id = ? AND kind = 'event' AND {_PENDING} AND ({matches})",
                (customer_id, *(value for name in names for value in (name, name, name))),
            )
            await _count_dropped(db, customer_id, dropped)
        return dropped

    async def drop_rows(self, rows: Sequence[OutboxRow]) -> int:
        """Delete these unsent rows (of one customer) and count them as dropped; return how many went."""
        if not rows:
            return 0
        async with self._write() as db:
            dropped = await _run_many(
                db, f"DELETE FROM outbox WHERE id = ? AND version = ? AND {_PENDING}",
                [(row.id, row.version) for row in rows],
            )
            await _count_dropped(db, rows[0].customer_id, dropped)
        return dropped

    # -- sending -------------------------------------------------------------------------------------------

    async def due_rows(
        self, customer_id: int, now: datetime, limit: int, kind: RowKind | None = None
    ) -> list[OutboxRow]:
        """Return up to ``limit`` pending rows due at ``now``, oldest first."""
        async with self._read() as db:
            rows = await _all(
                db,
                "SELECT id, customer_id, kind, key, payload, version, attempts FROM outbox "
                f"WHERE customer_id = ? AND {_PENDING} AND next_attempt_at <= ? AND (? IS NULL OR kind = ?) "
                "ORDER BY id LIMIT ?",
                (customer_id, _iso(now), kind, kind, limit),
            )
        return [_outbox_row(r) for r in rows]

    async def next_due_at(self, customer_id: int) -> datetime | None:
        """Return when the customer's earliest pending row is due, or None if nothing is pending."""
        async with self._read() as db:
            row = await _one(
                db,
                f"SELECT min(next_attempt_at) FROM outbox WHERE customer_id = ? AND {_PENDING}",
                (customer_id,),
            )
        return None if row is None else _opt_dt(row[0])

    async def mark_sent(self, row: OutboxRow, now: datetime, profile_id: str | None = None) -> bool:
        """Mark a row sent after Klaviyo's 2xx; return False if it was replaced (it then stays pending)."""
        async with self._write() as db:
            changed = await _run(
                db,
                f"UPDATE outbox SET sent_at = ? WHERE id = ? AND version = ? AND {_PENDING}",
                (_iso(now), row.id, row.version),
            )
            # The id belongs to the email whatever payload carried it, so record it even for a stale version.
            if profile_id is not None and row.kind == "profile":
                await _record_profile_id(db, row.customer_id, row.key, profile_id)
        return changed == 1

    async def mark_retry(
        self, row: OutboxRow, now: datetime, next_attempt_at: datetime, error: str, status: int | None
    ) -> None:
        """Count a failed attempt and schedule the next one (a replaced row is left as it is)."""
        async with self._write() as db:
            await _run(
                db,
                """UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,
                     last_status = ?
                   WHERE id = ? AND version = ? AND """ + _PENDING,
                (_iso(next_attempt_at), _clip(error), status, row.id, row.version),
            )

    async def mark_dead(self, row: OutboxRow, now: datetime, status: int | None, response: str) -> None:
        """Dead-letter a row Klaviyo refused for what it is (a replaced row keeps its new payload pending)."""
        async with self._write() as db:
            await _run(
                db,
                """UPDATE outbox SET attempts = attempts + 1, dead_at = ?, last_status = ?, response = ?
                   WHERE id = ? AND version = ? AND """ + _PENDING,
                (_iso(now), status, _clip(response), row.id, row.version),
            )

    async def pending_list_members(self, customer_id: int, limit: int = 1000) -> list[str]:
        """Return profile ids that still have to be added to the customer's list."""
        async with self._read() as db:
            rows = await _all(
                db,
                """SELECT DISTINCT profile_id FROM profiles
                   WHERE customer_id = ? AND on_list = 0 AND profile_id IS NOT NULL
                   ORDER BY profile_id LIMIT ?""",
                (customer_id, limit),
            )
        return [str(r[0]) for r in rows]

    async def mark_on_list(self, customer_id: int, profile_ids: Sequence[str]) -> None:
        """Record that these profiles joined the customer's list."""
        async with self._write() as db:
            # Without ANALYZE statistics SQLite scans the customer's primary-key range instead (seconds per
            # batch at 100k profiles); INDEXED BY also fails loudly should the index ever become unusable.
            await _run_many(
                db,
                """UPDATE profiles INDEXED BY profiles_off_list SET on_list = 1
                   WHERE customer_id = ? AND profile_id = ? AND on_list = 0 AND profile_id IS NOT NULL""",
                [(customer_id, pid) for pid in profile_ids],
            )

    # -- dead letters --------------------------------------------------------------------------------------

    async def dead_rows(self, customer_id: int | None) -> list[DeadRow]:
        """Return dead-lettered rows of one customer (or all customers), oldest first."""
        where, params = _dead_filter(customer_id, None)
        async with self._read() as db:
            rows = await _all(
                db,
                "SELECT id, customer_id, kind, key, last_status, response, dead_at, attempts FROM outbox "
                f"WHERE {where} ORDER BY id",
                params,
            )
        return [_dead_row(r) for r in rows]

    async def replay_dead(self, customer_id: int | None, row_ids: Sequence[int] | None, now: datetime) -> int:
        """Make dead rows (all, or those ids) of a customer (or all) pending again; return how many."""
        chunks: list[list[int] | None] = [None] if row_ids is None else list(_chunks(row_ids))
        replayed = 0
        async with self._write() as db:
            for chunk in chunks:
                where, params = _dead_filter(customer_id, chunk)
                replayed += await _run(
                    db,
                    "UPDATE outbox SET dead_at = NULL, attempts = 0, version = version + 1, "
                    f"next_attempt_at = ? WHERE {where}",
                    [_iso(now), *params],
                )
        return replayed

    # -- reporting -----------------------------------------------------------------------------------------

    async def counts(self, customer_id: int, since: datetime) -> Counts:
        """Count the customer's queued, sent (total, since ``since``) and dead rows, malformed orders and
        orders with an invalid email; say when the oldest row still waiting was queued."""
        async with self._read() as db:
            row = await _one(
                db,
                f"""SELECT coalesce(sum({_PENDING}), 0), coalesce(sum(sent_at IS NOT NULL), 0),
                      coalesce(sum(sent_at >= ?), 0), coalesce(sum(dead_at IS NOT NULL), 0),
                      min(CASE WHEN {_PENDING} THEN created_at END)
                    FROM outbox WHERE customer_id = ?""",
                (_iso(since), customer_id),
            )
            bad = await _one(
                db,
                """SELECT (SELECT count(*) FROM malformed WHERE customer_id = ?),
                          (SELECT count(*) FROM invalid_emails WHERE customer_id = ?)""",
                (customer_id, customer_id),
            )
        q, s, ss, d = (0, 0, 0, 0) if row is None else (int(v or 0) for v in tuple(row)[:4])
        malformed, invalid = (0, 0) if bad is None else (int(bad[0]), int(bad[1]))
        oldest = None if row is None else _opt_dt(row[4])
        return Counts(queued=q, sent=s, sent_since=ss, dead=d, malformed=malformed, invalid_email=invalid,
                      oldest_queued_at=oldest)

    async def profiles_with_ref(self, ref: str) -> list[tuple[int, str]]:
        """Return (customer id, email) of every known profile whose log reference is ``ref``."""
        async with self._read() as db:
            rows = await _all(
                db,
                "SELECT customer_id, email FROM profiles UNION "
                "SELECT customer_id, key FROM outbox WHERE kind = 'profile' ORDER BY 1, 2",
            )
        wanted = ref.strip().lower()
        return [(int(r[0]), str(r[1])) for r in rows if logs.keyed_ref(self.profile_key, str(r[1])) == wanted]

    async def backup_into(self, dest: Path) -> int:
        """Write a consistent copy of the whole database to ``dest`` (which must not exist); return its size.

        ``VACUUM INTO`` reads one snapshot (a running daemon keeps writing meanwhile) and works on a read-only
        connection; the copy is owner-only, like the database: it holds the Whiplash refresh token.
        """
        await asyncio.to_thread(_reserve_private_file, dest)
        try:
            async with self._read() as db:
                await db.execute("VACUUM INTO ?", (str(dest),))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write backup {dest}: {exc}") from exc
        return await asyncio.to_thread(os.path.getsize, dest)

    async def integrity_ok(self) -> bool:
        """Run the full PRAGMA integrity_check and tell whether it passed."""
        async with self._read() as db:
            rows = await _all(db, "PRAGMA integrity_check")
        return [str(r[0]) for r in rows] == ["ok"]

    # -- Whiplash token ------------------------------------------------------------------------------------

    async def load_whiplash_token(self) -> TokenRecord | None:
        """Return the saved Whiplash token record, if any."""
        async with self._read() as db:
            row = await _one(db, "SELECT * FROM whiplash_token WHERE id = 1")
        if row is None:
            return None
        return TokenRecord(
            access_token=str(row["access_token"]),
            expires_at=_dt(row["expires_at"]),
            refresh_token=_opt_str(row["refresh_token"]),
            seed_fingerprint=str(row["seed_fingerprint"]),
        )

    async def save_whiplash_token(self, rec: TokenRecord) -> None:
        """Replace the Whiplash token record durably (committed before this returns)."""
        async with self._write() as db:
            await db.execute(
                """INSERT INTO whiplash_token (id, access_token, expires_at, refresh_token, seed_fingerprint)
                   VALUES (1, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET access_token = excluded.access_token,
                     expires_at = excluded.expires_at, refresh_token = excluded.refresh_token,
                     seed_fingerprint = excluded.seed_fingerprint""",
                (rec.access_token, _iso(rec.expires_at), rec.refresh_token, rec.seed_fingerprint),
            )

    # =====================================================================================================
    # Bulk delivery and retention (issue 5). Additions only: nothing else in this module changes behaviour.
    # - Batch marks apply the same version guard as mark_sent/mark_retry, for many rows in ONE transaction
    #   (one fsync instead of one per row, which is what bounds a bulk backfill otherwise).
    # - A profile import job adds its profiles to the list by email, without telling us their Klaviyo ids:
    #   such profiles are recorded as on_list = 1 with whatever profile_id we knew (possibly NULL). Should a
    #   later single upsert return a new id, _record_profile_id sees a changed id and re-adds it: harmless.
    # - Retention (compact_sent) blanks the payloads of event rows sent before a cutoff: the row and its UNIQUE
    #   key stay, as does order memory, so no event can be queued or sent twice; only the bytes of an
    #   already-sent body go. Sent profile rows before the cutoff are deleted outright: a profile's name lives
    #   in `profiles`, and a later change queues a fresh row exactly as it would have re-queued the old one.
    #   (Counts.sent then counts the retained rows only.)

    async def mark_sent_many(self, rows: Sequence[OutboxRow], now: datetime) -> int:
        """Mark rows sent in one transaction once Klaviyo accepted the request carrying them; return how many."""
        stamp = _iso(now)
        async with self._write() as db:
            return await _run_many(
                db,
                f"UPDATE outbox SET sent_at = ? WHERE id = ? AND version = ? AND {_PENDING}",
                [(stamp, row.id, row.version) for row in rows],
            )

    async def mark_retry_many(
        self, rows: Sequence[OutboxRow], now: datetime, next_attempt_at: datetime, error: str, status: int | None
    ) -> None:
        """Count a failed attempt of each row and schedule the next, in one transaction (replaced rows untouched)."""
        params = (_iso(next_attempt_at), _clip(error), status)
        async with self._write() as db:
            await _run_many(
                db,
                """UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,
                     last_status = ?
                   WHERE id = ? AND version = ? AND """ + _PENDING,
                [(*params, row.id, row.version) for row in rows],
            )

    async def mark_listed_by_import(self, customer_id: int, emails: Sequence[str]) -> None:
        """Record that a bulk import job added these emails' profiles to the customer's list."""
        async with self._write() as db:
            await _ensure_customer(db, customer_id)
            await _run_many(
                db,
                """INSERT INTO profiles (customer_id, email, on_list) VALUES (?, ?, 1)
                   ON CONFLICT (customer_id, email) DO UPDATE SET on_list = 1""",
                [(customer_id, email) for email in emails],
            )

    async def compact_sent(self, sent_before: datetime) -> int:
        """Shrink what was sent before ``sent_before``: blank event payloads, drop profile rows; return rows touched."""
        cutoff = (_iso(sent_before),)
        async with self._write() as db:
            blanked = await _run(
                db,
                """UPDATE outbox SET payload = '', last_error = NULL, response = NULL
                   WHERE kind = 'event' AND sent_at IS NOT NULL AND sent_at < ? AND payload != ''""",
                cutoff,
            )
            dropped = await _run(
                db, "DELETE FROM outbox WHERE kind = 'profile' AND sent_at IS NOT NULL AND sent_at < ?", cutoff
            )
        return blanked + dropped

    # ===================================================================================== end of issue 5

    # -- operations commands: dead-letter inspection (added for `klaviyo-bridge dead-letters show`) ---------

    async def dead_letter(self, row_id: int) -> DeadLetter | None:
        """Return one dead-lettered row in full (payload, Klaviyo's response), or None if no such dead row."""
        async with self._read() as db:
            row = await _one(
                db,
                "SELECT id, customer_id, kind, key, payload, version, attempts, created_at, dead_at, last_status, "
                "last_error, response FROM outbox WHERE id = ? AND dead_at IS NOT NULL",
                (row_id,),
            )
        return None if row is None else _dead_letter(row)


# ---------------------------------------------------------------------------------------------------------
# Operations commands: a dead letter in full (kept together so other additions to this module stay apart)


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


def _dead_letter(row: sqlite3.Row) -> DeadLetter:
    """Build a DeadLetter from a selected row."""
    return DeadLetter(
        id=int(row["id"]),
        customer_id=int(row["customer_id"]),
        kind=cast(RowKind, row["kind"]),
        key=str(row["key"]),
        payload=str(row["payload"]),
        version=int(row["version"]),
        attempts=int(row["attempts"]),
        created_at=_dt(row["created_at"]),
        dead_at=_dt(row["dead_at"]),
        status=_opt_int(row["last_status"]),
        last_error=_opt_str(row["last_error"]),
        response=str(row["response"] or ""),
    )


__all__ = [
    "SCHEMA_VERSION",
    "Counts",
    "CustomerState",
    "DeadLetter",
    "DeadRow",
    "OutboxRow",
    "RowKind",
    "Store",
]

