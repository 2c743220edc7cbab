"""Run the real ``klaviyo-bridge`` CLI and write its own CPU seconds and peak RSS to $BENCH_USAGE_FILE.

Usage: ``python benchmarks/bridge_runner.py [--unlimited] -- run --once --config PATH``.
``--unlimited`` raises every endpoint's published limit in the bridge's own limiter to a million per second
and stops it learning from RateLimit-* headers, for the "limits off" pipeline benchmark: the config cannot
switch the limiter off (rate_limit_share ≤ 1), and the simulator still reports the published quota.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import cast


def unlimit() -> None:
    """Make the bridge's limiter effectively unlimited for every endpoint."""
    from klaviyo_bridge import ratelimit

    limits = cast(dict[ratelimit.Endpoint, ratelimit.Limit], ratelimit.LIMITS)
    for endpoint in list(limits):
        limits[endpoint] = ratelimit.Limit(1_000_000, 60_000_000)

    def ignore(self: ratelimit.AccountLimiter, endpoint: ratelimit.Endpoint, headers: object) -> None:
        """Skip learning: with its limits off the simulator still reports the published quota."""

    ratelimit.AccountLimiter.observe = ignore  # type: ignore[method-assign,assignment]


def report() -> None:
    """Write this process's CPU seconds (all threads) and peak RSS, if asked to."""
    target = os.environ.get("BENCH_USAGE_FILE")
    if not target:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures = {"cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_mb": usage.ru_maxrss / 1024}
    with open(target, "w") as out:
        json.dump(figures, out)


def main() -> None:
    """Run the CLI with the given arguments and report resource usage on the way out."""
    argv = sys.argv[1:]
    if argv[:1] == ["--unlimited"]:
        unlimit()
        argv = argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    from klaviyo_bridge.cli import main as cli

    try:
        code = cli(argv)
    finally:
        report()
    sys.exit(code)


if __name__ == "__main__":
    main()
