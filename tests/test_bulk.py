"""Bulk delivery end to end: a real Store in tmp_path, the real KlaviyoClient and Deliverer, FakeKlaviyo on loopback.

FakeKlaviyo validates every body against Klaviyo's OpenAPI spec (when ../shared has it) and records what it
kept; its own rate limits are off and the bridge's limiter runs on a fake clock, so nothing here waits.
Outcomes are read from the simulator's account and from the outbox table, never from call counts of mocks.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from kit.fakeclock import FakeClock
from pydantic import SecretStr

from klaviyo_bridge.aio import together
from klaviyo_bridge.core import EventKind, EventRow, Plan, ProfileChange, ProfileName
from klaviyo_bridge.delivery import Deliverer
from klaviyo_bridge.klaviyo import (
    MAX_BULK_EVENTS,
    ImportFailure,
    KlaviyoClient,
    bulk_events_body,
    map_failures,
    plan_chunks,
    profile_import_job_body,
)
from klaviyo_bridge.ratelimit import AccountLimiter
from klaviyo_bridge.sandbox.klaviyo import Account, EventMatch, FakeKlaviyo, ProfileMatch, serve_klaviyo
from klaviyo_bridge.store import Store

CID = 7
KEY = "pk_bulk_0123456789abcdef"
REVISION = "2026-07-15"
NOW = datetime.now(UTC).replace(microsecond=0)
WHEN = (NOW - timedelta(days=3)).isoformat()


@dataclass
class World:
    """The simulator, its account, the store and a deliverer wired to both."""

    fake: FakeKlaviyo
    account: Account
    store: Store
    db: Path
    url: str
    session: aiohttp.ClientSession
    list_id: str

    def client(self, **options: Any) -> KlaviyoClient:
        """Return a Klaviyo client with fast retries and job polls, paced on a fake clock."""
        time = FakeClock()
        settings: dict[str, Any] = {"max_tries": 2, "backoff_base": 0.001, "job_poll": (0.01, 0.05)} | options
        limiter = AccountLimiter(1.0, clock=time.clock, sleep=time.sleep)
        return KlaviyoClient(
            self.session, base_url=self.url, revision=REVISION, api_key=SecretStr(KEY), limiter=limiter, **settings
        )

    def deliverer(self, **options: Any) -> Deliverer:
        """Return a deliverer for the customer with the given client options."""
        return Deliverer(CID, self.store, self.client(**options), clock=lambda: datetime.now(UTC))

    def requests(self, op_id: str) -> int:
        """Return how many requests the simulator received for an operation."""
        return self.account.counters.requests[op_id]

    def outbox(self, where: str = "1") -> list[tuple[Any, ...]]:
        """Return (kind, key, sent, dead, attempts, response) of outbox rows, read independently."""
        with closing(sqlite3.connect(self.db)) as db:
            return list(db.execute(
                "SELECT kind, key, sent_at IS NOT NULL, dead_at IS NOT NULL, attempts, response "
                f"FROM outbox WHERE {where} ORDER BY id"
            ))

    def outbox_payloads(self) -> list[tuple[str, str]]:
        """Return (key, payload) of every outbox row."""
        with closing(sqlite3.connect(self.db)) as db:
            return list(db.execute("SELECT key, payload FROM outbox ORDER BY id"))

    def profiles_table(self) -> dict[str, tuple[Any, ...]]:
        """Return email → (profile_id, on_list) from the store."""
        with closing(sqlite3.connect(self.db)) as db:
            rows = db.execute("SELECT email, profile_id, on_list FROM profiles WHERE customer_id = ?", (CID,))
            return {r[0]: (r[1], r[2]) for r in rows}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    fake = FakeKlaviyo(limits_enabled=False, seed=1)
    account = fake.add_account(KEY, label="shop")
    klist = account.create_list("Whiplash", "single_opt_in", NOW)
    db = tmp_path / "bridge.db"
    store = await Store.open(db)
    await store.set_list_id(CID, klist.id)
    async with serve_klaviyo(fake) as url, aiohttp.ClientSession() as session:
        yield World(fake, account, store, db, url, session, klist.id)
    await store.close()


def event(order_id: int, *, backfill: bool, email: str | None = None, **props: Any) -> EventRow:
    """Build an event row as the core does (unique_id = order:kind)."""
    uid = f"{order_id}:shipped"
    payload = {
        "email": email or f"buyer{order_id}@example.com",
        "metric": "Order shipped",
        "time": WHEN,
        "unique_id": uid,
        "backfill": backfill,
        "value": 12.5,
        "value_currency": "USD",
        "properties": {"OrderId": str(order_id), **props},
    }
    return EventRow(uid, order_id, EventKind.SHIPPED, payload)


def person(n: int, first: str = "Ann", org: str | None = None) -> ProfileChange:
    """Build a profile change with a real name."""
    return ProfileChange(f"buyer{n}@example.com", ProfileName(first, f"Lee{n}", org, "real"))


async def queue(store: Store, events: Sequence[EventRow] = (), profiles: Sequence[ProfileChange] = ()) -> None:
    """Commit rows to the outbox the way a polled page does."""
    plan = Plan(profiles=list(profiles), names={p.email: p.name for p in profiles}, events=list(events))
    await store.commit_page(CID, plan, None, [], NOW)


def kept(account: Account) -> set[str]:
    """Return the unique_ids of the events the simulator kept."""
    return {e.unique_id for e in account.events if e.unique_id is not None}


# --- pure planning and bodies -------------------------------------------------------------------------


def test_plan_chunks_respects_count_bytes_and_never_repeats_a_key_in_a_chunk() -> None:
    sizes = [10] * 7
    keys = ["a", "b", "a", "c", "d", "e", "f"]

    assert plan_chunks(sizes, keys, max_items=3, max_bytes=1000) == [[0, 1], [2, 3, 4], [5, 6]]
    assert plan_chunks(sizes, None, max_items=100, max_bytes=25) == [[0, 1], [2, 3], [4, 5], [6]]
    assert plan_chunks([5, 500, 5], None, max_items=10, max_bytes=100) == [[0], [1], [2]]  # oversize alone
    assert plan_chunks([], None, max_items=10) == []


def test_bulk_events_body_groups_per_profile_in_first_seen_order() -> None:
    payloads = [event(1, backfill=True, email="a@x.com").payload, event(2, backfill=True, email="b@x.com").payload,
                event(3, backfill=False, email="a@x.com").payload]

    groups = bulk_events_body(payloads)["data"]["attributes"]["events-bulk-create"]["data"]

    assert [g["attributes"]["profile"]["data"]["attributes"]["email"] for g in groups] == ["a@x.com", "b@x.com"]
    first = [e["attributes"] for e in groups[0]["attributes"]["events"]["data"]]
    assert [(a["unique_id"], a["backfill"]) for a in first] == [("1:shipped", True), ("3:shipped", False)]
    assert "profile" not in first[0]
    assert first[0]["metric"] == {"data": {"type": "metric", "attributes": {"name": "Order shipped"}}}


def test_profile_import_job_body_adds_the_list_relationship_only_when_given() -> None:
    with_list = profile_import_job_body([{"email": "a@x.com"}], "L1")["data"]
    without = profile_import_job_body([{"email": "a@x.com"}], None)["data"]

    assert with_list["relationships"] == {"lists": {"data": [{"type": "list", "id": "L1"}]}}
    assert "relationships" not in without
    assert without["attributes"]["profiles"]["data"] == [{"type": "profile", "attributes": {"email": "a@x.com"}}]


def test_import_failures_map_by_pointer_unless_the_echoed_email_disagrees() -> None:
    profiles = [{"email": "a@x.com"}, {"email": "b@x.com"}, {"email": "c@x.com"}]
    failures = [
        ImportFailure(1, "b@x.com", "invalid: b", "{}"),  # pointer and email agree
        ImportFailure(0, "c@x.com", "invalid: c", "{}"),  # pointer disagrees: the email wins
        ImportFailure(None, "a@x.com", "invalid: a", "{}"),  # no pointer: by email
        ImportFailure(9, None, "invalid: ?", "{}"),  # out of range, no email: unmapped
    ]

    assert [f.index for f in map_failures(failures, profiles)] == [1, 2, 0, None]


async def test_together_cancels_the_siblings_of_a_failure_before_raising() -> None:
    """A failed lane must not leave the other sending in the background while the caller retries its rows."""
    finished: list[str] = []

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise sqlite3.OperationalError("database or disk is full")

    async def slow() -> None:
        await asyncio.sleep(0.2)
        finished.append("slow")

    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        await together(fails(), slow())
    await asyncio.sleep(0.3)

    assert finished == []
    assert await together(asyncio.sleep(0, "a"), asyncio.sleep(0, "b")) == ["a", "b"]


# --- events -------------------------------------------------------------------------------------------


async def test_backfill_events_go_bulk_and_live_events_of_a_short_queue_go_single(world: World) -> None:
    """1. Queue 30 backfill and 5 live events. 2. Deliver.
    Result: one bulk request carries the 30 backfill events, the 5 live ones use POST /api/events; all kept
    with their backfill flag; every row sent."""
    await queue(world.store, [event(i, backfill=True) for i in range(30)] + [event(100 + i, backfill=False)
                                                                          for i in range(5)])

    await world.deliverer().deliver_due()

    assert world.requests("bulk_create_events") == 1
    assert world.requests("create_event") == 5
    assert [job.event_count for job in world.account.event_jobs] == [30]
    assert {(e.unique_id, e.backfill) for e in world.account.events} == (
        {(f"{i}:shipped", True) for i in range(30)} | {(f"{100 + i}:shipped", False) for i in range(5)}
    )
    assert world.fake.rejections == []
    assert all(sent and not dead for _, _, sent, dead, _, _ in world.outbox())


async def test_a_long_queue_goes_bulk_in_chunks_of_at_most_1000(world: World) -> None:
    """1. Queue 1,100 live events (a long queue). 2. Deliver.
    Result: two bulk requests of 1000 and 100 events, no single sends, every event kept once."""
    await queue(world.store, [event(i, backfill=False) for i in range(1100)])

    await world.deliverer().deliver_due()

    assert sorted(job.event_count for job in world.account.event_jobs) == [100, MAX_BULK_EVENTS]
    assert world.requests("create_event") == 0
    assert len(kept(world.account)) == 1100
    assert world.account.duplicate_events == 0
    assert world.outbox("sent_at IS NULL") == []


async def test_a_refused_bulk_request_is_bisected_and_only_the_bad_row_is_dead(world: World) -> None:
    """1. The simulator refuses one event (400, which fails its whole bulk request). 2. Deliver 600 backfill events.
    Result: the bad row alone is dead-lettered with Klaviyo's response; the 599 others are sent and kept; the
    split costs a few extra requests, not one per row."""
    world.fake.reject_event_if(EventMatch(unique_id="417:shipped"))
    await queue(world.store, [event(i, backfill=True) for i in range(600)])

    await world.deliverer().deliver_due()

    dead = world.outbox("dead_at IS NOT NULL")
    assert [key for _, key, *_ in dead] == ["417:shipped"]
    assert "Event rejected by simulator rule" in dead[0][5]
    assert kept(world.account) == {f"{i}:shipped" for i in range(600)} - {"417:shipped"}
    assert len(world.outbox("sent_at IS NOT NULL")) == 599
    # One request, then two per halving (600 → 5 takes 7) and the last ≤ 8 rows one by one.
    assert world.requests("bulk_create_events") + world.requests("create_event") <= 1 + 2 * 7 + 8


async def test_a_transient_failure_reschedules_the_whole_bulk_request(world: World) -> None:
    """1. Klaviyo answers 503 to every bulk attempt. 2. Deliver 50 backfill events.
    Result: nothing is sent or dead; every row counts one failed attempt and waits for a later retry."""
    world.fake.fail_next(10, status=503, path_prefix="/api/event-bulk-create-jobs")
    await queue(world.store, [event(i, backfill=True) for i in range(50)])

    attempted = await world.deliverer().deliver_due()

    rows = world.outbox()
    assert attempted == 50
    assert {(sent, dead, attempts) for _, _, sent, dead, attempts, _ in rows} == {(0, 0, 1)}
    assert await world.store.due_rows(CID, datetime.now(UTC), 10) == []
    assert world.account.events == []


async def test_a_refused_key_pauses_the_customer_and_keeps_the_rows(world: World) -> None:
    """1. Revoke the key. 2. Deliver 200 backfill events and 150 profiles.
    Result: the deliverer stops with key_refused, the key is recorded unhealthy, every row stays pending."""
    world.fake.revoke(KEY)
    await queue(world.store, [event(i, backfill=True) for i in range(200)], [person(i) for i in range(150)])
    deliverer = world.deliverer()

    await deliverer.deliver_due()

    assert deliverer.key_refused
    assert not (await world.store.customer_state(CID)).key_healthy
    assert {(sent, dead, attempts) for _, _, sent, dead, attempts, _ in world.outbox()} == {(0, 0, 0)}


# --- profiles -----------------------------------------------------------------------------------------


async def test_many_profiles_go_through_one_import_job_that_fills_the_list(world: World) -> None:
    """1. Queue 150 profiles. 2. Deliver.
    Result: one import job, no single upserts and no list-add calls; every profile exists with its name and is
    on the list; rows are sent and the store knows them as on the list."""
    await queue(world.store, profiles=[person(i) for i in range(150)])

    await world.deliverer().deliver_due()

    assert len(world.account.import_jobs) == 1
    assert world.requests("create_or_update_profile") == 0
    assert world.requests("add_profiles_to_list") == 0
    members = set(world.account.lists[world.list_id].members)
    for i in range(150):
        profile = world.account.profile_by_email(f"buyer{i}@example.com")
        assert profile is not None
        assert (profile.first_name, profile.last_name) == ("Ann", f"Lee{i}")
        assert profile.id in members
    assert all(on_list == 1 for _, on_list in world.profiles_table().values())
    assert world.outbox("sent_at IS NULL") == []


async def test_profiles_a_job_fails_are_dead_lettered_and_the_rest_sent(world: World) -> None:
    """1. The simulator fails two profiles inside the job. 2. Deliver 120 profiles.
    Result: those two rows are dead with Klaviyo's import error and stay off the list; the 118 others are sent."""
    world.fake.reject_profile_if(ProfileMatch(email="buyer7@example.com"))
    world.fake.reject_profile_if(ProfileMatch(email="buyer99@example.com"))
    await queue(world.store, profiles=[person(i) for i in range(120)])

    await world.deliverer().deliver_due()

    dead = world.outbox("dead_at IS NOT NULL")
    assert [key for _, key, *_ in dead] == ["buyer7@example.com", "buyer99@example.com"]
    assert all("Profile rejected by simulator rule" in response for *_, response in dead)
    assert len(world.outbox("sent_at IS NOT NULL")) == 118
    table = world.profiles_table()
    assert table["buyer7@example.com"][1] == 0
    assert table["buyer8@example.com"][1] == 1
    assert len(world.account.lists[world.list_id].members) == 118


