"""Store tests on real SQLite files in tmp_path: durability settings, atomic pages, outbox life cycle."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from klaviyo_bridge import logs
from klaviyo_bridge import store as store_module
from klaviyo_bridge.core import EventKind, EventRow, NameSource, OrderMemory, Plan, ProfileChange, ProfileName
from klaviyo_bridge.errors import MalformedOrder, StoreError
from klaviyo_bridge.store import SCHEMA_VERSION, OutboxRow, Store
from klaviyo_bridge.whiplash_auth import TokenRecord

NOW = datetime(2026, 3, 2, 12, 0, 0, 123456, tzinfo=UTC)
CID = 42
PAGE = 4096  # SQLite's default page size
TABLES = ("customers", "orders", "profiles", "outbox", "malformed", "whiplash_token", "meta", "invalid_emails")


def event(order_id: int, kind: EventKind, email: str = "ann@example.com", **props: Any) -> EventRow:
    """Build an event row the way the core would."""
    uid = f"{order_id}:{kind}"
    payload = {
        "email": email,
        "metric": f"Order {kind}",
        "time": NOW.isoformat(),
        "unique_id": uid,
        "backfill": False,
        "properties": {"order_id": order_id, **props},
    }
    return EventRow(uid, order_id, kind, payload)


def change(email: str, first: str | None = None, org: str | None = None) -> ProfileChange:
    """Build a profile change with a real (first) or company (org) name."""
    source: NameSource = "real" if first else "company" if org else "none"
    return ProfileChange(email, ProfileName(first, None, org, source))


def plan(
    orders: dict[int, OrderMemory] | None = None,
    profiles: Sequence[ProfileChange] = (),
    events: Sequence[EventRow] = (),
) -> Plan:
    """Build a plan; names follow the profile changes like the core's do."""
    return Plan(
        orders=orders or {},
        profiles=list(profiles),
        names={p.email: p.name for p in profiles},
        events=list(events),
    )


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file (sync helper, so the async tests stay free of blocking path calls)."""
    path.write_bytes(data)


def read_bytes(path: Path) -> bytes:
    """Read a file."""
    return path.read_bytes()


def peek(path: Path, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """Read committed data through an independent connection."""
    with closing(sqlite3.connect(path)) as db:
        return list(db.execute(sql, params).fetchall())


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Return every row of every table, for before/after comparisons."""
    return {t: sorted(peek(path, f"SELECT * FROM {t}"), key=repr) for t in TABLES}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Return a database path in an existing folder (the store never creates folders), with no file yet."""
    path = tmp_path / "state" / "nested" / "bridge.db"
    path.parent.mkdir(parents=True)
    return path


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    """Yield an open store and close it afterwards."""
    s = await Store.open(db_path)
    yield s
    await s.close()


async def pragma(s: Store, name: str) -> object:
    """Return one pragma's value on the store's own connection."""
    rows = list(await s._db.execute_fetchall(f"PRAGMA {name}"))
    return rows[0][0]


async def refused(path: Path, match: str, *, readonly: bool = False) -> StoreError:
    """Assert that opening ``path`` fails with StoreError; close the store if it wrongly opened."""
    try:
        opened = await Store.open(path, readonly=readonly)
    except StoreError as exc:
        error = exc
    else:
        await opened.close()  # an unclosed aiosqlite thread would keep pytest from exiting
        pytest.fail(f"{path} opened although it should have been refused")
    assert re.search(match, str(error)), str(error)
    return error


async def only_row(s: Store, now: datetime = NOW) -> OutboxRow:
    """Return the single due row."""
    rows = await s.due_rows(CID, now, 10)
    assert len(rows) == 1
    return rows[0]


# ---------------------------------------------------------------------------------------------------------
# Opening, schema, refusal of unusable files


async def test_open_creates_private_schema_with_wal_and_full_sync(store: Store, db_path: Path) -> None:
    assert await pragma(store, "journal_mode") == "wal"
    assert await pragma(store, "synchronous") == 2  # FULL
    assert await pragma(store, "foreign_keys") == 1
    assert await pragma(store, "busy_timeout") == 5000
    assert await pragma(store, "user_version") == SCHEMA_VERSION
    names = {r[0] for r in peek(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert set(TABLES) <= names
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    assert await store.integrity_ok()


async def test_reopen_keeps_data(db_path: Path) -> None:
    async with await Store.open(db_path) as s:
        await s.commit_page(CID, plan({7: OrderMemory(100)}, [change("a@x.io", "Ann")]), (NOW, 7), [], NOW)
    async with await Store.open(db_path) as s:
        assert await s.load_memory(CID, [7]) == {7: OrderMemory(100)}
        assert (await s.customer_state(CID)).cursor == (NOW, 7)
        assert len(await s.due_rows(CID, NOW, 10)) == 1


async def test_newer_schema_is_refused(db_path: Path) -> None:
    await (await Store.open(db_path)).close()
    with closing(sqlite3.connect(db_path)) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    await refused(db_path, "newer than this klaviyo-bridge")
    await refused(db_path, "newer than this klaviyo-bridge", readonly=True)


async def test_garbage_file_is_refused_and_left_untouched(db_path: Path) -> None:
    garbage = b"this is not a database, it is a grocery list\n" * 200
    write_bytes(db_path, garbage)
    error = await refused(db_path, "corrupt or not a SQLite database")
    assert "Do NOT delete" in str(error)
    assert read_bytes(db_path) == garbage


def smear_pages(path: Path) -> None:
    """Overwrite a few whole pages with garbage (SQLite then raises 'malformed')."""
    with path.open("r+b") as f:
        f.seek(PAGE * 3)
        f.write(b"\xa5" * PAGE * 4)


def break_a_cell_pointer(path: Path) -> None:
    """Point the first cell of the first data leaf page out of range (quick_check then reports it)."""
    data = bytearray(path.read_bytes())
    leaf = next(n for n in range(12, len(data) // PAGE) if data[n * PAGE] in (0x0A, 0x0D))
    data[leaf * PAGE + 8 : leaf * PAGE + 10] = b"\x00\x01"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [smear_pages, break_a_cell_pointer])
async def test_corrupted_database_is_refused(db_path: Path, corrupt: Callable[[Path], None]) -> None:
    async with await Store.open(db_path) as s:
        orders = {i: OrderMemory(100 + i % 7) for i in range(1, 3000)}
        await s.commit_page(CID, plan(orders), None, [], NOW)
    corrupt(db_path)
    error = await refused(db_path, "corrupt or not a SQLite database")
    assert "Do NOT delete" in str(error)


async def test_foreign_sqlite_database_is_refused(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as raw:
        raw.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    await refused(db_path, "not klaviyo-bridge's")
    assert peek(db_path, "PRAGMA user_version") == [(0,)]


async def test_readonly_open_refuses_writes_and_missing_or_unmigrated_files(
    tmp_path: Path, db_path: Path
) -> None:
    await refused(tmp_path / "missing.db", "no state database", readonly=True)
    with closing(sqlite3.connect(tmp_path / "empty.db")) as raw:
        raw.execute("PRAGMA user_version = 0")
    await refused(tmp_path / "empty.db", "start the daemon once", readonly=True)
    await (await Store.open(db_path)).close()
    async with await Store.open_readonly(db_path) as ro:
        with pytest.raises(StoreError, match="read-only"):
            await ro.ensure_customer(CID)
        assert await ro.customer_state(CID) == store_module.CustomerState(CID)


async def test_missing_folder_is_refused_and_never_created(tmp_path: Path) -> None:
    """1. Open a DB in a folder that does not exist (a mistyped state_path).
    Result: StoreError naming the folder; no folder or file is created, so history is never re-sent."""
    target = tmp_path / "nonexistent" / "dir" / "state.db"
    error = await refused(target, "folder .*nonexistent/dir does not exist")
    assert "never creates" in str(error)
    assert not (tmp_path / "nonexistent").exists()


async def test_new_database_is_announced_once(db_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """1. Open a DB that does not exist yet, then open it again.
    Result: one WARNING at creation saying every customer starts from its backfill window; none on reopening."""
    caplog.set_level(logging.INFO, logger="klaviyo_bridge.store_schema")
    await (await Store.open(db_path)).close()
    await (await Store.open(db_path)).close()
    created = [r for r in caplog.records if "new state database" in r.getMessage()]
    assert len(created) == 1
    assert created[0].levelno == logging.WARNING
    assert "starts from its backfill window" in created[0].getMessage()


async def test_unusable_location_is_a_store_error(tmp_path: Path) -> None:
    write_bytes(tmp_path / "plain-file", b"")
    await refused(tmp_path / "plain-file" / "bridge.db", "cannot open state database")


async def test_naive_datetimes_are_rejected(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        await store.record_poll(CID, datetime(2026, 1, 1), True, None)


# ---------------------------------------------------------------------------------------------------------
# commit_page


async def test_commit_page_writes_memory_names_rows_malformed_and_cursor(store: Store, db_path: Path) -> None:
    page = plan(
        {1: OrderMemory(100, frozenset({EventKind.PROCESSING})), 2: OrderMemory(300)},
        [change("ann@example.com", "Ann"), change("shop@example.com", org="Shop Ltd")],
        [event(1, EventKind.PROCESSING)],
    )
    bad = MalformedOrder(3, "missing email", '{"id": 3}')
    queued = await store.commit_page(CID, page, (NOW, 2), [bad], NOW)

    assert queued == 3
    assert await store.load_memory(CID, [1, 2, 3]) == page.orders
    assert await store.load_names(CID, ["ann@example.com", "shop@example.com", "nobody@x.io"]) == page.names
    rows = await store.due_rows(CID, NOW, 10)
    assert [(r.kind, r.key) for r in rows] == [
        ("profile", "ann@example.com"),
        ("profile", "shop@example.com"),
        ("event", "1:processing"),
    ]
    assert rows[0].payload == '{"email":"ann@example.com","first_name":"Ann","last_name":null}'
    assert rows[1].payload == '{"email":"shop@example.com","organization":"Shop Ltd"}'
    assert rows[2].payload.startswith('{"backfill":false,"email":"ann@example.com",')
    assert (await store.customer_state(CID)).cursor == (NOW, 2)
    assert peek(db_path, "SELECT order_id, why FROM malformed") == [(3, "missing email")]


async def test_commit_page_is_all_or_nothing(
    store: Store, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.commit_page(CID, plan({1: OrderMemory(100)}, [change("a@x.io", "Ann")]), (NOW, 1), [], NOW)
    before = snapshot(db_path)

    async def disk_on_fire(*args: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(store_module, "set_cursor", disk_on_fire)
    page = plan(
        {1: OrderMemory(300, frozenset({EventKind.SHIPPED})), 2: OrderMemory(100)},
        [change("a@x.io", "Anna"), change("b@x.io", "Bob")],
        [event(1, EventKind.SHIPPED), event(2, EventKind.PROCESSING)],
    )
    with pytest.raises(OSError, match="disk on fire"):
        await store.commit_page(CID, page, (NOW + timedelta(hours=1), 2), [MalformedOrder(9, "x", "y")], NOW)

    assert snapshot(db_path) == before
    monkeypatch.undo()
    # The connection was not left inside the failed transaction.
    assert await store.commit_page(CID, page, (NOW, 2), [], NOW) == 3


async def test_commit_page_rolls_back_on_an_unserialisable_payload(store: Store, db_path: Path) -> None:
    await store.ensure_customer(CID)
    before = snapshot(db_path)
    unserialisable = {"unique_id": "2:shipped", "properties": {"x": object()}}
    broken = EventRow("2:shipped", 2, EventKind.SHIPPED, unserialisable)
    page = plan({1: OrderMemory(300)}, [change("a@x.io", "Ann")], [event(1, EventKind.SHIPPED), broken])
    with pytest.raises(TypeError):
        await store.commit_page(CID, page, (NOW, 2), [], NOW)
    assert snapshot(db_path) == before


async def test_cancelled_commit_rolls_back(
    store: Store, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.ensure_customer(CID)
    before = snapshot(db_path)
    inside = asyncio.Event()

    async def hang(*args: object) -> None:
        inside.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(store_module, "set_cursor", hang)
    task = asyncio.create_task(store.commit_page(CID, plan({1: OrderMemory(100)}), (NOW, 1), [], NOW))
    await asyncio.wait_for(inside.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert snapshot(db_path) == before
    monkeypatch.undo()
    await store.commit_page(CID, plan({1: OrderMemory(100)}), (NOW, 1), [], NOW)
    assert await store.load_memory(CID, [1]) == {1: OrderMemory(100)}


async def test_event_unique_id_is_never_queued_twice_even_after_sent(store: Store, db_path: Path) -> None:
    assert await store.commit_page(CID, plan(events=[event(5, EventKind.SHIPPED)]), None, [], NOW) == 1
    row = await only_row(store)
    assert await store.mark_sent(row, NOW)
    again = event(5, EventKind.SHIPPED, tracking="changed")
    assert await store.commit_page(CID, plan(events=[again, again]), None, [], NOW) == 0
    assert await store.due_rows(CID, NOW, 10) == []
    assert peek(db_path, "SELECT payload, sent_at IS NOT NULL FROM outbox") == [(row.payload, 1)]


async def test_event_payload_must_carry_the_row_unique_id(store: Store) -> None:
    wrong = EventRow("5:shipped", 5, EventKind.SHIPPED, {"unique_id": "5:delivered", "properties": {}})
    with pytest.raises(ValueError, match="unique_id"):
        await store.commit_page(CID, plan(events=[wrong]), None, [], NOW)


async def test_announced_events_are_never_forgotten(store: Store) -> None:
    shipped = frozenset({EventKind.SHIPPED})
    await store.commit_page(CID, plan({1: OrderMemory(300, shipped)}), None, [], NOW)
    await store.commit_page(CID, plan({1: OrderMemory(400, frozenset({EventKind.DELIVERED}))}), None, [], NOW)
    assert await store.load_memory(CID, [1]) == {1: OrderMemory(400, shipped | {EventKind.DELIVERED})}


async def test_load_memory_handles_more_ids_than_one_in_list(store: Store) -> None:
    kinds = list(EventKind)
    orders = {i: OrderMemory(i % 5, frozenset(kinds[: i % 5])) for i in range(1, 1201)}
    await store.commit_page(CID, plan(orders), None, [], NOW)
    await store.commit_page(CID + 1, plan({5000: OrderMemory(1)}), None, [], NOW)
    statements: list[str] = []
    await store._db.set_trace_callback(statements.append)
    assert await store.load_memory(CID, range(1, 1301)) == orders
    assert sum("FROM orders" in s for s in statements) == 3  # 1300 ids in IN-lists of at most 500
    assert await store.load_memory(CID, [5000]) == {}


async def test_malformed_orders_keep_first_seen_and_clear_once_readable(store: Store, db_path: Path) -> None:
    later = NOW + timedelta(minutes=5)
    await store.commit_page(CID, plan(), None, [MalformedOrder(3, "bad status", "{}")], NOW)
    again = [MalformedOrder(3, "no email", "{}"), MalformedOrder(None, "x", "")]
    await store.commit_page(CID, plan(), None, again, later)
    sql = "SELECT order_id, why, first_seen, last_seen FROM malformed ORDER BY order_id"
    assert peek(db_path, sql) == [
        (0, "x", later.isoformat(), later.isoformat()),
        (3, "no email", NOW.isoformat(), later.isoformat()),
    ]
    assert (await store.counts(CID, NOW)).malformed == 2
    await store.commit_page(CID, plan({3: OrderMemory(100)}), None, [], later)
    assert (await store.counts(CID, NOW)).malformed == 1


async def test_concurrent_customers_share_the_writer_without_interleaving(store: Store) -> None:
    async def one(cid: int) -> None:
        page = plan({cid: OrderMemory(100)}, [change(f"{cid}@x.io", "N")], [event(cid, EventKind.PROCESSING)])
        await store.commit_page(cid, page, (NOW, cid), [], NOW)
        for row in await store.due_rows(cid, NOW, 10):
            assert await store.mark_sent(row, NOW, f"P{cid}" if row.kind == "profile" else None)

    await asyncio.gather(*(one(cid) for cid in range(1, 21)))
    for cid in range(1, 21):
        assert (await store.counts(cid, NOW)).sent == 2
        assert await store.pending_list_members(cid) == [f"P{cid}"]


# ---------------------------------------------------------------------------------------------------------
# Profile rows


async def test_replaced_profile_refuses_stale_mark_sent_and_stays_pending(store: Store) -> None:
    await store.commit_page(CID, plan(profiles=[change("a@x.io", org="Shop")]), None, [], NOW)
    in_flight = await only_row(store)
    assert await store.commit_page(CID, plan(profiles=[change("a@x.io", "Ann")]), None, [], NOW) == 0

    assert not await store.mark_sent(in_flight, NOW)
    await store.mark_dead(in_flight, NOW, 400, "refused the old payload")  # stale version: no effect
    fresh = await only_row(store)
    assert (fresh.id, fresh.version) == (in_flight.id, in_flight.version + 1)
    assert fresh.payload == '{"email":"a@x.io","first_name":"Ann","last_name":null}'
    assert await store.mark_sent(fresh, NOW)
    assert await store.due_rows(CID, NOW, 10) == []


async def test_same_pending_profile_payload_keeps_its_version(store: Store) -> None:
    await store.commit_page(CID, plan(profiles=[change("a@x.io", "Ann")]), None, [], NOW)
    first = await only_row(store)
    await store.commit_page(CID, plan(profiles=[change("a@x.io", "Ann")]), None, [], NOW)
    assert await only_row(store) == first


async def test_last_change_of_an_email_in_a_page_wins(store: Store) -> None:
    page = plan(profiles=[change("a@x.io", org="Shop"), change("b@x.io", "Bob"), change("a@x.io", "Ann")])
    assert await store.commit_page(CID, page, None, [], NOW) == 2
    rows = await store.due_rows(CID, NOW, 10)
    assert [(r.key, r.version) for r in rows] == [("a@x.io", 1), ("b@x.io", 1)]
    assert rows[0].payload == '{"email":"a@x.io","first_name":"Ann","last_name":null}'
    assert (await store.load_names(CID, ["a@x.io"]))["a@x.io"].first_name == "Ann"


async def test_sent_or_dead_profile_is_queued_again_on_change(store: Store) -> None:
    await store.commit_page(CID, plan(profiles=[change("a@x.io", org="Shop")]), None, [], NOW)
    await store.mark_sent(await only_row(store), NOW)
    assert await store.commit_page(CID, plan(profiles=[change("a@x.io", "Ann")]), None, [], NOW) == 1
    row = await only_row(store)
    await store.mark_dead(row, NOW, 400, "bad email")
    assert await store.commit_page(CID, plan(profiles=[change("a@x.io", "Anna")]), None, [], NOW) == 1
    again = await only_row(store)
    assert (again.version, again.attempts) == (row.version + 1, 0)
    assert again.payload == '{"email":"a@x.io","first_name":"Anna","last_name":null}'


async def test_mark_sent_records_profile_id_and_list_membership(store: Store) -> None:
    async def send(first: str, profile_id: str) -> None:
        await store.commit_page(CID, plan(profiles=[change("a@x.io", first)]), None, [], NOW)
        assert await store.mark_sent(await only_row(store), NOW, profile_id)

    await store.commit_page(CID, plan(events=[event(1, EventKind.SHIPPED)]), None, [], NOW)
    assert await store.mark_sent(await only_row(store), NOW, "ignored-for-events")
    await send("Ann", "P1")
    assert await store.pending_list_members(CID) == ["P1"]
    await store.mark_on_list(CID, ["P1"])
    assert await store.pending_list_members(CID) == []
    await send("Anna", "P1")
    assert await store.pending_list_members(CID) == []
    await send("Annie", "P2")
    assert await store.pending_list_members(CID) == ["P2"]
    assert (await store.load_names(CID, ["a@x.io"]))["a@x.io"].first_name == "Annie"


async def test_pending_list_members_is_bounded(store: Store) -> None:
    profiles = [change(f"{i}@x.io", "N") for i in range(5)]
    await store.commit_page(CID, plan(profiles=profiles), None, [], NOW)
    for row in await store.due_rows(CID, NOW, 10):
        await store.mark_sent(row, NOW, f"P-{row.key}")
    first = await store.pending_list_members(CID, limit=3)
    assert len(first) == 3
    await store.mark_on_list(CID, first)
    assert len(await store.pending_list_members(CID, limit=3)) == 2


# ---------------------------------------------------------------------------------------------------------
# Due rows, retries, dead letters


async def test_due_rows_respect_schedule_order_kind_and_exclude_sent_and_dead(store: Store) -> None:
    events = [event(i, EventKind.SHIPPED) for i in range(1, 5)]
    await store.commit_page(CID, plan(profiles=[change("a@x.io", "Ann")], events=events), None, [], NOW)
    profile, sent, dead, later, due = await store.due_rows(CID, NOW, 10)
    assert await store.mark_sent(sent, NOW)
    await store.mark_dead(dead, NOW, 422, "nope")
    await store.mark_retry(later, NOW, NOW + timedelta(minutes=10), "503", 503)

    assert [r.id for r in await store.due_rows(CID, NOW, 10)] == [profile.id, due.id]
    assert [r.id for r in await store.due_rows(CID, NOW, 1)] == [profile.id]
    assert [r.id for r in await store.due_rows(CID, NOW, 10, kind="event")] == [due.id]
    assert [r.id for r in await store.due_rows(CID, NOW + timedelta(minutes=10), 10)] == [
        profile.id,
        later.id,
        due.id,
    ]
    assert await store.due_rows(CID + 1, NOW, 10) == []
    assert await store.due_rows(CID, NOW - timedelta(seconds=1), 10) == []


async def test_next_due_at_tracks_the_earliest_pending_row(store: Store) -> None:
    assert await store.next_due_at(CID) is None
    await store.commit_page(CID, plan(events=[event(1, EventKind.SHIPPED)]), None, [], NOW)
    row = await only_row(store)
    assert await store.next_due_at(CID) == NOW
    await store.mark_retry(row, NOW, NOW + timedelta(seconds=30), "timeout", None)
    assert await store.next_due_at(CID) == NOW + timedelta(seconds=30)
    await store.mark_sent(row, NOW)
    assert await store.next_due_at(CID) is None


async def test_mark_retry_counts_attempts_and_ignores_stale_versions(store: Store, db_path: Path) -> None:
    await store.commit_page(CID, plan(profiles=[change("a@x.io", "Ann")]), None, [], NOW)
    row = await only_row(store)
    await store.mark_retry(row, NOW, NOW, "500 boom", 500)
    await store.mark_retry(row, NOW, NOW, "429 slow down", 429)
    assert (await only_row(store)).attempts == 2
    assert peek(db_path, "SELECT last_status, last_error FROM outbox") == [(429, "429 slow down")]
    await store.commit_page(CID, plan(profiles=[change("a@x.io", "Anna")]), None, [], NOW)
    await store.mark_retry(row, NOW, NOW + timedelta(hours=1), "stale", 500)  # old version: no effect
    assert (await only_row(store)).attempts == 2


async def test_dead_rows_and_replay(store: Store) -> None:
    two = [event(1, EventKind.SHIPPED), event(2, EventKind.SHIPPED)]
    await store.commit_page(CID, plan(events=two), None, [], NOW)
    await store.commit_page(CID + 1, plan(events=[event(3, EventKind.SHIPPED)]), None, [], NOW)
    first, second = await store.due_rows(CID, NOW, 10)
    (other,) = await store.due_rows(CID + 1, NOW, 10)
    for row in (first, second, other):
        await store.mark_dead(row, NOW, 400, '{"errors":[{"detail":"bad"}]}')

    dead = await store.dead_rows(CID)
    assert [(d.id, d.key, d.status, d.attempts, d.dead_at) for d in dead] == [
        (first.id, "1:shipped", 400, 1, NOW),
        (second.id, "2:shipped", 400, 1, NOW),
    ]
    assert dead[0].response == '{"errors":[{"detail":"bad"}]}'
    assert len(await store.dead_rows(None)) == 3
    assert await store.due_rows(CID, NOW, 10) == []

    assert await store.replay_dead(CID, [], NOW) == 0
    assert await store.replay_dead(CID, [second.id, other.id], NOW) == 1  # other belongs to another customer
    replayed = await only_row(store)
    assert (replayed.id, replayed.attempts, replayed.version) == (second.id, 0, second.version + 1)
    assert replayed.payload == second.payload
    assert await store.replay_dead(None, None, NOW) == 2
    assert await store.dead_rows(None) == []


async def test_counts(store: Store) -> None:
    events = [event(i, EventKind.SHIPPED) for i in range(1, 5)]
    await store.commit_page(CID, plan(events=events), None, [MalformedOrder(9, "x", "y")], NOW,
                            email_invalid={21: True, 22: True, 23: False})
    old, recent, dead, _queued = await store.due_rows(CID, NOW, 10)
    await store.mark_sent(old, NOW - timedelta(days=2))
    await store.mark_sent(recent, NOW)
    await store.mark_dead(dead, NOW, 400, "bad")
    counts = await store.counts(CID, NOW - timedelta(days=1))
    assert counts == store_module.Counts(queued=1, sent=2, sent_since=1, dead=1, malformed=1, invalid_email=2,
                                         oldest_queued_at=NOW)
    assert await store.counts(CID + 1, NOW) == store_module.Counts(0, 0, 0, 0, 0)
    # A later read of order 21 with a valid email takes it off the list; 22 stays.
    await store.commit_page(CID, plan(), None, [], NOW, email_invalid={21: False})
    assert (await store.counts(CID, NOW)).invalid_email == 1


async def test_klaviyo_error_streak_starts_once_and_clears(store: Store) -> None:
    """1. Two Klaviyo failures, then a success. Result: the streak starts at the first failure, the last error
    is kept for status after the streak ends."""
    await store.record_klaviyo_error(CID, "klaviyo 503: down", NOW)
    await store.record_klaviyo_error(CID, "klaviyo 503: still down", NOW + timedelta(minutes=1))
    state = await store.customer_state(CID)
    assert (state.klaviyo_failing_since, state.klaviyo_error) == (NOW, "klaviyo 503: still down")
    assert state.klaviyo_error_at == NOW + timedelta(minutes=1)
    await store.clear_klaviyo_streak(CID)
    state = await store.customer_state(CID)
    assert (state.klaviyo_failing_since, state.klaviyo_error) == (None, "klaviyo 503: still down")


async def test_profile_references_resolve_to_their_email(store: Store) -> None:
    """1. Queue two profiles; resolve the log reference of one. Result: exactly that customer and email; the
    reference is stable for the database's key and differs from a plain hash."""
    await store.commit_page(CID, plan(profiles=[change("ann@example.com", "Ann"), change("bob@example.com", "Bob")]),
                            None, [], NOW)
    ref = logs.keyed_ref(store.profile_key, "ann@example.com")
    assert re.fullmatch(r"[0-9a-f]{10}", ref)
    assert logs.profile_ref("ann@example.com") == ref
    assert await store.profiles_with_ref(ref) == [(CID, "ann@example.com")]
    assert await store.profiles_with_ref("0000000000") == []


