"""Helpers for tests that run the real ``klaviyo-bridge`` process against the simulators.

``Harness.run`` runs a command to completion; ``Harness.running`` starts a long-running ``run`` whose log is
collected line by line, so a test can wait for a line, signal the process and time its exit. ``eventually``
waits for a condition on the simulators' state with a deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from kit.bridgekit import LoggedProcess, patch_example, toml_str

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.toml"
CLIENT_ID = "bridge-client"
CLIENT_SECRET = "whiplash-secret-value-1"


@dataclass
class Customer:
    """One [[customers]] block of a test config."""

    cid: int
    name: str
    key: str
    launch: date
    backfill_days: int = 14
    list_name: str = "Whiplash"
    enabled: bool = True

    @property
    def env_name(self) -> str:
        """Return the environment variable holding this customer's Klaviyo key."""
        return f"KLAVIYO_KEY_{self.cid}"

    @property
    def launch_at(self) -> datetime:
        """Return 00:00 UTC of the launch date: changes before it are backfill."""
        return datetime.combine(self.launch, datetime.min.time(), UTC)

    @property
    def window_start(self) -> datetime:
        """Return the oldest change the bridge reads: launch − backfill_days."""
        return self.launch_at - timedelta(days=self.backfill_days)


@dataclass
class BridgeRun:
    """What one run of the bridge process did."""

    returncode: int
    stdout: str
    stderr: str


@dataclass
class Harness:
    """A config written from config.example.toml and a way to run the bridge with it."""

    tmp: Path
    whiplash_url: str
    klaviyo_url: str
    customers: list[Customer]
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        """Return where the config file is written."""
        return self.tmp / "config.toml"

    @property
    def state_path(self) -> Path:
        """Return the state DB path."""
        return self.tmp / "state" / "bridge.db"

    def write_config(self) -> Path:
        """Write the config: the example's sections with test values, then our customers."""
        values = {
            "bridge": {"state_path": toml_str(str(self.state_path)), "poll_interval_seconds": "1.0"},
            "whiplash": {
                "base_url": toml_str(self.whiplash_url),
                "client_id": toml_str(CLIENT_ID),
                "client_secret": toml_str("env:WHIPLASH_SECRET"),
                "overlap_seconds": "60",
            },
            "klaviyo": {"base_url": toml_str(self.klaviyo_url), "key_probe_seconds": "1.0"},
        }
        for section, keys in self.overrides.items():
            values.setdefault(section, {}).update(keys)
        text = patch_example(EXAMPLE.read_text(), values)
        text += "".join(customer_block(c) for c in self.customers)
        self.config_path.write_text(text)
        self.state_path.parent.mkdir(exist_ok=True)  # as systemd's StateDirectory= would: the bridge never does
        return self.config_path

    def env(self) -> dict[str, str]:
        """Return the environment the bridge runs with (secrets as env: references)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KLAVIYO_", "JOURNAL_STREAM", "NOTIFY_"))}
        env["WHIPLASH_SECRET"] = CLIENT_SECRET
        env["PYTHONUNBUFFERED"] = "1"
        for c in self.customers:
            env[c.env_name] = c.key
        return {**env, **self.extra_env}

    async def run(self, *args: str, limit_s: float = 60) -> BridgeRun:
        """Run ``python -m klaviyo_bridge <args> --config <path>`` to completion."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "klaviyo_bridge", *args, "--config", str(self.config_path),
            env=self.env(), cwd=str(self.tmp),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
        assert proc.returncode is not None
        return BridgeRun(proc.returncode, out.decode(), err.decode())

    async def status(self) -> list[dict[str, Any]]:
        """Return ``klaviyo-bridge status --json`` rows (safe while a daemon runs)."""
        result = await self.run("status", "--json")
        assert result.returncode in (0, 2), result.stderr  # 2: some poll is older than 3 intervals
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        return rows

    async def status_of(self, cid: int) -> dict[str, Any]:
        """Return one customer's status row."""
        return next(r for r in await self.status() if r["customer_id"] == cid)

    @contextlib.asynccontextmanager
    async def running(self, *args: str) -> AsyncIterator[RunningBridge]:
        """Start ``run`` (long-running unless told otherwise); kill it on the way out if a test left it up."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "klaviyo_bridge", "run", *args, "--config", str(self.config_path),
            env=self.env(), cwd=str(self.tmp),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        bridge = RunningBridge(proc)
        try:
            yield bridge
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await bridge.closed()


class RunningBridge(LoggedProcess):
    """A long-running bridge process whose log lines are collected as they come."""

    async def stop(self, sig: signal.Signals = signal.SIGTERM, limit_s: float = 15.0) -> tuple[int, float]:
        """Send ``sig`` and return (exit code, seconds until the process exited)."""
        assert self.proc.returncode is None, f"bridge already exited rc={self.proc.returncode}; log:\n{self.log}"
        sent = time.monotonic()
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), limit_s)
        elapsed = time.monotonic() - sent
        await self.closed()
        return code, elapsed



def customer_block(c: Customer) -> str:
    """Return one [[customers]] block."""
    return (
        "\n[[customers]]\n"
        f"whiplash_customer_id = {c.cid}\n"
        f"name = {toml_str(c.name)}\n"
        f'klaviyo_api_key = "env:{c.env_name}"\n'
        f"launch_date = {c.launch.isoformat()}\n"
        f"backfill_days = {c.backfill_days}\n"
        f"list_name = {toml_str(c.list_name)}\n"
        f"enabled = {'true' if c.enabled else 'false'}\n"
    )