async def test_a_job_refused_whole_is_bisected_down_to_the_bad_profile(world: World) -> None:
    """1. One profile is over Klaviyo's 100 KB per-profile limit, which refuses the whole job (400). 2. Deliver 200.
    Result: only that profile is dead-lettered; the others are imported and on the list."""
    huge = person(13, org="x" * 110_000)
    await queue(world.store, profiles=[huge if i == 13 else person(i) for i in range(200)])

    await world.deliverer().deliver_due()

    dead = world.outbox("dead_at IS NOT NULL")
    assert [key for _, key, *_ in dead] == ["buyer13@example.com"]
    assert len(world.outbox("sent_at IS NOT NULL")) == 199
    members = world.account.lists[world.list_id].members
    assert len(members) == 199
    assert world.account.profile_by_email("buyer13@example.com") is None


async def test_slow_jobs_are_polled_until_complete(world: World) -> None:
    """1. Jobs take 0.3 s to run. 2. Deliver 100 profiles.
    Result: the job was polled more than once and its profiles are sent only after it completed."""
    world.fake.job_delay = 0.3
    await queue(world.store, profiles=[person(i) for i in range(100)])

    await world.deliverer().deliver_due()

    assert world.requests("get_bulk_import_profiles_job") >= 2
    assert len(world.account.lists[world.list_id].members) == 100
    assert world.outbox("sent_at IS NULL") == []


