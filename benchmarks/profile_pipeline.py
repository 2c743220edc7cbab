"""Profile the bridge's hot path: the limits-off pipeline run of ``run --once`` under py-spy (all threads).

    .venv/bin/python benchmarks/profile_pipeline.py [ORDERS]   (after `make bench` installed py-spy)

Prints the bridge's top functions by inclusive and by self samples; the raw stacks stay in the temp dir
printed at the end (loadable into speedscope). py-spy needs ptrace rights (root, or ptrace_scope 0).
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import Bench, Customer, bench, klaviyo_sim, seed_backfill

TOP = 25


async def record(tmp: Path, orders: int) -> Path:
    """Run the pipeline scenario's bridge under py-spy; return the raw (collapsed stacks) output."""
    today = datetime.now(UTC).date()
    customer = Customer(2002, "pk_profile_0123456789abcdef", today - timedelta(days=1), backfill_days=0)
    async with bench(tmp, [customer], klaviyo=klaviyo_sim(limits_enabled=False, seed=2)) as b:
        now = datetime.now(UTC).replace(microsecond=0)
        seed_backfill(b.whiplash, customer.cid, orders, start=now - timedelta(hours=2), end=now)
        return await spy(b, tmp / "bridge.raw")


async def spy(b: Bench, out: Path) -> Path:
    """Run ``run --once`` (limits off) under ``py-spy record`` and wait for it."""
    b.write_config()
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    command = [pyspy, "record", "-r", "250", "-f", "raw", "-o", str(out), "--",
               *b.command("run", "--once", unlimited=True)]
    proc = await asyncio.create_subprocess_exec(*command, env=b.env(), cwd=str(b.tmp),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await proc.wait()
    return out


def summarise(raw: Path) -> str:
    """Return the top functions by inclusive and self share of all samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples (all threads)", "", "inclusive, klaviyo_bridge frames:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common() if "klaviyo_bridge" in f][:TOP]
    lines += ["", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(TOP)]
    return "\n".join(lines)


def main() -> None:
    """Record and print the profile."""
    orders = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    tmp = Path(tempfile.mkdtemp(prefix="bridge-profile-"))
    raw = asyncio.run(record(tmp, orders))
    print(summarise(raw))
    print(f"\nraw stacks: {raw}")


if __name__ == "__main__":
    main()
