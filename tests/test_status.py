"""`klaviyo-bridge status` against a real state DB: the table, --json, phases, "sent today" and the exit code."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from klaviyo_bridge import logs
from klaviyo_bridge.alongside import round_seconds, stale_limit
from klaviyo_bridge.cli import main
from klaviyo_bridge.config import CustomerSettings, load_config
from klaviyo_bridge.core import EventKind, EventRow, Plan, ProfileChange, ProfileName
from klaviyo_bridge.exits import (
    CHECK_CRITICAL,
    CHECK_OK,
    CHECK_UNKNOWN,
    CHECK_WARNING,
    EX_FATAL,
    EX_OK,
    EX_UNHEALTHY,
)
from klaviyo_bridge.status import (
    age_text,
    check,
    phase_of,
    render_status,
    start_of_day,
    status_rows,
)
from klaviyo_bridge.store import CustomerState, Store

INTERVAL = 60.0


@dataclass
class Cust:
    """One [[customers]] block."""

    cid: int
    launch: date
    enabled: bool = True
    name: str = "Shop"


def write_config(tmp_path: Path, customers: list[Cust]) -> Path:
    """Write a config whose state DB lives in tmp_path."""
    blocks = "".join(
        f'\n[[customers]]\nwhiplash_customer_id = {c.cid}\nname = "{c.name} {c.cid}"\n'
        f'klaviyo_api_key = "env:TEST_KLAVIYO_KEY"\nlaunch_date = {c.launch.isoformat()}\n'
        f"enabled = {'true' if c.enabled else 'false'}\n"
        for c in customers
    )
    path = tmp_path / "config.toml"
    path.write_text(
        f'[bridge]\nstate_path = "{tmp_path / "state.db"}"\npoll_interval_seconds = {INTERVAL}\n'
        '[whiplash]\nbase_url = "http://127.0.0.1:9"\nclient_id = "c"\nclient_secret = "env:TEST_WHIPLASH"\n'
        '[klaviyo]\ndefault_profile_email = "samples@example.com"\n' + blocks
    )
    return path


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Provide the env: secrets the test config refers to."""
    monkeypatch.setenv("TEST_KLAVIYO_KEY", "pk_test_status_key_0001")
    monkeypatch.setenv("TEST_WHIPLASH", "whiplash-test-secret")


def event(order_id: int, kind: EventKind = EventKind.SHIPPED) -> EventRow:
    """Build a minimal event row."""
    uid = f"{order_id}:{kind.value}"
    return EventRow(uid, order_id, kind, {"unique_id": uid, "email": "a@example.com", "metric": "m"})


async def seed(db: Path, cid: int, *, sent_at: list[datetime], queued: int, dead: int, polled: datetime | None) -> None:
    """Give a customer rows sent at those times, some queued, some dead, and a completed poll."""
    store = await Store.open(db)
    try:
        n = len(sent_at) + queued + dead
        now = datetime.now(UTC)
        await store.commit_page(cid, Plan(events=[event(cid * 1000 + i) for i in range(n)]), None, (), now)
        rows = await store.due_rows(cid, now + timedelta(seconds=1), n)
        for row, at in zip(rows, sent_at, strict=False):
            await store.mark_sent(row, at)
        for row in rows[len(sent_at) : len(sent_at) + dead]:
            await store.mark_dead(row, now, 400, '{"errors":[{"detail":"bad"}]}')
        if polled is not None:
            await store.record_poll(cid, polled, True, None)
    finally:
        await store.close()


