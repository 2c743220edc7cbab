"""Shared pieces of the benchmarks: simulators on loopback, config files, the bridge as a subprocess, floors.

The simulators run in the benchmark's own event loop (one core); the bridge under test runs as a separate
process (``benchmarks/bridge_runner.py`` wrapping the real CLI), so on this 2-core machine each gets a core
and the bridge's CPU time is measured on its own (getrusage of the bridge process, all threads).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from klaviyo_bridge.ratelimit import LIMITS, Endpoint
from klaviyo_bridge.sandbox.filters import HAND_FILTERS, FilterTable
from klaviyo_bridge.sandbox.klaviyo import FakeKlaviyo, serve_klaviyo
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, serve_whiplash

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-whiplash-secret-1"
SAMPLE_EMAIL = "bridge-samples@example.com"
SHARE = 0.8  # the shipped default of klaviyo.rate_limit_share
PAGE_SIZE = 500  # the largest page the config allows

# FakeKlaviyo operation ids → the bridge limiter's endpoint (whose published limits the floor uses).
OP_ENDPOINTS: Mapping[str, Endpoint] = {
    "create_event": Endpoint.EVENTS,
    "bulk_create_events": Endpoint.BULK_EVENTS,
    "create_or_update_profile": Endpoint.PROFILE_IMPORT,
    "bulk_import_profiles": Endpoint.BULK_PROFILES,
    "get_bulk_import_profiles_job": Endpoint.BULK_PROFILES,
    "get_errors_for_bulk_import_profiles_job": Endpoint.BULK_PROFILES,
    "get_lists": Endpoint.LISTS_READ,
    "create_list": Endpoint.LISTS_CREATE,
    "add_profiles_to_list": Endpoint.LIST_ADD,
}


class NoCheck:
    """A body checker that accepts every body: the benchmarks time the bridge, not the simulator's validation.

    The simulator's hand rules cost it ~0.5 ms per event and its spec validation ~1 ms; the test suite
    validates every body shape the bridge sends (tests/test_bulk.py and the e2e tests run with the spec).
    """

    @property
    def filters(self) -> Mapping[str, FilterTable]:
        """Return the hand-written filter forms: ``filter`` parameters are still checked (cheap, once a list)."""
        return HAND_FILTERS

    def check(self, operation_id: str, body: object) -> None:
        """Accept the body."""


def klaviyo_sim(**options: Any) -> FakeKlaviyo:
    """Return a simulated Klaviyo that enforces limits and semantics but skips body validation."""
    fake = FakeKlaviyo(spec_path=None, **options)
    fake.checker = NoCheck()
    return fake


@dataclass
class Customer:
    """One [[customers]] block."""

    cid: int
    key: str
    launch: date
    backfill_days: int = 14

    @property
    def env_name(self) -> str:
        """Return the environment variable carrying this customer's Klaviyo key."""
        return f"BENCH_KLAVIYO_KEY_{self.cid}"


@dataclass
class BridgeRun:
    """What one bridge process did: exit code, wall and CPU seconds, peak RSS, its log."""

    returncode: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    stderr: str
    sim_cpu_s: float = math.nan  # CPU the simulators (this process) spent meanwhile
    started_mono: float = 0.0  # time.monotonic() at spawn
    started_wall: float = 0.0  # time.time() at spawn


@dataclass
class Settings:
    """Config values a benchmark varies."""

    poll_interval: float = 60.0
    share: float = SHARE
    overlap: int = 300
    log_level: str = "info"
    extra: dict[str, str] = field(default_factory=dict)


def toml_str(value: str) -> str:
    """Quote a TOML basic string."""
    return json.dumps(value)