# ---------------------------------------------------------------------------------------------------------
# Customer state, setup, token


async def test_key_health_reports_changes_only(store: Store) -> None:
    assert not await store.set_key_health(CID, True, None, NOW)  # new customers start healthy
    assert await store.set_key_health(CID, False, "401 refused", NOW)
    assert not await store.set_key_health(CID, False, "403 refused", NOW)
    state = await store.customer_state(CID)
    assert (state.key_healthy, state.key_error) == (False, "403 refused")
    assert await store.set_key_health(CID, True, None, NOW)
    assert (await store.customer_state(CID)).key_error is None


async def test_record_poll_tracks_success_and_last_error(store: Store) -> None:
    later, latest = NOW + timedelta(minutes=1), NOW + timedelta(minutes=2)
    await store.record_poll(CID, NOW, True, None)
    await store.record_poll(CID, later, False, "whiplash 503: down")
    state = await store.customer_state(CID)
    assert (state.last_poll_at, state.last_poll_ok_at, state.last_error) == (later, NOW, "whiplash 503: down")
    await store.record_poll(CID, latest, True, None)
    state = await store.customer_state(CID)
    assert (state.last_poll_at, state.last_poll_ok_at, state.last_error) == (latest, latest, None)


async def test_queue_setup_is_atomic_and_idempotent(store: Store) -> None:
    samples = [event(0, kind, email="setup@x.io") for kind in EventKind]
    profile = change("setup@x.io", "Setup")
    await store.queue_setup(CID, "LIST1", profile, samples, NOW)
    await store.queue_setup(CID, "LIST1", profile, samples, NOW)
    state = await store.customer_state(CID)
    assert (state.list_id, state.setup_done) == ("LIST1", True)
    rows = await store.due_rows(CID, NOW, 10)
    assert [r.kind for r in rows] == ["profile"] + ["event"] * 4
    assert await store.load_names(CID, ["setup@x.io"]) == {"setup@x.io": profile.name}
    await store.set_list_id(CID, "LIST2")
    assert (await store.customer_state(CID)).list_id == "LIST2"


