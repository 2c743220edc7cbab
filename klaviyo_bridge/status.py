"""Per-customer status read from the state DB; safe while the daemon runs (read-only connection).

Invariants:
- nothing here writes: the DB is opened read-only, so ``status`` can run as a health check at any time;
- every time shown is UTC, and "today" is the UTC day (the same day boundary as ``launch_date``), so the
  numbers do not depend on the time zone of the shell that asks;
- a customer is stale when it is enabled and has not completed a poll within 3 rounds (``alongside.stale_limit``,
  the limit the commands also judge a running daemon by); the daemon records a completed poll for pre-launch
  customers too, so stale always means "not polling";
- the Whiplash budget's use is what the daemon last saved (every 10 s), with its age, so a stopped daemon shows;
- no secret is needed: the config is read without resolving any, so a monitoring job needs no API key;
- ``check`` (``status --check``) turns the rows into one monitoring-plugins line: CRITICAL for a stalled poll
  or a refused key, WARNING for dead letters, a queue not draining or an upstream error streak, else OK.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from .alongside import STALE_POLLS, round_seconds, stale_limit
from .config import ALL_EVENTS, CustomerSettings, Settings
from .core import midnight_utc
from .exits import CHECK_CRITICAL, CHECK_OK, CHECK_WARNING
from .store import CustomerState, Store

# An upstream failing this long, or a row waiting this long, is worth a WARNING (shorter blips retry by themselves).
STREAK_WARN = timedelta(minutes=5)
QUEUE_WARN = timedelta(minutes=15)
CHECK_NAME = "KLAVIYO-BRIDGE"


@dataclass(frozen=True, slots=True)
class StatusRow:
    """One customer's line of ``klaviyo-bridge status``."""

    customer_id: int
    name: str
    enabled: bool
    launch_date: str
    events: str  # the milestones it gets: "all", "none" or e.g. "shipped,delivered"
    phase: str
    last_poll_ok: str | None
    poll_age_s: float | None
    cursor: str | None
    queued: int
    sent_today: int
    sent_total: int
    dead: int
    malformed: int
    invalid_email: int
    key: str
    klaviyo: str  # "ok", or how long Klaviyo has been failing for this customer
    last_error: str | None
    stale: bool
    oldest_queued_s: float | None  # age of the oldest row still waiting
    whiplash_failing_s: float | None  # how long this customer's polls have been failing (None: the last one worked)
    klaviyo_failing_s: float | None  # how long its Klaviyo requests have been failing (None: not failing)
    dropped: int  # queued rows dropped, never sent, because their event was disabled for this customer
    interval_s: float | None  # seconds between its last two polls: the interval the shared budget allowed

    def as_dict(self) -> dict[str, object]:
        """Return the row as a JSON-ready dict."""
        return asdict(self)

    def is_stale(self, limit: timedelta) -> bool:
        """Tell whether an enabled customer has not completed a poll within ``limit``."""
        if not self.enabled:
            return False
        return self.poll_age_s is None or self.poll_age_s > limit.total_seconds()


def start_of_day(now: datetime) -> datetime:
    """Return 00:00 UTC of ``now``'s UTC day ("today" in status is the UTC day, like launch dates)."""
    return midnight_utc(now.astimezone(UTC).date())


def phase_of(customer: CustomerSettings, state: CustomerState, now: datetime) -> str:
    """Name where the customer is: pre-launch, backfill (first walk since launch not finished) or live."""
    launch = midnight_utc(customer.launch_date)
    if now < launch:
        return "pre-launch"
    # The first poll after launch walks the whole backfill window; until one completes, history is loading.
    ok = state.last_poll_ok_at
    if ok is None or ok < launch:
        return "backfill"
    return "live"


async def status_rows(settings: Settings, now: datetime) -> list[StatusRow]:
    """Read every configured customer's status from the state DB."""
    rows, _ = await status_report(settings, now)
    return rows


async def status_report(settings: Settings, now: datetime) -> tuple[list[StatusRow], str]:
    """Read every configured customer's status and the Whiplash budget line from the state DB."""
    store = await Store.open(settings.bridge.state_path, readonly=True)
    try:
        rows = [await _row(store, c, now, stale_limit(settings)) for c in settings.customers]
        return rows, budget_line(await store.load_budget(), now, settings)
    finally:
        await store.close()


