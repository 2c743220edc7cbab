"""Upstream outages summarised for the log: one line when errors start, one when the upstream recovers.

During a Klaviyo 503 storm or a Whiplash outage every request fails and is retried; a line per failure would
bury the one line ops need at 3 a.m. An ``UpstreamHealth`` follows the failing customers of one upstream
(Whiplash: every customer, since one OAuth application serves them all; Klaviyo: one per merchant account)
and logs:
- one WARNING when the first customer starts failing: status, a one-line reason, what happens next;
- one INFO when the last failing customer succeeds again: how long the outage lasted, how many requests failed;
- the individual failures only at DEBUG.
It also feeds the per-customer error counters and streak gauges of the metrics.

Invariants: a streak starts at the first failure after a success and ends at the next success; ``failed`` and
``succeeded`` never raise and never do I/O; what they log is built from error texts that hold no secret.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .clock import Monotonic
from .errors import AuthFailed, PermanentUpstream, UpstreamError
from .metrics import MetricsSink, NoMetrics

log = logging.getLogger(__name__)

_ADVICE = {
    "whiplash": "polls are retried every interval and resume where they stopped; nothing is lost. If it lasts, "
                "check Whiplash's status and this host's network",
    "klaviyo": "rows stay queued and are retried with backoff; nothing is lost. If it lasts, check Klaviyo's "
               "status page (status.klaviyo.com)",
}


@dataclass(slots=True)
class _Streak:
    """One customer's current run of failures."""

    since: float
    failures: int = 0


class UpstreamHealth:
    """Follow one upstream's failing customers; log an outage's start and end, not every failure."""

    def __init__(self, upstream: str, *, metrics: MetricsSink | None = None, clock: Monotonic = time.monotonic) -> None:
        self.upstream = upstream
        self.metrics: MetricsSink = metrics if metrics is not None else NoMetrics()
        self._clock = clock
        self._failing: dict[int, _Streak] = {}
        self._outage_since: float | None = None
        self._outage_failures = 0
        self._outage_customers: set[int] = set()

    def failed(self, customer_id: int, error: BaseException) -> None:
        """Record one failed request of ``customer_id``; the first failure of an outage is logged."""
        now = self._clock()
        streak = self._failing.setdefault(customer_id, _Streak(now))
        streak.failures += 1
        self.metrics.upstream_error(self.upstream, customer_id)
        self.metrics.set_error_streak(self.upstream, customer_id, now - streak.since)
        self._outage_failures += 1
        self._outage_customers.add(customer_id)
        if self._outage_since is None:
            self._outage_since = now
            self._log_start(customer_id, error)
        else:
            log.debug("%s error customer=%s error=%s", self.upstream, customer_id, error)

    def succeeded(self, customer_id: int) -> None:
        """Record a success of ``customer_id``; the success that ends an outage is logged."""
        if self._failing.pop(customer_id, None) is None:
            return
        self.metrics.set_error_streak(self.upstream, customer_id, 0.0)
        if self._failing or self._outage_since is None:
            return
        log.info(
            "%s recovered outage_s=%.0f failed_requests=%d customers=%d", self.upstream,
            self._clock() - self._outage_since, self._outage_failures, len(self._outage_customers),
        )
        self._outage_since, self._outage_failures, self._outage_customers = None, 0, set()

    def streak_s(self, customer_id: int) -> float | None:
        """Return how long ``customer_id`` has been failing, or None when its last request worked."""
        streak = self._failing.get(customer_id)
        return None if streak is None else self._clock() - streak.since

    def is_failing(self, customer_id: int) -> bool:
        """Tell whether ``customer_id``'s last request to this upstream failed."""
        return customer_id in self._failing

    def _log_start(self, customer_id: int, error: BaseException) -> None:
        """Log the first failure of an outage, louder when retrying cannot help (refused credentials, 4xx)."""
        status = error.status if isinstance(error, UpstreamError) else None
        fatal = isinstance(error, AuthFailed | PermanentUpstream)
        log.log(
            logging.ERROR if fatal else logging.WARNING,
            "%s errors started customer=%s status=%s error=%s action=%s", self.upstream, customer_id,
            status if status is not None else "-", error,
            "fix what the error says (credentials, customer id); polls keep retrying" if fatal
            else _ADVICE.get(self.upstream, "retried with backoff"),
        )
