"""`dead-letters list|show|replay` and `resync` against real state DBs (and the simulated Whiplash for resync)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sqlite3
import stat
from contextlib import closing
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from klaviyo_bridge import logs
from klaviyo_bridge.alongside import token_conflict
from klaviyo_bridge.cli import main
from klaviyo_bridge.config import CustomerSettings, Settings, load_config
from klaviyo_bridge.core import EventKind, EventRow, Plan, ProfileChange, ProfileName
from klaviyo_bridge.ops import (
    EX_FATAL,
    EX_OK,
    EX_USAGE,
    order_id_of,
    response_excerpt,
    resync_refusal,
    run_resync,
)
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash
from klaviyo_bridge.store import Store
from klaviyo_bridge.sync import sync_window
from klaviyo_bridge.whiplash import WhiplashClient
from klaviyo_bridge.whiplash_auth import TokenRecord, fingerprint

CLIENT_ID = "ops-test-client"
WHIPLASH_SECRET = "ops-test-whiplash-secret"
REFRESH_SEED = "ops-test-refresh-seed"
A, B = 101, 202
KLAVIYO_422 = json.dumps({"errors": [{"id": "e1", "status": 400, "code": "invalid", "title": "Invalid input.",
                                      "detail": "'time' must not be in the future",
                                      "source": {"pointer": "/data/attributes/time"}}]})


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Provide the env: secrets the test configs refer to; keep `resync` from re-wiring the root logger."""
    monkeypatch.setenv("TEST_KLAVIYO_KEY", "pk_ops_test_key_0001")
    monkeypatch.setenv("TEST_WHIPLASH", WHIPLASH_SECRET)
    monkeypatch.setenv("TEST_REFRESH", REFRESH_SEED)
    monkeypatch.setattr(logs, "setup_logging", lambda *a, **k: None)


def write_config(
    tmp_path: Path,
    *,
    base_url: str = "http://127.0.0.1:9",
    launch: date | None = None,
    backfill_days: int = 3,
    grant: str = "client_credentials",
) -> Path:
    """Write a config with customers A (launched) and B (disabled); the state DB lives in tmp_path."""
    launch = launch or datetime.now(UTC).date() - timedelta(days=5)
    refresh = 'refresh_token = "env:TEST_REFRESH"\n' if grant == "refresh_token" else ""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[bridge]\nstate_path = "{tmp_path / "state.db"}"\npoll_interval_seconds = 60.0\n'
        f'[whiplash]\nbase_url = "{base_url}"\nclient_id = "{CLIENT_ID}"\nclient_secret = "env:TEST_WHIPLASH"\n'
        f'grant = "{grant}"\n{refresh}page_size = 2\noverlap_seconds = 60\n'
        '[klaviyo]\ndefault_profile_email = "samples@example.com"\n'
        f'[[customers]]\nwhiplash_customer_id = {A}\nname = "Acme"\nklaviyo_api_key = "env:TEST_KLAVIYO_KEY"\n'
        f"launch_date = {launch.isoformat()}\nbackfill_days = {backfill_days}\n"
        f'[[customers]]\nwhiplash_customer_id = {B}\nname = "Borealis"\nklaviyo_api_key = "env:TEST_KLAVIYO_KEY"\n'
        f"launch_date = {launch.isoformat()}\nenabled = false\n"
    )
    return path


def settings_of(path: Path) -> Settings:
    """Load a test config."""
    return load_config(path).settings


def event(order_id: int, kind: EventKind = EventKind.SHIPPED) -> EventRow:
    """Build a minimal event row."""
    uid = f"{order_id}:{kind.value}"
    payload = {"unique_id": uid, "email": "ann@example.com", "metric": "Order shipped",
               "time": "2026-01-01T00:00:00+00:00"}
    return EventRow(uid, order_id, kind, payload)


async def make_dead(db: Path, cid: int, order_ids: list[int], *, profile: str | None = None) -> list[int]:
    """Queue events (and a profile) for a customer and dead-letter them all; return their row ids."""
    store = await Store.open(db)
    try:
        now = datetime.now(UTC)
        profiles = [ProfileChange(profile, ProfileName("Ann", None, None, "real"))] if profile else []
        plan = Plan(events=[event(o) for o in order_ids], profiles=profiles)
        await store.commit_page(cid, plan, None, (), now)
        rows = await store.due_rows(cid, now + timedelta(seconds=1), 100)
        for row in rows:
            response = KLAVIYO_422 if row.kind == "event" else "upstream said no\n(plain text)"
            await store.mark_dead(row, now, 400 if row.kind == "event" else 409, response)
        return [r.id for r in rows]
    finally:
        await store.close()


