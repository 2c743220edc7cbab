"""Seeded random-kill soak: the real daemon is SIGKILLed again and again — after random delays, or by a random
failpoint — during a three-customer backfill while orders keep changing and access tokens keep expiring.

Orders change only once the state DB shows the bridge caught up with every current status, so every status
Whiplash shows is one the bridge observes; the expected events are those states replayed through the mapping
core. After each kill, re-sends are bounded by the event rows that were still unmarked at that kill.

It runs twice: polling every second, and with the webhook receiver on (the backstop poll at 30 s, so the polls
between restarts are the ones Whiplash's webhooks wake; webhooks sent while the daemon is dead are lost, as
they would be without the socket unit, and the next poll covers them).

``SOAK_KILLS`` (default 20) and ``SOAK_SEED`` change the size and the run; ``make soak`` runs 200 kills each.
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kit.bridgekit import eventually
from kit.faultkit import Bridge, Ledger, Proc, Sims, assert_delivered_once, caught_up, facts, serve, shops
from kit.hookkit import free_port, hook_sections, receiver_url

from klaviyo_bridge import failpoints
from klaviyo_bridge.sandbox.whiplash import OrderScript

KILLS = int(os.environ.get("SOAK_KILLS", "20"))
SEED = int(os.environ.get("SOAK_SEED", "20260501"))
MERCHANTS = shops(501, 502, 503)


@dataclass
class Soak:
    """The moving parts of one soak run and what it counted."""

    rng: random.Random
    sims: Sims
    bridge: Bridge
    ledger: Ledger
    scripts: list[OrderScript]
    kills: int = 0
    rounds: int = 0
    changes: int = 0
    by_failpoint: dict[str, int] = field(default_factory=dict)
    resends: list[int] = field(default_factory=list)  # per kill: events Klaviyo received twice afterwards

    def change_orders(self) -> None:
        """Move some orders one lifecycle step, add a few, maybe expire tokens — only if the bridge caught up."""
        cids = [shop.cid for shop in MERCHANTS]
        if not caught_up(self.bridge.state_path, self.sims.whiplash, cids):
            return
        for script in self.scripts:
            moved = script.tick(share=0.25)
            born = script.spawn(self.rng.randint(0, 2))
            self.changes += len(moved) + len(born)
        self.ledger.observe_all()
        if self.rng.random() < 0.3:
            self.sims.whiplash.expire_access_tokens()  # the next request refreshes: rotation under fire

    def arm(self) -> str:
        """Return a random failpoint spec for this round, or "" for a kill after a random delay only."""
        if self.rng.random() < 0.5:
            return ""
        point = self.rng.choice(sorted(failpoints.POINTS))
        if point == "during_token_refresh":
            self.sims.whiplash.expire_access_tokens()  # so that a refresh comes at all
            return f"{point}=kill"
        return f"{point}=kill@{self.rng.randint(1, 6)}"

    async def round(self) -> None:
        """Start the daemon, change orders while it runs, kill it; check re-sends against what was in flight."""
        self.rounds += 1
        spec = self.arm()
        pending = sum(facts(self.bridge.state_path).pending_events.values()) if self.bridge.state_path.exists() else 0
        before = self.sims.duplicates()
        async with self.bridge.running(failpoints=spec) as proc:
            code, fired = await self.live(proc)
        assert code == -signal.SIGKILL, f"bridge exited by itself rc={code}; log:\n{proc.log}"
        self.kills += 1
        point = spec.partition("=")[0] if fired else "timer"
        self.by_failpoint[point] = self.by_failpoint.get(point, 0) + 1
        # Re-sends after the previous kill happened in this run: only rows unmarked at that kill can go twice.
        self.resends.append(self.sims.duplicates() - before)
        assert self.resends[-1] <= pending, (self.resends[-1], pending)

    async def live(self, proc: Proc) -> tuple[int, bool]:
        """Let the daemon work for a random time, changing orders half-way; then SIGKILL it.

        Return the exit code and whether the process ended by itself (an armed failpoint fired).
        """
        for _ in range(2):
            code = await proc.exited_within(self.rng.uniform(0.2, 1.6))
            if code is not None:
                return code, True
            self.change_orders()
        return await proc.kill(), False


@pytest.mark.timeout(max(180, KILLS * 8))
@pytest.mark.parametrize("webhooks", [False, True], ids=["polling", "webhooks"])
async def test_random_kills_never_lose_nor_double_an_event(tmp_path: Path, webhooks: bool) -> None:
    """1. Backfill three customers (with webhooks: Whiplash subscribes the receiver to every order event).
    2. SIGKILL the daemon ≥ SOAK_KILLS times at random points while orders change. 3. Expire tokens, run it
    until quiet, stop it with SIGTERM.
    Result: Klaviyo holds exactly the expected events, one profile per email, nothing queued or dead; the DB
    passes integrity_check; the daemon still authenticates with the newest refresh token."""
    rng = random.Random(SEED)
    async with serve(MERCHANTS) as sims:
        scripts = [OrderScript(sims.whiplash, shop.cid, seed=SEED + shop.cid) for shop in MERCHANTS]
        for script in scripts:
            script.backfill(40, days=10)
        ledger = Ledger(sims.whiplash)
        ledger.observe_all()
        sections: dict[str, dict[str, str]] = {}
        if webhooks:
            port = free_port()
            sections = hook_sections(port, poll_s=30.0)
            sims.whiplash.subscribe(receiver_url(port))
        bridge = Bridge(tmp_path, sims, MERCHANTS, sections).write()
        soak = Soak(rng, sims, bridge, ledger, scripts)
        while soak.kills < KILLS:
            await soak.round()
        await quiesce(soak)
        assert_delivered_once(sims, bridge, ledger)
        assert facts(bridge.state_path).refresh_token == sims.whiplash.current_refresh_token
    hooks = sims.whiplash.webhooks.counts
    print(f"soak webhooks={webhooks} seed={SEED} kills={soak.kills} order_changes={soak.changes} "
          f"by={soak.by_failpoint} webhooks_delivered={hooks['delivered']} webhooks_lost={hooks['errors']} "
          f"resends={sum(soak.resends)} max_resends_per_kill={max(soak.resends)} "
          f"events={sum(len(sims.account(shop).events) for shop in MERCHANTS)}")


async def quiesce(soak: Soak) -> None:
    """Run the daemon (fresh tokens forced) until it has caught up and sent everything, then SIGTERM it."""
    soak.sims.whiplash.expire_access_tokens()
    cids = [shop.cid for shop in MERCHANTS]
    path = soak.bridge.state_path
    async with soak.bridge.running() as proc:
        await eventually(lambda: caught_up(path, soak.sims.whiplash, cids) and facts(path).pending_rows == 0,
                         limit_s=60, what="the bridge to catch up and drain")
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait(20) == 0, proc.log
