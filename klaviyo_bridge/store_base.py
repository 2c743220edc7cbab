"""The store facade's connection: opening the database, one lock, transactions, sqlite3's errors → StoreError,
and the poll outcomes written in batches.

``StoreBase`` is the bottom layer of ``store.Store`` (through ``store_delivery.DeliveryStore``): the machinery
every facade method runs on. Invariants:
- one writer connection; every write is one ``BEGIN IMMEDIATE`` transaction (``_write``), and an ``asyncio.Lock``
  serialises all use of the connection, so concurrent customer tasks never interleave statements;
- sqlite3's errors never leave ``_read`` or ``_write``: they become ``errors.StoreError`` naming the database;
- a read-only store refuses every write before it takes the lock;
- recorded poll outcomes wait at most ``POLL_FLUSH_S`` (and are flushed at close); a failed flush keeps them for
  the next one, newer records winning;
- the random key under which log lines name profiles (``logs.profile_ref``) is registered when opened.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import aiosqlite

from . import logs
from .errors import StoreError
from .store_rows import PendingPoll, clip, iso, merge_poll, write_polls
from .store_schema import (
    check_health,
    check_version_readonly,
    configure_writer,
    connect,
    migrate,
    profile_key,
    transaction,
)

# The facade's logger, whichever of its modules writes: operators know (and filter) these lines by that name.
log = logging.getLogger("klaviyo_bridge.store")

POLL_FLUSH_S = 2.0  # poll outcomes of every customer are written together this often


class StoreBase:
    """The connection under the store facade: one serialised writer, its transactions, polls written in batches."""

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
        self._polls: dict[int, PendingPoll] = {}  # poll outcomes not yet written (record_poll)
        self._flush_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path, *, readonly: bool = False) -> Self:
        """Open (creating and migrating unless ``readonly``) the state database at ``path``."""
        path = Path(path)
        db = await connect(path, readonly)
        try:
            await check_health(db, path)
            if readonly:
                await check_version_readonly(db, path)
            else:
                await configure_writer(db, path)
                await migrate(db, path)
            key = await profile_key(db)
        except BaseException:
            await db.close()
            raise
        logs.register_profile_key(key)
        return cls(db, path, readonly, key)

    @classmethod
    async def open_readonly(cls, path: Path) -> Self:
        """Open the database read-only, e.g. for ``status`` while the daemon runs."""
        return await cls.open(path, readonly=True)

    @property
    def path(self) -> Path:
        """Return the database path."""
        return self._path

    async def close(self) -> None:
        """Write the recorded polls, then close the connection once any running transaction has finished."""
        if self._flush_task is not None:
            self._flush_task.cancel()
            await asyncio.gather(self._flush_task, return_exceptions=True)
        if not self._readonly:
            try:
                await self.flush_polls()
            except StoreError as exc:
                log.error("poll outcomes not recorded at close error=%s", exc)
        async with self._lock:
            await self._db.close()

    async def __aenter__(self) -> Self:
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
                async with transaction(self._db) as db:
                    yield db

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate sqlite3's errors (locked, disk full, I/O) into the package's own, naming the database."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"state database {self._path}: {exc}") from exc

    # -- poll outcomes -------------------------------------------------------------------------------------

    async def record_poll(
        self, customer_id: int, now: datetime, ok: bool, error: str | None, *, interval_s: float | None = None
    ) -> None:
        """Record a poll's outcome (success clears the last error, failure records it) and the interval achieved.

        Written within POLL_FLUSH_S, together with every other customer's: a thousand idle customers would
        otherwise pay one fsync'd transaction per poll. This store's reads see it at once; a crash loses at
        most those seconds of poll times, which only ``status`` shows.
        """
        iso(now)  # a naive time is refused here, by the caller, not later by the flush
        self._polls[customer_id] = merge_poll(self._polls.get(customer_id), now, ok, clip(error), interval_s)
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_later(), name="store-polls")

    async def flush_polls(self) -> None:
        """Write the poll outcomes recorded since the last flush, all in one transaction."""
        pending, self._polls = self._polls, {}
        if not pending:
            return
        try:
            async with self._write() as db:
                await write_polls(db, pending)
        except BaseException:
            self._polls = pending | self._polls  # kept for the next flush; newer records win
            raise

    async def _flush_later(self) -> None:
        """Flush the recorded polls after POLL_FLUSH_S; a failed write is logged and retried with the next."""
        try:
            await asyncio.sleep(POLL_FLUSH_S)
            await self.flush_polls()
        except StoreError as exc:
            log.error("poll outcomes not recorded customers=%d error=%s action=%s", len(self._polls), exc,
                      "retried with the next poll; check the state DB's disk (space, permissions, other processes)")
        finally:
            self._flush_task = None
