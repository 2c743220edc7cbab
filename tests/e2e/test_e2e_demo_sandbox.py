"""`klaviyo-bridge demo` and `klaviyo-bridge sandbox` as a user runs them: real processes, real output."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sys
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp

from klaviyo_bridge.sandbox.world import CLIENT_ID, CLIENT_SECRET, demo_customers

DEMO_KEYS = [c.api_key for c in demo_customers(date.today())]


def child_env(**extra: str) -> dict[str, str]:
    """Return the environment for a child process, without systemd's variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


async def test_demo_runs_the_daemon_and_summarises_without_the_spec(tmp_path: Path) -> None:
    """1. Run `klaviyo-bridge demo --seconds 2` with the OpenAPI spec made unavailable.
    Result: exit 0; the bridge's own log is shown; the summary covers every customer, backfill vs live,
    the refused key and its queued rows, the webhooks (one forged and refused, one lost) and their latency,
    and a clean SIGTERM; its temporary directory is gone."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "klaviyo_bridge", "demo", "--seconds", "2",
        env=child_env(KLAVIYO_OPENAPI_SPEC=str(tmp_path / "absent.json"), TMPDIR=str(tmp_path)), cwd=str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 50)
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 0, out + err
    assert "bodies checked against hand-written rules" in out
    assert re.search(r"bridge \| \d\d:\d\d:\d\d INFO +daemon: started customers=4", out)
    summary = out.split("\nsummary\n", 1)[1]
    for header in ("101 Aurora Records", "202 Borealis Apparel", "303 Cedar & Sage", "404 Dune Outfitters"):
        assert f"\n{header} — " in summary
    # The merchant with a partial choice: only its two metrics, one under its own name, nothing else recorded.
    dune = summary.split("\n404 Dune Outfitters — ", 1)[1].split("\n\n", 1)[0]
    assert "gets only shipped and delivered" in dune
    assert re.search(r"Order shipped +1 +\d+ +\d+", dune)
    assert re.search(r"Dune: Order delivered +1 +\d+ +\d+", dune)
    assert "Processing order" not in dune
    assert "Order cancelled" not in dune
    assert re.search(r"events +sample +backfill +live", summary)
    assert re.search(r"Order shipped +1 +\d+ +\d+", summary)
    refused = r"refused: +Klaviyo answered 401 to \d+ requests \(key revoked\); [1-9]\d* rows stay queued"
    assert re.search(refused, summary)
    assert "SIGTERM -> exit code 0" in summary
    assert "0 invalid bodies, 0 duplicate events" in summary
    # Webhooks on: one forged (refused in the bridge's log, once), one lost, the rest answered 202 and timed.
    assert re.search(r"webhooks: [1-9]\d* delivered 202, 1 dropped, 1 refused 401", summary)
    assert re.search(r"latency: +webhook arrival -> event recorded in Klaviyo: p50 [\d.]+ s, p95 [\d.]+ s", summary)
    assert len(re.findall(r"bridge \| .*webhook rejected reason=bad_signature status=401", out)) == 1
    assert re.search(r"bridge \| .*webhooks listening on http://127\.0\.0\.1:\d+ path=/whiplash/webhook", out)
    assert not [key for key in DEMO_KEYS if key in out + err]  # the bridge's log masks keys
    assert leftovers(tmp_path) == []


def leftovers(directory: Path) -> list[str]:
    """Return what the demo left in its temporary directory's parent."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("klaviyo-bridge-demo-"))


async def read_banner(stream: asyncio.StreamReader) -> list[str]:
    """Read the sandbox's banner up to its last line."""
    lines: list[str] = []
    while not lines or not lines[-1].startswith("stop with"):
        raw = await asyncio.wait_for(stream.readline(), 20)
        assert raw, "sandbox exited before printing its banner: " + "\n".join(lines)
        lines.append(raw.decode().strip())
    return lines


def banner_value(lines: list[str], pattern: str) -> str:
    """Return the first capture group of the first banner line matching ``pattern``."""
    return next(m[1] for line in lines if (m := re.search(pattern, line)))


async def get_json(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> Any:
    """Make one request and return its JSON body, which must come with a 2xx status."""
    async with http.request(method, url, **kw) as resp:
        assert resp.status < 300, await resp.text()
        return await resp.json(content_type=None)


async def test_sandbox_serves_both_apis_for_curl_and_for_a_real_bridge(tmp_path: Path) -> None:
    """1. Start `klaviyo-bridge sandbox --port 0 --write-config`. 2. Use the printed credentials like the
    printed curl lines do. 3. Run the printed bridge command with --once. 4. SIGTERM the sandbox.
    Result: both APIs answer, the bridge syncs into the simulated Klaviyo, the sandbox exits 0."""
    config = tmp_path / "sandbox.toml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "klaviyo_bridge", "sandbox", "--port", "0", "--write-config", str(config),
        env=child_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        banner = await read_banner(proc.stdout)
        w_url = banner_value(banner, r"^whiplash\s+(http://\S+)")
        k_url = banner_value(banner, r"^klaviyo\s+(http://\S+)")
        key = banner_value(banner, r"^101\s+(\S+)")
        async with aiohttp.ClientSession() as http:
            token = await get_json(http, "POST", f"{w_url}/oauth/token", json={
                "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
            orders = await get_json(http, "GET", f"{w_url}/api/v2/orders", params={
                "search": json.dumps({"customer_id_eq": 101}), "per_page": "5"},
                headers={"Authorization": f"Bearer {token['access_token']}", "X-CUSTOMER-ID": "101"})
            assert [o["customer_id"] for o in orders] == [101] * 5
            lists = await get_json(http, "GET", f"{k_url}/api/lists",
                                   headers={"Authorization": f"Klaviyo-API-Key {key}", "revision": "2026-07-15"})
            assert lists["data"] == []

            command = shlex.split(banner_value(banner, r"^env (.*)$"))
            env = dict(item.split("=", 1) for item in command if "=" in item and not item.startswith("-"))
            run = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "klaviyo_bridge", "run", "--once", "--config", str(config),
                env=child_env(**env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, run_err = await asyncio.wait_for(run.communicate(), 30)
            assert run.returncode == 0, run_err.decode()
            state = await get_json(http, "GET", f"{k_url}/__sim/state")
        assert len(state["accounts"]["101"]["events"]) > 10
        assert state["accounts"]["303"]["counters"]["unauthorized"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    assert b"sandbox stopped" in out
