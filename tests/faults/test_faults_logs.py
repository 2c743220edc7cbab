"""What the real daemon writes, byte for byte, holds no secret and no shopper's data, at any log level.

Logs go to journald and log shippers: many people read them, for months. These tests run the real process
against the simulators through the situations that log the most (token rotations at debug level; a Klaviyo
outage, a refused row and a revoked key at info level) and scan every byte of its output for every value the
simulators know: each token Whiplash issued, each configured secret, each shopper's email, its local part and
its name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from pathlib import Path

import pytest
from kit.faultkit import CLIENT_ID, CLIENT_SECRET, SEED_TOKEN, Bridge, Sims, caught_up, in_process, serve, shops
from kit.hookkit import free_port, hook_sections, receiver_url

from klaviyo_bridge.sandbox.klaviyo import EventMatch, ProfileMatch
from klaviyo_bridge.sandbox.whiplash import FakeWhiplash, OrderScript

A, B, C = shops(951, 952, 953)
TOKEN_TTL_S = 3


def personal_values(sims: Sims) -> set[str]:
    """Return every shopper's email, the local part of it, and names, as the simulators know them."""
    values: set[str] = set()
    for order in sims.whiplash.orders.values():
        for email in filter(None, [order.email, (order.email or "").lower()]):
            values.add(email)
            local = email.split("@", 1)[0]
            if "." in local or len(local) >= 8:  # a person's name.surname; short generic words would match anything
                values.add(local)
        for name in (order.first_name, order.last_name, order.shipping_name):
            if name and len(name) >= 4:
                values.add(name)
    for account in sims.klaviyo.accounts:
        values |= {p.email for p in account.profiles.values() if p.email}
    return values


def leaks(log: str, values: set[str]) -> list[str]:
    """Return the values that appear anywhere in ``log`` (case-insensitively for emails)."""
    lowered = log.lower()
    return sorted(v for v in values if v in log or ("@" in v and v.lower() in lowered))


async def test_debug_level_output_holds_no_token_or_secret(tmp_path: Path) -> None:
    """1. Refresh-token grant, 3-second access tokens, log_level = "debug", two customers backfilling while
    orders keep moving, the webhook receiver on and Whiplash posting signed webhooks (one in five forged); the
    daemon runs until Whiplash has issued tokens several times over. 2. SIGTERM.
    Result: not one issued access or refresh token, the seed, the client secret, a Klaviyo key or a webhook
    signature appears anywhere in the output; webhooks are logged by customer and order only; debug lines are
    the bridge's own (none from aiosqlite or other libraries)."""
    fake = FakeWhiplash(CLIENT_ID, CLIENT_SECRET, refresh_token=SEED_TOKEN, refresh_revoked_on_use=True,
                        token_ttl=TOKEN_TTL_S)
    port = free_port()
    async with serve([A, B], whiplash=fake) as sims:
        scripts = [OrderScript(fake, shop.cid, seed=shop.cid) for shop in (A, B)]
        for script in scripts:
            script.backfill(20, days=5)
        fake.subscribe(receiver_url(port))
        sections = hook_sections(port, poll_s=1.0, bridge={"log_level": '"debug"'})
        bridge = Bridge(tmp_path, sims, [A, B], sections).write()
        async with bridge.running() as proc:
            loop = asyncio.get_running_loop()
            deadline, expired = loop.time() + 40, loop.time() + 2 * TOKEN_TTL_S  # tokens expire under it, too
            while (len(fake.issued_tokens()) < 12 or loop.time() < expired
                   or not caught_up(bridge.state_path, fake, [A.cid, B.cid])):
                assert loop.time() < deadline, proc.log
                for script in scripts:
                    script.spawn(1)
                fake.webhooks.forge_next(1)
                await asyncio.sleep(0.5)
            assert await proc.stop() == 0
        output = proc.log
    issued = fake.issued_tokens()
    assert len(issued) >= 12  # several rotations of both the access and the refresh token
    signatures = {d.signature for d in fake.webhook_deliveries if d.signature}
    assert len(signatures) >= 10
    secrets = {*issued, *signatures, SEED_TOKEN, CLIENT_SECRET, A.key, B.key}
    assert [s for s in secrets if s in output] == []
    assert re.search(r"webhook accepted customer=\d+ order=\d+", output)
    assert "webhook rejected reason=bad_signature" in output
    assert leaks(output, personal_values(sims)) == []
    debug = [line for line in output.splitlines() if " DEBUG " in line]
    assert debug, "log_level = debug must show the bridge's own debug lines"
    assert all(" klaviyo_bridge." in line for line in debug), [d for d in debug if " klaviyo_bridge." not in d][:3]
    assert "aiosqlite" not in output
    assert "Traceback" not in output


