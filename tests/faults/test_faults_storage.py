"""Storage faults: the state DB locked by another process, a full disk, an older schema, a corrupt file and an
unusable path. The bridge waits, logs and resumes — or refuses to start with a clear message — but never
corrupts its state, never starts from scratch, and never loses or doubles an event.

The full disk is real when it can be: a 4 MB tmpfs (CI runs as root). Where mounting is not allowed, the same
test caps the database with ``PRAGMA max_page_count`` instead, so it runs everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kit.faultkit import (
    Bridge,
    InProcess,
    Ledger,
    Shop,
    Sims,
    assert_delivered_once,
    config_text,
    facts,
    in_process,
    serve,
    shops,
)

from klaviyo_bridge import store_schema
from klaviyo_bridge.core import EventKind, OrderMemory
from klaviyo_bridge.sandbox.whiplash import OrderScript
from klaviyo_bridge.store import SCHEMA_VERSION, Store

A = shops(701)[0]
LOCK_HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def seed(sims: Sims, shop: Shop) -> tuple[OrderScript, Ledger]:
    """Give the shop history and live orders; return its script and what the bridge will see."""
    script = OrderScript(sims.whiplash, shop.cid, seed=shop.cid)
    script.backfill(15, days=10)
    script.spawn(3)
    ledger = Ledger(sims.whiplash)
    ledger.observe_all()
    return script, ledger


@contextlib.asynccontextmanager
async def write_lock(path: Path, seconds: float) -> AsyncIterator[asyncio.subprocess.Process]:
    """Hold the database's write lock from another process for ``seconds`` (yields once it holds it)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", LOCK_HOLDER, str(path), str(seconds),
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"locked\n"
    try:
        yield proc
    finally:
        await asyncio.wait_for(proc.wait(), seconds + 10)


async def test_a_short_foreign_write_lock_is_waited_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """1. Deliver everything. 2. New orders arrive while another process holds the write lock for 1 s.
    3. Cycle. Result: the commit waits (busy timeout), no error is logged, the new events go out once."""
    async with serve([A]) as sims:
        script, ledger = seed(sims, A)
        bridge = Bridge(tmp_path, sims, [A]).write()
        async with in_process(bridge) as run:
            await run.drain()
            script.spawn(2)
            ledger.observe_all()
            async with write_lock(bridge.state_path, 1.0):
                started = asyncio.get_running_loop().time()
                await run.cycle()
                waited = asyncio.get_running_loop().time() - started
            await run.drain()
        assert waited >= 0.5
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        assert_delivered_once(sims, bridge, ledger)


async def test_a_long_foreign_write_lock_is_logged_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. Busy timeout 0.3 s. 2. Another process holds the write lock for 2 s while new orders arrive.
    3. Cycle. Result: the poll fails with 'database is locked' logged as ERROR; nothing raises.
    4. The lock is released; drain. Result: everything delivered once, the DB intact."""
    monkeypatch.setattr(store_schema, "BUSY_TIMEOUT_MS", 300)
    async with serve([A]) as sims:
        script, ledger = seed(sims, A)
        bridge = Bridge(tmp_path, sims, [A]).write()
        async with in_process(bridge) as run:
            await run.drain()
            script.spawn(2)
            ledger.observe_all()
            async with write_lock(bridge.state_path, 2.0):
                await run.cycle()
                failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("poll failed")]
                assert failed
                assert "database is locked" in failed[0]
            await run.drain()
        assert_delivered_once(sims, bridge, ledger)


# ------------------------------------------------------------------------------------------ disk full


@dataclass
class SmallDisk:
    """Where the state DB lives, and how to make its disk full: a real tmpfs, or a page cap as a fallback."""

    root: Path
    real: bool

    async def fill(self, run: InProcess) -> None:
        """Leave no room for the database to grow."""
        checkpoint_truncate(run.settings.bridge.state_path)  # an empty WAL must grow to take the next commit
        if self.real:
            with (self.root / "filler").open("wb") as filler:
                with contextlib.suppress(OSError):
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
                with contextlib.suppress(OSError):
                    os.fsync(filler.fileno())
            return
        pages = sqlite3.connect(run.settings.bridge.state_path).execute("PRAGMA page_count").fetchone()[0]
        await run.store._db.execute(f"PRAGMA max_page_count = {pages}")

    async def free(self, run: InProcess) -> None:
        """Give the space back."""
        if self.real:
            (self.root / "filler").unlink()
            return
        await run.store._db.execute("PRAGMA max_page_count = 1073741823")


def checkpoint_truncate(path: Path) -> None:
    """Checkpoint the WAL into the database and truncate it to zero bytes."""
    db = sqlite3.connect(path, timeout=10)
    try:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        db.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """Mount a 4 MB tmpfs (root only); fall back to a page cap where mounting is not allowed."""
    root = tmp_path / "disk"
    root.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(root)], capture_output=True, check=False
    ).returncode == 0
    try:
        yield SmallDisk(root, mounted)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], check=True)


async def test_disk_full_is_an_error_not_a_corruption_and_passes(
    small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Deliver everything. 2. The disk fills up; new orders arrive. 3. Cycle.
    Result: the poll fails with 'disk is full' as ERROR, nothing raises, the DB passes integrity_check and holds
    nothing of the new page. 4. Space returns; drain. Result: the new events go out, everything once."""
    async with serve([A]) as sims:
        script, ledger = seed(sims, A)
        bridge = Bridge(small_disk.root, sims, [A]).write()
        async with in_process(bridge) as run:
            await run.drain()
            before = facts(bridge.state_path).statuses[A.cid]
            await small_disk.fill(run)
            new = script.spawn(3)
            ledger.observe_all()
            await run.cycle()
            failed = [r for r in caplog.records if r.getMessage().startswith("poll failed")]
            assert failed
            assert "full" in failed[0].getMessage()
            state = facts(bridge.state_path)
            assert state.integrity == ["ok"]
            assert state.statuses[A.cid] == before
            assert not set(new) & set(state.statuses[A.cid])
            await small_disk.free(run)
            await run.drain()
        assert_delivered_once(sims, bridge, ledger)
    print(f"disk full via {'tmpfs' if small_disk.real else 'max_page_count'}")