async def pending_keys(db: Path, cid: int) -> list[str]:
    """Return the keys of a customer's pending rows that are due now."""
    async with await Store.open(db) as store:
        return [r.key for r in await store.due_rows(cid, datetime.now(UTC) + timedelta(seconds=1), 1000)]


# ---------------------------------------------------------------------------------------------------------
# dead-letters


def test_list_shows_one_line_per_dead_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. Dead rows: two events and a profile of A, one event of B. 2. dead-letters list, then --customer B,
    then --json. Result: every row listed with order id, status and Klaviyo's first error in one line."""
    cfg = write_config(tmp_path)
    ids_a = asyncio.run(make_dead(tmp_path / "state.db", A, [7001, 7002], profile="ann@example.com"))
    ids_b = asyncio.run(make_dead(tmp_path / "state.db", B, [8001]))

    assert main(["dead-letters", "list", "--config", str(cfg)]) == EX_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["id", "customer", "kind", "key", "order"]
    assert [int(line.split()[0]) for line in lines[1:]] == sorted(ids_a + ids_b)
    shipped = next(line for line in lines if "7001:shipped" in line)
    assert " 7001 " in shipped
    assert " 400 " in shipped
    assert "invalid: 'time' must not be in the future (/data/attributes/time)" in shipped
    # A profile row is named by its reference (as in the logs), never by the shopper's email.
    assert not any("ann@example.com" in line for line in lines)
    profile = next(line for line in lines if " profile " in line)
    assert re.search(r" profile=[0-9a-f]{10} ", profile)
    assert "upstream said no (plain text)" in profile
    assert " 409 " in profile

    assert main(["dead-letters", "list", "--customer", str(B), "--config", str(cfg)]) == EX_OK
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [str(i) for i in ids_b]

    assert main(["dead-letters", "list", "--json", "--config", str(cfg)]) == EX_OK
    data = json.loads(capsys.readouterr().out)
    assert {d["order_id"] for d in data} == {"7001", "7002", "8001", None}


def test_list_says_so_when_there_are_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. A DB without dead rows. 2. dead-letters list. Result: exit 0 and "no dead letters"."""
    cfg = write_config(tmp_path)
    asyncio.run(make_dead(tmp_path / "state.db", A, []))
    assert main(["dead-letters", "list", "--config", str(cfg)]) == EX_OK
    assert capsys.readouterr().out.strip() == "no dead letters"


def test_show_prints_payload_and_response_pretty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. A dead event. 2. dead-letters show ID; then an id that is not dead.
    Result: facts, the payload and Klaviyo's response pretty-printed, a replay hint; unknown id → exit 1."""
    cfg = write_config(tmp_path)
    (row_id,) = asyncio.run(make_dead(tmp_path / "state.db", A, [7001]))

    assert main(["dead-letters", "show", str(row_id), "--config", str(cfg)]) == EX_OK
    out = capsys.readouterr().out
    assert out.startswith(f"dead letter {row_id}\n")
    assert f"customer:         {A} (Acme)" in out
    assert "order:            7001" in out
    assert "http status:      400" in out
    assert '  "unique_id": "7001:shipped"' in out  # payload, indented
    assert '      "detail": "\'time\' must not be in the future"' in out  # response, indented
    assert f"klaviyo-bridge dead-letters replay {row_id}" in out

    assert main(["dead-letters", "show", "999", "--config", str(cfg)]) == EX_FATAL
    assert "no dead letter with id 999" in capsys.readouterr().err


