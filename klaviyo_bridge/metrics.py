"""Optional Prometheus metrics: per-customer counters and gauges, served from the daemon's own event loop.

Invariants:
- every ``Metrics`` owns its registry (never prometheus_client's global one), so several can coexist;
- with ``[bridge] metrics_listen`` unset the daemon gets ``NoMetrics``, whose methods do nothing, so call
  sites never check whether metrics are on;
- recording never raises: a zero or negative count is ignored rather than tripping the Counter's check;
- labels carry only the Whiplash customer id (no names, emails or keys) and, for upstream failures, the
  upstream's name (``whiplash`` or ``klaviyo``), so a scrape never leaks anything;
- ``forget`` drops every series labelled with the customer, so a removed customer stops being alerted on.

The alerting rules (contrib/prometheus) and the dashboard (contrib/grafana) use these names; a test checks
that every name they use is one the running daemon exports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .budget import BudgetUsage
from .config import BridgeSettings

log = logging.getLogger(__name__)

PREFIX = "klaviyo_bridge"
METRICS_PATH = "/metrics"
UPSTREAMS = ("whiplash", "klaviyo")  # the values of the ``upstream`` label
# The values of the ``outcome`` label of webhook requests (see ``webhooks``); all exported from the start.
WEBHOOK_OUTCOMES = ("accepted", "already_seen", "unsigned", "bad_signature", "too_large", "malformed",
                    "unknown_customer", "ignored_disabled")


class NoMetrics:
    """What the daemon reports to; this base is the disabled sink, every method a no-op."""

    enabled = False

    def poll_done(self, customer_id: int, ok: bool, lag_s: float | None = None) -> None:
        """Do nothing."""

    def sent(self, customer_id: int, n: int = 1) -> None:
        """Do nothing."""

    def dead(self, customer_id: int, n: int = 1) -> None:
        """Do nothing."""

    def retried(self, customer_id: int, n: int = 1) -> None:
        """Do nothing."""

    def throttled(self, customer_id: int, n: int = 1) -> None:
        """Do nothing."""

    def set_queued(self, customer_id: int, n: int) -> None:
        """Do nothing."""

    def set_dead_letters(self, customer_id: int, n: int) -> None:
        """Do nothing."""

    def set_poll_interval(self, seconds: float) -> None:
        """Do nothing."""

    def set_key_refused(self, customer_id: int, refused: bool) -> None:
        """Do nothing."""

    def set_oldest_queued(self, customer_id: int, seconds: float) -> None:
        """Do nothing."""

    def upstream_error(self, upstream: str, customer_id: int, n: int = 1) -> None:
        """Do nothing."""

    def set_error_streak(self, upstream: str, customer_id: int, seconds: float) -> None:
        """Do nothing."""

    def set_poll_interval_achieved(self, customer_id: int, seconds: float) -> None:
        """Do nothing."""

    def watch_budget(self, usage: Callable[[], BudgetUsage]) -> None:
        """Do nothing."""

    def webhook(self, outcome: str) -> None:
        """Do nothing."""

    def webhook_wakeup(self, customer_id: int, new_poll: bool) -> None:
        """Do nothing."""

    def forget(self, customer_id: int) -> None:
        """Do nothing."""


MetricsSink = NoMetrics  # the type call sites annotate: Metrics or the disabled NoMetrics


class Metrics(NoMetrics):
    """Per-customer counters and gauges in a registry of their own."""

    enabled = True

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        by_customer = ["customer"]
        r = self.registry
        self._polls = Counter(f"{PREFIX}_polls", "Finished poll cycles by outcome (ok|error).",
                              [*by_customer, "outcome"], registry=r)
        self._sent = Counter(f"{PREFIX}_sent_rows", "Outbox rows Klaviyo accepted.", by_customer, registry=r)
        self._dead = Counter(f"{PREFIX}_dead_rows", "Outbox rows Klaviyo refused (dead-lettered).",
                             by_customer, registry=r)
        self._retries = Counter(f"{PREFIX}_retries", "Sends rescheduled after a transient failure.",
                                by_customer, registry=r)
        self._throttled = Counter(f"{PREFIX}_klaviyo_throttled", "Klaviyo 429 (rate limited) answers.",
                                  by_customer, registry=r)
        self._queued = Gauge(f"{PREFIX}_queued_rows", "Outbox rows waiting to be sent.", by_customer, registry=r)
        self._dead_letters = Gauge(f"{PREFIX}_dead_letters", "Dead letters waiting for ops (see dead-letters).",
                                   by_customer, registry=r)
        self._lag = Gauge(f"{PREFIX}_poll_lag_seconds",
                          "Age of the newest order change that produced an event in the last poll.",
                          by_customer, registry=r)
        self._last_ok = Gauge(f"{PREFIX}_last_successful_poll_timestamp_seconds",
                              "Unix time of the last poll that completed.", by_customer, registry=r)
        self._interval = Gauge(f"{PREFIX}_poll_interval_seconds",
                               "Configured poll interval ([bridge] poll_interval_seconds).", registry=r)
        self._key_refused = Gauge(f"{PREFIX}_klaviyo_key_refused",
                                  "1 while Klaviyo refuses the customer's key (401/403), else 0.",
                                  by_customer, registry=r)
        self._oldest_queued = Gauge(f"{PREFIX}_oldest_queued_seconds",
                                    "Age of the oldest row waiting to be sent (0 when none).", by_customer, registry=r)
        by_upstream = ["upstream", *by_customer]
        self._upstream_errors = Counter(f"{PREFIX}_upstream_errors", "Failed requests to an upstream API.",
                                        by_upstream, registry=r)
        self._error_streak = Gauge(f"{PREFIX}_upstream_error_streak_seconds",
                                   "How long requests to the upstream have failed without a success (0: healthy).",
                                   by_upstream, registry=r)
        self._upstreams: set[str] = set(UPSTREAMS)  # every upstream label value used, for ``forget``
        self._achieved = Gauge(f"{PREFIX}_poll_interval_achieved_seconds",
                               "Seconds between the customer's last two polls: the interval the budget allowed.",
                               by_customer, registry=r)
        # Webhook requests carry no customer label: most outcomes (forged, unsigned, too large) have no customer.
        self._webhooks = Counter(f"{PREFIX}_webhooks", "Webhook requests received, by outcome.", ["outcome"],
                                 registry=r)
        for outcome in WEBHOOK_OUTCOMES:  # a series from the start: rate() over a new series starts at 0
            self._webhooks.labels(outcome)
        self._wakeups = Counter(f"{PREFIX}_webhook_wakeups", "Verified webhooks that woke the customer's poller.",
                                by_customer, registry=r)
        self._wake_polls = Counter(f"{PREFIX}_webhook_polls",
                                   "Polls requested by webhooks (the other wake-ups joined a poll already requested).",
                                   by_customer, registry=r)

    def poll_done(self, customer_id: int, ok: bool, lag_s: float | None = None) -> None:
        """Count one finished poll cycle and, when given, record the poll lag."""
        cid = str(customer_id)
        self._polls.labels(cid, "ok" if ok else "error").inc()
        if ok:
            self._last_ok.labels(cid).set_to_current_time()
        if lag_s is not None:
            self._lag.labels(cid).set(max(0.0, lag_s))

    def sent(self, customer_id: int, n: int = 1) -> None:
        """Count rows Klaviyo accepted."""
        _add(self._sent, customer_id, n)

    def dead(self, customer_id: int, n: int = 1) -> None:
        """Count rows dead-lettered."""
        _add(self._dead, customer_id, n)

    def retried(self, customer_id: int, n: int = 1) -> None:
        """Count rows rescheduled after a transient failure."""
        _add(self._retries, customer_id, n)

    def throttled(self, customer_id: int, n: int = 1) -> None:
        """Count Klaviyo 429 answers."""
        _add(self._throttled, customer_id, n)

    def set_queued(self, customer_id: int, n: int) -> None:
        """Record how many rows are pending."""
        self._queued.labels(str(customer_id)).set(max(0, n))

    def set_dead_letters(self, customer_id: int, n: int) -> None:
        """Record how many dead letters are waiting for ops."""
        self._dead_letters.labels(str(customer_id)).set(max(0, n))

    def set_poll_interval(self, seconds: float) -> None:
        """Record the poll interval in effect (the stalled-poll alert compares against 3 × this)."""
        self._interval.set(_non_negative(seconds))

    def set_key_refused(self, customer_id: int, refused: bool) -> None:
        """Record whether Klaviyo currently refuses the customer's key."""
        self._key_refused.labels(str(customer_id)).set(1 if refused else 0)

    def set_oldest_queued(self, customer_id: int, seconds: float) -> None:
        """Record the age of the customer's oldest pending row (0 when nothing waits)."""
        self._oldest_queued.labels(str(customer_id)).set(_non_negative(seconds))

    def upstream_error(self, upstream: str, customer_id: int, n: int = 1) -> None:
        """Count failed requests to ``upstream`` (``whiplash`` or ``klaviyo``) made for a customer."""
        if n > 0:
            self._upstreams.add(upstream)
            self._upstream_errors.labels(upstream, str(customer_id)).inc(n)

    def set_error_streak(self, upstream: str, customer_id: int, seconds: float) -> None:
        """Record how long ``upstream`` has failed for a customer without a success (0 once it succeeds)."""
        self._upstreams.add(upstream)
        self._error_streak.labels(upstream, str(customer_id)).set(_non_negative(seconds))

    def set_poll_interval_achieved(self, customer_id: int, seconds: float) -> None:
        """Record the seconds between the customer's last two polls."""
        self._achieved.labels(str(customer_id)).set(_non_negative(seconds))

    def watch_budget(self, usage: Callable[[], BudgetUsage]) -> None:
        """Export the shared Whiplash budget's use, read at each scrape."""
        self.registry.register(BudgetCollector(usage))

    def webhook(self, outcome: str) -> None:
        """Count one webhook request by its outcome (``WEBHOOK_OUTCOMES``)."""
        self._webhooks.labels(outcome).inc()

    def webhook_wakeup(self, customer_id: int, new_poll: bool) -> None:
        """Count a webhook's wake-up of a customer, and whether it asked for a poll not already asked for."""
        _add(self._wakeups, customer_id, 1)
        if new_poll:
            _add(self._wake_polls, customer_id, 1)

    def forget(self, customer_id: int) -> None:
        """Drop a removed customer's series so the scrape stops reporting it."""
        cid = str(customer_id)
        for outcome in ("ok", "error"):
            _remove(self._polls, cid, outcome)
        for metric in (self._sent, self._dead, self._retries, self._throttled, self._queued, self._dead_letters,
                       self._lag, self._last_ok, self._key_refused, self._oldest_queued, self._achieved,
                       self._wakeups, self._wake_polls):
            _remove(metric, cid)
        for upstream in self._upstreams:
            _remove(self._upstream_errors, upstream, cid)
            _remove(self._error_streak, upstream, cid)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """Return the exposition body and its content type, negotiated from an Accept header."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class BudgetCollector(Collector):
    """The process's one Whiplash budget, read when Prometheus scrapes (no series per customer: it is shared)."""

    def __init__(self, usage: Callable[[], BudgetUsage]) -> None:
        self._usage = usage

    def collect(self) -> Iterator[Metric]:
        """Yield the budget's gauges and its 429 counter."""
        u = self._usage()
        yield GaugeMetricFamily(f"{PREFIX}_whiplash_budget_limit_per_second",
                                "Configured Whiplash requests per second ([whiplash] max_requests_per_second).",
                                value=u.limit_per_s)
        yield GaugeMetricFamily(f"{PREFIX}_whiplash_budget_effective_per_second",
                                "Whiplash requests per second allowed now (halved after a 429, then growing back).",
                                value=u.effective_per_s)
        yield GaugeMetricFamily(f"{PREFIX}_whiplash_requests_per_second",
                                "Whiplash requests started per second, averaged over the last 10 seconds.",
                                value=u.requests_per_s)
        yield GaugeMetricFamily(f"{PREFIX}_whiplash_requests_in_flight", "Whiplash requests in flight.",
                                value=u.in_flight)
        waiting = GaugeMetricFamily(f"{PREFIX}_whiplash_requests_waiting",
                                    "Whiplash requests waiting for the shared budget, by lane.", labels=["lane"])
        for lane, n in u.waiting.items():
            waiting.add_metric([lane.name.lower()], n)
        yield waiting
        yield CounterMetricFamily(f"{PREFIX}_whiplash_throttled", "Whiplash 429 answers (each slows the budget).",
                                  value=u.throttled)