async def test_a_job_that_never_finishes_reschedules_its_rows(world: World) -> None:
    """1. Jobs take an hour. 2. Deliver 100 profiles with a 0.2 s job timeout.
    Result: no row is sent or dead; each counts one failed attempt."""
    world.fake.job_delay = 3600
    await queue(world.store, profiles=[person(i) for i in range(100)])

    await world.deliverer(job_timeout=0.2).deliver_due()

    assert {(sent, dead, attempts) for _, _, sent, dead, attempts, _ in world.outbox()} == {(0, 0, 1)}


async def test_a_profile_replaced_during_its_job_stays_pending_and_its_new_name_wins(world: World) -> None:
    """1. A slow job carries 100 profiles. 2. While it runs, buyer5's name changes. 3. Delivery finishes.
    Result: the replaced row was not marked sent by the job; it went out again, so Klaviyo has the new name."""
    world.fake.job_delay = 0.3
    await queue(world.store, profiles=[person(i) for i in range(100)])
    submitted = asyncio.Event()

    async def poll_sleep(seconds: float) -> None:
        submitted.set()  # the client waits before its first poll only once the job was accepted
        await asyncio.sleep(seconds)

    delivering = asyncio.create_task(world.deliverer(sleep=poll_sleep).deliver_due())
    await submitted.wait()
    assert len(world.account.import_jobs) == 1

    await queue(world.store, profiles=[person(5, first="Zoe")])
    await delivering

    profile = world.account.profile_by_email("buyer5@example.com")
    assert profile is not None
    assert profile.first_name == "Zoe"
    assert world.outbox("sent_at IS NULL") == []