def test_replay_by_customer_makes_only_its_rows_pending(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. Dead rows of A and B. 2. dead-letters replay --customer A.
    Result: A's rows are due again (none dead), B's stay dead; the output says the daemon picks them up."""
    db = tmp_path / "state.db"
    cfg = write_config(tmp_path)
    asyncio.run(make_dead(db, A, [7001, 7002]))
    asyncio.run(make_dead(db, B, [8001]))

    assert main(["dead-letters", "replay", "--customer", str(A), "--config", str(cfg)]) == EX_OK
    out = capsys.readouterr().out
    assert "replayed 2 dead letters" in out
    assert "within a minute" in out
    assert sorted(asyncio.run(pending_keys(db, A))) == ["7001:shipped", "7002:shipped"]
    assert asyncio.run(pending_keys(db, B)) == []
    assert main(["dead-letters", "list", "--json", "--config", str(cfg)]) == EX_OK
    assert [d["customer_id"] for d in json.loads(capsys.readouterr().out)] == [B]


def test_replay_by_ids_and_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. Dead rows of A and B. 2. replay one id plus an unknown id; then replay --all.
    Result: the id is pending, exit 1 naming the unknown id; --all revives the rest and notes B is disabled."""
    db = tmp_path / "state.db"
    cfg = write_config(tmp_path)
    first, _ = asyncio.run(make_dead(db, A, [7001, 7002]))
    asyncio.run(make_dead(db, B, [8001]))

    assert main(["dead-letters", "replay", str(first), "4242", "--config", str(cfg)]) == EX_FATAL
    captured = capsys.readouterr()
    assert "replayed 1 dead letter;" in captured.out
    assert "4242" in captured.err
    assert asyncio.run(pending_keys(db, A)) == ["7001:shipped"]

    assert main(["dead-letters", "replay", "--all", "--config", str(cfg)]) == EX_OK
    out = capsys.readouterr().out
    assert "replayed 2 dead letters" in out
    assert f"customer {B} is not enabled" in out
    assert sorted(asyncio.run(pending_keys(db, A)) + asyncio.run(pending_keys(db, B))) == [
        "7001:shipped", "7002:shipped", "8001:shipped"]


def test_replay_needs_a_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. replay with nothing selected; replay with ids and --all. Result: exit 64 each, nothing replayed."""
    db = tmp_path / "state.db"
    cfg = write_config(tmp_path)
    (row_id,) = asyncio.run(make_dead(db, A, [7001]))
    assert main(["dead-letters", "replay", "--config", str(cfg)]) == EX_USAGE
    assert main(["dead-letters", "replay", str(row_id), "--all", "--config", str(cfg)]) == EX_USAGE
    assert "ids, --customer ID, or --all" in capsys.readouterr().err
    assert asyncio.run(pending_keys(db, A)) == []


def test_replay_notes_a_refused_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. A's key is recorded as refused; a dead row of A. 2. replay it. Result: a note that rows wait for the key."""
    db = tmp_path / "state.db"
    cfg = write_config(tmp_path)
    (row_id,) = asyncio.run(make_dead(db, A, [7001]))

    async def refuse() -> None:
        async with await Store.open(db) as store:
            await store.set_key_health(A, False, "401", datetime.now(UTC))

    asyncio.run(refuse())
    assert main(["dead-letters", "replay", str(row_id), "--config", str(cfg)]) == EX_OK
    assert "Klaviyo key is refused" in capsys.readouterr().out


def test_dead_letter_commands_never_create_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. No state DB. 2. list and replay --all. Result: exit 1 with the path; still no DB file."""
    cfg = write_config(tmp_path)
    assert main(["dead-letters", "list", "--config", str(cfg)]) == EX_FATAL
    assert main(["dead-letters", "replay", "--all", "--config", str(cfg)]) == EX_FATAL
    assert "no state database" in capsys.readouterr().err
    assert not (tmp_path / "state.db").exists()


def test_excerpt_and_order_id_helpers() -> None:
    """1. Odd responses and keys. Result: one bounded line; order ids only for numeric event keys."""
    assert response_excerpt("") == "-"
    assert response_excerpt('{"errors": []}') == '{"errors": []}'
    assert len(response_excerpt("x" * 500)) == 80
    assert response_excerpt('{"errors":[{"title":"Conflict."}]}') == "Conflict."
    assert order_id_of("event", "7001:shipped") == "7001"
    assert order_id_of("event", "sample:shipped") is None
    assert order_id_of("profile", "123@example.com") is None


# ---------------------------------------------------------------------------------------------------------
# resync


def utcnow() -> datetime:
    """Return now in UTC."""
    return datetime.now(UTC)


async def daemon_poll(settings: Settings, session: aiohttp.ClientSession) -> None:
    """Do what the daemon's poller does for A from its window start, then mark everything delivered."""
    customer = settings.customers[0]
    start = datetime.combine(customer.launch_date - timedelta(days=customer.backfill_days), datetime.min.time(), UTC)
    async with await Store.open(settings.bridge.state_path) as store:
        client = WhiplashClient.from_settings(settings.whiplash, session, store)
        stats = await sync_window(client, store, settings.rules_for(customer), start, move_cursor=True, clock=utcnow)
        assert stats.queued > 0
        for row in await store.due_rows(A, utcnow() + timedelta(seconds=1), 1000):
            await store.mark_sent(row, utcnow())


async def event_keys(db: Path) -> tuple[list[str], list[str], tuple[datetime, int] | None]:
    """Return A's (all event keys, pending keys, cursor)."""
    async with await Store.open(db) as store:
        pending = [r.key for r in await store.due_rows(A, utcnow() + timedelta(seconds=1), 1000)]
        cursor = (await store.customer_state(A)).cursor
    with closing(sqlite3.connect(db)) as raw:
        keys = [k for (k,) in raw.execute("SELECT key FROM outbox WHERE customer_id = ? AND kind = 'event'", (A,))]
    return sorted(keys), sorted(pending), cursor


async def test_resync_queues_the_missed_change_and_nothing_already_announced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. Orders X (shipped), Y (processing), Z (processing, 1 h ago); the daemon polls and delivers all.
    2. Whiplash records Y shipped with an updated_at of yesterday — behind the cursor, so polls never see it;
       an order without email changes after the cursor (a resync that moved the cursor would pass it).
    3. `klaviyo-bridge resync --customer A --since <3 days ago>`; then the same again.
    Result: exactly "Y:shipped" is newly queued, nothing sent before is queued again, the cursor has not
    moved; the second resync queues nothing."""
    now = utcnow()
    fake = FakeWhiplash(CLIENT_ID, WHIPLASH_SECRET)
    x = fake.create_order(A, status=300, at=now - timedelta(days=2))["id"]
    y = fake.create_order(A, status=100, at=now - timedelta(days=2, hours=1))["id"]
    z = fake.create_order(A, status=100, at=now - timedelta(hours=1))["id"]
    db = tmp_path / "state.db"
    async with serve_whiplash(fake) as url, aiohttp.ClientSession() as session:
        cfg = write_config(tmp_path, base_url=url)
        await daemon_poll(settings_of(cfg), session)
        keys_before, pending_before, cursor_before = await event_keys(db)
        assert pending_before == []
        fake.set_status(int(y), 300, at=now - timedelta(days=1))
        fake.create_order(A, status=100, at=now - timedelta(minutes=1), email=None)  # after the cursor

        since = (now - timedelta(days=3)).date().isoformat()
        argv = ["resync", "--customer", str(A), "--since", since, "--config", str(cfg)]
        assert await asyncio.to_thread(main, argv) == EX_OK
        first = capsys.readouterr().out
        keys_after, pending_after, cursor_after = await event_keys(db)

        assert await asyncio.to_thread(main, argv) == EX_OK
        second = capsys.readouterr().out
        keys_again, _, _ = await event_keys(db)

    assert keys_before == sorted([f"{x}:shipped", f"{y}:processing", f"{z}:processing"])
    assert pending_after == [f"{y}:shipped"]
    assert keys_after == sorted([*keys_before, f"{y}:shipped"])
    assert cursor_after == cursor_before
    assert "1 outbox row newly queued, 2 orders already announced" in first  # X and Z
    assert "fetched 4 orders" in first
    assert "1 without email" in first
    assert "the daemon's cursor was not moved" in first
    assert keys_again == keys_after
    assert "0 outbox rows newly queued" in second
    assert "nothing was missing" in second


@pytest.mark.parametrize(
    ("since_days_ago", "launch_days_ago", "backfill", "why"),
    [
        (-1, 5, 3, "in the future"),
        (15, 30, 14, "more than 14 days ago"),
        (10, 5, 3, "before customer 101's window"),
        (1, -2, 3, "launches on"),
    ],
)
def test_resync_refuses_windows_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], since_days_ago: int, launch_days_ago: int, backfill: int,
    why: str,
) -> None:
    """1. resync --since outside what the bridge may read (future, > 14 days, before the customer's window,
    before launch). Result: exit 64, a message saying why, and no state DB touched (none is created)."""
    today = utcnow().date()
    cfg = write_config(tmp_path, launch=today - timedelta(days=launch_days_ago), backfill_days=backfill)
    since = today - timedelta(days=since_days_ago)
    assert main(["resync", "--customer", str(A), "--since", since.isoformat(), "--config", str(cfg)]) == EX_USAGE
    assert why in capsys.readouterr().err
    assert not (tmp_path / "state.db").exists()


def test_resync_window_limits_are_inclusive() -> None:
    """1. since exactly 14 days back, exactly the window start, exactly today. Result: allowed."""
    today = date(2026, 6, 30)
    customer = CustomerSettings.model_validate(
        {"whiplash_customer_id": A, "name": "n", "klaviyo_api_key": "k", "launch_date": date(2026, 6, 1),
         "backfill_days": 14}
    )
    assert resync_refusal(customer, today - timedelta(days=14), today) is None
    assert resync_refusal(customer, today, today) is None
    late = customer.model_copy(update={"launch_date": date(2026, 6, 25), "backfill_days": 2})
    assert resync_refusal(late, date(2026, 6, 23), today) is None
    assert resync_refusal(late, date(2026, 6, 22), today) is not None


def test_resync_of_unknown_customer_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. resync --customer with an id not in the config. Result: exit 64 naming it."""
    cfg = write_config(tmp_path)
    assert main(["resync", "--customer", "999", "--since", utcnow().date().isoformat(), "--config", str(cfg)]) == 64
    assert "customer 999 is not in the config" in capsys.readouterr().err


async def test_resync_without_a_state_db_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. No state DB yet. 2. run_resync. Result: exit 1, and no DB is created (an empty one would resend all)."""
    settings = settings_of(write_config(tmp_path))
    out = io.StringIO()
    assert await run_resync(settings, settings.customers[0], utcnow().date(), out) == EX_FATAL
    assert "no state database" in capsys.readouterr().err
    assert not (tmp_path / "state.db").exists()


async def test_resync_never_renews_the_token_under_a_running_daemon(tmp_path: Path) -> None:
    """1. grant = refresh_token; A polled 10 s ago (the daemon runs). 2. Stored token: expiring in 3 min, then
    valid 2 h, then expiring but the daemon stopped long ago. Result: refused only in the first case; a
    client_credentials config never conflicts."""
    settings = settings_of(write_config(tmp_path, grant="refresh_token"))
    now = utcnow()
    seed = fingerprint(REFRESH_SEED)
    async with await Store.open(settings.bridge.state_path) as store:
        await store.record_poll(A, now - timedelta(seconds=10), True, None)
        await store.save_whiplash_token(TokenRecord("at", now + timedelta(minutes=3), "rt", seed))
        why = await token_conflict(settings, store, now)
        assert why is not None
        assert "Retry in a few minutes" in why
        assert await token_conflict(settings_of(write_config(tmp_path)), store, now) is None
        await store.save_whiplash_token(TokenRecord("at", now + timedelta(hours=2), "rt", seed))
        assert await token_conflict(settings, store, now) is None
        await store.save_whiplash_token(TokenRecord("at", now + timedelta(minutes=3), "rt", seed))
        assert await token_conflict(settings, store, now + timedelta(hours=1)) is None


@pytest.mark.parametrize(
    "argv",
    [["dead-letters", "list"], ["dead-letters", "show", "1"], ["dead-letters", "replay", "--all"],
     ["resync", "--customer", "1", "--since", "2026-01-01"]],
)
def test_a_bad_config_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """1. A config with an unknown key. 2. Each ops command. Result: exit 78 and the problem line."""
    bad = tmp_path / "bad.toml"
    bad.write_text(write_config(tmp_path).read_text() + "\n[colour]\nx = 1\n")
    assert main([*argv, "--config", str(bad)]) == 78
    assert "config error: colour: unknown key" in capsys.readouterr().err


def test_backup_is_a_consistent_private_copy_and_restores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. A state DB with dead letters, the daemon's writer connection open. 2. backup --to a new file.
    Result: exit 0; the copy is owner-only, passes integrity_check and holds the same rows. 3. backup to the same
    path again. Result: exit 1, nothing overwritten. 4. Restore: the copy replaces the DB. Result: it opens for
    writing (migrations, WAL) and the dead letters are there."""
    cfg = write_config(tmp_path)
    ids = asyncio.run(make_dead(tmp_path / "state.db", A, [7001, 7002], profile="ann@example.com"))
    dest = tmp_path / "backups" / "state-copy.db"
    dest.parent.mkdir()

    async def backup_while_written() -> None:
        async with await Store.open(tmp_path / "state.db"):
            assert await asyncio.to_thread(main, ["backup", "--to", str(dest), "--config", str(cfg)]) == EX_OK

    asyncio.run(backup_while_written())
    assert "integrity ok" in capsys.readouterr().out
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    before = dest.read_bytes()
    assert main(["backup", "--to", str(dest), "--config", str(cfg)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert dest.read_bytes() == before

    (tmp_path / "state.db").unlink()
    for companion in ("state.db-wal", "state.db-shm"):
        (tmp_path / companion).unlink(missing_ok=True)
    dest.rename(tmp_path / "state.db")

    async def restored() -> list[int]:
        async with await Store.open(tmp_path / "state.db") as store:
            return [r.id for r in await store.dead_rows(A)]

    assert asyncio.run(restored()) == sorted(ids)