def config_text(state: Path, whiplash_url: str, klaviyo_url: str, customers: Sequence[Customer], s: Settings) -> str:
    """Return a complete bridge config for these simulators and customers."""
    head = f"""[bridge]
state_path = {toml_str(str(state))}
poll_interval_seconds = {s.poll_interval}
log_level = "{s.log_level}"
shutdown_grace_seconds = 5.0

[whiplash]
base_url = {toml_str(whiplash_url)}
client_id = "{CLIENT_ID}"
client_secret = "env:BENCH_WHIPLASH_SECRET"
page_size = {PAGE_SIZE}
overlap_seconds = {s.overlap}

[klaviyo]
base_url = {toml_str(klaviyo_url)}
rate_limit_share = {s.share}
default_profile_email = "{SAMPLE_EMAIL}"
key_probe_seconds = 60.0
"""
    blocks = [
        f"""
[[customers]]
whiplash_customer_id = {c.cid}
name = "Merchant {c.cid}"
klaviyo_api_key = "env:{c.env_name}"
launch_date = {c.launch.isoformat()}
backfill_days = {c.backfill_days}
"""
        for c in customers
    ]
    return head + "".join(blocks)


@dataclass
class Bench:
    """A benchmark's simulators (served on loopback), its customers and a place for its config and state."""

    whiplash: FakeWhiplash
    klaviyo: FakeKlaviyo
    whiplash_url: str
    klaviyo_url: str
    tmp: Path
    customers: list[Customer]
    settings: Settings = field(default_factory=Settings)

    @property
    def state(self) -> Path:
        """Return the state database path."""
        return self.tmp / "state.db"

    @property
    def config(self) -> Path:
        """Return the config path."""
        return self.tmp / "config.toml"

    def write_config(self) -> Path:
        """Write the config for the current settings and customers."""
        self.config.write_text(config_text(self.state, self.whiplash_url, self.klaviyo_url, self.customers,
                                           self.settings))
        return self.config

    def env(self) -> dict[str, str]:
        """Return the bridge's environment: secrets as env: references, nothing else inherited that matters."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "KLAVIYO_", "NOTIFY_"))}
        env["BENCH_WHIPLASH_SECRET"] = CLIENT_SECRET
        env["PYTHONUNBUFFERED"] = "1"
        env.update({c.env_name: c.key for c in self.customers})
        return env

    def command(self, *args: str, unlimited: bool = False) -> list[str]:
        """Return the bridge command line (through the runner that reports its own resource usage)."""
        runner = [sys.executable, str(HERE / "bridge_runner.py")]
        return [*runner, *(["--unlimited"] if unlimited else []), "--", *args, "--config", str(self.config)]

    async def run_once(self, *, unlimited: bool = False, limit_s: float = 300) -> BridgeRun:
        """Run ``run --once`` to completion and return its figures."""
        self.write_config()
        usage = self.tmp / f"usage-{time.monotonic_ns()}.json"
        env = self.env() | {"BENCH_USAGE_FILE": str(usage)}
        sim_before, mono, epoch = own_cpu(), time.monotonic(), time.time()
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *self.command("run", "--once", unlimited=unlimited), env=env, cwd=str(self.tmp),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), limit_s)
        wall = time.perf_counter() - started
        figures = read_usage(usage)
        return BridgeRun(proc.returncode or 0, wall, figures["cpu_s"], figures["maxrss_mb"], err.decode(),
                         own_cpu() - sim_before, mono, epoch)

    def poll_phase_s(self, run: BridgeRun) -> float:
        """Return when, after spawn, the bridge's last Whiplash orders request was answered."""
        stamps = [r.at for r in self.whiplash.counters.log if r.path.startswith("/api/v2/orders")]
        return max(stamps, default=run.started_mono) - run.started_mono

    def last_klaviyo_s(self, run: BridgeRun, label: str) -> float:
        """Return when, after spawn, the account's last event was accepted."""
        events = self.klaviyo.account(label).events
        return max((e.received.timestamp() for e in events), default=run.started_wall) - run.started_wall