async def test_live_events_wait_for_their_profiles_and_backfill_events_do_not(world: World) -> None:
    """1. A slow import job (0.3 s) carries 100 profiles; 3 live and 3 backfill events are due too. 2. Deliver.
    Result: the live events reach Klaviyo only after the job completed (a flow they fire finds the names);
    the backfill events went out while the job was still running."""
    world.fake.job_delay = 0.3
    live = [event(i, backfill=False, email=f"buyer{i}@example.com") for i in range(3)]
    history = [event(10 + i, backfill=True, email=f"buyer{10 + i}@example.com") for i in range(3)]
    await queue(world.store, [*live, *history], [person(i) for i in range(100)])

    await world.deliverer().deliver_due()

    [job] = world.account.import_jobs.values()
    assert job.completed_at is not None
    received = {e.unique_id: e.received for e in world.account.events}
    assert all(received[e.unique_id] >= job.completed_at for e in live)
    assert all(received[e.unique_id] < job.completed_at for e in history)


async def test_few_profiles_use_single_upserts_and_the_list_flush(world: World) -> None:
    """1. Queue 3 profiles. 2. Deliver. Result: three upserts, one list add, no job; ids recorded, on the list."""
    await queue(world.store, profiles=[person(i) for i in range(3)])

    await world.deliverer().deliver_due()

    assert world.account.import_jobs == {}
    assert world.requests("create_or_update_profile") == 3
    assert world.requests("add_profiles_to_list") == 1
    assert all(pid is not None and on_list == 1 for pid, on_list in world.profiles_table().values())


