"""Per-customer status read from the state DB; safe while the daemon runs (read-only connection).

Invariants:
- nothing here writes: the DB is opened read-only, so ``status`` can run as a health check at any time;
- every time shown is UTC, and "today" is the UTC day (the same day boundary as ``launch_date``), so the
  numbers do not depend on the time zone of the shell that asks;
- a customer is stale when it is enabled and has not completed a poll within 3 × ``poll_interval_seconds``;
  the daemon records a completed poll for pre-launch customers too, so stale always means "not polling".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from .config import CustomerSettings, Settings
from .store import CustomerState, Store

STALE_POLLS = 3  # a customer is stale after this many poll intervals without a completed poll


@dataclass(frozen=True, slots=True)
class StatusRow:
    """One customer's line of ``klaviyo-bridge status``."""

    customer_id: int
    name: str
    enabled: bool
    launch_date: str
    phase: str
    last_poll_ok: str | None
    poll_age_s: float | None
    cursor: str | None
    queued: int
    sent_today: int
    sent_total: int
    dead: int
    malformed: int
    key: str
    last_error: str | None
    stale: bool

    def as_dict(self) -> dict[str, object]:
        """Return the row as a JSON-ready dict."""
        return asdict(self)

    def is_stale(self, limit: timedelta) -> bool:
        """Tell whether an enabled customer has not completed a poll within ``limit``."""
        if not self.enabled:
            return False
        return self.poll_age_s is None or self.poll_age_s > limit.total_seconds()


def stale_limit(settings: Settings) -> timedelta:
    """Return how long an enabled customer may go without a completed poll before it counts as stale."""
    return timedelta(seconds=STALE_POLLS * settings.bridge.poll_interval_seconds)


def utc_midnight(now: datetime) -> datetime:
    """Return 00:00 UTC of ``now``'s UTC day."""
    return datetime.combine(now.astimezone(UTC).date(), datetime.min.time(), UTC)


def phase_of(customer: CustomerSettings, state: CustomerState, now: datetime) -> str:
    """Name where the customer is: pre-launch, backfill (first walk since launch not finished) or live."""
    launch = datetime.combine(customer.launch_date, datetime.min.time(), UTC)
    if now < launch:
        return "pre-launch"
    # The first poll after launch walks the whole backfill window; until one completes, history is loading.
    ok = state.last_poll_ok_at
    if ok is None or ok < launch:
        return "backfill"
    return "live"


async def status_rows(settings: Settings, now: datetime) -> list[StatusRow]:
    """Read every configured customer's status from the state DB."""
    store = await Store.open(settings.bridge.state_path, readonly=True)
    try:
        return [await _row(store, c, now, stale_limit(settings)) for c in settings.customers]
    finally:
        await store.close()


async def _row(store: Store, customer: CustomerSettings, now: datetime, limit: timedelta) -> StatusRow:
    """Build one customer's status row."""
    cid = customer.whiplash_customer_id
    state = await store.customer_state(cid)
    counts = await store.counts(cid, utc_midnight(now))
    ok = state.last_poll_ok_at
    age = round((now - ok).total_seconds(), 1) if ok else None
    return StatusRow(
        customer_id=cid,
        name=customer.name,
        enabled=customer.enabled,
        launch_date=customer.launch_date.isoformat(),
        phase=phase_of(customer, state, now),
        last_poll_ok=_utc_text(ok),
        poll_age_s=age,
        cursor=_utc_text(state.cursor[0]) if state.cursor else None,
        queued=counts.queued,
        sent_today=counts.sent_since,
        sent_total=counts.sent,
        dead=counts.dead,
        malformed=counts.malformed,
        key="ok" if state.key_healthy else "REFUSED",
        last_error=state.last_error or state.key_error,
        stale=customer.enabled and (age is None or age > limit.total_seconds()),
    )


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
    ("last_poll_ok", "last_poll_ok"),
    ("age", "poll_age_s"),
    ("cursor", "cursor"),
    ("queued", "queued"),
    ("sent_today", "sent_today"),
    ("dead", "dead"),
    ("malformed", "malformed"),
    ("key", "key"),
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
    if field == "poll_age_s" and isinstance(value, float):
        return age_text(value)
    if field in ("last_poll_ok", "cursor"):
        return str(value).replace("+00:00", "Z")
    text = " ".join(str(value).split())  # one table line per customer, whatever the error text holds
    return text if len(text) <= 60 else text[:59] + "…"
