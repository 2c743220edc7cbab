"""Helpers for tests that run the real ``klaviyo-bridge`` process against the simulators."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

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
        return self.config_path

    def env(self) -> dict[str, str]:
        """Return the environment the bridge runs with (secrets as env: references)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KLAVIYO_", "JOURNAL_STREAM", "NOTIFY_"))}
        env["WHIPLASH_SECRET"] = CLIENT_SECRET
        env["PYTHONUNBUFFERED"] = "1"
        for c in self.customers:
            env[c.env_name] = c.key
        return env

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


def toml_str(value: str) -> str:
    """Quote a TOML basic string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def patch_example(text: str, values: dict[str, dict[str, str]]) -> str:
    """Replace ``key = value`` lines per section of the example and drop its customers."""
    head = text.split("[[customers]]", 1)[0]
    out: list[str] = []
    section = ""
    for line in head.splitlines():
        m = re.match(r"^\[(\w+)\]", line)
        if m:
            section = m.group(1)
        kv = re.match(r"^#?\s*(\w+)\s*=", line)
        if kv and kv.group(1) in values.get(section, {}):
            line = f"{kv.group(1)} = {values[section].pop(kv.group(1))}"
        out.append(line)
    leftovers = {s: k for s, k in values.items() if k}
    assert not leftovers, f"keys not found in config.example.toml: {leftovers}"
    return "\n".join(out) + "\n"


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