# --- client: import-errors paging ---------------------------------------------------------------------


async def test_import_errors_follow_the_cursor_pages(mocked: aioresponses) -> None:
    """The client reads every page of /import-errors (page[size]=100) by following links.next."""
    base = "https://a.klaviyo.com/api/profile-bulk-import-jobs/J1/import-errors"
    following = f"{base}?page%5Bcursor%5D=abc&page%5Bsize%5D=100"

    def error(i: int) -> dict[str, Any]:
        attributes = {"code": "invalid", "title": "Invalid", "detail": f"bad {i}",
                      "source": {"pointer": f"/data/attributes/profiles/data/{i}"},
                      "original_payload": {"email": f"p{i}@x.com"}}
        return {"type": "import-error", "id": f"e{i}", "attributes": attributes}

    mocked.get(f"{base}?page%5Bsize%5D=100", payload={"data": [error(0)], "links": {"next": following}})
    mocked.get(following, payload={"data": [error(4)], "links": {"next": None}})
    time = FakeClock()
    async with aiohttp.ClientSession() as session:
        client = KlaviyoClient(session, base_url="https://a.klaviyo.com", revision=REVISION, api_key=SecretStr(KEY),
                               limiter=AccountLimiter(1.0, clock=time.clock, sleep=time.sleep))
        failures = await client.profile_import_errors("J1")

    assert [(f.index, f.email, f.detail) for f in failures] == [(0, "p0@x.com", "invalid: bad 0"),
                                                                (4, "p4@x.com", "invalid: bad 4")]
    assert all(KEY not in f.raw for f in failures)
    assert json.loads(failures[1].raw)["id"] == "e4"


