"""``klaviyo-bridge demo``: the real daemon against the built-in simulators, then a readable summary.

The simulators run in this process; the bridge runs as a child process (``python -m klaviyo_bridge run``)
with a temporary config whose secrets are ``env:`` references, exactly as in production. Its webhook receiver
is on and the simulated Whiplash subscribes it to every order event, so changes arrive by signed webhook
within a fraction of a second while polling (every 30 s) stays the backstop; Whiplash forges one webhook and
loses another on purpose. Orders move every second while it runs; then the child gets SIGTERM and the summary
is read from the simulated Klaviyo, the simulated Whiplash and ``klaviyo-bridge status --json``, with the
latency measured from each webhook's arrival to its event recorded in Klaviyo.

Invariants: everything lives in a temporary directory removed at the end; the child runs in its own session
so a Ctrl-C reaches only the demo, which then stops the child once, gracefully; the exit code is 0 exactly
when the bridge exited 0 and its status could be read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from .clock import utcnow
from .core import DEFAULT_METRIC_NAMES, DEFAULT_STATUS_EVENTS, EventKind
from .sandbox.world import (
    Sandbox,
    SandboxCustomer,
    SandboxUrls,
    bridge_env,
    build_sandbox,
    config_text,
    demo_customers,
    serve_sandbox,
)

if TYPE_CHECKING:
    from .sandbox.klaviyo import Account
    from .sandbox.whiplash import FakeWhiplash, SimOrder

EX_OK = 0
EX_FAILED = 1
TICK_SECONDS = 1.0
SETTLE_SECONDS = 2.0  # after the last order move: one poll plus delivery, so the summary shows a settled state
GRACE_SECONDS = 5.0
BACKSTOP_SECONDS = 30.0  # the poll interval: with webhooks on, polling only backs them up
WEBHOOK_PATH = "/whiplash/webhook"
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d) (\w+)\s+klaviyo_bridge\.(\w+): (.*)$")
Status = Mapping[str, Any]
LatencyStart = Literal["arrival", "change"]  # from a webhook's arrival, or from the change Whiplash wrote


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``demo`` sub-command to the CLI."""
    parser = sub.add_parser("demo", help="run the bridge against built-in simulators and summarise the outcome")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="how long orders move while the bridge runs (default 15)")
    parser.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo."""
    return asyncio.run(run_demo(max(args.seconds, 1.0), sys.stdout))


@dataclass(slots=True)
class RunOutcome:
    """How the bridge run went."""

    returncode: int | None = None
    exited_early: bool = False
    ran_s: float = 0.0
    stop_s: float = 0.0
    changes: int = 0
    spawned: int = 0
    status: list[dict[str, Any]] = field(default_factory=list)
    webhook_port: int = 0


async def run_demo(seconds: float, out: TextIO) -> int:
    """Set up the sandbox, run the bridge for ``seconds`` while orders move, print the summary."""
    customers = demo_customers(utcnow().date())
    sandbox = build_sandbox(customers)
    with tempfile.TemporaryDirectory(prefix="klaviyo-bridge-demo-") as tmp:
        async with serve_sandbox(sandbox) as urls:
            port = free_port()
            config = Path(tmp) / "config.toml"
            config.write_text(config_text(urls, Path(tmp) / "state.db", customers, grace=GRACE_SECONDS,
                                          poll_interval=BACKSTOP_SECONDS, webhooks_listen=f"127.0.0.1:{port}"))
            sandbox.whiplash.subscribe(f"http://127.0.0.1:{port}{WEBHOOK_PATH}")  # every order event, every shop
            _print(out, intro(urls, sandbox, config, seconds, port))
            outcome = await run_bridge(sandbox, config, seconds, out, port)
            outcome.status = await read_status(config, customers)
        _print(out, summary(sandbox, outcome, utcnow()))
    return EX_OK if outcome.returncode == 0 and outcome.status else EX_FAILED


def _print(out: TextIO, lines: Sequence[str]) -> None:
    """Write lines and flush, so they interleave correctly with the streamed bridge log."""
    out.write("\n".join(lines) + "\n")
    out.flush()


# ---------------------------------------------------------------- running the bridge


def free_port() -> int:
    """Return a loopback port nobody listens on right now (for the bridge's webhook receiver)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def until_listening(port: int, stop: asyncio.Event, limit_s: float = 15.0) -> None:
    """Wait until something accepts connections on ``port`` (the receiver is up), or ``stop``, or the limit."""
    deadline = time.monotonic() + limit_s
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await _wait_or_stop(stop, 0.1)
            continue
        writer.close()
        return


async def run_bridge(sandbox: Sandbox, config: Path, seconds: float, out: TextIO, port: int) -> RunOutcome:
    """Run the daemon as a child, move orders for ``seconds``, let it settle, then SIGTERM it."""
    outcome = RunOutcome(webhook_port=port)
    stop = asyncio.Event()  # Ctrl-C, or the child exiting on its own, ends the run early
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "klaviyo_bridge", "run", "--config", str(config),
        env=bridge_env(sandbox.customers), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # a terminal Ctrl-C must not reach the child as well: we stop it once, ourselves
    )
    assert proc.stdout is not None
    pump = asyncio.create_task(stream_log(proc.stdout, out))
    exited = asyncio.create_task(proc.wait())
    exited.add_done_callback(lambda _: stop.set())
    try:
        started = time.monotonic()
        await until_listening(port, stop)
        sandbox.whiplash.webhooks.forge_next(1)  # shown refused (401) in the bridge's log, once
        sandbox.whiplash.webhooks.drop_next(1)  # lost: the customer's next poll reads its change anyway
        await move_orders(sandbox, seconds, stop, outcome)
        await _wait_or_stop(stop, SETTLE_SECONDS)
        outcome.ran_s = time.monotonic() - started
        outcome.exited_early = proc.returncode is not None
        outcome.returncode, outcome.stop_s = await terminate(proc)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if proc.returncode is None:
            proc.kill()
        await asyncio.gather(exited, pump)
    return outcome


