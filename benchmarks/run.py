"""Run every benchmark against the built-in simulators and print one table (``make bench``).

    python benchmarks/run.py [--only NAME ...] [--quick] [--json PATH]

Scenarios: limiter utilisation on Klaviyo's fixed windows, backfill at real limits (20,000 orders), pipeline
speed with limits off, live latency with a 5 s poll, state-DB bytes per order after 100,000 orders, the naive SDK
peer against the bridge on the same 500-order backfill; then Whiplash at scale (issue 13): a realistic backfill
(5,000 changes, Whiplash answering in 250 ms and limiting 10 requests/s), the competent SDK peer (bulk jobs,
sequential) against the bridge on 3,000 changes, and a fleet of 1,000 idle customers for ten 60 s intervals (the
shared budget, every customer polled in time, idle CPU and RSS). ``--quick`` shrinks every size for a smoke run.
Everything runs on loopback; the whole set takes about 20 minutes on a 2-core machine: ten of them the fleet, three
the naive peer waiting out Klaviyo's 150/min list-add limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

import scenarios
import webhook_latency
from scenarios import Row, verdict

Scenario = Callable[[Path], Awaitable[list[Row]]]

FULL: dict[str, Scenario] = {
    "limiter": scenarios.limiter,
    "backfill": scenarios.backfill,
    "pipeline": scenarios.pipeline,
    "latency": scenarios.latency,
    "webhooks": webhook_latency.webhook_latency,
    "db": scenarios.db_growth,
    "peer": scenarios.naive_peer,
    "realistic": scenarios.realistic,
    "peer2": scenarios.competent_peer,
    "fleet": scenarios.fleet,
}
QUICK: dict[str, Scenario] = {
    "limiter": scenarios.limiter,
    "backfill": lambda tmp: scenarios.backfill(tmp, 2000),
    "pipeline": lambda tmp: scenarios.pipeline(tmp, 2000),
    "latency": lambda tmp: scenarios.latency(tmp, 20, 8.0, 2.0),
    "webhooks": lambda tmp: webhook_latency.webhook_latency(tmp, 30, 10.0),
    "db": lambda tmp: scenarios.db_growth(tmp, 5000),
    "peer": lambda tmp: scenarios.naive_peer(tmp, 40),
    "realistic": lambda tmp: scenarios.realistic(tmp, 1000),
    "peer2": lambda tmp: scenarios.competent_peer(tmp, 600),
    "fleet": lambda tmp: scenarios.fleet(tmp, 50, 10.0, 2),
}


async def run_all(names: list[str], table: dict[str, Scenario], root: Path) -> list[Row]:
    """Run the chosen scenarios one after another (never side by side: they would share the cores)."""
    rows: list[Row] = []
    for name in names:
        started = time.perf_counter()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            rows += await table[name](root / name)
        except Exception as exc:  # one broken scenario must not hide the others' figures
            rows.append(Row(name, "ERROR", note=f"{type(exc).__name__}: {exc}"[:200]))
        print(f"  {name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def render(rows: list[Row]) -> str:
    """Render the rows as an aligned text table."""
    header = ("figure", "value", "target", "verdict", "note")
    cells = [header, *((r.figure, r.value, r.target, verdict(r.met), r.note) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = []
    for index, c in enumerate(cells):
        lines.append("  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4])
        if index == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(lines)


def main() -> int:
    """Parse options, run, print the table; exit 0 even when a target is missed (the table says so)."""
    parser = argparse.ArgumentParser(description="klaviyo-bridge benchmarks")
    parser.add_argument("--only", nargs="*", choices=list(FULL), help="run only these scenarios")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = QUICK if args.quick else FULL
    names = args.only or list(FULL)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as tmp:
        rows = asyncio.run(run_all(names, table, Path(tmp)))
    total = time.perf_counter() - started
    rows.append(Row("total benchmark wall time", f"{total:.0f} s", "< 30 min", total < 1800))
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