def budget_line(snapshot: Mapping[str, object] | None, now: datetime, settings: Settings) -> str:
    """Describe the shared Whiplash budget as the daemon last saved it, and the round it allows."""
    configured = settings.whiplash.max_requests_per_second
    rounds = round_seconds(settings)
    longer = (f"; rounds take {age_text(rounds)}, longer than the {age_text(settings.bridge.poll_interval_seconds)} "
              "interval: raise max_requests_per_second if Whiplash allows it"
              if rounds > settings.bridge.poll_interval_seconds else "")
    if snapshot is None:
        return f"whiplash budget: {configured} requests/s configured, no use recorded yet (daemon not started?){longer}"
    at = _parse_time(snapshot.get("at"))
    age = "" if at is None else f" (saved {age_text(max(0.0, (now - at).total_seconds()))} ago)"
    waiting = snapshot.get("waiting")
    queued = ", ".join(f"{k}={v}" for k, v in waiting.items()) if isinstance(waiting, dict) else "-"
    return (f"whiplash budget: {snapshot.get('requests_per_s')} of {snapshot.get('effective_per_s')} requests/s "
            f"(configured {configured}), in flight {snapshot.get('in_flight')}, waiting {queued}, "
            f"429s since start {snapshot.get('throttled')}{age}{longer}")


def _parse_time(value: object) -> datetime | None:
    """Return an ISO time saved by the daemon, or None when it is not one."""
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


async def _row(store: Store, customer: CustomerSettings, now: datetime, limit: timedelta) -> StatusRow:
    """Build one customer's status row."""
    cid = customer.whiplash_customer_id
    state = await store.customer_state(cid)
    counts = await store.counts(cid, start_of_day(now))
    ok = state.last_poll_ok_at
    age = round((now - ok).total_seconds(), 1) if ok else None
    klaviyo_failing = _seconds(now, state.klaviyo_failing_since)
    return StatusRow(
        customer_id=cid,
        name=customer.name,
        enabled=customer.enabled,
        launch_date=customer.launch_date.isoformat(),
        events=events_text(customer),
        phase=phase_of(customer, state, now),
        last_poll_ok=_utc_text(ok),
        poll_age_s=age,
        cursor=_utc_text(state.cursor[0]) if state.cursor else None,
        queued=counts.queued,
        sent_today=counts.sent_since,
        sent_total=counts.sent,
        dead=counts.dead,
        malformed=counts.malformed,
        invalid_email=counts.invalid_email,
        key="ok" if state.key_healthy else "REFUSED",
        klaviyo="ok" if klaviyo_failing is None else f"failing {age_text(klaviyo_failing)}",
        last_error=_last_error(state),
        stale=customer.enabled and (age is None or age > limit.total_seconds()),
        oldest_queued_s=_seconds(now, counts.oldest_queued_at) if counts.queued else None,
        whiplash_failing_s=_whiplash_failing(state, now),
        klaviyo_failing_s=klaviyo_failing,
        dropped=state.dropped_rows,
        interval_s=None if state.poll_interval_s is None else round(state.poll_interval_s, 1),
    )


def events_text(customer: CustomerSettings) -> str:
    """Name the milestones a customer gets: "all", "none", or the list in the config's order."""
    if set(customer.events) == set(ALL_EVENTS):
        return "all"
    return ",".join(customer.events) or "none"


def _seconds(now: datetime, since: datetime | None) -> float | None:
    """Return whole-ish seconds from ``since`` to ``now`` (None when there is no ``since``)."""
    return None if since is None else round(max(0.0, (now - since).total_seconds()), 1)


def _whiplash_failing(state: CustomerState, now: datetime) -> float | None:
    """Return how long the customer's polls have been failing, if the last one failed."""
    if state.last_error is None or state.last_poll_at is None:
        return None
    if state.last_poll_ok_at is not None and state.last_poll_ok_at >= state.last_poll_at:
        return None
    return _seconds(now, state.last_poll_ok_at or state.last_poll_at)


def _last_error(state: CustomerState) -> str | None:
    """Return the most pressing error on record: a refused key, a failing poll, then the last Klaviyo failure."""
    if not state.key_healthy and state.key_error:
        return state.key_error
    if state.last_error:
        return state.last_error
    if state.klaviyo_error and state.klaviyo_failing_since is not None:
        return state.klaviyo_error
    if state.klaviyo_error:
        return f"{state.klaviyo_error} (at {_utc_text(state.klaviyo_error_at)}, since recovered)"
    return state.key_error


def _utc_text(at: datetime | None) -> str | None:
    """Format a stored time as ISO-8601 UTC with whole seconds."""
    return None if at is None else at.astimezone(UTC).isoformat(timespec="seconds")


# (header, row field) in table order; the table shows the age in words and the full error only in --json.
COLUMNS = (
    ("customer", "customer_id"),
    ("name", "name"),
    ("enabled", "enabled"),
    ("phase", "phase"),
    ("launch", "launch_date"),
    ("events", "events"),
    ("last_poll_ok", "last_poll_ok"),
    ("age", "poll_age_s"),
    ("interval", "interval_s"),
    ("cursor", "cursor"),
    ("queued", "queued"),
    ("sent_today", "sent_today"),
    ("dead", "dead"),
    ("dropped", "dropped"),
    ("malformed", "malformed"),
    ("invalid_email", "invalid_email"),
    ("key", "key"),
    ("klaviyo", "klaviyo"),
    ("last_error", "last_error"),
)