async def move_orders(sandbox: Sandbox, seconds: float, stop: asyncio.Event, outcome: RunOutcome) -> None:
    """Tick every order script once a second (a new order per customer every other tick)."""
    deadline = time.monotonic() + seconds
    ticks = 0
    while time.monotonic() < deadline and not stop.is_set():
        await _wait_or_stop(stop, min(TICK_SECONDS, deadline - time.monotonic()))
        ticks += 1
        spawn = ticks % 2
        outcome.changes += len(sandbox.tick(share=0.3, spawn=spawn))
        outcome.spawned += spawn * len(sandbox.scripts)


async def _wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep up to ``seconds``, waking early when ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0.0))


async def terminate(proc: asyncio.subprocess.Process) -> tuple[int | None, float]:
    """Send SIGTERM and wait out the grace period; return (exit code or None if killed, seconds taken)."""
    if proc.returncode is not None:
        return proc.returncode, 0.0  # it stopped on its own: its log says why
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.wait_for(proc.wait(), GRACE_SECONDS + 5.0)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None, time.monotonic() - sent
    return code, time.monotonic() - sent


async def stream_log(stream: asyncio.StreamReader, out: TextIO) -> None:
    """Copy the bridge's log to ``out``, shortened and prefixed so it reads apart from the demo's text."""
    async for raw in stream:
        _print(out, [f"  bridge | {short_log_line(raw.decode(errors='replace').rstrip())}"])


def short_log_line(line: str) -> str:
    """Drop the date and the package prefix from a text log line: ``12:00:01 INFO daemon: started …``."""
    m = _LOG_LINE.match(line)
    return f"{m[1]} {m[2]:<7} {m[3]}: {m[4]}" if m else line