# --- store additions: batch marks, list membership by job, retention ----------------------------------


async def test_mark_sent_many_honours_the_version_guard(world: World) -> None:
    """1. Queue two profiles, read them, replace one's payload. 2. Mark both sent in one call.
    Result: only the unreplaced row is sent; the replaced one stays pending with its new payload."""
    await queue(world.store, profiles=[person(1), person(2)])
    rows = await world.store.due_rows(CID, datetime.now(UTC), 10)
    await queue(world.store, profiles=[person(2, first="Zoe")])

    marked = await world.store.mark_sent_many(rows, datetime.now(UTC))

    assert marked == 1
    [pending] = await world.store.due_rows(CID, datetime.now(UTC), 10)
    assert pending.key == "buyer2@example.com"
    assert json.loads(pending.payload)["first_name"] == "Zoe"


async def test_mark_retry_many_counts_an_attempt_and_reschedules_each_row(world: World) -> None:
    await queue(world.store, [event(i, backfill=True) for i in range(3)])
    rows = await world.store.due_rows(CID, datetime.now(UTC), 10)
    later = datetime.now(UTC) + timedelta(minutes=5)

    await world.store.mark_retry_many(rows, datetime.now(UTC), later, "klaviyo 503: down", 503)

    assert await world.store.due_rows(CID, datetime.now(UTC), 10) == []
    assert len(await world.store.due_rows(CID, later, 10)) == 3
    assert {(attempts, sent) for _, _, sent, _, attempts, _ in world.outbox()} == {(1, 0)}