async def test_disk_full_between_send_and_mark_resends_at_most_the_unmarked(
    small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    """1. New orders are polled and queued. 2. The disk fills up. 3. Deliver: Klaviyo takes the events but the
    marks cannot be written. 4. Space returns; drain.
    Result: the failed marks pause delivery with an ERROR, nothing raises; re-sends are at most the rows that
    were unmarked; everything delivered once."""
    async with serve([A]) as sims:
        script, ledger = seed(sims, A)
        bridge = Bridge(small_disk.root, sims, [A]).write()
        async with in_process(bridge) as run:
            await run.drain()
            script.spawn(4)
            ledger.observe_all()
            worker = run.workers[A.cid]
            await worker.poll_cycle()
            pending = sum(facts(bridge.state_path).pending_events.values())
            assert pending == 4
            await small_disk.fill(run)
            await worker.deliver_cycle()
            await small_disk.free(run)
            await run.drain()
        if small_disk.real:  # a page cap does not stop in-place updates: only a real full disk fails the marks
            paused = [r for r in caplog.records if r.getMessage().startswith("delivery paused")]
            assert paused
            assert "full" in paused[0].getMessage()
        assert sims.account(A).duplicate_events <= pending
        assert_delivered_once(sims, bridge, ledger)


# ------------------------------------------------------------------------------- schema and corruption


async def test_v1_database_is_migrated_with_its_data(tmp_path: Path) -> None:
    """1. A state DB written by schema v1: a cursor, a shipped order, a queued event. 2. Open it.
    Result: it is migrated to the current version, nothing is lost, and the shipped order counts as set at the
    upgrade (so the reconcile sweep re-reads it for reconcile_days from now)."""
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    for statement in store_schema.SCHEMA_V1:
        db.execute(statement)
    db.executescript(
        """PRAGMA user_version = 1;
        INSERT INTO customers (customer_id, cursor_ts, cursor_id, setup_done, list_id)
          VALUES (7, '2026-01-02T03:04:05.000000+00:00', 99, 1, 'LiSt01');
        INSERT INTO orders (customer_id, order_id, status, announced) VALUES (7, 99, 300, 5), (7, 98, 100, 1);
        INSERT INTO outbox (customer_id, kind, key, payload, created_at, next_attempt_at)
          VALUES (7, 'event', '99:shipped', '{"unique_id":"99:shipped"}', '2026-01-02T03:04:05.000000+00:00',
                  '2026-01-02T03:04:05.000000+00:00'),
                 (7, 'event', '98:processing', '{"backfill":true,"unique_id":"98:processing"}',
                  '2026-01-02T03:04:05.000000+00:00', '2026-01-02T03:04:05.000000+00:00');"""
    )
    db.commit()
    db.close()
    now = datetime.now(UTC)
    async with await Store.open(path) as store:
        assert SCHEMA_VERSION == 4
        state = await store.customer_state(7)
        assert state.cursor == (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), 99)
        assert (state.list_id, state.setup_done, state.reconciled_at) == ("LiSt01", True, None)
        memory = await store.load_memory(7, [98, 99])
        assert memory == {99: OrderMemory(300, frozenset({EventKind.PROCESSING, EventKind.SHIPPED})),
                          98: OrderMemory(100, frozenset({EventKind.PROCESSING}))}
        live, history = await store.due_rows(7, now, 10)
        assert (live.key, live.payload, live.history) == ("99:shipped", '{"unique_id":"99:shipped"}', False)
        assert (history.key, history.history) == ("98:processing", True)  # v4: queued backfill events are history
        assert await store.orders_to_reconcile(7, [300], EventKind.DELIVERED, now - timedelta(days=30)) == [99]
        assert await store.orders_to_reconcile(7, [300], EventKind.DELIVERED, now + timedelta(minutes=1)) == []
        assert await store.integrity_ok()
        assert len(store.profile_key) == 32  # v3: the key profile references in logs are made with
        assert (await store.counts(7, now)).invalid_email == 0
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 4