async def read_status(config: Path, customers: list[SandboxCustomer]) -> list[dict[str, Any]]:
    """Run ``klaviyo-bridge status --json`` and return its rows ([] when it could not be read)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "klaviyo_bridge", "status", "--json", "--config", str(config),
        env=bridge_env(customers), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, _ = await proc.communicate()
    try:
        rows = json.loads(stdout)
    except ValueError:
        return []
    return rows if isinstance(rows, list) else []


# ---------------------------------------------------------------- what is printed


def intro(urls: SandboxUrls, sandbox: Sandbox, config: Path, seconds: float, port: int) -> list[str]:
    """Return the lines printed before the bridge starts."""
    checks = "Klaviyo's OpenAPI spec" if sandbox.klaviyo.spec_validation else "hand-written rules (spec not found)"
    lines = [
        "klaviyo-bridge demo: the real daemon against simulated Whiplash and Klaviyo (no credentials needed)",
        f"  whiplash sim {urls.whiplash}   klaviyo sim {urls.klaviyo}   bodies checked against {checks}",
        f"  config {config} (secrets via env: references)",
        "  customers:",
    ]
    lines += [f"    {c.cid} {c.name:<17} {plan_text(c)}" for c in sandbox.customers]
    lines.append(f"  webhooks: Whiplash posts signed order webhooks to http://127.0.0.1:{port}{WEBHOOK_PATH}; "
                 "it forges one and loses one on purpose")
    lines.append(f"running the bridge (woken by webhooks, backstop poll every {BACKSTOP_SECONDS:.0f} s) while orders "
                 f"move for {seconds:.0f} s, then SIGTERM …")
    return lines


def plan_text(c: SandboxCustomer) -> str:
    """Describe what the bridge will do for one customer."""
    now = utcnow()
    launch = f"{c.launch_date} ({relative_day(c.launch_date, now)})"
    if not c.is_launched(now):
        return f"launch {launch}: set-up only — list, sample profile, one sample event per metric it gets"
    text = f"launched {launch}, backfill_days={c.backfill_days}: reads changes since {c.window_start:%Y-%m-%d}"
    if c.events is not None:
        text += f"; gets only {' and '.join(c.events)}"
    return text + ("; its Klaviyo key is revoked" if c.revoked else "")


def metric_names(c: SandboxCustomer) -> dict[EventKind, str]:
    """Return the metric name of each event this customer gets (its own names where it has them)."""
    own = dict(c.metrics)
    enabled = [EventKind(e) for e in c.events] if c.events is not None else list(EventKind)
    return {kind: own.get(kind.value, DEFAULT_METRIC_NAMES[kind]) for kind in EventKind if kind in enabled}


def relative_day(day: date, now: datetime) -> str:
    """Say "today", "in 2 days" or "7 days ago"."""
    delta = (day - now.date()).days
    if delta == 0:
        return "today"
    return f"in {plural(delta, 'day')}" if delta > 0 else f"{plural(-delta, 'day')} ago"


def summary(sandbox: Sandbox, outcome: RunOutcome, now: datetime) -> list[str]:
    """Return the closing summary: per customer, then overall."""
    rows = {int(r["customer_id"]): r for r in outcome.status}
    lines = ["", "summary", "======="]
    for c in sandbox.customers:
        lines += customer_section(sandbox, c, rows.get(c.cid, {}), now)
    return lines + overall_section(sandbox, outcome)


def customer_section(sandbox: Sandbox, c: SandboxCustomer, row: Status, now: datetime) -> list[str]:
    """Summarise one customer: Whiplash side, Klaviyo side, events and refusals."""
    acct = sandbox.klaviyo.account(str(c.cid))
    klist = acct.list_named(c.list_name)
    members = len(klist.members) if klist else 0
    return [
        "",
        f"{c.cid} {c.name} — {plan_text(c)}",
        *whiplash_lines(sandbox, c, now),
        f"  klaviyo:  {plural(len(acct.profiles), 'profile')}, list {c.list_name!r} has {plural(members, 'member')}",
        *event_table(acct, metric_names(c)),
        *refused_lines(acct, row),
    ]


def plural(n: int, noun: str) -> str:
    """Return "1 profile" / "2 profiles"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def orders_of(sandbox: Sandbox, cid: int) -> list[SimOrder]:
    """Return one customer's orders in the simulated Whiplash."""
    return [o for o in sandbox.whiplash.orders.values() if o.customer_id == cid]


def whiplash_lines(sandbox: Sandbox, c: SandboxCustomer, now: datetime) -> list[str]:
    """Describe the customer's orders: how many the bridge reads and skips, and whether Klaviyo caught up."""
    orders = orders_of(sandbox, c.cid)
    if not c.is_launched(now):
        return [f"  whiplash: {len(orders)} orders, none read before launch"]
    read = [o for o in orders if o.updated_at >= c.window_start]
    no_email = sum(1 for o in read if not o.email)
    wanted = set(metric_names(c))
    announced = announced_count(sandbox.klaviyo.account(str(c.cid)), read, wanted)
    mapped = sum(1 for o in read if o.email and DEFAULT_STATUS_EVENTS.get(o.status) in wanted)
    return [
        f"  whiplash: {len(orders)} orders: {len(read)} changed since {c.window_start:%Y-%m-%d} (read), "
        f"{len(orders) - len(read)} older (not read); {no_email} read without email (no profile, no event)",
        f"  in sync:  current status announced in Klaviyo for {announced} of {mapped} read orders with email",
    ]


def announced_count(acct: Account, orders: Sequence[SimOrder], wanted: set[EventKind]) -> int:
    """Count orders whose current status's event (one the customer gets) is recorded in Klaviyo."""
    have = {e.unique_id for e in acct.events}
    return sum(
        1 for o in orders
        if o.email and (kind := DEFAULT_STATUS_EVENTS.get(o.status)) in wanted and kind is not None
        and f"{o.id}:{kind.value}" in have
    )


def event_table(acct: Account, names: dict[EventKind, str]) -> list[str]:
    """Tabulate recorded events per metric the customer gets: samples, backfill (no flows), live (flows fire).

    A metric the customer does not get appears only if something was recorded under it (it never should be).
    """
    if not acct.events:
        return ["  events:   none recorded"]
    counts: Counter[tuple[str, str]] = Counter()
    for e in acct.events:
        column = "sample" if (e.unique_id or "").startswith("sample:") else "backfill" if e.backfill else "live"
        counts[(e.metric, column)] += 1
    metrics = list(names.values()) + sorted({m for m, _ in counts} - set(names.values()))
    width = max(20, *(len(m) + 2 for m in metrics))
    lines = [f"  {'events':<{width}}{'sample':>8}{'backfill':>10}{'live':>6}"]
    for metric in metrics:
        cells = [counts[(metric, col)] for col in ("sample", "backfill", "live")]
        lines.append(f"  {metric:<{width}}{cells[0]:>8}{cells[1]:>10}{cells[2]:>6}")
    return lines


