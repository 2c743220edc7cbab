"""The sender's side of the store facade: due rows, settling each send (sent, retried, dead, dropped), the Klaviyo
list's members, and dead letters with their replay.

``DeliveryStore`` is the middle layer of ``store.Store``, which callers use. Invariants:
- a row is settled only in the ``version`` that was read and only while pending: a profile row replaced meanwhile
  keeps its new payload pending, and a row sent or dead-lettered meanwhile is left as it is;
- the rows of one bulk request are settled in one transaction (one fsync), each with that version guard;
- a replayed row is pending again with its attempts reset and a new ``version``;
- a profile joins the customer's list under its Klaviyo id; a new id makes it join again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from .store_base import StoreBase
from .store_outbox import (
    PENDING,
    DeadLetter,
    DeadRow,
    OutboxRow,
    RowKind,
    dead_filter,
    dead_letter,
    dead_row,
    mark_rows_sent,
    outbox_row,
)
from .store_rows import chunks, clip, count_dropped, ensure_customer, iso, opt_dt, record_profile_id
from .store_schema import fetch_all, fetch_one, run, run_many


class DeliveryStore(StoreBase):
    """The store's methods for the sender and for ops' dead letters (``store.Store`` adds the rest)."""

    # -- due rows ------------------------------------------------------------------------------------------

    async def due_rows(
        self, customer_id: int, now: datetime, limit: int, kind: RowKind | None = None, *,
        history: bool | None = None,
    ) -> list[OutboxRow]:
        """Return up to ``limit`` pending rows due at ``now`` (of one kind, history or live), oldest first."""
        flag = None if history is None else int(history)
        async with self._read() as db:
            rows = await fetch_all(
                db,
                "SELECT id, customer_id, kind, key, payload, version, attempts, history FROM outbox "
                f"WHERE customer_id = ? AND {PENDING} AND next_attempt_at <= ? AND (? IS NULL OR kind = ?) "
                "AND (? IS NULL OR history = ?) ORDER BY id LIMIT ?",
                (customer_id, iso(now), kind, kind, flag, flag, limit),
            )
        return [outbox_row(r) for r in rows]

    async def count_due(self, customer_id: int, now: datetime, kind: RowKind, *, history: bool) -> int:
        """Return how many pending rows of one kind, history or live, are due at ``now``."""
        async with self._read() as db:
            row = await fetch_one(
                db,
                f"SELECT count(*) FROM outbox WHERE customer_id = ? AND {PENDING} AND next_attempt_at <= ? "
                "AND kind = ? AND history = ?",
                (customer_id, iso(now), kind, int(history)),
            )
        return 0 if row is None else int(row[0])

    async def next_due_at(self, customer_id: int) -> datetime | None:
        """Return when the customer's earliest pending row is due, or None if nothing is pending."""
        async with self._read() as db:
            row = await fetch_one(
                db,
                f"SELECT min(next_attempt_at) FROM outbox WHERE customer_id = ? AND {PENDING}",
                (customer_id,),
            )
        return None if row is None else opt_dt(row[0])

    async def customers_due(self, now: datetime) -> set[int]:
        """Return every customer with a pending row due by ``now``: one query for all of them (the daemon's watch)."""
        async with self._read() as db:
            rows = await fetch_all(
                db,
                f"SELECT DISTINCT customer_id FROM outbox WHERE {PENDING} AND next_attempt_at <= ?",
                (iso(now),),
            )
        return {int(row[0]) for row in rows}

    # -- settling a send -----------------------------------------------------------------------------------

    async def mark_sent(self, row: OutboxRow, now: datetime, profile_id: str | None = None) -> bool:
        """Mark a row sent after Klaviyo's 2xx; return False if it was replaced (it then stays pending)."""
        async with self._write() as db:
            changed = await mark_rows_sent(db, [row], now)
            # The id belongs to the email whatever payload carried it, so record it even for a stale version.
            if profile_id is not None and row.kind == "profile":
                await record_profile_id(db, row.customer_id, row.key, profile_id)
        return changed == 1

    async def mark_sent_many(self, rows: Sequence[OutboxRow], now: datetime) -> int:
        """Mark rows sent in one transaction once Klaviyo accepted the request carrying them; return how many.

        One transaction (one fsync) for a whole bulk request, with mark_sent's version guard per row.
        """
        async with self._write() as db:
            return await mark_rows_sent(db, rows, now)

    async def mark_retry(
        self, row: OutboxRow, now: datetime, next_attempt_at: datetime, error: str, status: int | None
    ) -> None:
        """Count a failed attempt and schedule the next one (a replaced row is left as it is)."""
        await self.mark_retry_many([row], now, next_attempt_at, error, status)

    async def mark_retry_many(
        self, rows: Sequence[OutboxRow], now: datetime, next_attempt_at: datetime, error: str, status: int | None
    ) -> None:
        """Count a failed attempt of each row and schedule the next, in one transaction (replaced rows untouched)."""
        params = (iso(next_attempt_at), clip(error), status)
        async with self._write() as db:
            await run_many(
                db,
                """UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,
                     last_status = ?
                   WHERE id = ? AND version = ? AND """ + PENDING,
                [(*params, row.id, row.version) for row in rows],
            )

    async def mark_dead(self, row: OutboxRow, now: datetime, status: int | None, response: str) -> None:
        """Dead-letter a row Klaviyo refused for what it is (a replaced row keeps its new payload pending)."""
        async with self._write() as db:
            await run(
                db,
                """UPDATE outbox SET attempts = attempts + 1, dead_at = ?, last_status = ?, response = ?
                   WHERE id = ? AND version = ? AND """ + PENDING,
                (iso(now), status, clip(response), row.id, row.version),
            )

    async def drop_rows(self, rows: Sequence[OutboxRow]) -> int:
        """Delete these unsent rows (of one customer) and count them as dropped; return how many went."""
        if not rows:
            return 0
        async with self._write() as db:
            dropped = await run_many(
                db, f"DELETE FROM outbox WHERE id = ? AND version = ? AND {PENDING}",
                [(row.id, row.version) for row in rows],
            )
            await count_dropped(db, rows[0].customer_id, dropped)
        return dropped

    # -- list members --------------------------------------------------------------------------------------

    async def pending_list_members(self, customer_id: int, limit: int = 1000) -> list[str]:
        """Return profile ids that still have to be added to the customer's list."""
        async with self._read() as db:
            rows = await fetch_all(
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
            await run_many(
                db,
                """UPDATE profiles INDEXED BY profiles_off_list SET on_list = 1
                   WHERE customer_id = ? AND profile_id = ? AND on_list = 0 AND profile_id IS NOT NULL""",
                [(customer_id, pid) for pid in profile_ids],
            )

    async def mark_listed_by_import(self, customer_id: int, emails: Sequence[str]) -> None:
        """Record that a bulk import job added these emails' profiles to the customer's list.

        A job adds profiles by email without telling their Klaviyo ids: they are recorded on the list with
        whatever id was known; should a later upsert return a new id, it joins the list again (harmless).
        """
        async with self._write() as db:
            await ensure_customer(db, customer_id)
            await run_many(
                db,
                """INSERT INTO profiles (customer_id, email, on_list) VALUES (?, ?, 1)
                   ON CONFLICT (customer_id, email) DO UPDATE SET on_list = 1""",
                [(customer_id, email) for email in emails],
            )

    # -- dead letters --------------------------------------------------------------------------------------

    async def dead_rows(self, customer_id: int | None) -> list[DeadRow]:
        """Return dead-lettered rows of one customer (or all customers), oldest first."""
        where, params = dead_filter(customer_id, None)
        async with self._read() as db:
            rows = await fetch_all(
                db,
                "SELECT id, customer_id, kind, key, last_status, response, dead_at, attempts FROM outbox "
                f"WHERE {where} ORDER BY id",
                params,
            )
        return [dead_row(r) for r in rows]

    async def dead_letter(self, row_id: int) -> DeadLetter | None:
        """Return one dead-lettered row in full (payload, Klaviyo's response), or None if no such dead row."""
        async with self._read() as db:
            row = await fetch_one(
                db,
                "SELECT id, customer_id, kind, key, payload, version, attempts, created_at, dead_at, last_status, "
                "last_error, response FROM outbox WHERE id = ? AND dead_at IS NOT NULL",
                (row_id,),
            )
        return None if row is None else dead_letter(row)

    async def replay_dead(self, customer_id: int | None, row_ids: Sequence[int] | None, now: datetime) -> int:
        """Make dead rows (all, or those ids) of a customer (or all) pending again; return how many."""
        groups: list[list[int] | None] = [None] if row_ids is None else list(chunks(row_ids))
        replayed = 0
        async with self._write() as db:
            for chunk in groups:
                where, params = dead_filter(customer_id, chunk)
                replayed += await run(
                    db,
                    "UPDATE outbox SET dead_at = NULL, attempts = 0, version = version + 1, "
                    f"next_attempt_at = ? WHERE {where}",
                    [iso(now), *params],
                )
        return replayed