def _add(counter: Counter, customer_id: int, n: int) -> None:
    """Add ``n`` to a customer's counter; nothing happened when ``n`` is not positive."""
    if n > 0:
        counter.labels(str(customer_id)).inc(n)


def _non_negative(seconds: float) -> float:
    """Return ``seconds``, or 0 for a negative or NaN value (a clock step back must not export nonsense)."""
    return seconds if seconds > 0 else 0.0


def _remove(metric: Counter | Gauge, *labels: str) -> None:
    """Remove one labelled series if it exists."""
    try:
        metric.remove(*labels)
    except KeyError:
        return


def metrics_for(bridge: BridgeSettings) -> MetricsSink:
    """Return a live ``Metrics`` when ``metrics_listen`` is set, else the no-op sink.

    The poll interval is exported from the start: the stalled-poll alert compares against 3 × it, and a 0
    there would page for every customer until the daemon first reported it.
    """
    if bridge.metrics_address() is None:
        return NoMetrics()
    metrics = Metrics()
    metrics.set_poll_interval(bridge.poll_interval_seconds)
    return metrics


@dataclass(slots=True)
class MetricsServer:
    """A running metrics endpoint; ``close`` stops listening."""

    runner: web.AppRunner
    url: str

    async def close(self) -> None:
        """Stop serving and release the port."""
        await self.runner.cleanup()


def metrics_app(metrics: Metrics) -> web.Application:
    """Build the aiohttp application that serves ``GET /metrics``."""

    async def scrape(request: web.Request) -> web.Response:
        body, content_type = metrics.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get(METRICS_PATH, scrape)
    return app


async def start_metrics_server(metrics: Metrics, address: tuple[str, int]) -> MetricsServer:
    """Serve ``metrics`` on ``address`` (host, port; port 0 picks a free one) from the running loop.

    Raises OSError when the address cannot be bound (e.g. the port is taken).
    """
    runner = web.AppRunner(metrics_app(metrics), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, address[0], address[1])
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    url = f"http://[{host}]:{port}{METRICS_PATH}" if ":" in host else f"http://{host}:{port}{METRICS_PATH}"
    log.info("metrics endpoint listening url=%s", url)
    return MetricsServer(runner, url)