@asynccontextmanager
async def bench(
    tmp: Path, customers: list[Customer], *, klaviyo: FakeKlaviyo, whiplash: FakeWhiplash | None = None
) -> AsyncIterator[Bench]:
    """Serve both simulators on loopback for one benchmark; accounts are added for every customer."""
    whiplash = whiplash or FakeWhiplash(CLIENT_ID, CLIENT_SECRET, max_per_page=PAGE_SIZE)
    for c in customers:
        whiplash.add_customer(c.cid)
        klaviyo.add_account(c.key, label=str(c.cid))
    make_dir(tmp)
    async with serve_whiplash(whiplash) as w_url, serve_klaviyo(klaviyo) as k_url:
        yield Bench(whiplash, klaviyo, w_url, k_url, tmp, customers)


MIXED = (100, 300, 350, 300, 160, 40, 300, 350)  # processing, shipped, delivered, cancelled


def seed_backfill(
    whiplash: FakeWhiplash, cid: int, n: int, *, start: datetime, end: datetime, statuses: Sequence[int] = MIXED
) -> list[int]:
    """Create ``n`` orders of distinct shoppers, spread evenly over [start, end), cycling through ``statuses``."""
    step = (end - start) / max(n, 1)
    ids = []
    for i in range(n):
        order = whiplash.create_order(cid, status=statuses[i % len(statuses)], at=start + step * i,
                                      first_name=f"Shopper{i}", last_name="Bench")
        ids.append(int(order["id"]))
    return ids


def requests_by_endpoint(klaviyo: FakeKlaviyo, label: str) -> dict[Endpoint, int]:
    """Return how many requests one simulated account received, per bridge limiter endpoint."""
    counts: dict[Endpoint, int] = {}
    for op_id, n in klaviyo.account(label).counters.requests.items():
        endpoint = OP_ENDPOINTS[op_id]
        counts[endpoint] = counts.get(endpoint, 0) + n
    return counts


def fixed_window_floor(requests: Mapping[Endpoint, int], share: float) -> float:
    """Return the least time any client needs for these requests at ``share`` of Klaviyo's fixed windows.

    Per endpoint, requests go as early as the burst (1 s) and steady (60 s) windows allow, starting at a
    window boundary with the whole quota free; endpoints run in parallel, so the floor is the slowest one.
    The n-th request can go no earlier than 60·⌊(n-1)/m⌋ + ⌊((n-1) mod m)/b⌋ seconds (b, m = the share of
    the burst and steady limits). Polls that must wait for a job are not counted as waiting: a lower bound.
    """
    floor = 0.0
    for endpoint, n in requests.items():
        if n <= 0:
            continue
        limit = LIMITS[endpoint]
        burst = max(1, math.floor(share * limit.burst))
        steady = max(1, math.floor(share * limit.steady))
        minute, within = divmod(n - 1, steady)
        floor = max(floor, 60.0 * minute + within // burst)
    return floor


def sustained_floor(requests: Mapping[Endpoint, int], share: float) -> float:
    """Return the time these requests take at exactly share × the steady limit (no quota saved up)."""
    return max((n / (share * LIMITS[e].steady / 60.0) for e, n in requests.items() if n > 0), default=0.0)


def own_cpu() -> float:
    """Return this process's CPU seconds so far (the simulators run here)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_dir(path: Path) -> None:
    """Create a directory and its parents (sync helper: async code does no blocking path calls)."""
    path.mkdir(parents=True, exist_ok=True)


def read_usage(path: Path) -> dict[str, float]:
    """Read the figures bridge_runner.py wrote, NaN when it wrote none (it crashed)."""
    if not path.exists():
        return {"cpu_s": math.nan, "maxrss_mb": math.nan}
    figures: dict[str, float] = json.loads(path.read_text())
    return figures


def utc_midnight(day: date) -> datetime:
    """Return 00:00 UTC of a day."""
    return datetime.combine(day, datetime.min.time(), UTC)


def pct(values: Sequence[float], q: float) -> float:
    """Return the q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def window_start_days_ago(days: int) -> datetime:
    """Return now minus ``days``, whole seconds."""
    return (datetime.now(UTC) - timedelta(days=days)).replace(microsecond=0)


def describe(value: Any) -> str:
    """Format a figure for the table."""
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