async def test_corrupt_state_db_refuses_to_start_and_sends_nothing(tmp_path: Path) -> None:
    """1. Run once (state written, events sent). 2. Damage a page of the DB file. 3. Run again.
    Result: exit 1 with a clear message naming the file and warning not to delete it; the file is untouched;
    Klaviyo gets no request at all (no fresh start that would re-send the history)."""
    async with serve([A]) as sims:
        seed(sims, A)
        bridge = Bridge(tmp_path, sims, [A]).write()
        first = await bridge.once()
        assert first.code == 0, first.log
        with bridge.state_path.open("r+b") as f:
            f.seek(2 * 4096)
            f.write(b"\xde\xad\xbe\xef" * 256)
        digest = hashlib.sha256(bridge.state_path.read_bytes()).hexdigest()
        requests = sum(sum(acct.counters.requests.values()) for acct in sims.klaviyo.accounts)
        pages = sims.whiplash.counters.pages_served
        second = await bridge.once()
        assert second.code == 1
        assert "state database unusable" in second.log
        assert "corrupt" in second.log
        assert "Do NOT delete" in second.log
        assert "Traceback" not in second.log
        assert hashlib.sha256(bridge.state_path.read_bytes()).hexdigest() == digest
        assert sum(sum(acct.counters.requests.values()) for acct in sims.klaviyo.accounts) == requests
        assert sims.whiplash.counters.pages_served == pages


async def test_unusable_state_path_exits_cleanly(tmp_path: Path) -> None:
    """1. state_path names a directory. 2. Run once.
    Result: a config error naming bridge.state_path (exit 78), nothing sent, no traceback."""
    async with serve([A]) as sims:
        bridge = Bridge(tmp_path, sims, [A]).write()
        bridge.state_path.mkdir(parents=True)
        result = await bridge.once()
        assert sum(sum(acct.counters.requests.values()) for acct in sims.klaviyo.accounts) == 0
    assert result.code == 78
    assert f"config error: bridge.state_path: {bridge.state_path} is not a readable and writable file" in result.log
    assert "Traceback" not in result.log
    assert "Event loop is closed" not in result.log


async def test_mistyped_state_folder_is_a_config_error_and_sends_nothing(tmp_path: Path) -> None:
    """1. state_path in a folder that does not exist (a typo). 2. Run once.
    Result: exit 78 naming bridge.state_path; no folder is created and nothing reaches either API."""
    async with serve([A]) as sims:
        bridge = Bridge(tmp_path, sims, [A])
        missing = tmp_path / "nonexistent" / "dir" / "state.db"
        bridge.config_path.write_text(config_text(missing, sims, [A], {}))
        result = await bridge.once()
        assert sum(sum(acct.counters.requests.values()) for acct in sims.klaviyo.accounts) == 0
        assert sims.whiplash.counters.pages_served == 0
    assert result.code == 78
    assert "config error: bridge.state_path: folder" in result.log
    assert "nonexistent/dir does not exist" in result.log
    assert not (tmp_path / "nonexistent").exists()