def refused_lines(acct: Account, row: Status) -> list[str]:
    """Say what Klaviyo refused for this customer and what the bridge kept for later."""
    lines: list[str] = []
    if acct.counters.unauthorized or row.get("key") == "REFUSED":
        lines.append(
            f"  refused:  Klaviyo answered 401 to {acct.counters.unauthorized} requests (key revoked); "
            f"{row.get('queued', '?')} rows stay queued until the key works (status key={row.get('key', '?')})"
        )
    if row.get("dead"):
        lines.append(f"  refused:  {row['dead']} rows Klaviyo rejected as invalid are kept as dead letters")
    if acct.counters.rejections:
        lines.append(f"  refused:  {len(acct.counters.rejections)} request bodies were invalid")
    outbox = f"outbox: {row.get('queued', '?')} queued, {row.get('sent_total', '?')} sent"
    return lines or [f"  refused:  nothing ({outbox})"]


def stop_text(outcome: RunOutcome) -> str:
    """Say how the bridge ended."""
    if outcome.exited_early:
        return f"the bridge EXITED BY ITSELF with code {outcome.returncode} (see its log above)"
    if outcome.returncode is None:
        return "SIGTERM -> still running after the grace period, killed"
    return f"SIGTERM -> exit code {outcome.returncode} in {outcome.stop_s:.1f} s"


def overall_section(sandbox: Sandbox, outcome: RunOutcome) -> list[str]:
    """Summarise the run itself and the checks every run should pass."""
    accounts = sandbox.klaviyo.accounts
    dupes = sum(a.duplicate_events for a in accounts)
    throttled = sum(a.counters.throttled for a in accounts)
    return [
        "",
        f"run:      {outcome.ran_s:.1f} s with {outcome.changes} status changes and {outcome.spawned} new orders; "
        + stop_text(outcome),
        *webhook_lines(sandbox),
        f"klaviyo:  {len(sandbox.klaviyo.rejections)} invalid bodies, {dupes} duplicate events, "
        f"{throttled} throttled requests",
        "status:   " + ("read from klaviyo-bridge status --json" if outcome.status else "COULD NOT BE READ"),
    ]


def webhook_lines(sandbox: Sandbox) -> list[str]:
    """Say what the webhooks did and how fast changes turned into Klaviyo events."""
    deliveries = sandbox.whiplash.webhook_deliveries
    counts = Counter(f"{d.outcome} {d.status}" if d.status is not None else d.outcome for d in deliveries)
    shown = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "none sent"
    lines = [f"webhooks: {shown} (refused 401 = forged; dropped = lost by Whiplash, read by the next poll)"]
    starts: tuple[tuple[LatencyStart, str], ...] = (("arrival", "webhook arrival"),
                                                    ("change", "order change in Whiplash"))
    for start, label in starts:
        lags = webhook_latencies(sandbox.whiplash, sandbox.klaviyo.accounts, since=start)
        if lags:
            lines.append(f"latency:  {label} -> event recorded in Klaviyo: p50 {percentile(lags, 0.5):.2f} s, "
                         f"p95 {percentile(lags, 0.95):.2f} s, max {max(lags):.2f} s ({len(lags)} live events)")
    return lines


def webhook_latencies(
    whiplash: FakeWhiplash, accounts: Sequence[Account], *, since: LatencyStart = "arrival"
) -> list[float]:
    """Return, per live event recorded in Klaviyo, the seconds from the first webhook (answered 202) reporting
    its order at a status of its milestone — from its arrival, or from the change Whiplash wrote — to the
    event's recording; 0 when a poll woken by an earlier webhook had already recorded it. Events without such a
    webhook (history, forged or lost ones) are left out."""
    to_wall = time.time() - time.monotonic()  # the simulator stamps deliveries with the monotonic clock
    start: dict[str, float] = {}
    for d in whiplash.webhook_deliveries:
        if d.outcome != "delivered" or d.sent_at is None:
            continue
        kind = DEFAULT_STATUS_EVENTS.get(int(d.payload()["order"]["status"]))
        if kind is not None:
            start.setdefault(f"{d.order_id}:{kind.value}", (d.sent_at if since == "arrival" else d.queued_at) + to_wall)
    return [max(0.0, e.received.timestamp() - start[uid]) for acct in accounts for e in acct.events
            if not e.backfill and (uid := e.unique_id or "") in start]


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