def test_table_and_json_show_each_customer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. A live customer with rows sent before and after 00:00 UTC, 2 queued, 1 dead, polled 10 s ago;
    a pre-launch customer polled now; a disabled one never polled. 2. status, then status --json.
    Result: exit 0; sent_today counts only rows sent since 00:00 UTC; phases live / pre-launch / backfill."""
    today = datetime.now(UTC).date()
    cfg = write_config(tmp_path, [Cust(11, today - timedelta(days=30)), Cust(22, today + timedelta(days=5)),
                                  Cust(33, today - timedelta(days=1), enabled=False)])
    midnight = start_of_day(datetime.now(UTC))
    now = datetime.now(UTC)
    sent = [midnight + timedelta(seconds=1), midnight + timedelta(seconds=2), midnight - timedelta(seconds=1)]
    asyncio.run(seed(tmp_path / "state.db", 11, sent_at=sent, queued=2, dead=1, polled=now - timedelta(seconds=10)))
    asyncio.run(seed(tmp_path / "state.db", 22, sent_at=[], queued=0, dead=0, polled=now))

    assert main(["status", "--config", str(cfg)]) == EX_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["customer", "name", "enabled", "phase"]
    live = next(line for line in table if line.startswith("11 "))
    assert "live" in live
    assert "sent_today" in table[0]
    assert not any(line.startswith("STALE") for line in table)

    assert main(["status", "--json", "--config", str(cfg)]) == EX_OK
    rows = {r["customer_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows[11]["sent_today"], rows[11]["sent_total"], rows[11]["queued"], rows[11]["dead"]) == (2, 3, 2, 1)
    assert [rows[c]["phase"] for c in (11, 22, 33)] == ["live", "pre-launch", "backfill"]
    assert rows[11]["stale"] is False
    assert rows[33]["stale"] is False
    assert rows[11]["key"] == "ok"
    assert rows[11]["last_error"] is None


def test_exit_code_is_unhealthy_when_an_enabled_customer_stopped_polling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. Customer 11 polled 10 s ago, customer 12 polled 4 × poll_interval ago. 2. status.
    Result: exit 2, a STALE line naming 12 (not 11); after 12 polls again, exit 0."""
    today = datetime.now(UTC).date()
    cfg = write_config(tmp_path, [Cust(11, today - timedelta(days=3)), Cust(12, today - timedelta(days=3))])
    now = datetime.now(UTC)
    asyncio.run(seed(tmp_path / "state.db", 11, sent_at=[], queued=0, dead=0, polled=now - timedelta(seconds=10)))
    asyncio.run(seed(tmp_path / "state.db", 12, sent_at=[], queued=0, dead=0,
                     polled=now - timedelta(seconds=4 * INTERVAL)))

    assert main(["status", "--config", str(cfg)]) == EX_UNHEALTHY
    stale = [line for line in capsys.readouterr().out.splitlines() if line.startswith("STALE")]
    assert len(stale) == 1
    assert "customer=12" in stale[0]

    asyncio.run(seed(tmp_path / "state.db", 12, sent_at=[], queued=0, dead=0, polled=datetime.now(UTC)))
    assert main(["status", "--config", str(cfg)]) == EX_OK


def test_never_polled_enabled_customer_is_unhealthy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. An enabled customer the daemon never polled (DB exists). 2. status --json. Result: exit 2, stale."""
    today = datetime.now(UTC).date()
    cfg = write_config(tmp_path, [Cust(11, today)])
    asyncio.run(seed(tmp_path / "state.db", 99, sent_at=[], queued=0, dead=0, polled=None))
    assert main(["status", "--json", "--config", str(cfg)]) == EX_UNHEALTHY
    (row,) = json.loads(capsys.readouterr().out)
    assert row["stale"] is True
    assert row["poll_age_s"] is None
    assert row["phase"] == "backfill"


LAUNCH = date(2026, 5, 10)
LAUNCH_AT = datetime(2026, 5, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "last_ok", "phase"),
    [
        (LAUNCH_AT - timedelta(seconds=1), LAUNCH_AT - timedelta(seconds=30), "pre-launch"),
        (LAUNCH_AT + timedelta(minutes=1), LAUNCH_AT - timedelta(seconds=30), "backfill"),  # first walk running
        (LAUNCH_AT + timedelta(minutes=1), None, "backfill"),
        (LAUNCH_AT + timedelta(minutes=1), LAUNCH_AT + timedelta(seconds=5), "live"),
    ],
)
def test_phase_follows_launch_and_the_first_completed_poll(now: datetime, last_ok: datetime | None, phase: str) -> None:
    """1. A customer launching 2026-05-10 at various moments. Result: the phase named in the case."""
    customer = CustomerSettings.model_validate(
        {"whiplash_customer_id": 1, "name": "n", "klaviyo_api_key": "k", "launch_date": LAUNCH}
    )
    assert phase_of(customer, CustomerState(1, last_poll_ok_at=last_ok), now) == phase


def test_age_text_and_long_errors_stay_on_one_line() -> None:
    """1. Ages from seconds to days; a row whose last error spans lines. Result: compact ages; one line per row."""
    assert [age_text(s) for s in (5, 185, 7500, 190000)] == ["5s", "3m05s", "2h05m", "2d04h"]
    from klaviyo_bridge.status import StatusRow

    row = StatusRow(1, "n", True, "2026-01-01", "all", "live", None, None, None, 0, 0, 0, 0, 0, 0, "REFUSED", "ok",
                    "line one\nline two " + "x" * 200, False, None, None, None, 0, None)
    text = render_status([row])
    assert len(text.splitlines()) == 2
    assert "line one line two" in text
    assert "REFUSED" in text


# --- no secrets needed, --check, --profile ------------------------------------------------------------------


def test_status_and_dead_letters_need_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. A config whose secrets are credential:/env: references that cannot be resolved here (no
    CREDENTIALS_DIRECTORY, no variables): a monitoring job without root or API keys. 2. status, status --check,
    status --json, dead-letters list. Result: each works from the config and the state DB alone."""
    today = datetime.now(UTC).date()
    cfg = write_config(tmp_path, [Cust(11, today - timedelta(days=3))])
    cfg.write_text(cfg.read_text().replace('"env:TEST_WHIPLASH"', '"credential:whiplash-client-secret"'))
    monkeypatch.delenv("TEST_KLAVIYO_KEY")
    monkeypatch.delenv("TEST_WHIPLASH")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    asyncio.run(seed(tmp_path / "state.db", 11, sent_at=[], queued=0, dead=0, polled=datetime.now(UTC)))
    assert main(["status", "--config", str(cfg)]) == EX_OK
    assert main(["status", "--json", "--config", str(cfg)]) == EX_OK
    assert main(["status", "--check", "--config", str(cfg)]) == CHECK_OK
    assert main(["dead-letters", "list", "--config", str(cfg)]) == EX_OK
    err = capsys.readouterr().err
    assert "config error" not in err


