"""Drain one customer's outbox into its Klaviyo account.

A row is marked sent only after Klaviyo answered 2xx for it. Outcomes other than success never lose a
row: transient failures reschedule it with capped exponential backoff, a refused row becomes a dead
letter holding Klaviyo's response, and a refused key (401/403) pauses the whole customer, keeping its
rows queued until a later probe succeeds. One customer's failures never touch another's rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from .errors import AuthFailed, PermanentUpstream, TransientUpstream
from .klaviyo import KlaviyoClient
from .store import OutboxRow, Store

log = logging.getLogger(__name__)

RETRY_BASE = timedelta(seconds=30)
RETRY_CAP = timedelta(hours=1)
LIST_ADD_BATCH = 1000


@dataclass(slots=True)
class DeliveryStats:
    """What one customer's sender did since the counters were last taken."""

    sent: int = 0
    dead: int = 0
    retried: int = 0

    def take(self) -> DeliveryStats:
        """Return the counters and reset them."""
        taken = DeliveryStats(self.sent, self.dead, self.retried)
        self.sent = self.dead = self.retried = 0
        return taken


def retry_delay(attempts: int) -> timedelta:
    """Return the wait before the next attempt of a row that already failed ``attempts`` times."""
    return min(RETRY_BASE * (1 << min(attempts, 10)), RETRY_CAP)


def order_of(row: OutboxRow) -> str:
    """Return the order id an outbox row is about, for log lines ("-" for profiles and samples)."""
    if row.kind == "event":
        head = row.key.split(":", 1)[0]
        if head.isdigit():
            return head
    return "-"


class Deliverer:
    """Sends due outbox rows of one customer, a bounded number at a time."""

    def __init__(
        self,
        customer_id: int,
        store: Store,
        klaviyo: KlaviyoClient,
        *,
        clock: Callable[[], datetime],
        concurrency: int = 16,
        batch: int = 200,
    ) -> None:
        self.customer_id = customer_id
        self.store = store
        self.klaviyo = klaviyo
        self.clock = clock
        self.concurrency = concurrency
        self.batch = batch
        self.stats = DeliveryStats()
        self.key_refused = False

    async def deliver_due(self) -> int:
        """Send every row due now, batch by batch; return how many rows were attempted."""
        attempted = 0
        while not self.key_refused:
            rows = await self.store.due_rows(self.customer_id, self.clock(), self.batch)
            if not rows:
                break
            await self.send_rows(rows)
            attempted += len(rows)
            await self.flush_list_members()
        return attempted

    async def send_rows(self, rows: list[OutboxRow]) -> None:
        """Send rows concurrently; profile rows first so their ids can join the list in this batch."""
        gate = asyncio.Semaphore(self.concurrency)

        async def one(row: OutboxRow) -> None:
            async with gate:
                if not self.key_refused:
                    await self.send_row(row)

        profiles = [r for r in rows if r.kind == "profile"]
        events = [r for r in rows if r.kind == "event"]
        for group in (profiles, events):
            await asyncio.gather(*(one(r) for r in group))

    async def send_row(self, row: OutboxRow) -> None:
        """Send one row and record the outcome."""
        try:
            profile_id = await self._send(row)
        except AuthFailed as exc:
            await self.on_key_refused(exc)
        except PermanentUpstream as exc:
            await self.on_refused(row, exc)
        except TransientUpstream as exc:
            await self.on_transient(row, exc)
        else:
            await self.store.mark_sent(row, self.clock(), profile_id)
            self.stats.sent += 1
            await self.on_key_accepted()

    async def _send(self, row: OutboxRow) -> str | None:
        """Perform the Klaviyo call for one row; return the profile id for profile rows."""
        if row.kind == "profile":
            return await self.klaviyo.import_profile(json.loads(row.payload))
        await self.klaviyo.create_event(row.payload)
        return None

    async def flush_list_members(self) -> None:
        """Add imported profiles to the customer's list, up to 1000 ids per call."""
        state = await self.store.customer_state(self.customer_id)
        if state.list_id is None or self.key_refused:
            return
        while ids := await self.store.pending_list_members(self.customer_id, LIST_ADD_BATCH):
            try:
                await self.klaviyo.add_to_list(state.list_id, ids)
            except AuthFailed as exc:
                await self.on_key_refused(exc)
                return
            except (TransientUpstream, PermanentUpstream) as exc:
                # Membership stays pending in the store and is retried with the next batch.
                log.warning("list add failed customer=%s profiles=%d error=%s", self.customer_id, len(ids), exc)
                return
            await self.store.mark_on_list(self.customer_id, ids)

    async def on_key_refused(self, exc: AuthFailed) -> None:
        """Pause this customer: its key is refused, and every further send would be too."""
        self.key_refused = True
        if await self.store.set_key_health(self.customer_id, False, str(exc), self.clock()):
            log.error(
                "klaviyo key refused customer=%s status=%s detail=%s action=%s",
                self.customer_id,
                exc.status,
                exc.detail,
                "check the customer's private key and its scopes (events:write profiles:write lists:read "
                "lists:write); rows stay queued and go out once the key works",
            )

    async def on_key_accepted(self) -> None:
        """Record that the key works again, logging the recovery once."""
        if await self.store.set_key_health(self.customer_id, True, None, self.clock()):
            log.info("klaviyo key accepted again customer=%s", self.customer_id)

    async def on_refused(self, row: OutboxRow, exc: PermanentUpstream) -> None:
        """Dead-letter a row Klaviyo refused for what it is; the queue moves on."""
        await self.store.mark_dead(row, self.clock(), exc.status, exc.body or exc.detail)
        self.stats.dead += 1
        log.error(
            "klaviyo refused row customer=%s order=%s kind=%s key=%s status=%s detail=%s action=%s",
            self.customer_id,
            order_of(row),
            row.kind,
            row.key,
            exc.status,
            exc.detail,
            "inspect with `klaviyo-bridge dead-letters show`, fix the cause, then replay",
        )

    async def on_transient(self, row: OutboxRow, exc: TransientUpstream) -> None:
        """Reschedule a row after a failure that may pass."""
        delay = retry_delay(row.attempts)
        if exc.retry_after is not None:
            delay = max(delay, timedelta(seconds=exc.retry_after))
        now = self.clock()
        await self.store.mark_retry(row, now, now + delay, str(exc), exc.status)
        self.stats.retried += 1
        log.warning(
            "klaviyo send will be retried customer=%s order=%s key=%s in_s=%d error=%s",
            self.customer_id,
            order_of(row),
            row.key,
            delay.total_seconds(),
            exc,
        )