async def test_listed_by_import_needs_no_profile_id_and_leaves_nothing_to_add(world: World) -> None:
    """A job-imported profile is on the list without a Klaviyo id; one whose id we knew is marked too."""
    await queue(world.store, profiles=[person(1), person(2)])
    [first, _] = await world.store.due_rows(CID, datetime.now(UTC), 10)
    await world.store.mark_sent(first, datetime.now(UTC), "PID1")
    assert await world.store.pending_list_members(CID) == ["PID1"]

    await world.store.mark_listed_by_import(CID, ["buyer1@example.com", "buyer2@example.com", "new@example.com"])

    assert await world.store.pending_list_members(CID) == []
    assert world.profiles_table() == {"buyer1@example.com": ("PID1", 1), "buyer2@example.com": (None, 1),
                                      "new@example.com": (None, 1)}


async def test_retention_blanks_old_sent_events_drops_old_sent_profiles_and_never_resends(world: World) -> None:
    """1. Send an event and a profile; leave another event pending and dead-letter a third. 2. Compact.
    Result: the sent event keeps its row (and key) with an empty payload, the sent profile row is gone, pending
    and dead rows are untouched; queueing the same event again adds nothing, a new name queues a fresh row."""
    await queue(world.store, [event(1, backfill=True), event(2, backfill=True), event(3, backfill=True)], [person(1)])
    rows = {r.key: r for r in await world.store.due_rows(CID, datetime.now(UTC), 10)}
    sent_at = datetime.now(UTC)
    await world.store.mark_sent_many([rows["1:shipped"], rows["buyer1@example.com"]], sent_at)
    await world.store.mark_dead(rows["3:shipped"], sent_at, 400, "invalid")

    touched = await world.store.compact_sent(sent_at + timedelta(seconds=1))

    assert touched == 2
    with closing(sqlite3.connect(world.db)) as db:
        left = dict(db.execute("SELECT key, payload FROM outbox"))
    assert left["1:shipped"] == ""
    assert json.loads(left["2:shipped"])["unique_id"] == "2:shipped"
    assert json.loads(left["3:shipped"])["unique_id"] == "3:shipped"
    assert "buyer1@example.com" not in left
    await queue(world.store, [event(1, backfill=True)], [person(1, first="Zoe")])
    pending = {r.key for r in await world.store.due_rows(CID, datetime.now(UTC), 10)}
    assert pending == {"2:shipped", "buyer1@example.com"}


async def test_retention_keeps_rows_sent_after_the_cutoff(world: World) -> None:
    await queue(world.store, [event(1, backfill=True)], [person(1)])
    rows = await world.store.due_rows(CID, datetime.now(UTC), 10)
    await world.store.mark_sent_many(rows, datetime.now(UTC))

    assert await world.store.compact_sent(datetime.now(UTC) - timedelta(days=30)) == 0
    payloads = world.outbox_payloads()
    assert len(payloads) == 2
    assert all(payload for _, payload in payloads)


async def test_rows_of_an_event_the_customer_no_longer_gets_are_dropped_not_sent(world: World) -> None:
    """1. Three live shipped events queued (as a replayed dead letter would be after a reload). 2. A deliverer for
    a customer that no longer gets "shipped" delivers. Result: Klaviyo receives none of them; they are gone from
    the outbox and counted as dropped; a delivered event beside them still goes out."""
    delivered = EventRow("9:delivered", 9, EventKind.DELIVERED, {**event(9, backfill=False).payload,
                                                                 "unique_id": "9:delivered",
                                                                 "metric": "Order delivered"})
    await queue(world.store, [event(i, backfill=False) for i in range(3)] + [delivered])
    deliverer = Deliverer(CID, world.store, world.client(), clock=lambda: datetime.now(UTC),
                          events=frozenset({EventKind.DELIVERED}))
    await deliverer.deliver_due()
    assert kept(world.account) == {"9:delivered"}
    assert [key for _, key, *_ in world.outbox("kind = 'event'")] == ["9:delivered"]
    assert (await world.store.customer_state(CID)).dropped_rows == 3