def check_of(tmp_path: Path, capsys: pytest.CaptureFixture[str], cfg: Path) -> tuple[int, str]:
    """Run status --check; return its exit code and its one line."""
    code = main(["status", "--check", "--config", str(cfg)])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1, out
    return code, out[0]


async def _state(db: Path, cid: int, *, polled_ok: datetime | None = None, failed_poll: datetime | None = None,
                 refused: bool = False, klaviyo_since: datetime | None = None) -> None:
    """Shape one customer's health in the state DB as the daemon records it."""
    store = await Store.open(db)
    try:
        if polled_ok is not None:
            await store.record_poll(cid, polled_ok, True, None)
        if failed_poll is not None:
            await store.record_poll(cid, failed_poll, False, "whiplash 503: HTML page \"Service Unavailable\"")
        if refused:
            await store.set_key_health(cid, False, "klaviyo 401: not_authenticated", datetime.now(UTC))
        if klaviyo_since is not None:
            await store.record_klaviyo_error(cid, "klaviyo 503: unavailable", klaviyo_since)
    finally:
        await store.close()


def test_check_states(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. Healthy customers. Result: OK (0) with perfdata. 2. A dead letter. Result: WARNING (1) naming it.
    3. Klaviyo failing for 10 min. Result: WARNING. 4. A refused key. Result: CRITICAL (2). 5. A customer whose
    last successful poll is 4 intervals old. Result: CRITICAL naming the stall. 6. No state DB. Result: UNKNOWN
    (3). 7. An unreadable config. Result: UNKNOWN. Disabled customers never count."""
    today = datetime.now(UTC).date()
    now = datetime.now(UTC)
    cfg = write_config(tmp_path, [Cust(11, today - timedelta(days=3)), Cust(12, today - timedelta(days=3)),
                                  Cust(13, today - timedelta(days=3), enabled=False)])
    db = tmp_path / "state.db"
    asyncio.run(seed(db, 11, sent_at=[now], queued=0, dead=0, polled=now))
    asyncio.run(seed(db, 12, sent_at=[], queued=0, dead=0, polled=now))
    asyncio.run(seed(db, 13, sent_at=[], queued=0, dead=4, polled=None))  # disabled: ignored
    code, line = check_of(tmp_path, capsys, cfg)
    assert (code, line.split(" - ")[0]) == (CHECK_OK, "KLAVIYO-BRIDGE OK")
    assert line.endswith("| customers=2 stalled=0 key_refused=0 queued=0 dead=0 sent_today=1")

    asyncio.run(seed(db, 12, sent_at=[], queued=0, dead=1, polled=now))
    code, line = check_of(tmp_path, capsys, cfg)
    assert (code, line.split(" - ")[0]) == (CHECK_WARNING, "KLAVIYO-BRIDGE WARNING")
    assert re.search(r"customer 12: 1 dead letter( |;|$)", line.split(" | ")[0])

    asyncio.run(_state(db, 11, klaviyo_since=now - timedelta(minutes=10)))
    code, line = check_of(tmp_path, capsys, cfg)
    assert code == CHECK_WARNING
    assert "customer 11: Klaviyo failing for 10m" in line

    asyncio.run(_state(db, 11, refused=True))
    code, line = check_of(tmp_path, capsys, cfg)
    assert (code, line.split(" - ")[0]) == (CHECK_CRITICAL, "KLAVIYO-BRIDGE CRITICAL")
    assert line.index("customer 11: Klaviyo key refused") < line.index("customer 12: 1 dead letter")

    asyncio.run(_state(db, 12, polled_ok=now - timedelta(seconds=4 * INTERVAL),
                       failed_poll=now - timedelta(seconds=5)))
    code, line = check_of(tmp_path, capsys, cfg)
    assert code == CHECK_CRITICAL
    assert "customer 12: poll stalled (no poll for 4m" in line

    db.rename(tmp_path / "elsewhere.db")
    code, line = check_of(tmp_path, capsys, cfg)
    assert (code, line) == (CHECK_UNKNOWN, f"KLAVIYO-BRIDGE UNKNOWN - no state database at {db}")
    cfg.write_text("not = [valid")
    code, line = check_of(tmp_path, capsys, cfg)
    assert (code, line) == (CHECK_UNKNOWN, "KLAVIYO-BRIDGE UNKNOWN - configuration unusable (run klaviyo-bridge "
                                           "check-config)")


def test_check_warns_about_a_queue_not_draining_and_a_whiplash_streak(tmp_path: Path) -> None:
    """1. A customer with a row queued 20 minutes ago and polls failing for 6 minutes.
    Result: WARNING naming both (the streak is not yet a stall: its last success is 6 minutes old)."""
    today = datetime.now(UTC).date()
    now = datetime.now(UTC)
    cfg = write_config(tmp_path, [Cust(11, today - timedelta(days=3))])
    settings = load_config(cfg, resolve_secrets=False).settings
    db = tmp_path / "state.db"

    async def shape() -> None:
        store = await Store.open(db)
        try:
            await store.commit_page(11, Plan(events=[event(1)]), None, (), now - timedelta(minutes=20))
            await store.record_poll(11, now - timedelta(minutes=6), True, None)
            await store.record_poll(11, now - timedelta(seconds=5), False, "whiplash 502: Bad Gateway")
        finally:
            await store.close()

    asyncio.run(shape())
    # poll interval 60 s: the stall limit is 3 minutes, so make this config's interval long enough.
    slow = settings.model_copy(update={"bridge": settings.bridge.model_copy(update={"poll_interval_seconds": 300.0})})
    rows = asyncio.run(status_rows(slow, now))
    code, line = check(rows, slow)
    assert code == CHECK_WARNING, line
    assert "customer 11: queue not draining (oldest row 20m" in line
    assert "customer 11: Whiplash failing for 6m" in line


def test_profile_reference_resolves_on_purpose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. A profile queued for ann@example.com. 2. status --profile <its log reference>.
    Result: exit 0 and the customer and email; an unknown reference exits 1 saying so."""
    today = datetime.now(UTC).date()
    cfg = write_config(tmp_path, [Cust(11, today)])

    async def queue() -> str:
        store = await Store.open(tmp_path / "state.db")
        try:
            change = ProfileChange("ann@example.com", ProfileName("Ann", None, None, "real"))
            await store.commit_page(11, Plan(profiles=[change]), None, (), datetime.now(UTC))
            return logs.keyed_ref(store.profile_key, "ann@example.com")
        finally:
            await store.close()

    ref = asyncio.run(queue())
    assert main(["status", "--profile", ref, "--config", str(cfg)]) == EX_OK
    assert capsys.readouterr().out == f"profile={ref} customer=11 email=ann@example.com\n"
    assert main(["status", "--profile", "0123456789", "--config", str(cfg)]) == EX_FATAL
    assert "no profile with reference" in capsys.readouterr().err


def test_budget_line_and_rounds_the_budget_lengthens(tmp_path: Path) -> None:
    """1,000 enabled customers at 60 s with 10 requests/s: a round takes 100 s, so a customer is stale only after
    3 rounds (300 s), and the budget line says rounds are longer than the interval; the daemon's last saved use is
    shown with its age; without one, the line says none was recorded."""
    from klaviyo_bridge.status import budget_line

    settings = load_config(write_config(tmp_path, [Cust(1, date(2026, 1, 1))])).settings
    many = [settings.customers[0].model_copy(update={"whiplash_customer_id": 20_000 + i}) for i in range(1000)]
    big = settings.model_copy(update={"customers": many})
    assert round_seconds(big) == 100.0
    assert stale_limit(big) == timedelta(seconds=300)
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    snapshot = {"at": (now - timedelta(seconds=8)).isoformat(), "requests_per_s": 9.6, "effective_per_s": 10,
                "in_flight": 2, "waiting": {"token": 0, "live": 41, "background": 3}, "throttled": 0}
    line = budget_line(snapshot, now, big)
    assert line.startswith("whiplash budget: 9.6 of 10 requests/s (configured 10), in flight 2, waiting token=0, "
                           "live=41, background=3, 429s since start 0 (saved 8s ago)")
    assert "rounds take 1m40s, longer than the 1m00s interval" in line
    assert budget_line(None, now, settings).startswith("whiplash budget: 10 requests/s configured, no use recorded")