def render_status(rows: list[StatusRow]) -> str:
    """Render rows as an aligned text table, followed by one line per stale customer."""
    table = [[h for h, _ in COLUMNS]] + [[_cell(f, r.as_dict()[f]) for _, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
    lines += [_stale_line(r) for r in rows if r.stale]
    return "\n".join(lines)


def _stale_line(row: StatusRow) -> str:
    """Tell ops which customer is not polling and what to look at."""
    since = "never completed a poll" if row.poll_age_s is None else f"no completed poll for {age_text(row.poll_age_s)}"
    return (
        f"STALE customer={row.customer_id} ({row.name}): {since}; check that the daemon runs "
        "(systemctl status klaviyo-bridge) and its log (journalctl -u klaviyo-bridge -p warning)"
    )


def age_text(seconds: float) -> str:
    """Render an age compactly: 42s, 3m05s, 2h07m, 4d03h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _cell(field: str, value: object) -> str:
    """Format one table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if field in ("poll_age_s", "interval_s") and isinstance(value, float):
        return age_text(value)
    if field in ("last_poll_ok", "cursor"):
        return str(value).replace("+00:00", "Z")
    text = " ".join(str(value).split())  # one table line per customer, whatever the error text holds
    return text if len(text) <= 60 else text[:59] + "…"


# --- status --check ---------------------------------------------------------------------------------------


def check(rows: Sequence[StatusRow], settings: Settings) -> tuple[int, str]:
    """Return (exit code, one line) in the monitoring-plugins convention for the enabled customers' rows."""
    live = [r for r in rows if r.enabled]
    critical = [p for r in live for p in _critical(r)]
    warning = [p for r in live for p in _warnings(r, settings)]
    code, word = ((CHECK_CRITICAL, "CRITICAL") if critical else (CHECK_WARNING, "WARNING") if warning
                  else (CHECK_OK, "OK"))
    problems = critical + warning
    text = "; ".join(problems) if problems else _all_well(live)
    return code, f"{CHECK_NAME} {word} - {text} | {_perfdata(live)}"


def _critical(row: StatusRow) -> list[str]:
    """Return what makes a customer's state CRITICAL: nothing polls it, or Klaviyo refuses its key."""
    found = []
    if row.stale:
        idle = "never completed a poll" if row.poll_age_s is None else f"no poll for {age_text(row.poll_age_s)}"
        found.append(f"customer {row.customer_id}: poll stalled ({idle})")
    if row.key != "ok":
        found.append(f"customer {row.customer_id}: Klaviyo key refused")
    return found


def _warnings(row: StatusRow, settings: Settings) -> list[str]:
    """Return what makes a customer's state WARNING: dead letters, a queue not draining, an error streak."""
    found = []
    if row.dead:
        found.append(f"customer {row.customer_id}: {row.dead} dead letter{'s' if row.dead != 1 else ''}")
    queue_limit = max(QUEUE_WARN.total_seconds(), STALE_POLLS * settings.bridge.poll_interval_seconds)
    if row.key == "ok" and row.oldest_queued_s is not None and row.oldest_queued_s > queue_limit:
        found.append(f"customer {row.customer_id}: queue not draining (oldest row {age_text(row.oldest_queued_s)})")
    for upstream, failing in (("Whiplash", row.whiplash_failing_s), ("Klaviyo", row.klaviyo_failing_s)):
        if failing is not None and failing >= STREAK_WARN.total_seconds() and not row.stale:
            found.append(f"customer {row.customer_id}: {upstream} failing for {age_text(failing)}")
    return found


def _all_well(rows: Sequence[StatusRow]) -> str:
    """Summarise a healthy bridge."""
    queued = sum(r.queued for r in rows)
    sent = sum(r.sent_today for r in rows)
    return f"{len(rows)} enabled customers polling, {queued} rows queued, {sent} sent today"


def _perfdata(rows: Sequence[StatusRow]) -> str:
    """Return the performance data Nagios/Icinga graph (no per-customer labels: names stay in the text)."""
    values = {
        "customers": len(rows),
        "stalled": sum(r.stale for r in rows),
        "key_refused": sum(r.key != "ok" for r in rows),
        "queued": sum(r.queued for r in rows),
        "dead": sum(r.dead for r in rows),
        "sent_today": sum(r.sent_today for r in rows),
    }
    return " ".join(f"{name}={value}" for name, value in values.items())


async def resolve_profile(settings: Settings, ref: str) -> list[tuple[int, str]]:
    """Return (customer id, email) of the profiles a log line's ``profile=REF`` stands for."""
    store = await Store.open(settings.bridge.state_path, readonly=True)
    try:
        return await store.profiles_with_ref(ref)
    finally:
        await store.close()
