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
- **One kind of failure.** sqlite3's errors never leave the facade: every read and write translates them into
  ``errors.StoreError`` naming the database, so callers handle one storage error and nothing else imports sqlite3.
- **Never from scratch.** A database that is unreadable, corrupt or from a newer version stops the daemon;
  an older schema is migrated in place, in one transaction per version.
The fault suite (tests/faults/) SIGKILLs the daemon at named failpoints (one inside ``commit_page``'s
transaction, before COMMIT) and under random load, and checks the above.

The facade is three layers, one class each: ``store_base.StoreBase`` (the connection: one lock, transactions,
sqlite3's errors, poll outcomes written in batches), ``store_delivery.DeliveryStore`` (the sender's rows and the
dead letters) and ``Store`` here (customers, order memory, a page's commit, reports, the Whiplash token).

Invariants kept here (each other module of the store states its own):
- a page's memory, names, outbox rows, malformed orders and cursor are one transaction (``commit_page``);
- order memory only gains announced events; ``status_at`` is when the remembered status was set and bounds
  the reconcile sweep;
- a customer once inserted (or seen) is known for the store's life: an idle poll needs no write transaction.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from . import failpoints, logs
from .core import EventKind, EventRow, OrderMemory, Plan, ProfileChange, ProfileName
from .errors import MalformedOrder, StoreError
from .store_delivery import DeliveryStore
from .store_outbox import (
    Counts,
    DeadLetter,
    DeadRow,
    OutboxRow,
    RowKind,
    Totals,
    compact,
    delete_pending_events,
    queue_events,
    queue_profiles,
    read_counts,
    read_totals,
)
from .store_rows import (
    CHUNK,
    EVENT_BITS,
    CustomerState,
    clear_malformed,
    clip,
    count_dropped,
    customer_state,
    ensure_customer,
    epoch,
    iso,
    marks,
    opt_str,
    parse_dt,
    read_customer_of_order,
    read_memory,
    read_names,
    record_invalid_emails,
    record_malformed,
    set_cursor,
    upsert_names,
    upsert_orders,
    with_poll,
)
from .store_schema import SCHEMA_VERSION, fetch_all, fetch_one, reserve_private_file
from .whiplash_auth import TokenRecord


class Store(DeliveryStore):
    """The bridge's SQLite state, behind one serialised writer connection (``StoreBase``)."""

    # -- customers -----------------------------------------------------------------------------------------

    async def ensure_customer(self, customer_id: int) -> None:
        """Insert the customer if it is missing."""
        if customer_id in self._known_customers:
            return
        async with self._write() as db:
            await ensure_customer(db, customer_id)
        self._known_customers.add(customer_id)

    async def customer_state(self, customer_id: int) -> CustomerState:
        """Return what the store knows about a customer (defaults if never seen), polls not yet written included."""
        async with self._read() as db:
            row = await fetch_one(db, "SELECT * FROM customers WHERE customer_id = ?", (customer_id,))
        return with_poll(customer_state(customer_id, row), self._polls.get(customer_id))

    async def set_list_id(self, customer_id: int, list_id: str) -> None:
        """Record the id of the customer's Klaviyo list."""
        async with self._write() as db:
            await ensure_customer(db, customer_id)
            await db.execute("UPDATE customers SET list_id = ? WHERE customer_id = ?", (list_id, customer_id))

    async def set_key_health(self, customer_id: int, healthy: bool, error: str | None, now: datetime) -> bool:
        """Record whether the customer's Klaviyo key works; return True if that changed."""
        async with self._write() as db:
            await ensure_customer(db, customer_id)
            row = await fetch_one(db, "SELECT key_healthy FROM customers WHERE customer_id = ?", (customer_id,))
            await db.execute(
                """UPDATE customers SET key_healthy = ?, key_error = ?, key_checked_at = ?
                   WHERE customer_id = ?""",
                (int(healthy), clip(error), iso(now), customer_id),
            )
        return row is None or bool(row["key_healthy"]) != healthy

    async def move_cursor(self, customer_id: int, cursor: tuple[datetime, int]) -> None:
        """Move the customer's cursor alone (a sliced walk whose finished slice completed the prefix)."""
        async with self._write() as db:
            await set_cursor(db, customer_id, cursor)
            failpoints.hit("during_cursor_update")

    async def save_budget(self, snapshot: Mapping[str, object]) -> None:
        """Keep the Whiplash budget's latest use (a JSON object) for ``status``, which runs in another process."""
        async with self._write() as db:
            await db.execute(
                "INSERT INTO meta (name, value) VALUES ('whiplash_budget', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (json.dumps(snapshot, sort_keys=True),),
            )

    async def load_budget(self) -> dict[str, object] | None:
        """Return the Whiplash budget's use the daemon last saved (None: never saved)."""
        async with self._read() as db:
            row = await fetch_one(db, "SELECT value FROM meta WHERE name = 'whiplash_budget'")
        if row is None:
            return None
        value = json.loads(row["value"])
        return value if isinstance(value, dict) else None

    async def record_klaviyo_error(self, customer_id: int, error: str, now: datetime) -> None:
        """Record a Klaviyo failure of the customer; the streak starts at the first one since a success."""
        stamp = iso(now)
        async with self._write() as db:
            await ensure_customer(db, customer_id)
            await db.execute(
                """UPDATE customers SET klaviyo_error = ?, klaviyo_error_at = ?,
                     klaviyo_failing_since = coalesce(klaviyo_failing_since, ?)
                   WHERE customer_id = ?""",
                (clip(error), stamp, stamp, customer_id),
            )

    async def clear_klaviyo_streak(self, customer_id: int) -> None:
        """End the customer's Klaviyo failure streak (the last error stays on record for ``status``)."""
        async with self._write() as db:
            await db.execute("UPDATE customers SET klaviyo_failing_since = NULL WHERE customer_id = ?",
                             (customer_id,))

    async def record_reconcile(self, customer_id: int, now: datetime) -> None:
        """Record that a reconcile sweep of the customer completed at ``now``."""
        async with self._write() as db:
            await ensure_customer(db, customer_id)
            await db.execute(
                "UPDATE customers SET reconciled_at = ? WHERE customer_id = ?", (iso(now), customer_id)
            )

    # -- mapping memory ------------------------------------------------------------------------------------

    async def load_memory(self, customer_id: int, order_ids: Iterable[int]) -> dict[int, OrderMemory]:
        """Return the remembered status and announced events of those orders the store knows."""
        async with self._read() as db:
            return await read_memory(db, customer_id, order_ids)

    async def orders_to_reconcile(
        self,
        customer_id: int,
        statuses: Iterable[int],
        unannounced: EventKind,
        since: datetime,
        *,
        after_id: int = 0,
        limit: int = CHUNK,
    ) -> list[int]:
        """Return ids (ascending, above ``after_id``) of orders whose status is one of ``statuses``, set at or
        after ``since``, and whose ``unannounced`` event has not been announced."""
        codes = sorted(set(statuses))
        if not codes:
            return []
        async with self._read() as db:
            rows = await fetch_all(
                db,
                "SELECT order_id FROM orders WHERE customer_id = ? AND order_id > ? "
                f"AND status IN ({marks(len(codes))}) AND status_at >= ? AND announced & ? = 0 "
                "ORDER BY order_id LIMIT ?",
                (customer_id, after_id, *codes, epoch(since), EVENT_BITS[unannounced], limit),
            )
        return [int(r[0]) for r in rows]

    async def remembered_status(self, customer_id: int, order_id: int) -> int | None:
        """Return the status the order memory holds for one order, if the bridge has seen it."""
        memory = (await self.load_memory(customer_id, [order_id])).get(order_id)
        return None if memory is None else memory.status

    async def customer_of_order(self, order_id: int) -> int | None:
        """Return the customer an order belongs to, if the bridge has seen the order (None otherwise)."""
        async with self._read() as db:
            return await read_customer_of_order(db, order_id)

    async def load_names(self, customer_id: int, emails: Iterable[str]) -> dict[str, ProfileName]:
        """Return the name last queued for each known email."""
        async with self._read() as db:
            return await read_names(db, customer_id, emails)

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
        stamps = {oid: epoch(times.get(oid, now)) for oid in plan.orders}
        async with self._write() as db:
            await ensure_customer(db, customer_id)
            await upsert_orders(db, customer_id, plan.orders, stamps)
            await upsert_names(db, customer_id, names)
            queued = await queue_profiles(db, customer_id, plan.profiles, now)
            queued += await queue_events(db, customer_id, plan.events, now)
            await clear_malformed(db, customer_id, plan.orders)
            await record_malformed(db, customer_id, malformed, now)
            await record_invalid_emails(db, customer_id, email_invalid or {}, now)
            if cursor is not None:
                await set_cursor(db, customer_id, cursor)
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
            await ensure_customer(db, customer_id)
            await upsert_names(db, customer_id, {profile.email: profile.name})
            await queue_profiles(db, customer_id, [profile], now)
            await queue_events(db, customer_id, events, now)
            await db.execute(
                "UPDATE customers SET list_id = ?, setup_done = 1 WHERE customer_id = ?",
                (list_id, customer_id),
            )

    async def queue_samples(self, customer_id: int, events: Sequence[EventRow], now: datetime) -> int:
        """Queue sample events this customer never had (one per metric it gets); return how many were new."""
        async with self._write() as db:
            await ensure_customer(db, customer_id)
            return await queue_events(db, customer_id, events, now)

    async def drop_pending_events(self, customer_id: int, kinds: Iterable[EventKind]) -> int:
        """Delete the customer's unsent event rows announcing any of ``kinds`` (events it no longer gets).

        The order memory keeps those milestones announced, so the rows are never queued again; the customer's
        ``dropped_rows`` counts them for ``status``. Returns how many were dropped.
        """
        names = [kind.value for kind in kinds]
        if not names:
            return 0
        async with self._write() as db:
            dropped = await delete_pending_events(db, customer_id, names)
            await count_dropped(db, customer_id, dropped)
        return dropped

    # -- reporting -----------------------------------------------------------------------------------------

    async def counts(self, customer_id: int, since: datetime) -> Counts:
        """Count the customer's queued, sent (total, since ``since``) and dead rows, malformed orders and
        orders with an invalid email; say when the oldest row still waiting was queued."""
        async with self._read() as db:
            return await read_counts(db, customer_id, since)

    async def totals(self, customer_ids: Iterable[int], since: datetime) -> Totals:
        """Return queued, sent-since and dead rows and refused keys summed over ``customer_ids`` (one query)."""
        async with self._read() as db:
            return await read_totals(db, customer_ids, since)

    async def profiles_with_ref(self, ref: str) -> list[tuple[int, str]]:
        """Return (customer id, email) of every known profile whose log reference is ``ref``."""
        async with self._read() as db:
            rows = await fetch_all(
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
        await asyncio.to_thread(reserve_private_file, dest)
        try:
            async with self._read() as db:
                await db.execute("VACUUM INTO ?", (str(dest),))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write backup {dest}: {exc}") from exc
        return await asyncio.to_thread(os.path.getsize, dest)

    async def integrity_ok(self) -> bool:
        """Run the full PRAGMA integrity_check and tell whether it passed."""
        async with self._read() as db:
            rows = await fetch_all(db, "PRAGMA integrity_check")
        return [str(r[0]) for r in rows] == ["ok"]

    async def compact_sent(self, sent_before: datetime) -> int:
        """Shrink what was sent before ``sent_before``: blank event payloads, drop profile rows; return rows touched.

        Event rows and their keys stay, as does order memory, so nothing can be queued or sent twice; a sent
        profile row goes whole (the name lives in ``profiles``; a later change queues a fresh row).
        """
        async with self._write() as db:
            return await compact(db, iso(sent_before))

    # -- Whiplash token ------------------------------------------------------------------------------------

    async def load_whiplash_token(self) -> TokenRecord | None:
        """Return the saved Whiplash token record, if any."""
        async with self._read() as db:
            row = await fetch_one(db, "SELECT * FROM whiplash_token WHERE id = 1")
        if row is None:
            return None
        return TokenRecord(
            access_token=str(row["access_token"]),
            expires_at=parse_dt(row["expires_at"]),
            refresh_token=opt_str(row["refresh_token"]),
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
                (rec.access_token, iso(rec.expires_at), rec.refresh_token, rec.seed_fingerprint),
            )


# The facade's public names: the store and the row types its methods take and return.
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