async def test_info_level_output_names_customers_and_orders_not_shoppers(tmp_path: Path) -> None:
    """1. Klaviyo refuses one of A's events and one of its profiles (400: dead letters), B's Klaviyo answers 503
    to everything (an
    outage), C's key is revoked. 2. The daemon runs at log_level = "info" until all three are in the log.
    3. SIGTERM. Result: the dead letter, the outage and the refused key are logged (by customer, order and
    profile reference), but no shopper's email, its local part or a name appears anywhere in the output."""
    async with serve([A, B, C]) as sims:
        for shop in (A, B, C):
            script = OrderScript(sims.whiplash, shop.cid, seed=shop.cid + 7)
            script.backfill(12, days=5)
            script.spawn(6)
        a_orders = sorted((o for o in sims.whiplash.orders.values() if o.customer_id == A.cid), key=lambda o: o.id)
        sims.klaviyo.reject_event_if(EventMatch(unique_id=f"{a_orders[-1].id}:processing"))
        shopper = next(o.email for o in a_orders if o.email)
        sims.klaviyo.reject_profile_if(ProfileMatch(email=shopper))
        sims.klaviyo.fail_next(10_000, 503, account=B.label)
        sims.klaviyo.revoke(C.key)
        bridge = Bridge(tmp_path, sims, [A, B, C]).write()
        async with bridge.running() as proc:
            await proc.wait_for_line(rf"klaviyo refused row customer={A.cid} order=\d+ kind=event", 30)
            await proc.wait_for_line(rf"klaviyo refused row customer={A.cid} order=- kind=profile profile=\w{{10}} ",
                                     30)
            await proc.wait_for_line(rf"klaviyo errors started customer={B.cid} status=503", 30)
            await proc.wait_for_line(rf"klaviyo key refused customer={C.cid}", 30)
            status = {row["customer_id"]: row for row in json.loads(await bridge_status(bridge))}
            assert await proc.stop() == 0
        output = proc.log
        values = personal_values(sims)
    # The storm shows in status (not "ok" with no error, as a refused key would not either).
    assert status[B.cid]["klaviyo"].startswith("failing")
    assert status[B.cid]["last_error"].startswith("klaviyo 503")
    assert status[C.cid]["key"] == "REFUSED"
    assert len(values) > 20
    assert leaks(output, values) == []
    assert "Traceback" not in output


async def bridge_status(bridge: Bridge) -> str:
    """Return ``klaviyo-bridge status --json`` for the bridge's config (no secret in its environment)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "klaviyo_bridge", "status", "--json", "--config", str(bridge.config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(bridge.tmp),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode in (0, 2), err.decode()
    return out.decode()


async def test_a_refused_key_is_never_quiet(tmp_path: Path) -> None:
    """1. A's key is revoked; key_probe_seconds = 1. The daemon runs 3.5 s. Result: one ERROR when first refused,
    then a WARNING at each failed probe (about one a second, not one per request). 2. Restart with the key still
    refused. Result: the refusal is logged again at start, as a WARNING ("still refused")."""
    async with serve([A]) as sims:
        OrderScript(sims.whiplash, A.cid, seed=3).backfill(10, days=3)
        sims.klaviyo.revoke(A.key)
        bridge = Bridge(tmp_path, sims, [A]).write()
        async with bridge.running() as proc:
            await proc.wait_for_line(rf"ERROR .*klaviyo key refused customer={A.cid}", 20)
            await asyncio.sleep(3.5)
            assert await proc.stop() == 0
        first = [line for line in proc.log.splitlines() if "klaviyo key" in line]
        async with bridge.running() as again:
            await again.wait_for_line(rf"WARNING .*klaviyo key still refused customer={A.cid}", 20)
            assert await again.stop() == 0
    assert " ERROR " in first[0]
    still = [line for line in first[1:] if "still refused" in line]
    assert 2 <= len(still) <= 5, first
    assert all(" WARNING " in line and "action=" in line for line in still)


async def test_the_cycle_line_appears_only_when_something_happened(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """1. A backfill is read and delivered. Result: cycle lines with newly_queued= and sent=. 2. Three more
    cycles with nothing new (each re-reads the overlap window). Result: no cycle line at all."""
    caplog.set_level(logging.INFO, logger="klaviyo_bridge")
    async with serve([A]) as sims:
        OrderScript(sims.whiplash, A.cid, seed=11).backfill(15, days=2)
        bridge = Bridge(tmp_path, sims, [A], {"whiplash": {"overlap_seconds": "86400"}}).write()
        async with in_process(bridge) as run:
            await run.drain()
            busy = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cycle ")]
            assert busy
            assert re.search(r"newly_queued=[1-9]\d* sent=", busy[0])
            caplog.clear()
            for _ in range(3):
                await run.cycle()
            assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("cycle ")] == []
