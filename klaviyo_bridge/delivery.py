"""Drain one customer's outbox into its Klaviyo account.

A row is marked sent only after Klaviyo accepted (2xx) the request that carried it. Outcomes other than
success never lose a row: transient failures reschedule it with capped exponential backoff, a refused row
becomes a dead letter holding Klaviyo's response, and a refused key (401/403) pauses the whole customer,
keeping its rows queued until a later probe succeeds. One customer's failures never touch another's rows.

Routing, by what a row is (not by how full the queue happens to be):
- History (backfill: events recorded with ``"backfill": true``, and profiles of shoppers whose orders in the
  page were all history) goes through ``event-bulk-create-jobs`` (1,000 events or 5 MB per request, never one
  unique_id twice) and profile import jobs (10,000 profiles or 5 MB, each job also adding them to the list).
  Only full requests go while the window is still being read, pipelined with the reading; the remainder goes
  once the read is done (``final``). Nothing of it fires a flow, so nothing is lost by waiting for a full batch.
- Live events use ``POST /api/events`` (the lowest latency); live profiles ``POST /api/profile-import`` and
  the list-add flush. A live queue of at least ``BULK_EVENTS_MIN`` events or ``BULK_PROFILES_MIN`` profiles
  (catching up after an outage) goes in bulk instead: singles could not keep up with Klaviyo's limits.
- A bulk request Klaviyo refuses (4xx but 401/403) is bisected, so one bad row does not sink its batch; a
  refused chunk of at most ``BISECT_LEAF`` rows goes row by row through the single endpoints, and only the
  bad row is dead-lettered, with Klaviyo's response to it. A transient failure reschedules every row of
  the request.
- Live profiles go before live events: Klaviyo needs no profile before its events (an event upserts its profile
  by email), but a live event may fire a flow at once, and the email it sends should greet the shopper by the
  name the profile row carries. So live events wait until the live profile lane has drained (a live event also
  makes its shopper's queued history profile live, in the store); history fires no flow and goes out side by
  side with both (e.g. while an import job runs).
- Within a lane, rows are fetched again only after every request for the previous fetch has ended, so a
  row is never in two requests of its lane at once. (A history profile that a live event makes live while its
  import job runs may also go out as a single upsert: a profile upsert is idempotent, so that costs a request.)

What reaches the log: a profile row is named ``profile=<ref>`` (``logs.profile_ref``), never by its email;
a Klaviyo outage is summarised by ``health.UpstreamHealth`` (one line when it starts, one when it ends), the
rows it reschedules only at DEBUG; a refused key is logged when first seen and again at most once per probe
interval while it stays refused, so it is never quiet. Key health and the error streak are written to the
store only when they change, never once per successful send.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from . import failpoints, logs
from .aio import together
from .clock import WallClock
from .core import EventKind, event_kind_of_key, order_of_key
from .errors import AuthFailed, MalformedPayload, PermanentUpstream, TransientUpstream, UpstreamError
from .health import UpstreamHealth
from .klaviyo import (
    EVENT_WRAPPER_BYTES,
    MAX_BULK_EVENTS,
    MAX_BULK_PROFILES,
    PROFILE_WRAPPER_BYTES,
    ImportFailure,
    ImportOutcome,
    KlaviyoClient,
    plan_chunks,
)
from .store import OutboxRow, RowKind, Store

log = logging.getLogger(__name__)

RETRY_BASE = timedelta(seconds=30)
RETRY_CAP = timedelta(hours=1)
LIST_ADD_BATCH = 1000
BULK_EVENTS_MIN = 100  # a due event queue this long goes bulk whole: ~1 bulk request instead of 100+ singles
# Klaviyo advises against import jobs for a handful of profiles; below this the synchronous upsert is used.
BULK_PROFILES_MIN = 100
EVENT_FETCH = 5000  # due event rows read per round (5 bulk requests in flight at most)
PROFILE_FETCH = 2 * MAX_BULK_PROFILES  # due profile rows read per round (2 import jobs in flight at most)
BISECT_LEAF = 8  # a refused bulk chunk this small is sent row by row through the single endpoint
CONCURRENCY = 16  # single requests in flight per customer (its own account's limiter paces them)
SINGLES_BATCH = 200  # rows sent through single endpoints per round

Parsed = tuple[OutboxRow, dict[str, Any]]
T = TypeVar("T")


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
    return (order_of_key(row.key) if row.kind == "event" else None) or "-"


def row_ref(row: OutboxRow) -> str:
    """Name a row in a log line: an event by ``key=<unique_id>``, a profile by ``profile=<ref>``, never its email."""
    return f"profile={logs.profile_ref(row.key)}" if row.kind == "profile" else f"key={row.key}"


def parse_payloads(rows: Sequence[OutboxRow]) -> list[Parsed]:
    """Pair each row with its payload, parsed once for whichever request carries it."""
    return [(row, json.loads(row.payload)) for row in rows]


def ready_chunks(chunks: list[list[int]], max_items: int, final: bool) -> list[list[int]]:
    """Return the chunks to send now: all when ``final``, else only full ones (the last may still grow).

    ``plan_chunks`` fills greedily, so every chunk but the last is full (by count or by bytes).
    """
    if final or not chunks:
        return chunks
    return chunks if len(chunks[-1]) >= max_items else chunks[:-1]


def halves(items: Sequence[Parsed]) -> tuple[Sequence[Parsed], Sequence[Parsed]]:
    """Split a refused chunk in two for bisection."""
    middle = len(items) // 2
    return items[:middle], items[middle:]


class Deliverer:
    """Sends due outbox rows of one customer: bulk for backfills and long queues, single requests otherwise."""

    def __init__(
        self,
        customer_id: int,
        store: Store,
        klaviyo: KlaviyoClient,
        *,
        clock: WallClock,
        health: UpstreamHealth | None = None,
        key_probe_seconds: float = 300.0,
        events: frozenset[EventKind] = frozenset(EventKind),
    ) -> None:
        self.customer_id = customer_id
        self.store = store
        self.klaviyo = klaviyo
        self.clock = clock
        self.stats = DeliveryStats()
        self.key_refused = False
        self.health = health if health is not None else UpstreamHealth("klaviyo")
        self.key_probe_seconds = key_probe_seconds
        self.events = events  # the milestones this customer gets; a row announcing another is dropped, not sent
        # What the store says, once read: writes happen only when these change (None: not read yet).
        self._key_healthy: bool | None = None
        self._streak_on_record: bool | None = None
        self._refusal_logged_at: float | None = None
        self.holding = False  # history rows were left for a full request or the end of the read (deliver_due)

    async def deliver_due(self, *, final: bool = True) -> int:
        """Send every row due now; return how many rows were attempted.

        History rows go in full bulk requests only, unless ``final`` (the window being read is done): then the
        remainder goes too. Live profiles go before live events; history goes side by side with both.
        """
        self.holding = False
        # One cheap query decides the common idle case (a thousand idle customers each look once a minute).
        if self.key_refused or not await self.store.due_rows(self.customer_id, self.clock(), 1):
            return 0
        live_profiles_done = asyncio.Event()
        counts = await together(
            self._drain_live_profiles(live_profiles_done),
            self._drain_live_events(live_profiles_done),
            self._drain_history_profiles(final),
            self._drain_history_events(final),
        )
        return sum(counts)

    async def _due_profiles(self, history: bool) -> list[OutboxRow]:
        """Return due profile rows, history or live."""
        return await self.store.due_rows(self.customer_id, self.clock(), PROFILE_FETCH, "profile", history=history)

    async def _drain_live_profiles(self, done: asyncio.Event) -> int:
        """Send due live profiles round by round, joining the list after each round; then set ``done``."""
        attempted = 0
        try:
            while not self.key_refused and (rows := await self._due_profiles(False)):
                await self.send_profiles(rows)
                attempted += len(rows)
                await self.flush_list_members()
        finally:
            done.set()
        return attempted

    async def _drain_live_events(self, profiles_done: asyncio.Event) -> int:
        """Send due live events once the live profiles are in: one by one, or in bulk for a long catch-up queue."""
        attempted = 0
        while not self.key_refused:
            rows = await self.store.due_rows(self.customer_id, self.clock(), EVENT_FETCH, "event", history=False)
            if not rows:
                break
            live = parse_payloads(await self._without_disabled(rows))
            await profiles_done.wait()
            if len(live) >= BULK_EVENTS_MIN:
                await self.send_event_chunks(live)
            else:
                await self.send_singles(live)
            attempted += len(live)
        return attempted

    async def _full_batch_waits(self, kind: RowKind, batch: int) -> bool:
        """Tell whether at least a full request's worth of history rows of ``kind`` is due (one count, no rows read:
        the sender wakes after every committed page, and most wakes have less); note that some are held."""
        due = await self.store.count_due(self.customer_id, self.clock(), kind, history=True)
        self.holding = self.holding or due > 0
        return due >= batch

    async def _drain_history_profiles(self, final: bool) -> int:
        """Import history profiles in full jobs (up to 10,000 profiles or 5 MB); the remainder when ``final``."""
        if not final and not await self._full_batch_waits("profile", MAX_BULK_PROFILES):
            return 0
        attempted = 0
        while not self.key_refused and (rows := await self._due_profiles(True)):
            list_id = (await self.store.customer_state(self.customer_id)).list_id
            if list_id is None:  # set-up comes first; without the list a job could not add the profiles to it
                break
            parsed = parse_payloads(rows)
            sizes = [len(row.payload.encode()) + PROFILE_WRAPPER_BYTES for row in rows]
            chunks = ready_chunks(plan_chunks(sizes, None, max_items=MAX_BULK_PROFILES), MAX_BULK_PROFILES, final)
            if not chunks:
                break
            await together(*(self._import([parsed[i] for i in chunk], list_id) for chunk in chunks))
            attempted += sum(len(chunk) for chunk in chunks)
        return attempted

    async def _drain_history_events(self, final: bool) -> int:
        """Send history events in full bulk requests (up to 1,000 events or 5 MB); the remainder when ``final``."""
        if not final and not await self._full_batch_waits("event", MAX_BULK_EVENTS):
            return 0
        attempted = 0
        while not self.key_refused:
            rows = await self.store.due_rows(self.customer_id, self.clock(), EVENT_FETCH, "event", history=True)
            if not rows:
                break
            parsed = parse_payloads(await self._without_disabled(rows))
            chunks = ready_chunks(self._event_chunks(parsed), MAX_BULK_EVENTS, final)
            if not chunks:
                break
            await together(*(self._bulk_events([parsed[i] for i in chunk]) for chunk in chunks))
            attempted += sum(len(chunk) for chunk in chunks)
        return attempted

    async def _without_disabled(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """Drop rows of events the customer no longer gets (say a dead letter replayed after a reload)."""
        unwanted = [row for row in rows if (kind := event_kind_of_key(row.key)) is not None and kind not in self.events]
        if not unwanted:
            return rows
        dropped = await self.store.drop_rows(unwanted)
        log.info("queued events dropped customer=%s rows=%d reason=disabled_for_customer", self.customer_id, dropped)
        gone = {row.id for row in unwanted}
        return [row for row in rows if row.id not in gone]

    # -- routing -------------------------------------------------------------------------------------------

    async def send_profiles(self, rows: list[OutboxRow]) -> None:
        """Import live profiles by job when there are many and the list is known, else one by one."""
        list_id = (await self.store.customer_state(self.customer_id)).list_id
        parsed = parse_payloads(rows)
        if list_id is None or len(rows) < BULK_PROFILES_MIN:
            # Without the list id a job could not add the profiles to it; single upserts record ids instead.
            await self.send_singles(parsed)
            return
        sizes = [len(row.payload.encode()) + PROFILE_WRAPPER_BYTES for row in rows]
        chunks = plan_chunks(sizes, None, max_items=MAX_BULK_PROFILES)
        await together(*(self._import([parsed[i] for i in chunk], list_id) for chunk in chunks))

    def _event_chunks(self, items: Sequence[Parsed]) -> list[list[int]]:
        """Split events into bulk requests within Klaviyo's count, size and unique_id rules."""
        sizes = [len(row.payload.encode()) + EVENT_WRAPPER_BYTES for row, _ in items]
        keys = [(payload.get("email"), payload.get("metric"), row.key) for row, payload in items]
        return plan_chunks(sizes, keys, max_items=MAX_BULK_EVENTS)

    async def send_event_chunks(self, items: Sequence[Parsed]) -> None:
        """Send events in bulk requests within Klaviyo's count, size and unique_id rules."""
        chunks = self._event_chunks(items)
        await together(*(self._bulk_events([items[i] for i in chunk]) for chunk in chunks))

    async def send_singles(self, items: Sequence[Parsed]) -> None:
        """Send rows through the single endpoints, ``batch`` at a time."""
        for start in range(0, len(items), SINGLES_BATCH):
            if self.key_refused:
                return
            await self.send_rows(items[start : start + SINGLES_BATCH])

    # -- bulk events ---------------------------------------------------------------------------------------

    async def _bulk_events(self, items: Sequence[Parsed]) -> None:
        """Send one bulk event request and record the outcome for all its rows."""
        if self.key_refused:
            return
        rows = [row for row, _ in items]
        failpoints.hit("mid_batch")
        sent, _ = await self._settle(rows, lambda: self.klaviyo.create_events_bulk([p for _, p in items]),
                                     lambda exc: self._bisect(items, exc, self._bulk_events))
        if sent:
            await self.on_sent_many(rows)

    async def _bisect(
        self,
        items: Sequence[Parsed],
        exc: PermanentUpstream,
        again: Callable[[Sequence[Parsed]], Awaitable[None]],
    ) -> None:
        """Isolate the row Klaviyo refused: halve the request, or send a small one row by row."""
        kind = items[0][0].kind
        log.warning(
            "klaviyo refused bulk request customer=%s kind=%s rows=%d status=%s detail=%s action=%s",
            self.customer_id, kind, len(items), exc.status, exc.detail,
            "splitting" if len(items) > BISECT_LEAF else "sending row by row",
        )
        if len(items) <= BISECT_LEAF:
            await self.send_rows(items)
            return
        first, second = halves(items)
        await together(again(first), again(second))

    # -- bulk profiles -------------------------------------------------------------------------------------

    async def _import(self, items: Sequence[Parsed], list_id: str) -> None:
        """Run one profile import job (which also adds the profiles to the list) and account for it."""
        if self.key_refused:
            return
        rows = [row for row, _ in items]
        # A job that failed may have run in part or not at all; importing again is a harmless upsert.
        done, outcome = await self._settle(
            rows, lambda: self.klaviyo.import_profiles([p for _, p in items], list_id),
            lambda exc: self._bisect(items, exc, lambda part: self._import(part, list_id)),
        )
        if done and outcome is not None:
            await self._account_import(rows, outcome)

    async def _account_import(self, rows: Sequence[OutboxRow], outcome: ImportOutcome) -> None:
        """Dead-letter the profiles the job failed; record the others as sent and on the list."""
        failed = outcome.failed_indexes()
        for index, failure in failed.items():
            await self.on_import_failed(rows[index], failure)
        imported = [row for index, row in enumerate(rows) if index not in failed]
        # Membership first: were we to stop between the two, re-importing is harmless, a lost member is not.
        await self.store.mark_listed_by_import(self.customer_id, [row.key for row in imported])
        await self.on_sent_many(imported)
        for failure in outcome.unmapped():
            log.warning(
                "klaviyo import error not tied to a profile sent customer=%s job=%s profile=%s detail=%s",
                self.customer_id, outcome.job.id, logs.profile_ref(failure.email) if failure.email else "-",
                failure.detail,
            )

    async def on_import_failed(self, row: OutboxRow, failure: ImportFailure) -> None:
        """Dead-letter a profile its import job could not import, with Klaviyo's import error."""
        await self.store.mark_dead(row, self.clock(), None, failure.raw)
        self.stats.dead += 1
        log.error(
            "klaviyo import job refused profile customer=%s %s detail=%s action=%s",
            self.customer_id, row_ref(row), failure.detail,
            "inspect with `klaviyo-bridge dead-letters show`, fix the cause, then replay",
        )

    # -- single requests -----------------------------------------------------------------------------------

    async def send_rows(self, items: Sequence[Parsed]) -> None:
        """Send rows concurrently; profile rows first so their ids can join the list in this batch."""
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(item: Parsed) -> None:
            async with gate:
                if not self.key_refused:
                    failpoints.hit("mid_batch")
                    await self.send_row(item)

        for kind in ("profile", "event"):
            await together(*(one(item) for item in items if item[0].kind == kind))

    async def send_row(self, item: Parsed) -> None:
        """Send one row through its single endpoint and record the outcome."""
        row, payload = item
        sent, profile_id = await self._settle([row], lambda: self._send(row.kind, payload),
                                              lambda exc: self.on_refused(row, exc))
        if sent:
            failpoints.hit("after_send_before_mark")
            await self.store.mark_sent(row, self.clock(), profile_id)
            self.stats.sent += 1
            await self.on_accepted()

    async def _send(self, kind: RowKind, payload: Mapping[str, Any]) -> str | None:
        """Perform the Klaviyo call for one row; return the profile id for profile rows."""
        if kind == "profile":
            return await self.klaviyo.import_profile(payload)
        await self.klaviyo.create_event(payload)
        return None

    async def _settle(
        self, rows: Sequence[OutboxRow], request: Callable[[], Awaitable[T]],
        refused: Callable[[PermanentUpstream], Awaitable[None]],
    ) -> tuple[bool, T | None]:
        """Run one request carrying ``rows``; on failure record the outcome for all of them, the one way.

        Returns (True, the request's result) when Klaviyo accepted it. A refused key pauses the customer, a
        refused request goes to ``refused`` (dead letter, or bisection of a bulk request), anything that may pass
        later (429, 5xx, timeouts, an unreadable answer) reschedules every row.
        """
        try:
            return True, await request()
        except AuthFailed as exc:
            await self.on_key_refused(exc)
        except PermanentUpstream as exc:
            await refused(exc)
        except (TransientUpstream, MalformedPayload) as exc:
            await self.on_transient(rows, exc)
        return False, None

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
            except TransientUpstream as exc:
                # Membership stays pending in the store and is retried with the next batch.
                await self.record_failure(exc)
                return
            except PermanentUpstream as exc:
                log.warning("list add refused customer=%s profiles=%d error=%s action=%s", self.customer_id,
                            len(ids), exc, "retried with the next batch; if it persists check the list still exists")
                return
            await self.store.mark_on_list(self.customer_id, ids)

    # -- outcomes ------------------------------------------------------------------------------------------

    async def on_sent_many(self, rows: Sequence[OutboxRow]) -> None:
        """Mark the rows of an accepted bulk request sent, in one transaction."""
        if not rows:
            return
        failpoints.hit("after_send_before_mark")
        await self.store.mark_sent_many(rows, self.clock())
        self.stats.sent += len(rows)
        log.debug("klaviyo accepted bulk customer=%s kind=%s rows=%d", self.customer_id, rows[0].kind, len(rows))
        await self.on_accepted()

    async def on_transient(self, rows: Sequence[OutboxRow], exc: TransientUpstream | MalformedPayload) -> None:
        """Reschedule every row of a request that failed in a way that may pass (its server hint respected)."""
        attempts = max(row.attempts for row in rows)
        delay = retry_delay(attempts)
        hint = exc.retry_after if isinstance(exc, TransientUpstream) else None
        if hint is not None:
            delay = max(delay, timedelta(seconds=hint))
        now = self.clock()
        await self.store.mark_retry_many(rows, now, now + delay, str(exc), exc.status)
        self.stats.retried += len(rows)
        log.debug(
            "klaviyo send will be retried customer=%s rows=%d first=%s order=%s in_s=%d error=%s",
            self.customer_id, len(rows), row_ref(rows[0]), order_of(rows[0]), delay.total_seconds(), exc,
        )
        await self.record_failure(exc)

    async def on_key_refused(self, exc: AuthFailed) -> None:
        """Pause this customer: its key is refused, and every further send would be too."""
        self.key_refused = True
        newly = await self._set_key_health(False, str(exc))
        now = time.monotonic()
        if not newly and self._refusal_logged_at is not None and \
                now - self._refusal_logged_at < 0.9 * self.key_probe_seconds:
            return  # several sends of one probe round saw the same 401: one line per probe interval
        self._refusal_logged_at = now
        log.log(
            logging.ERROR if newly else logging.WARNING,
            "klaviyo key %s customer=%s status=%s detail=%s action=%s",
            "refused" if newly else "still refused", self.customer_id, exc.status, exc.detail,
            "check the customer's private key and its scopes (events:write profiles:write lists:read "
            f"lists:write); rows stay queued and go out once the key works (probed every "
            f"{self.key_probe_seconds:.0f}s)",
        )

    async def on_accepted(self) -> None:
        """Record that Klaviyo accepted a request: the key works and any outage of this account is over."""
        self._refusal_logged_at = None
        if await self._set_key_health(True, None):
            log.info("klaviyo key accepted again customer=%s", self.customer_id)
        self.health.succeeded(self.customer_id)
        if self._streak_on_record is None:
            self._streak_on_record = (await self.store.customer_state(self.customer_id)).klaviyo_failing_since \
                is not None
        if self._streak_on_record:
            await self.store.clear_klaviyo_streak(self.customer_id)
            self._streak_on_record = False

    async def _set_key_health(self, healthy: bool, error: str | None) -> bool:
        """Record the key's health when it differs from what the store holds; return True if it changed."""
        if self._key_healthy is None:
            self._key_healthy = (await self.store.customer_state(self.customer_id)).key_healthy
        if self._key_healthy == healthy:
            return False
        await self.store.set_key_health(self.customer_id, healthy, error, self.clock())
        self._key_healthy = healthy
        return True

    async def record_failure(self, exc: UpstreamError) -> None:
        """Count a failed Klaviyo request: the outage summary, and the error streak ``status`` shows."""
        self.health.failed(self.customer_id, exc)
        await self.store.record_klaviyo_error(self.customer_id, str(exc), self.clock())
        self._streak_on_record = True

    async def on_refused(self, row: OutboxRow, exc: PermanentUpstream) -> None:
        """Dead-letter a row Klaviyo refused for what it is; the queue moves on."""
        await self.store.mark_dead(row, self.clock(), exc.status, exc.body or exc.detail)
        self.stats.dead += 1
        log.error(
            "klaviyo refused row customer=%s order=%s kind=%s %s status=%s detail=%s action=%s",
            self.customer_id,
            order_of(row),
            row.kind,
            row_ref(row),
            exc.status,
            exc.detail,
            "inspect with `klaviyo-bridge dead-letters show`, fix the cause, then replay",
        )