# -- routing by what a row is (history or live), not by how full the queue is ------------------------------------


def history_person(n: int) -> ProfileChange:
    """A profile change of a shopper whose orders in the page were all history."""
    return ProfileChange(f"buyer{n}@example.com", ProfileName("Ann", f"Lee{n}", None, "real"), history=True)


async def test_while_the_window_is_read_only_full_history_requests_go(world: World) -> None:
    """1. Queue 1,500 history events and 40 history profiles. 2. Deliver while the window is still being read
    (final=False). Result: one bulk request of exactly 1,000 events; the other 500 events and the 40 profiles wait.
    3. Deliver once the read is done (final=True). Result: one more bulk request (500) and one import job (40
    profiles, not single upserts); every row sent."""
    await queue(world.store, [event(i, backfill=True) for i in range(1500)], [history_person(i) for i in range(40)])
    deliverer = world.deliverer()

    await deliverer.deliver_due(final=False)
    assert [job.event_count for job in world.account.event_jobs] == [MAX_BULK_EVENTS]
    assert world.account.import_jobs == {}
    assert len(world.outbox("sent_at IS NULL AND kind = 'event'")) == 500
    assert len(world.outbox("sent_at IS NULL AND kind = 'profile'")) == 40

    await deliverer.deliver_due(final=True)
    assert sorted(job.event_count for job in world.account.event_jobs) == [500, MAX_BULK_EVENTS]
    assert [job.total_count for job in world.account.import_jobs.values()] == [40]
    assert world.requests("create_or_update_profile") == 0
    assert world.requests("create_event") == 0
    assert len(kept(world.account)) == 1500
    assert world.outbox("sent_at IS NULL") == []


async def test_live_rows_go_at_once_one_by_one_while_history_waits(world: World) -> None:
    """1. Queue 3 live events with their (live) profiles and 20 history events. 2. Deliver while reading.
    Result: the live profiles and events went through the single endpoints at once; the history events wait."""
    await queue(world.store, [event(100 + i, backfill=False) for i in range(3)] +
                [event(i, backfill=True) for i in range(20)], [person(100 + i) for i in range(3)])

    await world.deliverer().deliver_due(final=False)

    assert world.requests("create_event") == 3
    assert world.requests("create_or_update_profile") == 3
    assert world.account.event_jobs == []
    assert len(world.outbox("sent_at IS NULL")) == 20
    assert {key for _, key, *_ in world.outbox("sent_at IS NULL")} == {f"{i}:shipped" for i in range(20)}


async def test_a_live_event_makes_its_shoppers_queued_history_profile_live(world: World) -> None:
    """1. A history profile is queued (page one: only old orders of buyer5). 2. A later page brings a live event of
    the same shopper (the name is unchanged, so no new profile row). 3. Deliver while reading.
    Result: the profile went at once (single upsert, before the live event), so the flow's email can use the name."""
    await queue(world.store, profiles=[history_person(5)])
    await queue(world.store, [event(5, backfill=False)])

    await world.deliverer().deliver_due(final=False)

    assert world.requests("create_or_update_profile") == 1
    assert world.requests("create_event") == 1
    profile = world.account.profile_by_email("buyer5@example.com")
    assert profile is not None
    assert profile.first_name == "Ann"
    assert world.outbox("sent_at IS NULL") == []


async def test_a_history_profile_replaced_by_a_live_change_stays_live(world: World) -> None:
    """A pending live profile row replaced by a history change of the same shopper stays live (live wins)."""
    await queue(world.store, profiles=[person(9)])
    await queue(world.store, profiles=[ProfileChange("buyer9@example.com", ProfileName("Bo", "Lee9", None, "real"),
                                                     history=True)])

    await world.deliverer().deliver_due(final=False)

    assert world.requests("create_or_update_profile") == 1
    profile = world.account.profile_by_email("buyer9@example.com")
    assert profile is not None
    assert profile.first_name == "Bo"
