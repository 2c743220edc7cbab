"""Per-customer status read from the state DB; safe while the daemon runs (read-only connection)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from .config import CustomerSettings, Settings
from .store import CustomerState, Store


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
    sent_24h: int
    sent_total: int
    dead: int
    malformed: int
    key: str
    last_error: str | None

    def as_dict(self) -> dict[str, object]:
        """Return the row as a JSON-ready dict."""
        return asdict(self)

    def is_stale(self, limit: timedelta) -> bool:
        """Tell whether an enabled customer has not completed a poll within ``limit``."""
        if not self.enabled:
            return False
        return self.poll_age_s is None or self.poll_age_s > limit.total_seconds()


def phase_of(customer: CustomerSettings, state: CustomerState, now: datetime) -> str:
    """Name where the customer is: pre-launch, backfill (catching up before launch) or live."""
    launch = datetime.combine(customer.launch_date, datetime.min.time(), UTC)
    if now < launch:
        return "pre-launch"
    if state.cursor is None or state.cursor[0] < launch:
        return "backfill"
    return "live"


async def status_rows(settings: Settings, now: datetime) -> list[StatusRow]:
    """Read every configured customer's status from the state DB."""
    store = await Store.open(settings.bridge.state_path, readonly=True)
    try:
        return [await _row(store, c, now) for c in settings.customers]
    finally:
        await store.close()


async def _row(store: Store, customer: CustomerSettings, now: datetime) -> StatusRow:
    """Build one customer's status row."""
    cid = customer.whiplash_customer_id
    state = await store.customer_state(cid)
    counts = await store.counts(cid, now - timedelta(days=1))
    ok = state.last_poll_ok_at
    return StatusRow(
        customer_id=cid,
        name=customer.name,
        enabled=customer.enabled,
        launch_date=customer.launch_date.isoformat(),
        phase=phase_of(customer, state, now),
        last_poll_ok=ok.isoformat(timespec="seconds") if ok else None,
        poll_age_s=round((now - ok).total_seconds(), 1) if ok else None,
        cursor=state.cursor[0].isoformat(timespec="seconds") if state.cursor else None,
        queued=counts.queued,
        sent_24h=counts.sent_since,
        sent_total=counts.sent,
        dead=counts.dead,
        malformed=counts.malformed,
        key="ok" if state.key_healthy else "REFUSED",
        last_error=state.last_error or state.key_error,
    )


COLUMNS = ("customer_id", "name", "enabled", "phase", "launch_date", "last_poll_ok", "poll_age_s", "cursor",
           "queued", "sent_24h", "dead", "malformed", "key", "last_error")


def render_status(rows: list[StatusRow]) -> str:
    """Render rows as an aligned text table."""
    table = [list(COLUMNS)] + [[_cell(r.as_dict()[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in table)


def _cell(value: object) -> str:
    """Format one table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)[:60]
