"""What the commands share to run alongside the daemon: whether it is polling, its state DB, its token chain.

``status``, ``dead-letters``, ``resync``, ``backup`` and ``webhooks`` run while the daemon runs, on the same state
DB and the same Whiplash token chain. They take these helpers from here and never import each other (only
``cli`` imports the commands). Invariants:
- a customer is stale when it is enabled and has not completed a poll within ``STALE_POLLS`` rounds, a round
  being ``poll_interval_seconds`` or, when the Whiplash budget cannot poll every customer that often, the time it
  needs (customers ÷ ``max_requests_per_second``); the daemon counts as running while any enabled customer
  completed or attempted a poll within that limit;
- ``open_store`` never creates a state DB: a missing one is an error, because an empty DB would make a resync
  queue a whole window as if it had never been sent;
- ``token_conflict`` keeps a command from rotating the Whiplash refresh token under a running daemon.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from . import budget
from .config import Settings
from .errors import StoreError
from .store import Store
from .whiplash_auth import REFRESH_MARGIN, fingerprint

STALE_POLLS = 3  # a customer is stale after this many poll intervals without a completed poll
TOKEN_HEADROOM = timedelta(minutes=10)  # a command must finish before the daemon renews the shared token


def round_seconds(settings: Settings) -> float:
    """Return how long one round of polls takes: the interval, or longer when the budget cannot keep up with it."""
    return budget.round_seconds(len(settings.enabled_customers()), settings.whiplash.max_requests_per_second,
                                settings.bridge.poll_interval_seconds)


def stale_limit(settings: Settings) -> timedelta:
    """Return how long an enabled customer may go without a completed poll before it counts as stale."""
    return timedelta(seconds=STALE_POLLS * round_seconds(settings))


async def open_store(settings: Settings, *, write: bool) -> Store:
    """Open the existing state DB (read-only unless ``write``); never create one."""
    path = settings.bridge.state_path
    if write and not path.is_file():
        raise StoreError(f"no state database at {path}; has the daemon ever run with this config?")
    return await Store.open(path, readonly=not write)


async def token_conflict(settings: Settings, store: Store, now: datetime) -> str | None:
    """Tell why a resync would break a running daemon's Whiplash token chain, or None when it cannot.

    With ``grant = "refresh_token"`` Whiplash rotates the refresh token on every renewal and revokes the old
    one; the daemon keeps its chain in memory, so a renewal made here would leave it holding a dead token.
    A resync therefore only runs alongside the daemon when the stored access token will not need renewal.
    """
    w = settings.whiplash
    if w.grant != "refresh_token" or w.refresh_token is None:
        return None
    if not await _daemon_polling(settings, store, now, stale_limit(settings)):
        return None
    rec = await store.load_whiplash_token()
    seed = fingerprint(w.refresh_token.get_secret_value())
    if rec is not None and rec.seed_fingerprint == seed and rec.expires_at - now > REFRESH_MARGIN + TOKEN_HEADROOM:
        return None
    return ("the daemon is running with whiplash.grant = \"refresh_token\" and its Whiplash access token is due "
            "for renewal; a renewal here would rotate the refresh token under the daemon. Retry in a few minutes, "
            "once the daemon has renewed it, or stop the daemon first")


async def _daemon_polling(settings: Settings, store: Store, now: datetime, limit: timedelta) -> bool:
    """Tell whether any enabled customer completed or attempted a poll within ``limit`` (the daemon runs)."""
    for customer in settings.enabled_customers():
        last = (await store.customer_state(customer.whiplash_customer_id)).last_poll_at
        if last is not None and now - last <= limit:
            return True
    return False
