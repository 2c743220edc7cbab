"""``klaviyo-bridge sandbox``: serve both simulators for manual exploration with curl or a real bridge.

Invariants: Whiplash listens on ``--port`` and Klaviyo on ``--port + 1`` (both free ports with 0); the base
URLs, the simulator credentials and example curl lines are printed before anything else, so a script can read
them; SIGTERM and SIGINT stop the servers cleanly and the command exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from .world import (
    CLIENT_ID,
    CLIENT_SECRET,
    REVISION,
    Sandbox,
    SandboxCustomer,
    SandboxUrls,
    build_sandbox,
    config_text,
    demo_customers,
    secret_env,
    serve_sandbox,
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``sandbox`` sub-command to the CLI."""
    parser = sub.add_parser("sandbox", help="serve simulated Whiplash and Klaviyo APIs for exploration")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8700,
                        help="Whiplash port; Klaviyo listens on the next one (0: two free ports; default 8700)")
    parser.add_argument("--tick", type=float, default=0.0, metavar="SECONDS",
                        help="move orders along their lifecycle every SECONDS (default 0: only via /__sim/tick)")
    parser.add_argument("--write-config", type=Path, metavar="PATH",
                        help="write a bridge config for the sandbox to PATH (state DB beside it)")
    parser.add_argument("--no-spec", action="store_true",
                        help="check Klaviyo bodies by hand rules instead of the OpenAPI spec")
    parser.add_argument("--whiplash-rate-limit-per-s", type=_positive_int, metavar="N",
                        help="Whiplash answers 429 past N requests in a second, all customers together "
                             "(default: unlimited)")
    parser.add_argument("--whiplash-response-ms", type=_milliseconds, default=0.0, metavar="MS",
                        help="every Whiplash orders request takes MS milliseconds (default 0)")
    parser.set_defaults(handler=cmd_sandbox)


def _positive_int(raw: str) -> int:
    """Parse a count of at least 1."""
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _milliseconds(raw: str) -> float:
    """Parse a duration of 0 ms or more."""
    value = float(raw)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Serve the sandbox until SIGTERM/SIGINT."""
    customers = demo_customers(datetime.now(UTC).date())
    sandbox = build_sandbox(customers, spec_path=None if args.no_spec else "auto")
    sandbox.whiplash.rate_limit_per_s = args.whiplash_rate_limit_per_s
    sandbox.whiplash.response_ms = args.whiplash_response_ms
    asyncio.run(serve_until_stopped(sandbox, args.host, args.port, args.tick, args.write_config))
    return 0


async def serve_until_stopped(
    sandbox: Sandbox, host: str, port: int, tick: float, config_path: Path | None, out: TextIO = sys.stdout,
) -> None:
    """Serve both simulators, print how to use them, and tick orders until a stop signal arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with serve_sandbox(sandbox, host, port, access_log=False) as urls:
        if config_path is not None:
            write_config(config_path, urls, sandbox.customers)
        print(usage(urls, sandbox, config_path), file=out, flush=True)
        await _tick_until(stop, sandbox, tick)
    print("sandbox stopped", file=out, flush=True)


async def _tick_until(stop: asyncio.Event, sandbox: Sandbox, every: float) -> None:
    """Move orders every ``every`` seconds (never when 0) until ``stop`` is set."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every if every > 0 else None)
        except TimeoutError:
            sandbox.tick(spawn=1)


def write_config(path: Path, urls: SandboxUrls, customers: list[SandboxCustomer]) -> None:
    """Write a bridge config for the sandbox, with its state DB beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text(urls, path.with_suffix(".db"), customers))


def usage(urls: SandboxUrls, sandbox: Sandbox, config_path: Path | None) -> str:
    """Return the banner: URLs, credentials, customers and example curl lines."""
    lines = [
        "klaviyo-bridge sandbox (simulated APIs; every credential below is made up for the simulators)",
        f"  whiplash  {urls.whiplash}   client_id={CLIENT_ID} client_secret={CLIENT_SECRET}",
        f"  klaviyo   {urls.klaviyo}   revision={REVISION}"
        f" (bodies checked against {'the OpenAPI spec' if sandbox.klaviyo.spec_validation else 'hand-written rules'})",
        "  customers (whiplash id, klaviyo key, launch):",
        *(_customer_line(c) for c in sandbox.customers),
        "",
        "try:",
        *(f"  {line}" for line in curl_examples(urls, sandbox.customers[0])),
    ]
    if config_path is not None:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in secret_env(sandbox.customers).items())
        lines += ["", "run the bridge against it (in another shell):",
                  f"  env {exports} klaviyo-bridge run --config {shlex.quote(str(config_path))}"]
    lines += ["", "stop with Ctrl-C or SIGTERM"]
    return "\n".join(lines)


def _customer_line(c: SandboxCustomer) -> str:
    """Describe one demo merchant."""
    note = " (key revoked: Klaviyo answers 401)" if c.revoked else ""
    return f"    {c.cid}  {c.api_key}  launch {c.launch_date.isoformat()} backfill_days={c.backfill_days}{note}"


def curl_examples(urls: SandboxUrls, c: SandboxCustomer) -> list[str]:
    """Return example curl lines for both simulators."""
    w, k = urls.whiplash, urls.klaviyo
    token_json = json.dumps({"grant_type": "client_credentials", "client_id": CLIENT_ID,
                             "client_secret": CLIENT_SECRET})
    search = json.dumps({"customer_id_eq": c.cid, "status_in": [300, 350]})
    klaviyo = f"-H 'Authorization: Klaviyo-API-Key {c.api_key}' -H 'revision: {REVISION}'"
    return [
        f"TOKEN=$(curl -s -X POST {w}/oauth/token -H 'Content-Type: application/json' -d '{token_json}'"
        " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')",
        f"curl -s -G {w}/api/v2/orders -H \"Authorization: Bearer $TOKEN\" -H 'X-CUSTOMER-ID: {c.cid}'"
        f" --data-urlencode 'search={search}' --data-urlencode 'sort=updated_at asc,id asc' -d per_page=5",
        f"curl -s -X POST {w}/__sim/tick -d '{{\"steps\": 1, \"share\": 0.5, \"spawn\": 1}}'   # move orders",
        f"curl -s {w}/__sim/state",
        f"curl -s {k}/api/lists {klaviyo}",
        f"curl -s {k}/__sim/state   # profiles, lists, events per account (labelled by whiplash id)",
        f"curl -s {w}/__sim/   # every control route, its body fields (the same at {k}/__sim/)",
    ]

