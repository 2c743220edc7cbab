"""The state database's schema, its migrations, and opening it safely: the file side of the store.

Invariants:
- migrations are append-only: entry i takes ``user_version`` i to i + 1 in ONE transaction (schema change and
  version together), re-checking the version under the write lock, so a crash mid-upgrade leaves the old
  version, migrated again at the next start;
- a file that is not SQLite, fails ``quick_check``, holds someone else's tables or has a newer schema is
  refused, never recreated: starting from an empty database would re-send every order's history;
- a missing database file is created owner-only (it holds the Whiplash refresh token) and announced by one
  WARNING; a missing folder never is: a mistyped path must not start from scratch;
- the writer runs in WAL mode with ``synchronous=FULL`` and foreign keys on, every write a ``BEGIN IMMEDIATE``
  transaction (a deferred read-then-write could hit SQLITE_BUSY without honouring the busy timeout);
- migration v3 makes the random key under which log lines name profiles (``meta.profile_ref_key``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Final

import aiosqlite

from .errors import StoreError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS: Final = 5000

SCHEMA_V1: Final = (
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

Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


async def _migrate_v1(db: aiosqlite.Connection) -> None:
    """Create the initial schema."""
    for statement in SCHEMA_V1:
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


async def _migrate_v4(db: aiosqlite.Connection) -> None:
    """Mark history rows (sent by full bulk requests, not one by one) and record each customer's real interval."""
    await db.execute("ALTER TABLE outbox ADD COLUMN history INTEGER NOT NULL DEFAULT 0")
    # Queued backfill events are history; queued profiles stay live (sent at once, as before the upgrade).
    await db.execute(
        """UPDATE outbox SET history = 1 WHERE kind = 'event' AND sent_at IS NULL AND dead_at IS NULL
             AND json_extract(payload, '$.backfill') = 1"""
    )
    await db.execute("ALTER TABLE customers ADD COLUMN poll_interval_s REAL")

# Append-only: entry i migrates user_version i to i + 1. Never edit a released migration.
_MIGRATIONS: Final[tuple[Migration, ...]] = (_migrate_v1, _migrate_v2, _migrate_v3, _migrate_v4)

SCHEMA_VERSION: Final = len(_MIGRATIONS)


def _corrupt_message(path: Path, detail: str) -> str:
    """Explain to ops what to do (and not do) with an unreadable state database."""
    return (
        f"state database {path} is corrupt or not a SQLite database ({detail}). Do NOT delete or replace it "
        "blindly: a fresh database would re-send every order's history to Klaviyo. Keep the daemon stopped "
        "and the file in place with its -wal/-shm companions, then restore a backup or salvage it with "
        f"`sqlite3 {path} .recover`."
    )


async def fetch_all(db: aiosqlite.Connection, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
    """Run a query and return every row."""
    return list(await db.execute_fetchall(sql, params))


async def fetch_one(db: aiosqlite.Connection, sql: str, params: Sequence[object] = ()) -> sqlite3.Row | None:
    """Run a query and return its first row, if any."""
    rows = await fetch_all(db, sql, params)
    return rows[0] if rows else None


async def run(db: aiosqlite.Connection, sql: str, params: Sequence[object] = ()) -> int:
    """Run a write statement and return how many rows it changed."""
    cursor = await db.execute(sql, params)
    try:
        return cursor.rowcount
    finally:
        await cursor.close()


async def run_many(db: aiosqlite.Connection, sql: str, rows: Iterable[Sequence[object]]) -> int:
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
async def transaction(db: aiosqlite.Connection) -> AsyncIterator[aiosqlite.Connection]:
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


async def profile_key(db: aiosqlite.Connection) -> bytes:
    """Return the key under which log lines name profiles (made once, by migration v3)."""
    row = await fetch_one(db, "SELECT value FROM meta WHERE name = 'profile_ref_key'")
    if row is None:
        raise StoreError("state database lacks its profile reference key (meta.profile_ref_key)")
    return bytes(row[0])


async def _user_version(db: aiosqlite.Connection) -> int:
    """Return the schema version recorded in the database header."""
    row = await fetch_one(db, "PRAGMA user_version")
    return 0 if row is None else int(row[0])


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


def reserve_private_file(dest: Path) -> None:
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


async def connect(path: Path, readonly: bool) -> aiosqlite.Connection:
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


async def check_health(db: aiosqlite.Connection, path: Path) -> None:
    """Refuse a file that is not SQLite or fails quick_check."""
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        rows = await fetch_all(db, "PRAGMA quick_check")
    except sqlite3.OperationalError as exc:
        raise StoreError(f"cannot read state database {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreError(_corrupt_message(path, str(exc))) from exc
    verdict = [str(row[0]) for row in rows]
    if verdict != ["ok"]:
        raise StoreError(_corrupt_message(path, "quick_check: " + "; ".join(verdict[:5])))


async def configure_writer(db: aiosqlite.Connection, path: Path) -> None:
    """Set the durability pragmas of the writer connection."""
    row = await fetch_one(db, "PRAGMA journal_mode = WAL")
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
    row = await fetch_one(db, "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
    return row is not None and int(row[0]) > 0


async def _apply_migration(db: aiosqlite.Connection, path: Path, target: int) -> None:
    """Migrate to ``target`` in one transaction, re-checking the version under the write lock."""
    async with transaction(db):
        current = await _user_version(db)
        if current >= target:
            return
        if current == 0 and await _has_foreign_objects(db):
            raise StoreError(f"{path} is a SQLite database but not klaviyo-bridge's; refusing to touch it")
        await _MIGRATIONS[target - 1](db)
        # user_version lives in the header page, so it commits (or rolls back) with the schema change.
        await db.execute(f"PRAGMA user_version = {int(target)}")
    log.info("state database migrated path=%s schema=v%d", path, target)


async def migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Bring the schema up to SCHEMA_VERSION; refuse a newer one."""
    version = await _user_version(db)
    if version > SCHEMA_VERSION:
        raise StoreError(_newer_schema_message(path, version))
    for target in range(version + 1, SCHEMA_VERSION + 1):
        await _apply_migration(db, path, target)


async def check_version_readonly(db: aiosqlite.Connection, path: Path) -> None:
    """Refuse to read a database whose schema differs from this program's."""
    version = await _user_version(db)
    if version > SCHEMA_VERSION:
        raise StoreError(_newer_schema_message(path, version))
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"state database {path} has schema v{version}, this klaviyo-bridge expects v{SCHEMA_VERSION}; "
            "start the daemon once so it migrates the database"
        )