async def test_whiplash_token_round_trip(db_path: Path) -> None:
    first = TokenRecord("access-1", NOW + timedelta(hours=2), "refresh-1", "seed")
    rotated = TokenRecord("access-2", NOW + timedelta(hours=4), "refresh-2", "seed")
    async with await Store.open(db_path) as s:
        assert await s.load_whiplash_token() is None
        await s.save_whiplash_token(first)
        assert await s.load_whiplash_token() == first
        await s.save_whiplash_token(rotated)
    async with await Store.open(db_path) as s:
        assert await s.load_whiplash_token() == rotated
    assert peek(db_path, "SELECT count(*) FROM whiplash_token") == [(1,)]


# ---------------------------------------------------------------------------------------------------------
# Readers next to the writer


async def test_readonly_reader_sees_committed_data_while_the_writer_works(
    store: Store, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.commit_page(CID, plan(events=[event(1, EventKind.SHIPPED)]), (NOW, 1), [], NOW)
    reader = await Store.open(db_path, readonly=True)
    seen: list[tuple[int, tuple[datetime, int] | None]] = []
    original: Callable[..., Any] = store_module.set_cursor

    async def look_then_set(*args: Any) -> None:
        # Runs inside the writer's open transaction: the reader must neither block nor see it.
        state = await reader.customer_state(CID)
        seen.append(((await reader.counts(CID, NOW)).queued, state.cursor))
        await original(*args)

    monkeypatch.setattr(store_module, "set_cursor", look_then_set)
    try:
        later = NOW + timedelta(minutes=1)
        await store.commit_page(CID, plan(events=[event(2, EventKind.SHIPPED)]), (later, 2), [], NOW)
        assert seen == [(1, (NOW, 1))]
        assert (await reader.counts(CID, NOW)).queued == 2
        assert (await reader.customer_state(CID)).cursor == (later, 2)
    finally:
        await reader.close()


async def test_readonly_reader_opens_after_the_writer_has_closed(db_path: Path) -> None:
    async with await Store.open(db_path) as s:
        await s.commit_page(CID, plan({1: OrderMemory(100)}), None, [], NOW)
    async with await Store.open(db_path, readonly=True) as ro:
        assert await ro.load_memory(CID, [1]) == {1: OrderMemory(100)}
        assert await ro.integrity_ok()


async def test_dropping_a_disabled_events_pending_rows(store: Store) -> None:
    """1. Pending rows: two shipped events, a delivered one, the shipped and delivered samples (one under a
    renamed metric whose name holds colons), a profile; one shipped event already sent, one dead.
    2. Drop shipped. Result: exactly the pending shipped rows and the shipped samples go (3), counted for status;
    sent and dead rows, other events and profiles stay; the order memory is untouched. 3. Drop nothing. Result: 0.
    4. drop_rows on one row. Result: that row goes and the count grows."""
    events = [event(1, EventKind.SHIPPED), event(2, EventKind.SHIPPED), event(3, EventKind.DELIVERED),
              event(4, EventKind.SHIPPED), event(5, EventKind.SHIPPED)]
    samples = [EventRow(uid, None, kind, {"unique_id": uid, "email": "s@example.com"})
               for uid, kind in (("sample:shipped:Ship: it: now", EventKind.SHIPPED),
                                 ("sample:delivered", EventKind.DELIVERED))]
    await store.commit_page(CID, plan({1: OrderMemory(300, frozenset({EventKind.SHIPPED}))},
                                      [change("ann@example.com", "Ann")], events + samples), None, [], NOW)
    rows = {r.key: r for r in await store.due_rows(CID, NOW, 20)}
    await store.mark_sent(rows["4:shipped"], NOW)
    await store.mark_dead(rows["5:shipped"], NOW, 400, "bad")

    assert await store.drop_pending_events(CID, {EventKind.SHIPPED}) == 3
    left = sorted(r.key for r in await store.due_rows(CID, NOW, 20))
    assert left == ["3:delivered", "ann@example.com", "sample:delivered"]
    assert (await store.customer_state(CID)).dropped_rows == 3
    assert [d.key for d in await store.dead_rows(CID)] == ["5:shipped"]
    assert await store.load_memory(CID, [1]) == {1: OrderMemory(300, frozenset({EventKind.SHIPPED}))}
    assert await store.drop_pending_events(CID, set()) == 0
    assert await store.drop_pending_events(CID + 1, {EventKind.DELIVERED}) == 0

    [delivered] = [r for r in await store.due_rows(CID, NOW, 20) if r.key == "3:delivered"]
    assert await store.drop_rows([delivered]) == 1
    assert (await store.customer_state(CID)).dropped_rows == 4
    assert await store.drop_rows([]) == 0
